"""How often does a two-process gloo run abort at its very end? ``barrier + destroy`` against ``common.distributed.shutdown``.

Each run is a fresh ``torchrun --standalone --nproc_per_node=2`` of :func:`worker`: a small DDP network, three
backward passes, a barrier, then the ending under test. A run fails when torchrun exits non-zero (a rank
dies with SIGABRT, ``terminate called without an active exception``). Load the machine while it runs
(the failure is a race; CI runs two test workers at once)::

    python -m experiments.ddp_teardown --runs 60 --mode plain      # barrier + destroy_process_group
    python -m experiments.ddp_teardown --runs 60 --mode shutdown   # what every multi_gpu_train.json ends with
"""

from __future__ import annotations

import os
import subprocess
import sys

from experiments.runner import ROOT

MODES = ("plain", "shutdown")


def worker(mode: str = "shutdown") -> None:
    """(internal, one torchrun rank) DDP steps, a barrier, then the ending ``mode``."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv3d(1, 4, 3))
    x = torch.randn(2, 1, 8, 16, 16)
    for _ in range(3):
        net(x).mean().backward()
    rank = dist.get_rank()
    print(f"rank {rank}: steps done", flush=True)
    if mode == "plain":
        dist.barrier()
        dist.destroy_process_group()
    else:
        from common.distributed import shutdown

        shutdown()
    print(f"rank {rank}: group ended; the interpreter exits next", flush=True)


def main(runs: int = 60, mode: str = "shutdown", timeout: int = 120) -> dict:
    """Run ``runs`` fresh two-process jobs ending with ``mode``; print and return how many failed."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    failed = []
    for i in range(int(runs)):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "experiments.ddp_teardown", "worker", "--mode", mode],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            out = p.stdout + p.stderr
            why = "SIGABRT" if "SIGABRT" in out else f"exit {p.returncode}"
            failed.append(i)
            print(f"run {i}: failed ({why}); its ranks said:", flush=True)
            print("\n".join(ln for ln in out.splitlines() if not ln.startswith(("W1", "E1", "*", "  ")))[-3000:], flush=True)
    res = {"mode": mode, "runs": int(runs), "failed": len(failed), "failed_runs": failed}
    print(f"{mode}: {len(failed)} of {runs} runs failed", flush=True)
    return res


if __name__ == "__main__":
    from common.cli import strict_fire

    if sys.argv[1:2] != ["worker"]:
        strict_fire(main, serialize=lambda _: None)
    else:  # one torchrun rank
        strict_fire(worker, argv=sys.argv[2:])

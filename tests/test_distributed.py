"""common.distributed.shutdown: the ending of every multi_gpu_train.json (no rank aborts in gloo's teardown)."""

import glob
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch.distributed as dist

from common.distributed import _count_to, shutdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shutdown_without_a_process_group_does_nothing():
    assert not dist.is_initialized()
    assert shutdown() is False


def test_count_to_waits_for_every_rank_round_after_round():
    store = dist.HashStore()
    done = []

    def rank(r):
        for round_ in range(3):  # reusable: the same key serves several endings in one job
            _count_to(store, "k", 3, timeout_s=20)
            done.append((round_, r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == [(i, r) for i in range(3) for r in range(3)]
    assert store.add("k", 0) == 9
    # no rank leaves a round before all have entered it: round i ends only after the 3 entries of round i
    first_of_round_1 = done.index(next(d for d in done if d[0] == 1))
    assert all(d[0] == 0 for d in done[:3]) and first_of_round_1 >= 3


def test_count_to_names_the_missing_ranks_after_its_timeout():
    store = dist.HashStore()
    with pytest.raises(TimeoutError, match=r"only 1 of 2 ranks reached 'k' within 0 s; check the other ranks"):
        _count_to(store, "k", 2, timeout_s=0.2)


_WORKER = """
import os, sys, torch, torch.distributed as dist
from common.distributed import shutdown
rank, ports = int(sys.argv[1]), sys.argv[2:]
for port in ports:  # twice in one process: nothing of the first group is left to disturb the second
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv3d(1, 2, 3))
    net(torch.randn(1, 1, 6, 6, 6)).mean().backward()
    assert shutdown() is True and not dist.is_initialized()
print("ended", rank)
"""


def test_two_real_processes_end_cleanly_with_the_store_in_rank_0():
    """Real gloo, two processes, the store hosted by rank 0 (``tcp://``): both end with status 0, twice."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(str(s.getsockname()[1]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), *ports], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ended {r}" in out, out[-2000:]


def test_every_multi_gpu_config_ends_with_the_shutdown():
    files = sorted(glob.glob(os.path.join(ROOT, "bundles", "*", "configs", "multi_gpu_train.json")))
    assert len(files) == 5
    for f in files:
        with open(f) as fh:
            assert json.load(fh)["finalize"] == ["$common.distributed.shutdown()"], f

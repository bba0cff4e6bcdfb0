"""Helpers for the distribution tests (packaging/download, MONAI Label): which bundles can be exercised,
tiny copies of them with random weights, sample inputs made from their metadata, loopback servers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import numpy as np
import torch
from monai.bundle import ConfigParser

from zoo_testing import BUNDLES, ROOT, TINY, TINY_TRAIN

ALL = sorted(b for b in os.listdir(BUNDLES) if os.path.isfile(os.path.join(BUNDLES, b, "configs", "metadata.json")))
INFERENCE_KEYS = ("network_def", "preprocessing", "inferer", "postprocessing", "dataset_dir", "output_dir")


def metadata(bundle: str, root: str = BUNDLES) -> dict:
    with open(os.path.join(root, bundle, "configs", "metadata.json")) as f:
        return json.load(f)


def unusable_reason(bundle: str) -> str | None:
    """Why a bundle cannot be run by these tests (None when it can)."""
    root = os.path.join(BUNDLES, bundle)
    path = os.path.join(root, "configs", "inference.json")
    if not os.path.isfile(path):
        return f"{bundle}: no configs/inference.json"
    try:
        with open(path) as f:
            cfg = json.load(f)
        meta = metadata(bundle)
    except (OSError, json.JSONDecodeError) as e:
        return f"{bundle}: unreadable config ({e})"
    missing = [k for k in INFERENCE_KEYS if k not in cfg]
    if missing:
        return f"{bundle}: inference.json lacks {missing}"
    inp = next(iter(meta.get("network_data_format", {}).get("inputs", {}).values()), {})
    if not inp.get("spatial_shape") or not inp.get("num_channels"):
        return f"{bundle}: metadata.json has no input spatial_shape/num_channels"
    if bundle not in TINY:
        return f"{bundle}: no tests/tiny/{bundle}.json (tiny network overrides for CPU tests)"
    return None


def input_spec(bundle: str, root: str = BUNDLES) -> tuple[int, int]:
    """``(spatial_dims, channels)`` of a bundle's input."""
    inp = next(iter(metadata(bundle, root)["network_data_format"]["inputs"].values()))
    return len(inp["spatial_shape"]), int(inp["num_channels"])


def sample_image(bundle: str, seed: int = 0, root: str = BUNDLES) -> tuple[np.ndarray, str, tuple]:
    """A random input of odd size for a bundle: ``(array, axes, spacing_um)``."""
    dims, channels = input_spec(bundle, root)
    rng = np.random.default_rng(seed)
    shape, spacing = ((13, 45, 52), (0.4, 0.3, 0.3)) if dims == 3 else ((75, 90), (0.65, 0.65))
    arr = rng.random((channels, *shape)).astype(np.float32) * 1000 + 100
    axes = "C" + "ZYX"[-dims:]
    if channels == 1:
        arr, axes = arr[0], axes[1:]
    return arr, axes, spacing


def blob_instances(shape, seed: int = 0, n: int = 6) -> np.ndarray:
    """Instance labels of ``n`` separated round blobs (uint16)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lab = np.zeros(shape, np.uint16)
    r = max(2.0, min(shape[-2:]) / 9)
    for i in range(1, n + 1):
        c = [rng.uniform(r, s - r) if s > 2 * r else s / 2 for s in shape]
        d2 = sum(((g - ci) / (r if s > 2 * r else max(1.0, s / 2))) ** 2 for g, ci, s in zip(grids, c, shape))
        lab[(d2 <= 1) & (lab == 0)] = i
    return lab


def training_label(bundle: str, kind: str, shape, seed: int = 0) -> np.ndarray:
    """A label an annotator would save for ``bundle``: the target stain for virtual staining, otherwise
    what the bundle's train.json takes (binary nucleus mask, instance labels, or the 3-class map)."""
    if kind == "image":
        return np.random.default_rng(seed + 100).random(shape).astype(np.float32)
    inst = blob_instances(shape, seed)
    if bundle == "isl_nucleus_seg":
        return (inst > 0).astype(np.uint8)
    if bundle == "unet3d_fucci":  # background 0 / edge 1 / nucleus 2
        from scipy import ndimage

        fg = inst > 0
        interior = ndimage.binary_erosion(fg)
        return np.where(interior, 2, np.where(fg, 1, 0)).astype(np.uint8)
    return inst


def make_copy(bundle: str, dest_dir: str, bake_tiny: bool, seed: int = 0) -> str:
    """Copy a bundle (configs, docs, LICENSE, scripts) to ``dest_dir/<bundle>`` with random weights in
    ``models/model.pt`` for its network with the tiny overrides, and its record ``models/model.json`` (the
    network, and the input channels the metadata describes). ``bake_tiny`` writes the tiny network
    overrides into the copied inference.json/train.json (MONAI Label reads the files as they are)."""
    src = os.path.join(BUNDLES, bundle)
    dst = os.path.join(dest_dir, bundle)
    os.makedirs(os.path.join(dst, "models"), exist_ok=True)
    for part in ("configs", "docs", "scripts"):
        if os.path.isdir(os.path.join(src, part)):
            shutil.copytree(os.path.join(src, part), os.path.join(dst, part),
                            ignore=shutil.ignore_patterns("__pycache__", "monailabel_train.json"))
    if not os.path.isfile(os.path.join(dst, "docs", "README.md")):  # bundle still being written: layout tests flag it
        os.makedirs(os.path.join(dst, "docs"), exist_ok=True)
        with open(os.path.join(dst, "docs", "README.md"), "w") as f:
            f.write(f"# {bundle}\n")
    shutil.copy(os.path.join(ROOT, "LICENSE"), os.path.join(dst, "LICENSE"))
    tiny = dict(TINY.get(bundle, {}))
    parser = ConfigParser()
    parser.read_config(os.path.join(dst, "configs", "inference.json"))
    settings = {}
    if "in_channels" in parser.config:  # the input the metadata describes (the shipped model's), not the default
        settings["in_channels"] = tiny.setdefault("in_channels", input_spec(bundle, dest_dir)[1])
    for k, v in tiny.items():
        parser[k] = v
    if bake_tiny:
        ConfigParser.export_config_file(parser.config, os.path.join(dst, "configs", "inference.json"), indent=4)
        train = os.path.join(dst, "configs", "train.json")
        if os.path.isfile(train):
            tp = ConfigParser()
            tp.read_config(train)
            for k, v in tiny.items():
                tp[k] = v
            ConfigParser.export_config_file(tp.config, train, indent=4)
    parser["bundle_root"] = dst
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), os.path.join(dst, "models", "model.pt"))
    from common.networks.record import write_record

    write_record(os.path.join(dst, "models", "model.pt"), net, settings)  # what training writes beside the weights
    return dst


def tiny_train_overrides(bundles) -> dict:
    return {b: dict(TINY_TRAIN.get(b, {})) for b in bundles}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, log_path: str | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log) when ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log = open(log_path).read()[-5000:] if log_path and os.path.exists(log_path) else ""
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}\n{log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop_process_tree(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server we started (and the workers it started), by pid."""
    if proc.poll() is not None:
        return
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or process gone
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    for c in children:
        try:
            c.kill()
        except Exception:
            pass


# A driver run in a fresh interpreter: runs several bundles' inference configs one after the other
# (one interpreter start instead of one per bundle) and records which `common` each one used.
DRIVER = r'''
import json, os, sys
jobs = json.load(open(sys.argv[1]))
from monai.bundle import run
report = []
for job in jobs:
    for m in [m for m in list(sys.modules) if m == "common" or m.startswith("common.")]:
        del sys.modules[m]
    if job.get("path"):
        sys.path.insert(0, job["path"])  # what `cd <bundle> && python -m monai.bundle run` does
    import common
    report.append({"bundle": job["bundle"], "common": os.path.abspath(common.__file__), "sys_path": list(sys.path)})
    run(config_file=job["config"], **job["overrides"])
    if job.get("path"):
        sys.path.remove(job["path"])
json.dump(report, open(sys.argv[2], "w"))
'''


def start_driver(jobs: list, work: str, env: dict, python_args=(), cwd=None) -> dict:
    """Start :data:`DRIVER` on ``jobs`` in a fresh interpreter (returns at once; see :func:`finish_driver`)."""
    import sys

    os.makedirs(work, exist_ok=True)
    jobs_path, report_path, script, log = (os.path.join(work, n) for n in ("jobs.json", "report.json", "driver.py",
                                                                           "driver.log"))
    with open(jobs_path, "w") as f:
        json.dump(jobs, f)
    with open(script, "w") as f:
        f.write(DRIVER)
    proc = subprocess.Popen([sys.executable, *python_args, script, jobs_path, report_path], cwd=cwd or work, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return {"proc": proc, "report": report_path, "log": log}


def finish_driver(handle: dict, timeout: int = 900) -> list:
    """Wait for a driver; its report (which ``common`` each bundle used), or an error with its log."""
    proc = handle["proc"]
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_tree(proc)
        raise
    if proc.returncode != 0:
        raise AssertionError(f"driver failed ({proc.returncode}):\n{open(handle['log']).read()[-8000:]}")
    with open(handle["report"]) as f:
        return json.load(f)


def run_driver(jobs: list, work: str, env: dict, python_args=(), cwd=None, timeout: int = 900) -> list:
    return finish_driver(start_driver(jobs, work, env, python_args, cwd), timeout)

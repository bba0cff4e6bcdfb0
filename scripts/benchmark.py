"""Throughput, memory and scaling of the zoo's hot paths, each optimised path next to its reference.

    python scripts/benchmark.py                         # profile "auto": "full" on a GPU, "small" on a CPU
    python scripts/benchmark.py --profile full          # the issue's sizes (hours on a 2-core CPU)
    python scripts/benchmark.py --profile small         # a quarter of the compute; under 10 min on 2 cores
    python scripts/benchmark.py --profile quick         # seconds; what the tests run
    python scripts/benchmark.py --only fnet_train,fnet_infer --threads 2 --out bench.json
    python scripts/benchmark.py quality                 # bf16 vs fp32: validation Pearson r after N steps
    python scripts/benchmark.py profile --batch 4       # torch.profiler of one training step, ref and opt

The reference ("ref") is the network run the way pytorch_fnet runs it: eager PyTorch, float32,
contiguous tensors, F-net sliding windows of 32x64x64 with 25 % overlap (pytorch_fnet predicts
whole volumes at once, which does not fit in memory at 1x64x512x512: the "whole" rows of the
scaling table show how that memory grows). The optimised path ("opt") is what the bundle's config
switches turn on (``common.fastpath``): bf16 autocast on CPU (AMP on GPU), channels-last memory
format, BatchNorm folded into convolutions, larger sliding windows with the same 16-voxel
overlap, optionally ``torch.compile``.

Method: every timed call is preceded by warm-up calls; reference and optimised runs are
interleaved (A B A B ...) so that both see the same machine load; times are medians. Volume
inference runs in a fresh child process per measurement, so that its peak RSS (``ru_maxrss``) is
its own. In-process rows give the peak RSS sampled during that call. The load average is printed
with the table: on a shared machine re-run it idle before quoting absolute numbers.

Sections (``--only``): fnet_train, fnet_infer, scaling, densenet2d, unet3d, loader, ddp, peer, and ttq (time to
a good model, :mod:`experiments.time_to_quality`; opt-in: 30 to 40 min per seed on 2 cores).
Networks whose module does not exist yet are skipped with a printed reason.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # children get it as PYTHONPATH

SECTIONS = ("fnet_train", "fnet_infer", "scaling", "densenet2d", "unet3d", "loader", "ddp", "peer", "ttq")
#: sections left out of the default run (name them in ``--only``): their time does not fit in 10 minutes
OPT_IN = {"ttq": "time to a good model: 30 to 40 min per seed on 2 cores (python -m experiments.time_to_quality)"}

# ------------------------------------------------------------------------------------- profiles

_FNET_SW_REF = {"roi": (32, 64, 64), "sw_batch": 4, "overlap": 0.25}  # the bundle's (and pytorch_fnet's) patch
_FNET_SW_OPT = {"roi": (64, 128, 128), "sw_batch": 1, "overlap": 0.125}  # same 16-voxel overlap in Y/X

PROFILES = {
    # the issue's sizes: F-net as published, batch 4 and 24, 1x64x512x512, DenseNet-121 U-Net at 1024^2,
    # the FUCCI 3D U-Net at 21x512x512
    "full": {
        "fnet": {"mult_chan": 32, "depth": 4},
        "train_patch": (32, 64, 64), "train_batches": (4, 24), "train_repeats": {4: 3, 24: 2},
        "sw_volume": (64, 512, 512), "sw_ref": _FNET_SW_REF, "sw_opt": _FNET_SW_OPT,
        "scaling": ((64, 128, 128), (64, 256, 256), (64, 512, 512), (64, 1024, 1024)),
        "whole_max_voxels": 64 * 256 * 256,
        "densenet": {"kwargs": {}, "in_channels": 3, "image": (1024, 1024), "train_batch": 1, "repeats": 3},
        "unet3d": {"kwargs": {"in_channels": 1, "out_channels": 3, "features": (64, 128, 256)},
                   "volume": (21, 512, 512), "ref": {"roi": (24, 128, 128), "sw_batch": 4, "overlap": 0.25},
                   "opt": {"roi": (24, 192, 192), "sw_batch": 1, "overlap": 0.125}},
        "loader": {"n_volumes": 2, "shape": (64, 256, 256), "batch": 4, "n_batches": 25, "workers": (0, 2)},
        "ddp": {"batch": 4, "steps": 3, "mult_chan": 16},
        "compile_infer": True,
    },
    # the same code paths at about a quarter of the compute (F-net with 16 channels, smaller volumes)
    "small": {
        "fnet": {"mult_chan": 16, "depth": 4},
        "train_patch": (32, 64, 64), "train_batches": (4,), "train_repeats": {4: 3},
        "sw_volume": (64, 256, 256), "sw_ref": _FNET_SW_REF, "sw_opt": _FNET_SW_OPT,
        "scaling": ((64, 128, 128), (64, 256, 256), (64, 384, 384), (64, 512, 512)),
        "whole_max_voxels": 64 * 256 * 256,
        "densenet": {"kwargs": {"init_features": 32, "growth_rate": 16, "decoder_channels": (128, 64, 32, 16, 8)},
                     "in_channels": 3, "image": (512, 512), "train_batch": 1, "repeats": 3},
        "unet3d": {"kwargs": {"in_channels": 1, "out_channels": 3, "features": (16, 32, 64)},
                   "volume": (21, 256, 256), "ref": {"roi": (24, 128, 128), "sw_batch": 4, "overlap": 0.25},
                   "opt": {"roi": (24, 192, 192), "sw_batch": 1, "overlap": 0.125}},
        "loader": {"n_volumes": 2, "shape": (48, 160, 160), "batch": 4, "n_batches": 25, "workers": (0, 2)},
        "ddp": {"batch": 4, "steps": 3, "mult_chan": 8},
        "compile_infer": False,
    },
    # tiny networks and volumes: every code path in well under a minute (tests)
    "quick": {
        "fnet": {"mult_chan": 4, "depth": 2},
        "train_patch": (16, 32, 32), "train_batches": (2,), "train_repeats": {2: 2},
        "sw_volume": (16, 64, 64), "sw_ref": {"roi": (16, 32, 32), "sw_batch": 2, "overlap": 0.25},
        "sw_opt": {"roi": (16, 64, 64), "sw_batch": 1, "overlap": 0.125},
        "scaling": ((16, 32, 32), (16, 64, 64), (16, 64, 128), (16, 128, 128)),
        "whole_max_voxels": 16 * 64 * 64,
        "densenet": {"kwargs": {"init_features": 8, "growth_rate": 4, "block_config": (2, 2, 2, 2),
                                "decoder_channels": (32, 16, 8, 8, 4)},
                     "in_channels": 3, "image": (64, 64), "train_batch": 1, "repeats": 2},
        "unet3d": {"kwargs": {"in_channels": 1, "out_channels": 3, "features": (4, 8, 16)},
                   "volume": (12, 64, 64), "ref": {"roi": (12, 32, 32), "sw_batch": 2, "overlap": 0.25},
                   "opt": {"roi": (12, 64, 64), "sw_batch": 1, "overlap": 0.125}},
        "loader": {"n_volumes": 2, "shape": (16, 64, 64), "batch": 2, "n_batches": 8, "workers": (0,)},
        "ddp": {"batch": 2, "steps": 2, "mult_chan": 4, "depth": 2, "patch": (16, 32, 32)},
        "compile_infer": False,
    },
}

# dense bf16/fp16 tensor peak (TFLOP/s) of common cards, to state GPU throughput as a fraction of peak
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "V100": 125.0, "T4": 65.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


# ------------------------------------------------------------------------------------- helpers

def _log(msg: str) -> None:
    print(msg, flush=True)


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))


def _rss_now_mib() -> float:
    """Current resident set size in MiB (/proc on Linux; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        from common.fastpath import peak_rss_mib

        return peak_rss_mib()


class RssSampler:
    """Peak RSS (MiB) of this process during a ``with`` block, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_now_mib())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = _rss_now_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_now_mib())


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def interleave(fns: dict[str, Callable[[], None]], warmup: int, repeats: int, device="cpu") -> dict[str, dict]:
    """Time each callable ``repeats`` times, in the order A B A B ..., after ``warmup`` calls each.

    Returns ``{name: {"times": [...], "median": s, "rss": peak MiB during the timed calls}}``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            _sync(device)
    out = {k: {"times": [], "rss": 0.0} for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            with RssSampler() as s:
                t = time.perf_counter()
                fn()
                _sync(device)
                dt = time.perf_counter() - t
            out[k]["times"].append(dt)
            out[k]["rss"] = max(out[k]["rss"], s.peak)
    for v in out.values():
        v["median"] = statistics.median(v["times"])
    return out


def _loadavg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def _gpu_peak(name: str) -> float | None:
    for key, val in GPU_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return val
    return None


def _flops(fn: Callable[[], None]) -> float:
    """Floating-point operations of one call (``torch.utils.flop_counter``: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def _parse_list(value, cast=str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v) for v in str(value).replace(" ", "").split(",") if v]


def _row(section, path, size, time_s, voxels=None, ratio=None, rss=None, note="", **extra) -> dict:
    r = {"section": section, "path": path, "size": size, "time_s": time_s,
         "voxels_per_s": (voxels / time_s) if (voxels and time_s) else None,
         "ratio_vs_ref": ratio, "peak_rss_mib": rss, "note": note}
    r.update(extra)
    return r


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return format(v, spec)


def format_table(rows: list[dict]) -> str:
    """The Markdown table printed at the end (and written to ``docs/performance.md`` by hand)."""
    cols = ["section", "path", "size", "time (s)", "Mvox/s", "x ref", "peak RSS (MiB)", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for r in rows:
        vps = r.get("voxels_per_s")
        cells = [r["section"], r["path"], r["size"], _fmt(r.get("time_s"), ".3f"),
                 _fmt(vps / 1e6 if vps else None, ".3f"), _fmt(r.get("ratio_vs_ref"), ".2f"),
                 _fmt(r.get("peak_rss_mib"), ".0f"), r.get("note", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


# ------------------------------------------------------------------------------------- networks

def build_network(kind: str, kwargs: dict, seed: int = 0):
    """``fnet`` (common.networks.fnet.FNet), ``densenet`` (DenseNetUNet) or ``unet3d`` (UNet3D)."""
    import torch

    torch.manual_seed(seed)
    if kind == "fnet":
        from common.networks.fnet import FNet

        net = FNet(spatial_dims=3, in_channels=1, out_channels=1, **kwargs)
    elif kind == "densenet":
        from common.networks.densenet_unet import DenseNetUNet

        net = DenseNetUNet(spatial_dims=2, **kwargs)
    elif kind == "unet3d":
        from common.networks.unet3d import UNet3D

        net = UNet3D(**kwargs)
    else:
        raise ValueError(f"unknown network kind {kind!r} (fnet, densenet, unet3d)")
    # He initialisation (outputs that vary, so that the Pearson r of an optimised output with the
    # reference measures rounding, not a near-constant output) and realistic BatchNorm statistics (as
    # after training), so that eval mode and folding are exercised
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


def train_step_fn(net, x, y, bf16: bool, channels_last: bool, device) -> Callable[[], None]:
    """One training step (forward, MSE loss in fp32, backward, Adam) as train.json runs it."""
    import torch

    from common.fastpath import FastSimpleInferer, set_memory_format

    set_memory_format(net, channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    inferer = FastSimpleInferer(bf16_cpu=bf16, bf16_cuda=bf16, channels_last=channels_last)
    loss_fn = torch.nn.MSELoss()
    net.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(inferer(x, net), y)
        loss.backward()
        opt.step()

    return step


# ------------------------------------------------------------------------------------- sections

#: training variants of ``fnet_train``: (bf16 autocast, channels-last, reuse_memory); "opt" is every fast
#: path (``--bf16_cpu true`` plus the defaults channels-last and reuse_memory), "ref" pytorch_fnet's way
TRAIN_VARIANTS = {"ref": (False, False, False), "opt": (True, True, True)}
TRAIN_ABLATION = {"bf16 only": (True, False, False), "channels_last only": (False, True, False),
                  "reuse_memory only": (False, False, True), "bf16 + channels_last (glibc's malloc defaults)": (True, True, False)}


#: warm-up steps of every training child (at least): the second step of a fresh process still grows
#: the heap (Adam's state exists from the first step on), so it ran 5 % above the steady state of the
#: bf16 path (672 and 643 ms against about 615 ms from the third step on; eager fp32 1 to 2 %)
TRAIN_WARMUP = 2


def interleave_children(specs: dict[str, dict], warmup: int, repeats: int) -> dict[str, dict]:
    """:func:`interleave` for training steps that must each run in a fresh process (``reuse_memory`` is
    process-wide): ``repeats`` rounds A B A B ..., each child ``max(warmup, TRAIN_WARMUP)`` steps then
    one timed step.

    Returns ``{name: {"times": [...], "median": s, "rss": peak MiB of the children}}``."""
    out = {k: {"times": [], "rss": 0.0} for k in specs}
    for _ in range(repeats):
        for k, spec in specs.items():
            r = _child(dict(spec, kind="train", warmup=max(int(warmup), TRAIN_WARMUP), steps=1))
            out[k]["times"] += r["times"]
            out[k]["rss"] = max(out[k]["rss"], r["peak_rss_mib"])
            out[k].update({key: r[key] for key in ("compile_s",) if r.get(key) is not None})
    for v in out.values():
        v["median"] = statistics.median(v["times"])
    return out


def train_child(s: dict) -> dict:
    """(internal) Training steps in this fresh process: ``s["path"]`` ``ours`` (:func:`train_step_fn` with
    ``bf16``/``channels_last``, ``reuse_memory`` applied first) or ``peer`` (pytorch_fnet's
    ``Model.train_on_batch``); seeded random patches of ``s["batch"]`` x ``s["patch"]``."""
    import torch

    from common.fastpath import peak_rss_mib, reuse_freed_memory

    _set_threads(s.get("threads"))
    reuse_freed_memory(s.get("reuse_memory", False))
    device = torch.device(s.get("device", "cpu"))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(s["batch"], 1, *s["patch"], generator=g).to(device)
    y = torch.randn(s["batch"], 1, *s["patch"], generator=g).to(device)
    compile_s = None
    if s["path"] == "peer":
        model = peer_model(s["peer_path"], s["net_kwargs"])

        def step():
            model.train_on_batch(x, y)
    else:
        net = build_network("fnet", s["net_kwargs"]).to(device)
        if s.get("compile"):
            from common.fastpath import set_memory_format

            set_memory_format(net, s["channels_last"])
            net = torch.compile(net)
        step = train_step_fn(net, x, y, s["bf16"], s["channels_last"], device)
        if s.get("compile"):
            t = time.perf_counter()
            step()
            _sync(device)
            compile_s = time.perf_counter() - t
    for _ in range(int(s.get("warmup", 1))):
        step()
        _sync(device)
    times = []
    for _ in range(int(s.get("steps", 1))):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"times": times, "peak_rss_mib": peak_rss_mib(), "compile_s": compile_s}


def section_fnet_train(p: dict, device, threads, rows: list, warmup: int, ablation: bool, compile_train: bool) -> None:
    import torch

    for b in p["train_batches"]:
        variants = dict(TRAIN_VARIANTS, **(TRAIN_ABLATION if ablation else {}))
        base = {"net_kwargs": p["fnet"], "batch": b, "patch": list(p["train_patch"]), "threads": threads,
                "device": str(device), "path": "ours"}
        specs = {name: dict(base, bf16=bf16, channels_last=cl, reuse_memory=reuse)
                 for name, (bf16, cl, reuse) in variants.items()}
        if compile_train:
            specs["opt + compile"] = dict(specs["opt"], compile=True)
        x = torch.randn(b, 1, *p["train_patch"], device=device)
        flops = _flops(train_step_fn(build_network("fnet", p["fnet"]).to(device), x, x, False, False, device))
        reps = p["train_repeats"].get(b, 3)
        _log(f"  fnet_train batch {b}: {len(specs)} variants x {reps} rounds of a fresh process "
             f"({max(int(warmup), TRAIN_WARMUP)} warm-up + 1 timed step), interleaved")
        res = interleave_children(specs, warmup, reps)
        vox = b * int(np.prod(p["train_patch"]))
        ref_t = res["ref"]["median"]
        for name, r in res.items():
            note = f"{b / r['median']:.2f} patches/s; {flops / r['median'] / 1e9:.1f} GFLOP/s"
            if r.get("compile_s") is not None:
                note += f"; compile + first step {r['compile_s']:.0f} s"
            rows.append(_row("fnet_train", name, f"b{b} x {_shape_str(p['train_patch'])}", r["median"], vox,
                             ref_t / r["median"], r["rss"], note, batch=b, patches_per_s=b / r["median"],
                             flops=flops, times=r["times"]))
            _log("    " + format_table(rows[-1:]).splitlines()[-1])


def _child(spec: dict, timeout: int = 3600) -> dict:
    """Run one volume-inference measurement in a fresh process (spec as JSON on its stdin); returns its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "child", "--spec", "stdin"]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(f"benchmark child failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def child(spec: str) -> None:
    """(internal) One inference measurement: build, warm up, run once, report time and peak RSS."""
    import torch

    from common.cli import json_spec
    from common.fastpath import FastSlidingWindowInferer, peak_rss_mib, reuse_freed_memory

    s = json_spec(spec)
    if s.get("kind") == "train":
        print("BENCH_RESULT " + json.dumps(train_child(s)), flush=True)
        return
    _set_threads(s.get("threads"))
    # the bundles' default (reuse_memory: true, tied to fast at inference) for the optimised and bundle paths;
    # the reference, the whole-volume and the peer's paths keep glibc's defaults, as their own code runs
    reuse_freed_memory(s.get("reuse_memory", s["path"].startswith("opt") or (s["path"] == "bundle" and s.get("fast"))))
    device = torch.device(s.get("device", "cpu"))
    net = build_network(s["net"], s["net_kwargs"], seed=s.get("seed", 0)).to(device).eval()
    g = torch.Generator().manual_seed(123)
    x = torch.randn(1, s.get("in_channels", 1), *s["volume"], generator=g).to(device)
    path = s["path"]
    compile_s = None
    if path == "peer":  # the peer's own Model and its predict_piecewise, on the same volume
        model = peer_model(s["peer_path"], s["net_kwargs"])

        def run(v):
            return model.predict_piecewise(v[0].cpu())[None]

        warm = x[(...,) + tuple(slice(0, min(32, n)) for n in x.shape[2:])]
    elif path == "bundle":  # fnet_baseline's inference.json defaults
        inferer = FastSlidingWindowInferer(roi_size=s["roi"], sw_batch_size=s["sw_batch"], overlap=s["overlap"],
                                           mode=s.get("mode", "constant"), margin=s.get("margin"), fast=s["fast"])

        def run(v):
            with torch.no_grad():
                return inferer(v, net)

        warm = torch.randn(1, x.shape[1], *s["roi"], device=device)
    elif path == "whole":  # pytorch_fnet: the whole (padded) volume through the network at once, fp32
        def run(v):
            with torch.no_grad():
                return net(v)

        warm = x[(...,) + tuple(slice(0, min(16, n)) for n in x.shape[2:])]
    else:
        opt = path.startswith("opt")
        inferer = FastSlidingWindowInferer(
            roi_size=s["roi"], sw_batch_size=s["sw_batch"], overlap=s["overlap"], mode="gaussian",
            bf16_cpu=opt, bf16_cuda=opt, channels_last=opt, fuse_bn=opt, compile=opt and s.get("compile", False))

        def run(v):
            with torch.no_grad():
                return inferer(v, net)

        warm = torch.randn(1, x.shape[1], *s["roi"], device=device)
    t = time.perf_counter()
    run(warm)  # warm-up (and compilation) on one window
    _sync(device)
    warm_s = time.perf_counter() - t
    if s.get("compile") and path.startswith("opt"):
        compile_s = warm_s
    t = time.perf_counter()
    out = run(x)
    _sync(device)
    dt = time.perf_counter() - t
    if s.get("save"):
        np.save(s["save"], out.float().cpu().numpy())
    res = {"time_s": dt, "warmup_s": warm_s, "compile_s": compile_s, "peak_rss_mib": peak_rss_mib(),
           "voxels": int(np.prod(s["volume"]))}
    if device.type == "cuda":
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("BENCH_RESULT " + json.dumps(res), flush=True)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _sw_note(sw: dict) -> str:
    return f"roi {_shape_str(sw['roi'])}, sw_batch {sw['sw_batch']}, overlap {sw['overlap']}"


def section_fnet_infer(p: dict, device, threads, rows: list, tmp: str, compile_infer: bool,
                       repeats: int = 1, ablation: bool = False) -> dict:
    """Sliding-window F-net inference on ``sw_volume``: ref vs opt (and opt + compile), each in a child."""
    base = {"net": "fnet", "net_kwargs": p["fnet"], "volume": list(p["sw_volume"]), "threads": threads,
            "device": str(device)}
    specs = {"ref": dict(base, path="ref", **p["sw_ref"]), "opt": dict(base, path="opt", **p["sw_opt"])}
    if compile_infer:
        specs["opt + compile"] = dict(base, path="opt", compile=True, **p["sw_opt"])
    # the fast paths alone (the reference's own windows: the same output up to rounding)
    specs["opt, ref windows (fast paths alone)"] = dict(base, path="opt", **p["sw_ref"])
    if ablation:  # the window-geometry gain alone; the allocator's share of the fast paths
        specs["ref, opt windows"] = dict(base, path="ref", **p["sw_opt"])
        specs["opt, ref windows, glibc's malloc defaults"] = dict(base, path="opt", reuse_memory=False, **p["sw_ref"])
        specs["ref + reuse_memory"] = dict(base, path="ref", reuse_memory=True, **p["sw_ref"])
    results = {k: [] for k in specs}

    def npy(k):
        return os.path.join(tmp, "fnet_" + "".join(c if c.isalnum() else "_" for c in k) + ".npy")

    for r in range(repeats):
        for k, spec in specs.items():
            save = npy(k) if r == 0 else None
            _log(f"  fnet_infer {k} on 1x{_shape_str(p['sw_volume'])} (child process)")
            try:
                results[k].append(_child(dict(spec, save=save)))
            except RuntimeError as e:
                _log(f"    {k} failed: {str(e).splitlines()[0]}")
                results[k].append({"error": str(e)})
    ref_out = np.load(npy("ref"))
    ref_t = statistics.median(x["time_s"] for x in results["ref"])
    out = {}
    for k, res in results.items():
        ok = [x for x in res if "error" not in x]
        if not ok:
            rows.append(_row("fnet_infer", k, "1x" + _shape_str(p["sw_volume"]), None,
                             note="failed: " + res[0]["error"].splitlines()[0][:120]))
            continue
        t = statistics.median(x["time_s"] for x in ok)
        note = _sw_note(specs[k])
        if specs[k].get("reuse_memory", specs[k]["path"].startswith("opt")):
            note += ", reuse_memory"
        if k != "ref":
            pred = np.load(npy(k))
            note += f"; Pearson r with ref output {_pearson(pred, ref_out):.5f}"
        if ok[0].get("compile_s") is not None:
            note += f"; compile {ok[0]['compile_s']:.0f} s (not in time)"
        if ok[0].get("peak_gpu_mib") is not None:
            note += f"; peak GPU memory {ok[0]['peak_gpu_mib']:.0f} MiB"
        rows.append(_row("fnet_infer", k, "1x" + _shape_str(p["sw_volume"]), t, ok[0]["voxels"], ref_t / t,
                         max(x["peak_rss_mib"] for x in ok), note))
        out[k] = ok[0]
        _log("    " + format_table(rows[-1:]).splitlines()[-1])
    return out


def section_scaling(p: dict, device, threads, rows: list, reuse: dict | None, tmp: str) -> None:
    """Time and peak RSS of the optimised sliding window at four volume sizes, and of the
    whole-volume fp32 forward (pytorch_fnet's way) where it fits."""
    base = {"net": "fnet", "net_kwargs": p["fnet"], "threads": threads, "device": str(device)}
    whole_pts, whole_t = [], {}
    for vol in p["scaling"]:
        size = "1x" + _shape_str(vol)
        nvox = int(np.prod(vol))
        if nvox <= p["whole_max_voxels"]:
            _log(f"  scaling whole-volume fp32 {size} (child process)")
            r = _child(dict(base, path="whole", volume=list(vol), save=os.path.join(tmp, f"whole_{size}.npy")))
            whole_pts.append((nvox, r["peak_rss_mib"]))
            whole_t[size] = r["time_s"]
            rows.append(_row("scaling", "whole volume fp32 (pytorch_fnet)", size, r["time_s"], nvox, None,
                             r["peak_rss_mib"], ""))
            _log("    " + format_table(rows[-1:]).splitlines()[-1])
        elif len(whole_pts) >= 2:
            (v0, m0), (v1, m1) = whole_pts[0], whole_pts[-1]
            est = m1 + (m1 - m0) / (v1 - v0) * (nvox - v1)
            rows.append(_row("scaling", "whole volume fp32 (pytorch_fnet)", size, None, note=(
                f"not run: needs ~{est / 1024:.1f} GiB (linear in voxels from the sizes above)")))
        if reuse is not None and list(vol) == list(p["sw_volume"]) and "opt" in reuse:
            r = reuse["opt"]
            note = _sw_note(p["sw_opt"]) + "; same run as fnet_infer opt"
        else:
            _log(f"  scaling opt sliding window {size} (child process)")
            whole = os.path.join(tmp, f"whole_{size}.npy")
            r = _child(dict(base, path="opt", volume=list(vol), save=os.path.join(tmp, f"opt_{size}.npy")
                            if os.path.isfile(whole) else None, **p["sw_opt"]))
            note = _sw_note(p["sw_opt"])
            if os.path.isfile(whole):
                note += (f"; Pearson r with the whole-volume output "
                         f"{_pearson(np.load(os.path.join(tmp, f'opt_{size}.npy')), np.load(whole)):.5f}")
            if r.get("peak_gpu_mib") is not None:
                note += f"; peak GPU memory {r['peak_gpu_mib']:.0f} MiB"
        ratio = whole_t[size] / r["time_s"] if size in whole_t else None  # vs pytorch_fnet's whole-volume pass
        rows.append(_row("scaling", "opt sliding window", size, r["time_s"], nvox, ratio, r["peak_rss_mib"], note))
        _log("    " + format_table(rows[-1:]).splitlines()[-1])


def section_densenet2d(p: dict, device, rows: list, warmup: int) -> None:
    import torch

    from common.fastpath import FastSimpleInferer

    d = p["densenet"]
    kw = dict(d["kwargs"], in_channels=d["in_channels"], out_channels=1)
    b = d["train_batch"]
    x = torch.randn(b, d["in_channels"], *d["image"], device=device)
    y = torch.randn(b, 1, *d["image"], device=device)
    nets = {k: build_network("densenet", kw).to(device) for k in ("ref", "opt")}
    fns = {"ref": train_step_fn(nets["ref"], x, y, False, False, device),
           "opt": train_step_fn(nets["opt"], x, y, True, True, device)}
    flops = _flops(fns["ref"])
    _log(f"  densenet2d train step b{b} x {_shape_str(d['image'])}: ref vs opt, interleaved")
    res = interleave(fns, warmup, d["repeats"], device)
    npx = b * int(np.prod(d["image"]))
    for k, r in res.items():
        rows.append(_row("densenet2d train", k, f"b{b} x {d['in_channels']}x{_shape_str(d['image'])}", r["median"],
                         npx, res["ref"]["median"] / r["median"], r["rss"],
                         f"{flops / r['median'] / 1e9:.1f} GFLOP/s", flops=flops))
        _log("    " + format_table(rows[-1:]).splitlines()[-1])
    # inference on one whole image (fits in memory in 2D), eval mode
    xi = torch.randn(1, d["in_channels"], *d["image"], device=device)
    net = build_network("densenet", kw).to(device).eval()
    inferers = {"ref": FastSimpleInferer(), "opt": FastSimpleInferer(bf16_cpu=True, bf16_cuda=True,
                                                                      channels_last=True, fuse_bn=True)}
    outs = {}

    def infer(k):
        def f():
            with torch.no_grad():
                outs[k] = inferers[k](xi, net)
        return f

    fns = {k: infer(k) for k in inferers}
    flops = _flops(fns["ref"])
    _log(f"  densenet2d inference 1x{d['in_channels']}x{_shape_str(d['image'])}: ref vs opt, interleaved")
    res = interleave(fns, warmup, d["repeats"], device)
    r_out = _pearson(outs["opt"].cpu().numpy(), outs["ref"].cpu().numpy())
    for k, r in res.items():
        note = f"{flops / r['median'] / 1e9:.1f} GFLOP/s"
        if k == "opt":
            note += f"; Pearson r with ref output {r_out:.5f}"
        rows.append(_row("densenet2d infer", k, f"1x{d['in_channels']}x{_shape_str(d['image'])}", r["median"],
                         int(np.prod(d["image"])), res["ref"]["median"] / r["median"], r["rss"], note, flops=flops))
        _log("    " + format_table(rows[-1:]).splitlines()[-1])


def section_unet3d(p: dict, device, threads, rows: list, tmp: str) -> None:
    u = p["unet3d"]
    base = {"net": "unet3d", "net_kwargs": u["kwargs"], "volume": list(u["volume"]), "threads": threads,
            "device": str(device), "in_channels": u["kwargs"].get("in_channels", 1)}
    size = f"1x{u['kwargs'].get('in_channels', 1)}x{_shape_str(u['volume'])}"
    res = {}
    for k in ("ref", "opt"):
        _log(f"  unet3d {k} sliding window on {size} (child process)")
        res[k] = _child(dict(base, path=k, save=os.path.join(tmp, f"unet3d_{k}.npy"), **u[k]))
    r_out = _pearson(np.load(os.path.join(tmp, "unet3d_opt.npy")), np.load(os.path.join(tmp, "unet3d_ref.npy")))
    for k, r in res.items():
        note = _sw_note(u[k]) + (f"; Pearson r with ref output {r_out:.5f}" if k == "opt" else "")
        rows.append(_row("unet3d_fucci infer", k, size, r["time_s"], r["voxels"], res["ref"]["time_s"] / r["time_s"],
                         r["peak_rss_mib"], note))
        _log("    " + format_table(rows[-1:]).splitlines()[-1])


def section_loader(p: dict, rows: list, tmp: str, model_patches_per_s: dict) -> None:
    """Patches/s of fnet_baseline's own training loader (train.json's train#dataloader)."""
    import torch
    from monai.bundle import ConfigParser

    from common.synthetic import write_dataset_3d

    L = p["loader"]
    data_dir = os.path.join(tmp, "loader_data")
    _log(f"  loader: writing {L['n_volumes']} synthetic volumes {_shape_str(L['shape'])}")
    manifest = write_dataset_3d(data_dir, n_volumes=L["n_volumes"], shape=L["shape"], seed=0)
    caches = {
        "Dataset (no cache)": {"_target_": "Dataset", "data": "@train#datalist", "transform": "@preprocessing"},
        "CacheDataset": None,  # train.json's own
        "PersistentDataset": {"_target_": "PersistentDataset", "data": "@train#datalist",
                              "transform": "@preprocessing", "cache_dir": os.path.join(tmp, "persistent")},
    }
    model_ref = max(model_patches_per_s.values()) if model_patches_per_s else None
    for cache_name, cache_cfg in caches.items():
        for workers in L["workers"]:
            parser = ConfigParser()
            parser.read_config(os.path.join(ROOT, "bundles", "fnet_baseline", "configs", "train.json"))
            parser.update({"bundle_root": os.path.join(ROOT, "bundles", "fnet_baseline"), "train_manifest": manifest,
                           "patch_size": list(p["train_patch"]), "batch_size": L["batch"],
                           "epoch_length": L["n_batches"] + 1, "num_workers": workers})
            if cache_cfg is not None:
                parser["train#cache"] = cache_cfg
            t = time.perf_counter()
            loader = parser.get_parsed_content("train#dataloader")
            it = iter(loader)
            next(it)  # first batch: worker start-up, first reads
            setup = time.perf_counter() - t
            t = time.perf_counter()
            n = 0
            for batch in it:
                n += batch["image"].shape[0]
            dt = time.perf_counter() - t
            pps = n / dt
            note = f"{pps:.1f} patches/s; setup + first batch {setup:.2f} s"
            if model_ref:
                note += f"; {pps / model_ref:.1f}x the fastest training step"
            rows.append(_row("loader", f"{cache_name}, {workers} workers", f"b{L['batch']} x {_shape_str(p['train_patch'])}",
                             dt / max(1, n // L["batch"]), n * int(np.prod(p["train_patch"])) / L["batch"] if n else None,
                             None, None, note, patches_per_s=pps))
            rows[-1]["voxels_per_s"] = n * int(np.prod(p["train_patch"])) / dt
            _log("    " + format_table(rows[-1:]).splitlines()[-1])
            del loader, it
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, port: int, spec: str) -> None:
    """(internal) One DDP training process (gloo): warm-up then timed steps; rank 0 prints the result."""
    import torch
    import torch.distributed as dist

    from common.cli import json_spec

    s = json_spec(spec)
    _set_threads(s.get("threads"))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=int(rank), world_size=int(world))
    net = torch.nn.parallel.DistributedDataParallel(build_network("fnet", s["fnet"]))
    g = torch.Generator().manual_seed(int(rank))
    x = torch.randn(s["batch"], 1, *s["patch"], generator=g)
    y = torch.randn(s["batch"], 1, *s["patch"], generator=g)
    step = train_step_fn(net, x, y, False, False, "cpu")
    step()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(s["steps"]):
        step()
    dist.barrier()
    dt = time.perf_counter() - t
    if int(rank) == 0:
        from common.fastpath import peak_rss_mib

        print("BENCH_RESULT " + json.dumps({"time_s": dt / s["steps"], "peak_rss_mib": peak_rss_mib()}), flush=True)
    from common.distributed import shutdown

    shutdown()


def section_ddp(p: dict, threads, rows: list) -> None:
    """Samples/s of fp32 F-net training with 1 process and with 2 DDP processes (gloo, CPU)."""
    d = p["ddp"]
    fnet = {"mult_chan": d["mult_chan"], "depth": d.get("depth", 4)}
    patch = list(d.get("patch", p["train_patch"]))
    total = int(threads or os.cpu_count() or 1)
    res = {}
    for world in (1, 2):
        per = max(1, total // world)
        spec = {"fnet": fnet, "patch": patch, "batch": d["batch"], "steps": d["steps"], "threads": per}
        port = _free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        _log(f"  ddp: {world} process(es) x {per} thread(s), batch {d['batch']} per process")
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "ddp_worker", "--rank", str(r),
                                   "--world", str(world), "--port", str(port), "--spec", "stdin"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env)
                 for r in range(world)]
        for pr in procs:  # every rank gets its spec before any is waited on (they meet in init_process_group)
            pr.stdin.write(json.dumps(spec))
            pr.stdin.close()
            pr.stdin = None  # communicate() would flush the closed pipe
        outs = [pr.communicate(timeout=3600) for pr in procs]
        line = next((ln for ln in outs[0][0].splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if line is None:
            raise RuntimeError(f"DDP benchmark with {world} processes failed:\n{outs[0][1][-3000:]}")
        r = json.loads(line[len("BENCH_RESULT "):])
        sps = world * d["batch"] / r["time_s"]
        res[world] = sps
        note = f"{sps:.2f} samples/s, {per} thread(s) per process"
        if world == 2:
            note += f"; scaling efficiency {sps / (2 * res[1]):.0%} of 2x"
        rows.append(_row("ddp (fp32, gloo)", f"{world} process{'es' if world > 1 else ''}",
                         f"b{d['batch']}/process x {_shape_str(patch)}, mult_chan {d['mult_chan']}", r["time_s"],
                         world * d["batch"] * int(np.prod(patch)), sps / res[1], r["peak_rss_mib"], note))
        _log("    " + format_table(rows[-1:]).splitlines()[-1])


# ------------------------------------------------------------------------------------- peer

PEER_SHIMS = (
    "scipy.signal.triang = scipy.signal.windows.triang (moved in SciPy 1.13; pytorch_fnet's predict_piecewise "
    "imports the old name)",
    "the fnet package's __init__ is not run (it imports the CLI and data modules, which need aicsimageio, "
    "not installed here): a bare package module whose __path__ is the checkout's fnet/ is registered, so "
    "fnet.fnet_model, fnet.predict_piecewise and fnet.nn_modules import unchanged from the checkout",
)


def _parse_peer(peer) -> dict[str, str]:
    """``pytorch_fnet=/path`` (comma-separated for several) -> ``{name: path}``."""
    out = {}
    for item in _parse_list(peer):
        name, _, path = item.partition("=")
        if name != "pytorch_fnet" or not path:
            raise ValueError(f"--peer takes pytorch_fnet=<path of a checkout>; got {item!r}")
        out[name] = os.path.abspath(os.path.expanduser(path))
    return out


def peer_import(path: str):
    """pytorch_fnet's ``fnet.fnet_model`` module from the checkout at ``path`` (with :data:`PEER_SHIMS`)."""
    import importlib
    import types

    import scipy.signal
    import scipy.signal.windows

    if not os.path.isfile(os.path.join(path, "fnet", "fnet_model.py")):
        raise FileNotFoundError(f"{path} is not a pytorch_fnet checkout (no fnet/fnet_model.py)")
    if not hasattr(scipy.signal, "triang"):
        scipy.signal.triang = scipy.signal.windows.triang
    pkg = sys.modules.get("fnet")
    if pkg is None or list(getattr(pkg, "__path__", [])) != [os.path.join(path, "fnet")]:
        pkg = types.ModuleType("fnet")
        pkg.__path__ = [os.path.join(path, "fnet")]
        sys.modules["fnet"] = pkg
    return importlib.import_module("fnet.fnet_model")


def peer_model(path: str, net_kwargs: dict, seed: int = 0):
    """The peer's own ``fnet.fnet_model.Model`` (its 3D F-net of ``depth``/``mult_chan``, Adam with betas
    0.5/0.999 and lr 1e-3 as its defaults, its WeightedMSE loss, its weight initialisation), on CPU."""
    import torch

    mod = peer_import(path)
    torch.manual_seed(seed)
    return mod.Model(nn_class="fnet.nn_modules.fnet_nn_3d_params.Net",
                     nn_kwargs={"depth": int(net_kwargs.get("depth", 4)), "mult_chan": int(net_kwargs["mult_chan"])})



def _bundle_infer_defaults(bundle: str = "fnet_baseline") -> dict:
    """The sliding-window settings of a bundle's inference.json, as a user running it gets them."""
    with open(os.path.join(ROOT, "bundles", bundle, "configs", "inference.json")) as f:
        cfg = json.load(f)
    return {"roi": list(cfg["patch_size"]), "sw_batch": int(cfg["sw_batch_size"]), "overlap": float(cfg["overlap"]),
            "margin": cfg.get("sw_margin"), "mode": cfg["inferer"].get("mode", "constant"),
            "fast": bool(cfg.get("fast", False)),
            "reuse_memory": bool(cfg.get("fast", False)) if "@fast" in str(cfg.get("reuse_memory")) else bool(cfg.get("reuse_memory", False))}


def _train_defaults(bundle: str = "fnet_baseline") -> dict:
    """The fast-path switches of a bundle's train.json defaults (``None``: follows ``fast``)."""
    from common.fastpath import native_bf16_cpu

    with open(os.path.join(ROOT, "bundles", bundle, "configs", "train.json")) as f:
        cfg = json.load(f)
    cl = cfg.get("channels_last", False)
    bf16 = cfg.get("bf16_cpu", False)
    bf16 = native_bf16_cpu() if str(bf16).lower() == "auto" else bool(bf16)
    return {"channels_last": bool(cl), "bf16": bf16, "reuse_memory": bool(cfg.get("reuse_memory", False))}


def section_peer(p: dict, device, threads, rows: list, warmup: int, peers: dict) -> None:
    """Ours (the bundles' defaults) against pytorch_fnet's own code: its training step
    (``Model.train_on_batch``) and its prediction (``Model.predict_piecewise``) on the same F-net size,
    patches and volume; ratios are theirs / ours in time (> 1: ours faster)."""
    if not peers:
        reason = "skipped: no checkout given (--peer pytorch_fnet=<path>)"
        _log("  " + reason)
        rows.append(_row("peer", "pytorch_fnet", "", None, note=reason))
        return
    if device.type != "cpu":
        _log("  peer: run on CPU only (pytorch_fnet's predict goes through numpy)")
    from common.report import git_commit

    path = peers["pytorch_fnet"]
    commit = git_commit(path)
    _log(f"  peer pytorch_fnet at {path}, commit {commit}; shims: " + "; ".join(PEER_SHIMS))
    b = p["train_batches"][0]
    tr = _train_defaults()
    model = peer_model(path, p["fnet"])
    ours = build_network("fnet", p["fnet"])
    n_ours = sum(t.numel() for t in ours.parameters())
    n_peer = sum(t.numel() for t in model.net.parameters())
    del model, ours
    base = {"net_kwargs": p["fnet"], "batch": b, "patch": list(p["train_patch"]), "threads": threads, "device": "cpu"}
    specs = {"ours (train.json defaults)": dict(base, path="ours", bf16=tr["bf16"], channels_last=tr["channels_last"],
                                                 reuse_memory=tr["reuse_memory"]),
             "pytorch_fnet train_on_batch": dict(base, path="peer", peer_path=path)}
    if not tr["bf16"]:
        specs["ours (bf16_cpu true)"] = dict(specs["ours (train.json defaults)"], bf16=True)
    reps = p["train_repeats"].get(b, 3)
    _log(f"  peer training step b{b} x {_shape_str(p['train_patch'])}: {len(specs)} variants x {reps} rounds "
         "of a fresh process, interleaved")
    res = interleave_children(specs, warmup, reps)
    theirs = res["pytorch_fnet train_on_batch"]["median"]
    for k, r in res.items():
        note = f"{b / r['median']:.2f} patches/s"
        if k.startswith("pytorch_fnet"):
            note += f"; commit {commit[:12]}; {n_peer} parameters (ours {n_ours})"
        rows.append(_row("peer train", k, f"b{b} x {_shape_str(p['train_patch'])}", r["median"],
                         b * int(np.prod(p["train_patch"])), theirs / r["median"], r["rss"], note + "; x = theirs/this",
                         patches_per_s=b / r["median"]))
        _log("    " + format_table(rows[-1:]).splitlines()[-1])
    base = {"net": "fnet", "net_kwargs": p["fnet"], "volume": list(p["sw_volume"]), "threads": threads, "device": "cpu"}
    specs = {"ours (inference.json defaults)": dict(base, path="bundle", **_bundle_infer_defaults()),
             "pytorch_fnet predict_piecewise": dict(base, path="peer", peer_path=path)}
    res = {}
    for k, spec in specs.items():
        _log(f"  peer prediction: {k} on 1x{_shape_str(p['sw_volume'])} (child process)")
        res[k] = _child(spec)
    theirs = res["pytorch_fnet predict_piecewise"]["time_s"]
    theirs_rss = res["pytorch_fnet predict_piecewise"]["peak_rss_mib"]
    for k, r in res.items():
        if k.startswith("ours"):
            sp = specs[k]
            note = (f"roi {_shape_str(sp['roi'])}, sw_batch {sp['sw_batch']}, overlap {sp['overlap']}, "
                    f"margin {sp['margin']}, fast {sp['fast']}; peak RSS theirs/ours {theirs_rss / r['peak_rss_mib']:.2f}")
        else:
            note = "its own pieces (32x512x512 max, 16-voxel overlap), fp32"
        rows.append(_row("peer predict", k, "1x" + _shape_str(p["sw_volume"]), r["time_s"], r["voxels"],
                         theirs / r["time_s"], r["peak_rss_mib"], note + "; x = theirs/this"))
        _log("    " + format_table(rows[-1:]).splitlines()[-1])


#: the reference arm of each time-to-quality experiment: x = its time to the target / the arm's
TTQ_REF = {"fnet": "pytorch_fnet", "fucci": "eager fp32"}


def ttq_rows(kind: str, res: dict) -> list[dict]:
    """Benchmark rows from an :mod:`experiments.time_to_quality` ``summary.json`` (``res``): one per arm,
    time = mean time to the target over the seeds that reached it, x = :data:`TTQ_REF`'s time / this arm's
    (mean of the per-seed ratios; a lower bound, said in the note, when the reference missed the target)."""
    ref = TTQ_REF[kind]
    setup, summary = res["setup"], res["summary"]
    size = (f"F-net d{setup['depth']}x{setup['mult_chan']}, b{setup['batch']} x {_shape_str(setup['patch'])}"
            if kind == "fnet" else
            f"U-Net {'/'.join(map(str, setup['features']))}, b{setup['batch']} x {_shape_str(setup['patch'])}")
    goal = "val r >= 0.80" if kind == "fnet" else "nucleus F1 >= 0.85"
    rows = []
    for arm, v in summary.items():
        t = v["time_to_target_s"]
        exact, bound = v.get(f"speedup_vs_{ref}"), v.get(f"speedup_at_least_vs_{ref}")
        if exact or bound:
            ratio = float(np.mean(exact or bound))
        else:  # the reference's own row: 1 when it reached the target in every seed
            ratio = 1.0 if arm == ref and v["reached"] == v["seeds"] else None
        note = (f"{goal} in {v['reached']}/{v['seeds']} seeds, after {np.mean(v['iterations_to_target']):.0f} "
                f"iterations" if t else f"{goal} not reached in {v['seeds']} seeds") + \
            f"; best {np.mean(v['best']):.3f}; x = {ref}/this" + (
                f" (at least: {ref} missed the target in some seed)" if bound else "")
        rows.append(_row(f"ttq {kind}", arm, size, float(np.mean(t)) if t else None, None, ratio, None, note))
    return rows


def section_ttq(rows: list, tmp: str, peers: dict, seeds: int = 1) -> None:
    """Time to a good model (issue 19, item 3): :mod:`experiments.time_to_quality` in a child process, F-net
    to validation Pearson r 0.80 (ours, ours bf16, pytorch_fnet when ``peers`` has it) and unet3d_fucci to
    nucleus F1 0.85 on cells3d (ours, ours bf16, eager fp32); rows from :func:`ttq_rows`."""
    for kind in TTQ_REF:
        out = os.path.join(tmp, f"ttq_{kind}")
        cmd = [sys.executable, "-m", "experiments.time_to_quality", kind, "--seeds", str(int(seeds)), "--out_dir", out]
        if kind == "fnet" and peers.get("pytorch_fnet"):
            cmd += ["--peer", peers["pytorch_fnet"]]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        _log("  " + " ".join(cmd[1:]))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if p.returncode != 0:
            raise RuntimeError(f"time_to_quality {kind} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        with open(os.path.join(out, "summary.json")) as f:
            new_rows = ttq_rows(kind, json.load(f))
        rows.extend(new_rows)
        for r in new_rows:
            _log("    " + format_table([r]).splitlines()[-1])


# ------------------------------------------------------------------------------------- commands

def plan_sections(only: str | None = None, skip: str | None = None) -> tuple[list[str], list[str]]:
    """``(sections to run, opt-in sections left out)``: ``only`` (comma-separated) or every section but the
    :data:`OPT_IN` ones, less ``skip``; the opt-in ones are listed as left out only in a run without ``only``.
    Raises ``ValueError`` for a name that is not in :data:`SECTIONS`."""
    only_l, skip_l = _parse_list(only), _parse_list(skip)
    bad = [s for s in only_l + skip_l if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {bad}; sections are {', '.join(SECTIONS)}")
    run_l = [s for s in (only_l or [s for s in SECTIONS if s not in OPT_IN]) if s not in skip_l]
    left_out = [] if only_l else [s for s in OPT_IN if s not in skip_l]
    return run_l, left_out


def run(profile: str = "auto", only: str | None = None, skip: str | None = None, threads: int | None = None,
        warmup: int = 1, device: str = "auto", out: str | None = None, compile_infer: bool | None = None,
        compile_train: bool = False, ablation: bool = False, sw_repeats: int = 1, sizes: str | None = None,
        peer: str | None = None, ttq_seeds: int = 1) -> None:
    """Run the benchmark and print the table (``--out``: also write it as JSON).

    Args:
        profile: ``full`` (the issue's sizes), ``small`` (about a quarter of the compute), ``quick`` (tests) or
            ``auto`` (``full`` when the benchmark runs on a GPU, ``small`` on a CPU, where the full sizes take
            hours on 2 cores).
        only: comma-separated sections to run (default all): fnet_train, fnet_infer, scaling, densenet2d,
            unet3d, loader, ddp, peer.
        skip: comma-separated sections to leave out.
        threads: ``torch.set_num_threads`` in this process and every child (default: PyTorch's default).
        warmup: warm-up calls before the timed in-process calls.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``; on CUDA "opt" means AMP + channels-last.
        out: write the rows and the environment as JSON here (atomically).
        compile_infer: add an ``opt + compile`` F-net inference row (default: the profile's choice).
        compile_train: add an ``opt + compile`` training row (its compile time is reported).
        ablation: add bf16-only and channels-last-only training rows, and F-net inference rows that
            separate the precision/layout gain from the window-geometry gain.
        sw_repeats: repetitions of each F-net sliding-window inference (children, interleaved).
        sizes: volume sizes of the scaling section instead of the profile's, e.g. ``64x1024x1024``
            (ZYX, comma-separated).
        peer: ``pytorch_fnet=<path of a checkout>``: the peer section runs pytorch_fnet's own training
            step and ``predict_piecewise`` next to ours (skipped, with the reason in the table, without it).
        ttq_seeds: seeds of the opt-in ``ttq`` section (time to a good model, :mod:`experiments.time_to_quality`).
    """
    import torch

    from common.report import write_json

    on_gpu = torch.cuda.is_available() and device in ("auto", "cuda")
    if profile == "auto":
        profile = "full" if on_gpu else "small"
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES) + ['auto']}")
    p = dict(PROFILES[profile])
    if sizes:
        p["scaling"] = tuple(tuple(int(v) for v in str(sz).lower().split("x")) for sz in _parse_list(sizes))
        if any(len(sz) != 3 for sz in p["scaling"]):
            raise ValueError(f"sizes must be ZxYxX volumes, e.g. 64x1024x1024; got {sizes!r}")
    sections, left_out = plan_sections(only, skip)  # an unknown name fails before any work
    _set_threads(threads)
    dev = torch.device("cuda" if (device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if device == "auto" else device))
    compile_infer = p["compile_infer"] if compile_infer is None else bool(compile_infer)
    from common.fastpath import native_bf16_cpu
    from common.report import git_commit

    peers = _parse_peer(peer)  # a bad --peer fails before any work
    env = {"profile": profile, "device": str(dev), "cpu": _cpu_name(), "cpu_flags": _cpu_flags(),
           "native_bf16_cpu": native_bf16_cpu(), "peers": {k: [v, git_commit(v)] for k, v in peers.items()},
           "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "loadavg_start": _loadavg(), "command": " ".join(["python", "scripts/benchmark.py"] + sys.argv[1:])}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["gpu_peak_tflops"] = _gpu_peak(env["gpu"])
    _log(f"benchmark profile={profile} sections={','.join(sections)} device={dev} threads={env['torch_threads']} "
         f"cpu='{env['cpu']}' ({env['cpu_flags']}; native bf16: {env['native_bf16_cpu']}, so the fast defaults "
         f"{'include' if env['native_bf16_cpu'] else 'leave out'} bf16 on CPU) load average {env['loadavg_start']}")
    rows: list[dict] = []
    t0 = time.perf_counter()
    reuse = None
    with tempfile.TemporaryDirectory(prefix="zoo_bench_") as tmp:
        for sec in sections:
            ts = time.perf_counter()
            _log(f"[{sec}] (elapsed {ts - t0:.0f} s, load average {_loadavg()})")
            if sec == "fnet_train":
                section_fnet_train(p, dev, threads, rows, warmup, ablation, compile_train)
            elif sec == "fnet_infer":
                reuse = section_fnet_infer(p, dev, threads, rows, tmp, compile_infer, sw_repeats, ablation)
            elif sec == "scaling":
                section_scaling(p, dev, threads, rows, reuse, tmp)
            elif sec == "densenet2d":
                section_densenet2d(p, dev, rows, warmup)
            elif sec == "unet3d":
                section_unet3d(p, dev, threads, rows, tmp)
            elif sec == "loader":
                model = {r["path"]: r["patches_per_s"] for r in rows if r["section"] == "fnet_train"}
                section_loader(p, rows, tmp, model)
            elif sec == "ddp":
                section_ddp(p, threads, rows)
            elif sec == "peer":
                section_peer(p, dev, threads, rows, warmup, peers)
            elif sec == "ttq":
                section_ttq(rows, tmp, peers, ttq_seeds)
            _log(f"  [{sec}] took {time.perf_counter() - ts:.0f} s")
    for sec in left_out:  # the default run says what it left out
        rows.append(_row(sec, "", "", None, note=f"not run: opt-in (--only {sec}); {OPT_IN[sec]}"))
    env["loadavg_end"] = _loadavg()
    env["total_s"] = time.perf_counter() - t0
    if dev.type == "cuda" and env.get("gpu_peak_tflops"):
        for r in rows:
            if r.get("flops") and r.get("time_s"):
                r["note"] += f"; {r['flops'] / r['time_s'] / 1e12 / env['gpu_peak_tflops']:.1%} of the card's peak"
    _log("")
    _log(f"## Benchmark ({profile}): {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, "
         f"device {dev}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, torch {env['torch']}")
    _log(f"load average at start {env['loadavg_start']}, at end {env['loadavg_end']}; total {env['total_s']:.0f} s")
    _log("")
    _log(format_table(rows))
    if out:
        write_json(out, {"environment": env, "rows": rows})
        _log(f"written {out}")


def _make_volume(shape, seed):
    from common.synthetic import make_cell_field_3d

    d = make_cell_field_3d(shape=shape, seed=seed)
    z = lambda a: ((a - a.mean()) / (a.std() + 1e-8)).astype(np.float32)  # noqa: E731
    return z(d["signal"]), z(d["target"])


def quality(steps: int = 200, mult_chan: int = 4, depth: int = 2, patch=(16, 32, 32), batch: int = 8,
            n_train: int = 3, shape=(32, 96, 96), lr: float = 3e-3, cosine: bool = True, seed: int = 0,
            control: bool = False, only: str | None = None, threads: int | None = None, device: str = "cpu",
            out: str | None = None) -> None:
    """Does bf16 cost quality? Train F-net twice from the same initial weights on the same random
    patches of synthetic phantoms (``common.synthetic.make_cell_field_3d``), in fp32 (reference) and
    with the fast path (bf16 autocast + channels-last, exactly what train.json's switches do), then
    predict a held-out phantom with each network's own inference path and compare the validation
    Pearson r with its DNA target. The target is r within 1 % (relative) of the fp32 run's.

    Args:
        steps, batch, patch, lr, cosine: training budget (Adam, betas 0.5/0.999 as the bundle;
            cosine decay of the learning rate to 0 over ``steps``).
        mult_chan, depth: F-net size.
        n_train, shape, seed: synthetic training volumes (a further one is the validation volume).
        control: also train fp32 with channels-last only ("control"): the same maths in another
            summation order, which shows how far two numerically equivalent runs drift apart.
        only: comma-separated subset of runs (fp32, bf16, control).
        device: ``cpu`` or ``cuda`` (bf16 autocast on either).
        out: write the results as JSON.
    """
    import torch

    from common.fastpath import FastSimpleInferer, FastSlidingWindowInferer, set_memory_format
    from common.report import write_json

    _set_threads(threads)
    patch = tuple(int(v) for v in patch)
    vols = [_make_volume(shape, seed + i) for i in range(n_train + 1)]
    train, (val_x, val_y) = vols[:n_train], vols[n_train]
    if any(s < p for vol in train for s, p in zip(vol[0].shape, patch)):
        raise ValueError(f"patch {patch} is larger than the synthetic volumes {tuple(shape)}")

    def batches():  # the same seeded patch sequence for every run
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            xs, ys = [], []
            for _ in range(batch):
                sx, sy = train[rng.integers(len(train))]
                o = [rng.integers(0, s - p + 1) for s, p in zip(sx.shape, patch)]
                sl = tuple(slice(a, a + p) for a, p in zip(o, patch))
                xs.append(sx[sl][None])
                ys.append(sy[sl][None])
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    results = {}
    runs = [("fp32", False), ("bf16", True)]
    if control:  # fp32 again, channels-last only: the same maths in another summation order
        runs.append(("control", "cl"))
    if only:
        runs = [r for r in runs if r[0] in _parse_list(only)]
    for name, fast in runs:
        net = build_network("fnet", {"mult_chan": mult_chan, "depth": depth}, seed=seed).to(device)
        for m in net.modules():  # fresh BatchNorm statistics, as an untrained network has
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
        bf16, cl = fast is True, bool(fast)
        set_memory_format(net, cl)
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.999))
        state = {"opt": opt, "inferer": FastSimpleInferer(bf16_cpu=bf16, bf16_cuda=bf16, channels_last=cl),
                 "sched": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cosine else None}
        t = time.perf_counter()
        losses = []
        for i, (x, y) in enumerate(batches()):
            losses.append(_train_on(net, state, x.to(device), y.to(device)))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(f"{name} training: loss {losses[-1]} at step {i + 1}")
        train_s = time.perf_counter() - t
        net.eval()
        inferer = FastSlidingWindowInferer(roi_size=patch, sw_batch_size=4, overlap=0.25, mode="gaussian",
                                           bf16_cpu=bf16, bf16_cuda=bf16, channels_last=cl, fuse_bn=cl)
        v = torch.from_numpy(val_x)[None, None].to(device)
        with torch.no_grad():
            pred = inferer(v, net)[0, 0].cpu().numpy()
        results[name] = {"val_pearson": _pearson(pred, val_y), "final_loss": float(np.mean(losses[-5:])),
                         "train_s": train_s}
        _log(f"  {name}: validation Pearson r {results[name]['val_pearson']:.4f}, "
             f"mean loss of the last 5 steps {results[name]['final_loss']:.4f}, {train_s:.1f} s")
        if name == "fp32":  # the same network through the optimised inference path: precision, then windows
            big = tuple(min(2 * a, b) for a, b in zip(patch, val_x.shape))
            for label, roi, sw, ov in (("bf16 inference", patch, 4, 0.25),
                                       (f"bf16 inference, windows {_shape_str(big)}", big, 1, 0.125)):
                fast_inf = FastSlidingWindowInferer(roi_size=roi, sw_batch_size=sw, overlap=ov, mode="gaussian",
                                                    bf16_cpu=True, bf16_cuda=True, channels_last=True, fuse_bn=True)
                with torch.no_grad():
                    pred = fast_inf(v, net)[0, 0].cpu().numpy()
                results[f"fp32, {label}"] = dict(results["fp32"], val_pearson=_pearson(pred, val_y))
                _log(f"  fp32 network, {label}: validation Pearson r {_pearson(pred, val_y):.4f}")
    summary = {"steps": steps, "mult_chan": mult_chan, "depth": depth, "patch": list(patch), "batch": batch,
               "lr": lr, "cosine": cosine, "runs": results}
    _log("")
    _log("| run | steps | validation Pearson r | relative to fp32 | mean loss (last 5 steps) | train time (s) |")
    _log("|---|---|---|---|---|---|")
    r32 = results.get("fp32", {}).get("val_pearson")
    for k, v in results.items():
        rel = (v["val_pearson"] - r32) / abs(r32) if r32 else None
        v["relative_to_fp32"] = rel
        _log(f"| {k} | {steps} | {v['val_pearson']:.4f} | {'' if rel is None else format(rel, '+.2%')} | "
             f"{v['final_loss']:.4f} | {v['train_s']:.1f} |")
    if "bf16" in results and r32:
        rel = abs(results["bf16"]["relative_to_fp32"])
        summary.update(relative_difference=rel, within_1_percent=bool(rel <= 0.01))
        _log(f"\nbf16 vs fp32: relative difference {rel:.2%} ({'within' if rel <= 0.01 else 'NOT within'} 1 %)")
    if out:
        write_json(out, summary)


def profile(profile: str = "full", batch: int = 4, threads: int | None = None, rows: int = 12,
            out: str | None = None) -> None:
    """Where the time of one F-net training step goes (``torch.profiler``), reference and optimised.

    Prints the top operators by self CPU time and the share of convolution kernels (forward and
    backward): the part that bf16 and the memory format can speed up.
    """
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from common.report import write_json

    _set_threads(threads)
    p = PROFILES[profile]
    x = torch.randn(batch, 1, *p["train_patch"])
    y = torch.randn(batch, 1, *p["train_patch"])
    summary = {"profile": profile, "batch": batch, "threads": torch.get_num_threads(), "loadavg": _loadavg()}
    for name, fast in (("ref", False), ("opt", True)):
        step = train_step_fn(build_network("fnet", p["fnet"]), x, y, fast, fast, "cpu")
        step()  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
        bn = sum(e.self_cpu_time_total for e in events if "batch_norm" in e.key)
        summary[name] = {"total_ms": total / 1e3, "convolution_ms": conv / 1e3, "batch_norm_ms": bn / 1e3,
                         "top": [(e.key, e.self_cpu_time_total / 1e3) for e in
                                 sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]]}
        _log(f"\n### {name}: F-net training step, batch {batch} x {_shape_str(p['train_patch'])}, "
             f"profiled self CPU time {total / 1e6:.2f} s; convolutions {conv / total:.0%}, "
             f"batch norm {bn / total:.0%}")
        _log(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    if "ref" in summary and "opt" in summary:
        r, o = summary["ref"], summary["opt"]
        _log(f"convolution time ref/opt {r['convolution_ms'] / o['convolution_ms']:.2f}x, "
             f"rest ref/opt {(r['total_ms'] - r['convolution_ms']) / max(1e-9, o['total_ms'] - o['convolution_ms']):.2f}x, "
             f"whole step {r['total_ms'] / o['total_ms']:.2f}x")
    if out:
        write_json(out, summary)


def _train_on(net, state: dict, x, y) -> float:
    """One training step of :func:`quality`: forward through the (fast) inferer, fp32 MSE, Adam."""
    import torch

    net.train()
    state["opt"].zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(state["inferer"](x, net), y)
    loss.backward()
    state["opt"].step()
    if state.get("sched") is not None:
        state["sched"].step()
    return float(loss.detach())


if __name__ == "__main__":
    if len(sys.argv) == 1 or sys.argv[1].startswith("-"):
        sys.argv.insert(1, "run")
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire({"run": run, "quality": quality, "profile": profile, "child": child, "ddp_worker": ddp_worker})

"""2D ablation of Spotlight's soft threshold and lambda against MSE F-net, on slices of hazy 3D phantoms.

    python -m experiments.spotlight_ablation --seeds 3 --out_dir spotlight_ablation      # ~40 min on 2 cores
    python -m experiments.spotlight_ablation --seeds 1 --iterations 40 --variants "['mse','min@0.5']"  # smoke

The issue behind it: which soft-threshold formulation (and which lambda) reproduces the paper's three
expectations (flat background, same foreground, better nuclei), at a budget where MSE F-net has
converged. Everything is in one process per run (no bundle machinery), so a sweep is affordable:

* **Data**: :func:`experiments.spotlight_vs_fnet.write_phantoms` (the same hazy phantoms as the 3D
  comparison), standardised per volume as spotlight_dna does (:class:`common.spotlight.OtsuStandardize`
  on signal and target; MSE on the Otsu-standardised target is the F-net loss up to an affine map
  of the target, which the min-max-rescaling evaluation removes).
* **Training**: a 2D :class:`common.networks.fnet.FNet` on random ``patch`` x ``patch`` crops of
  any z-slice of the training volumes that hold some foreground (the bundles' ``RandForegroundPatchd``
  rule), Adam (lr 1e-3, betas 0.5/0.999, as the bundles; cosine decay to 0 by default), bf16 autocast + channels-last on CPUs with
  native bf16. Both loss terms are logged every ``log_every`` iterations; validation Pearson r (the
  convergence criterion) on the validation volume.
* **Evaluation**: the test volumes predicted slice by slice, then the 3D Spotlight protocol of
  :mod:`common.spotlight.evaluation` (prediction min-max rescaled onto the training targets' range;
  PSNR, Pearson r whole and foreground, background std; watershed tuned on the training targets
  against the ground truth, AP@0.5 / AP@0.75 / mAP).

Variants (``--variants``): ``mse`` (F-net), ``<clamp>@<lambda>`` with clamp ``min``, ``both``, ``none``,
``rescaled`` (see :func:`common.spotlight.soft_threshold`), and the remedies ``<clamp>@<lambda>+bias``
(output bias initialised to -1: the background starts below the threshold), ``<clamp>@<lambda>+warm``
(initialised from the same seed's trained MSE network) and ``<clamp>@<lambda>+soft`` (``k = -0.6`` instead
of -0.95: a wider soft step, whose slope at 1 is 0.36 instead of 0.026, so the Dice term still reaches
background voxels predicted well above the threshold).
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

DEFAULT_VARIANTS = ("mse", "min@0.3", "min@0.5", "min@0.7", "both@0.3", "both@0.5", "both@0.7", "none@0.3",
                    "none@0.5", "none@0.7", "rescaled@0.3", "rescaled@0.5", "rescaled@0.7", "min@0.5+bias",
                    "min@0.5+warm", "min@0.5+soft")
NET_2D = dict(spatial_dims=2, in_channels=1, out_channels=1, depth=3, mult_chan=16)


def parse_variant(name: str) -> dict:
    """``"mse"`` or ``"<clamp>@<lambda>[+bias|+warm]"`` -> dict(loss, clamp, lam, init)."""
    base, _, init = name.partition("+")
    if base == "mse":
        return dict(loss="mse", clamp=None, lam=1.0, init=init or None, k=-0.95)
    clamp, _, lam = base.partition("@")
    if clamp not in ("min", "both", "none", "rescaled") or not lam:
        raise ValueError(f"variant {name!r}: expected 'mse' or '<min|both|none|rescaled>@<lambda>[+bias|+warm]'")
    if init not in ("", "bias", "warm", "soft"):
        raise ValueError(f"variant {name!r}: unknown remedy {init!r} (bias, warm, soft)")
    return dict(loss="spotlight", clamp=clamp, lam=float(lam), init=init or None, k=-0.6 if init == "soft" else -0.95)


def load_split(manifest: str) -> list[dict]:
    """Records of a phantom manifest, loaded and Otsu-standardised (signal and target, per volume)."""
    from common.data import read_manifest
    from common.io import read_image
    from common.spotlight import OtsuStandardize

    std = OtsuStandardize()
    out = []
    for r in read_manifest(manifest, optional={"path_label": "gt"}):
        sig, spacing, _ = read_image(r["image"], 3)
        tgt = read_image(r["label"], 3)[0]
        out.append({"signal": np.asarray(std(sig))[0], "target": np.asarray(std(tgt))[0],
                    "target_raw": np.asarray(tgt[0], np.float32), "spacing": tuple(spacing), "path": r["image"],
                    "gt": read_image(r["gt"], 3)[0][0].astype(np.int64) if r.get("gt") else None})
    return out


def _slices_with_fg(vols):
    return [(i, z) for i, v in enumerate(vols) for z in range(v["target"].shape[0]) if (v["target"][z] >= 0).any()]


def sample_batch(vols, pool, rng, batch: int, patch: int):
    """``batch`` random 2D crops (signal, target) from ``pool`` slices, each with some foreground."""
    xs, ys = [], []
    while len(xs) < batch:
        i, z = pool[rng.integers(len(pool))]
        t = vols[i]["target"][z]
        y0, x0 = rng.integers(0, t.shape[0] - patch + 1), rng.integers(0, t.shape[1] - patch + 1)
        tc = t[y0:y0 + patch, x0:x0 + patch]
        if not (tc >= 0).any() and len(xs) % 2 == 0:  # half the crops must hold foreground, as a floor
            continue
        xs.append(vols[i]["signal"][z, y0:y0 + patch, x0:x0 + patch])
        ys.append(tc)
    return np.stack(xs)[:, None], np.stack(ys)[:, None]


def predict_volume(net, signal: np.ndarray, fast: bool) -> np.ndarray:
    """Slice-by-slice prediction of a ``ZYX`` volume (spatial sizes padded to a multiple of 8)."""
    import torch

    from common.fastpath import autocast_context

    z, h, w = signal.shape
    ph, pw = -h % 8, -w % 8
    x = torch.from_numpy(np.pad(signal, ((0, 0), (0, ph), (0, pw)), mode="reflect")[:, None].copy())
    net.eval()
    with torch.no_grad(), autocast_context("cpu", fast):
        out = torch.cat([net(x[i:i + 8]).float() for i in range(0, z, 8)])
    net.train()
    return out[:, 0, :h, :w].numpy()


def train_one(variant: str, seed: int, data_dir: str, iterations: int, batch: int, patch: int,
              warm_dir: str | None = None, log_every: int = 50, threads: int = 1, lr_schedule: str = "cosine") -> dict:
    """Train one variant with one seed; returns its history and saves ``<data_dir>/../runs/<variant>_s<seed>.pt``."""
    import torch

    from common.fastpath import autocast_context, native_bf16_cpu
    from common.metrics import pearson_r
    from common.networks.fnet import FNet
    from common.handlers import step_is_finite
    from common.optim import lr_scheduler
    from common.outputs import atomic_write
    from common.spotlight import SpotlightLoss, masked_mse, soft_dice_loss, soft_threshold

    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    v = parse_variant(variant)
    train = load_split(os.path.join(data_dir, "train.csv"))
    val = load_split(os.path.join(data_dir, "val.csv"))
    pool = _slices_with_fg(train)
    net = FNet(**NET_2D)
    if v["init"] == "bias":
        with torch.no_grad():
            last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
            last.bias.fill_(-1.0)
    elif v["init"] == "warm":
        net.load_state_dict(torch.load(os.path.join(warm_dir, f"mse_s{seed}.pt"), map_location="cpu"))
    net = net.to(memory_format=torch.channels_last)
    fast = native_bf16_cpu()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    sched = lr_scheduler(opt, lr_schedule, iterations)
    loss_fn = SpotlightLoss(lambda_mse=v["lam"], k=v["k"], clamp=v["clamp"] or "min") if v["loss"] == "spotlight" else None
    hist = {"iteration": [], "loss": [], "mmse": [], "dice": [], "frac_above": [], "val_iteration": [], "val_pearson": []}
    acc = {"loss": [], "mmse": [], "dice": [], "frac_above": []}
    skipped = []
    t0 = time.time()
    for it in range(1, iterations + 1):
        xs, ys = sample_batch(train, pool, rng, batch, patch)
        x = torch.from_numpy(xs).to(memory_format=torch.channels_last)
        y = torch.from_numpy(ys)
        m = (y >= 0).float()
        with autocast_context("cpu", fast):
            p = net(x)
        p = p.float()
        if loss_fn is None:
            loss = torch.mean((p - y) ** 2)
        else:
            loss = loss_fn(p, torch.cat([y, m], 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step_is_finite(opt, loss):  # bf16 on CPU has no loss scaler: a rare non-finite step is skipped
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)
            skipped.append(it)
        sched.step()
        with torch.no_grad():  # both terms of the Spotlight loss, logged for every variant
            acc["loss"].append(float(loss))
            acc["mmse"].append(float(masked_mse(p, y, m).mean()))
            has = m.sum((2, 3)) > 0
            d = soft_dice_loss(soft_threshold(p, v["k"], v["clamp"] or "min"), m)
            acc["dice"].append(float((d * has).sum() / has.sum().clamp(min=1)))
            acc["frac_above"].append(float((p >= 0).float().mean()))
        if it % log_every == 0 or it == iterations:
            hist["iteration"].append(it)
            for k in acc:
                hist[k].append(float(np.mean(acc[k])))
                acc[k] = []
        if it % max(1, iterations // 20) == 0 or it == iterations:
            r = np.mean([pearson_r(predict_volume(net, vv["signal"], fast), vv["target"]) for vv in val])
            hist["val_iteration"].append(it)
            hist["val_pearson"].append(float(r))
    runs = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "runs")
    os.makedirs(runs, exist_ok=True)
    path = os.path.join(runs, f"{variant}_s{seed}.pt")
    with atomic_write(path) as tmp:  # a killed sweep never leaves a half-written network
        torch.save(net.to(memory_format=torch.contiguous_format).state_dict(), tmp)
    return {"variant": variant, "seed": seed, "seconds": round(time.time() - t0, 1), "history": hist,
            "skipped_steps": skipped}


def converged(val_iteration, val_pearson, fraction: float = 0.2, tol: float = 0.01) -> tuple[bool, float]:
    """Change of validation Pearson r over the last ``fraction`` of the iterations; converged if ``|change| < tol``.

    The change is the least-squares line through the validations in that window times its length
    (the trend, so that validation noise between checkpoints does not count as learning). Fewer
    than 2 validations in the window: the difference of the last two values.
    """
    it = np.asarray(val_iteration, float)
    r = np.asarray(val_pearson, float)
    if it.size < 2:
        return False, float("nan")
    sel = it >= it[-1] * (1 - fraction)
    if sel.sum() < 2:
        sel[-2:] = True
    x, y = it[sel], r[sel]
    slope = np.polyfit(x, y, 1)[0]
    change = float(slope * (it[-1] * fraction))
    return abs(change) < tol, change


def watershed_params(data_dir: str) -> dict:
    """Otsu + watershed parameters tuned on the training targets against their labels (cached in ``data_dir``)."""
    from common.report import write_json
    from common.spotlight.evaluation import tune_watershed

    cache = os.path.join(data_dir, "watershed.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    train = load_split(os.path.join(data_dir, "train.csv"))
    from experiments.spotlight_vs_fnet import WATERSHED_GRID

    params, _ = tune_watershed([v["target_raw"] for v in train], [v["gt"] for v in train], train[0]["spacing"],
                               grid=WATERSHED_GRID, verbose=False)
    write_json(cache, params)
    return params


def evaluate_run(variant: str, seed: int, data_dir: str, threads: int = 1) -> dict:
    """The Spotlight protocol on the held-out test volumes for one trained 2D network."""
    import torch

    from common.fastpath import native_bf16_cpu
    from common.metrics import dataset_average_precision, rescale_to_range
    from common.networks.fnet import FNet
    from common.spotlight.evaluation import dataset_target_range, foreground_of, pixel_metrics, segment
    from common.segmentation import remove_border_objects

    torch.set_num_threads(int(threads))
    runs = os.path.join(os.path.dirname(os.path.abspath(data_dir)), "runs")
    net = FNet(**NET_2D)
    net.load_state_dict(torch.load(os.path.join(runs, f"{variant}_s{seed}.pt"), map_location="cpu"))
    test = load_split(os.path.join(data_dir, "test.csv"))
    from common.data import read_manifest

    lo, hi = dataset_target_range([r["label"] for r in read_manifest(os.path.join(data_dir, "train.csv"))])
    params = watershed_params(data_dir)
    fast = native_bf16_cpu()
    rows, gts, segs = [], [], []
    for v in test:
        pred = predict_volume(net, v["signal"], fast)
        fg = foreground_of(v["target_raw"])
        m = pixel_metrics(pred, v["target_raw"], (lo, hi), v["spacing"], fg=fg, microssim=False)
        m["bg_above"] = float((pred[~fg] >= 0).mean())  # background voxels the prediction puts over the threshold
        rows.append(m)
        gts.append(remove_border_objects(v["gt"]))
        segs.append(segment(rescale_to_range(pred, lo, hi), v["spacing"], "watershed", params))
    ap = dataset_average_precision(gts, segs)
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out.update(ap50=float(ap["ap"][0]), ap75=float(ap["ap"][5]), mAP=float(ap["mAP"]))
    return out


def _job(variant: str, seed: int, data_dir: str, iterations: int, batch: int, patch: int, threads: int,
         lr_schedule: str = "cosine") -> dict:
    out = train_one(variant, seed, data_dir, iterations, batch, patch,
                    warm_dir=os.path.join(os.path.dirname(os.path.abspath(data_dir)), "runs"), threads=threads,
                    lr_schedule=lr_schedule)
    return dict(out, metrics=evaluate_run(variant, seed, data_dir, threads))


def _run_pool(jobs, n_workers: int, on_result) -> None:
    """Run ``_job(*j)`` for every ``j`` on ``n_workers`` processes; ``on_result(result)`` as each one ends."""
    import multiprocessing as mp
    from concurrent.futures import as_completed

    if n_workers <= 1:
        for j in jobs:
            on_result(_job(*j))
        return
    with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn")) as ex:
        for f in as_completed([ex.submit(_job, *j) for j in jobs]):
            on_result(f.result())


#: metrics of the ablation table: (key, header, format)
COLUMNS = (("pearson", "Pearson r", ".3f"), ("pearson_fg", "r (fg)", ".3f"), ("psnr_fg", "PSNR fg (dB)", ".2f"),
           ("bg_std", "bg std", ".1f"), ("bg_ratio", "bg std / F-net", ".2f"), ("bg_above", "bg >= thr", ".3f"),
           ("ap50", "AP@0.5", ".3f"), ("ap75", "AP@0.75", ".3f"), ("mAP", "mAP", ".3f"),
           ("val_change", "val r change, last 20 %", ".3f"))


def summarise(results: dict, variants, seeds) -> tuple[list[dict], str]:
    """Rows of mean +- sd over seeds per variant, with the F-net-relative background ratio, and the table."""
    from common.report import mean_sd

    rows = []
    for v in variants:
        per = []
        for s in seeds:
            if f"{v}_s{s}" not in results:  # a sweep stopped early (--train false reports what finished)
                continue
            m = dict(results[f"{v}_s{s}"]["metrics"])
            ref = results.get(f"mse_s{s}", {}).get("metrics")
            m["bg_ratio"] = m["bg_std"] / ref["bg_std"] if ref else float("nan")
            h = results[f"{v}_s{s}"]["history"]
            m["val_change"] = converged(h["val_iteration"], h["val_pearson"])[1]
            per.append(m)
        if not per:
            continue
        row = {"variant": v, "n": len(per)}
        for k, _, fmt in COLUMNS:
            row[k] = [p[k] for p in per]
            row[k + "_txt"] = mean_sd(row[k], fmt)
        rows.append(row)
    lines = ["| variant | seeds | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['n']} | " + " | ".join(r[k + '_txt'] for k, _, _ in COLUMNS) + " |")
    return rows, "\n".join(lines)


def plot_curves(path: str, results: dict, variants, seed: int) -> str:
    """Training curves of both Spotlight terms (masked MSE, soft Dice) and the fraction of voxels >= 0."""
    from common.report import save_figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    for v in variants:
        h = results.get(f"{v}_s{seed}", {}).get("history")
        if not h:
            continue
        for a, k in zip(ax[:3], ("mmse", "dice", "frac_above")):
            a.plot(h["iteration"], h[k], label=v)
        ax[3].plot(h["val_iteration"], h["val_pearson"], label=v)
    for a, t in zip(ax, ("masked MSE (fg)", "soft Dice of sigma_k(pred)", "fraction of voxels >= 0", "val Pearson r")):
        a.set_title(t)
        a.set_xlabel("iteration")
    ax[0].set_yscale("log")
    ax[3].legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def main(out_dir: str = "spotlight_ablation", seeds: int | str = 3, variants=DEFAULT_VARIANTS, iterations: int = 3000,
         batch: int = 8, patch: int = 48, jobs: int = 2, threads: int = 1, n_volumes=(6, 1, 3), train: bool = True,
         lr_schedule: str = "cosine"):
    """Train and evaluate every variant for every seed; writes ``ablation.md``, ``results.json``, ``curves.png``.

    ``n_volumes``: phantoms for (train, val, test); finished runs in ``results.json`` are kept on a rerun.
    ``train=False``: no training, the report of the runs in ``results.json`` (e.g. of a sweep stopped early).
    ``lr_schedule``: Adam's rate over the iterations (``common.optim``): ``cosine`` (default, decays to 0, so
    that the runs settle) or ``constant``.
    """
    from common.optim import lr_factor
    from common.report import write_json, write_text
    from experiments.spotlight_vs_fnet import write_phantoms

    t0 = time.time()
    seeds = list(range(int(seeds))) if isinstance(seeds, (int, str)) and str(seeds).isdigit() else [int(s) for s in seeds]
    variants = [variants] if isinstance(variants, str) else list(variants)
    for v in variants:
        parse_variant(v)
    lr_factor(0, lr_schedule, 1)  # a wrong name is a named error before any work starts
    if any(parse_variant(v)["init"] == "warm" for v in variants) and "mse" not in variants:
        raise ValueError("the '+warm' variants start from the 'mse' networks: add 'mse' to --variants")
    out_dir = os.path.abspath(out_dir)
    data_dir = os.path.join(out_dir, "data")
    write_phantoms(data_dir, *(int(n) for n in n_volumes))
    watershed_params(data_dir)
    res_path = os.path.join(out_dir, "results.json")
    results = json.load(open(res_path)) if os.path.isfile(res_path) else {}
    common = (data_dir, int(iterations), int(batch), int(patch), int(threads), str(lr_schedule))

    def done(r):
        results[f"{r['variant']}_s{r['seed']}"] = r
        write_json(res_path, results)  # resumable: finished runs are skipped on a rerun
        m = r["metrics"]
        print(f"[spotlight_ablation {time.strftime('%H:%M:%S')}] {r['variant']} seed {r['seed']} ({r['seconds']} s): "
              f"r {m['pearson']:.3f}, PSNR fg {m['psnr_fg']:.2f}, bg std {m['bg_std']:.1f}, AP@0.5 {m['ap50']:.3f}",
              flush=True)

    from common.cli import as_bool

    for phase in ("first", "warm") if as_bool(train, "train") else ():  # seed-major order: every variant's first seed comes first
        todo = [(v, s) for s in seeds for v in variants if f"{v}_s{s}" not in results
                and (parse_variant(v)["init"] == "warm") == (phase == "warm")]
        _run_pool([(v, s, *common) for v, s in todo], int(jobs), done)
    rows, table = summarise(results, variants, seeds)
    plot_curves(os.path.join(out_dir, "curves.png"), results, variants, seeds[0])
    cmd = "python -m experiments.spotlight_ablation " + " ".join(sys.argv[1:])
    text = (f"# Spotlight ablation (2D, phantom slices)\n\nCommand: `{cmd.strip()}`; {len(seeds)} seed(s); "
            f"{iterations} iterations of batch {batch} (Adam lr 1e-3, {lr_schedule} schedule), {patch}x{patch} crops, 2D F-net {NET_2D['depth']} levels / "
            f"{NET_2D['mult_chan']} channels; evaluated on {len(load_split(os.path.join(data_dir, 'test.csv')))} "
            f"held-out 3D volumes predicted slice by slice. Mean +- sd over seeds. bg std: std of the min-max "
            f"rescaled prediction outside the target's Otsu foreground (target units); bg >= thr: fraction of "
            f"those voxels predicted at or above the threshold. Wall time {time.time() - t0:.0f} s.\n\n{table}\n\n"
            f"![training curves, seed {seeds[0]}](curves.png)\n")
    write_text(os.path.join(out_dir, "ablation.md"), text)
    print(text, flush=True)


if __name__ == "__main__":
    from common.cli import strict_fire

    strict_fire(main)

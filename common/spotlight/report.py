"""The Spotlight evaluation over a data set: one report folder (report.md, metrics.json, PNG figures) per run."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import numpy as np

from common.metrics import DEFAULT_IOU_THRESHOLDS, background_variability, dataset_average_precision, rescale_to_range
from common.spotlight.evaluation import (DEFAULT_SWEEP_LEVELS, DEFAULT_WATERSHED, EvaluationInputError,
                                         dataset_target_range, feature_comparison, feature_table, foreground_of,
                                         pixel_metrics, remove_border_objects, segment, threshold_sweep,
                                         tune_watershed)

__all__ = ["voxel_sizes", "evaluate_dataset"]


def voxel_sizes(paths: Sequence[str], voxel_size: Sequence[float] | None = None) -> dict:
    """The voxel size ``(dz, dy, dx)`` in um of each file: from the file, or ``voxel_size`` for all.

    The evaluation measures in micrometres (the watershed's minimum object size and marker
    distance, object volumes and axes, the FSC resolution), so a file that carries no voxel size
    (a plain TIFF, a PNG) cannot be evaluated on a guess.

    Args:
        paths: image files (``ZYX``).
        voxel_size: the voxel size to use for every file (e.g. from ``--voxel_size``); files that
            carry their own are then overridden (a note lists them when they differ).

    Returns:
        ``{path: (dz, dy, dx)}``.

    Raises:
        EvaluationInputError: ``voxel_size`` is not three positive numbers, or it is ``None`` and
            a file carries no voxel size (the message names the files and the option to pass).
    """
    from common.io import read_image

    if voxel_size is not None:
        try:
            vs = tuple(float(v) for v in voxel_size)
        except (TypeError, ValueError):
            vs = ()
        if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
            raise EvaluationInputError(f"voxel size {voxel_size!r} is not three positive numbers z,y,x in um "
                                       "(e.g. --voxel_size 0.29,0.108,0.108)")
        voxel_size = vs
    out, missing, differ = {}, [], []
    for p in dict.fromkeys(paths):
        _, sp, known = read_image(p)
        if voxel_size is not None:
            if known and not np.allclose(sp, voxel_size, rtol=0.01):
                differ.append(f"{os.path.basename(p)} {tuple(round(v, 4) for v in sp)}")
            out[p] = voxel_size
        elif known:
            out[p] = tuple(float(v) for v in sp)
        else:
            missing.append(p)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise EvaluationInputError(
            f"{missing[0]}{more}: no voxel size in the file (plain TIFF or PNG?); the evaluation measures in "
            "micrometres (object sizes, watershed distances, FSC resolution): pass --voxel_size z,y,x in um "
            "(e.g. --voxel_size 0.29,0.108,0.108) or write the files as OME-TIFF with their voxel size")
    if differ:
        print(f"note: --voxel_size {voxel_size} replaces the voxel size of {len(differ)} file(s): "
              + ", ".join(differ[:3]) + (" ..." if len(differ) > 3 else ""), flush=True)
    return out


def _find_prediction(folder: str, signal_path: str, postfix: str) -> str:
    from common.io import SaveOmeTiff

    stem = SaveOmeTiff.stem(signal_path)
    for suffix in (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".nii.gz", ".nii"):
        cand = os.path.join(folder, f"{stem}{postfix}{suffix}")
        if os.path.isfile(cand):
            return cand
    raise FileNotFoundError(f"{folder}: no prediction '{stem}{postfix}.ome.tif' for {signal_path} "
                            "(run the bundle's inference.json on the manifest's signals first)")


def _fmt_row(name, d, keys):
    return dict(model=name, **{k: d.get(k, float("nan")) for k in keys})


def evaluate_dataset(manifest: str, predictions: Mapping[str, str], out_dir: str, train_manifest: str | None = None,
                     target_range: Sequence[float] | None = None, backend: str = "watershed",
                     watershed_params: Mapping | None = None, tune: bool = True, cellpose_model: str | None = None,
                     sweep_levels: Sequence[float] | None = DEFAULT_SWEEP_LEVELS, postfix: str = "_pred",
                     microssim: bool = True, title: str = "Virtual staining evaluation (Spotlight protocol)",
                     notes: str = "", voxel_size: Sequence[float] | None = None) -> dict:
    """Evaluate folders of predictions against the targets (and labels) of a manifest; write a report.

    Args:
        manifest: CSV ``path_signal,path_target[,path_label]`` of the evaluated volumes.
        predictions: ``{model name: folder}``; the prediction of signal ``<stem>.ome.tif`` is
            ``<folder>/<stem><postfix>.ome.tif`` (what the bundles' ``inference.json`` writes).
        out_dir: report folder (created): ``report.md``, ``metrics.json``, ``mips_<i>.png``,
            ``histograms.png``, ``metrics.png``, ``ap_iou.png``, ``sweep.png``.
        train_manifest: its targets give the intensity range predictions are rescaled onto, and
            (with labels) the data the watershed is tuned on. Default: the evaluated manifest.
        target_range: explicit ``(lo, hi)`` instead.
        backend: ``"watershed"`` or ``"cellpose"`` (needs ``cellpose_model``).
        watershed_params: fixed watershed parameters (skips tuning).
        tune: tune the watershed on the training targets against their labels.
        sweep_levels: threshold-sweep levels (``None`` or empty: no sweep).
        microssim: compute MicroMS3IM.
        voxel_size: ``(dz, dy, dx)`` in um for every target, required when a target file carries
            none (see :func:`voxel_sizes`).

    Returns:
        the metrics dictionary also written to ``metrics.json``.

    Raises:
        EvaluationInputError, ManifestError, ImageReadError, FileNotFoundError: checked before any
        computation (voxel sizes, manifests, files, the predictions' presence); nothing is written.
        The report files are written into a temporary folder beside ``out_dir`` and moved into
        ``out_dir`` at the end, so a failure half-way leaves no partial report.
    """
    import shutil
    import tempfile

    from common.data import read_manifest
    from common.io import read_image
    from common.report import write_json

    t0 = time.time()
    opt = {"path_label": "gt"}
    recs = read_manifest(manifest, optional=opt)
    train_recs = read_manifest(train_manifest, optional=opt) if train_manifest else recs
    tuning = backend == "watershed" and tune and not watershed_params and all("gt" in r for r in train_recs)
    spacing = voxel_sizes([r["label"] for r in recs] + ([r["label"] for r in train_recs] if tuning else []),
                          voxel_size)
    for r in recs:  # every prediction present before any work
        for n in predictions:
            _find_prediction(predictions[n], r["image"], postfix)
    if target_range is None:
        target_range = dataset_target_range([r["label"] for r in train_recs])
    lo, hi = (float(v) for v in target_range)
    has_gt = all("gt" in r for r in recs)

    def load(path):
        arr, sp, _ = read_image(path)
        return arr[0], spacing.get(path, sp)

    final_dir = out_dir
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    out_dir = tempfile.mkdtemp(prefix=".tmp_report_", dir=parent)
    try:
        result = _evaluate(recs, train_recs, tuning, predictions, out_dir, lo, hi, has_gt, load, backend,
                           watershed_params, cellpose_model, sweep_levels, postfix, microssim, title, notes, t0,
                           write_json)
        os.makedirs(final_dir, exist_ok=True)
        for name in sorted(os.listdir(out_dir)):
            os.replace(os.path.join(out_dir, name), os.path.join(final_dir, name))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    print(f"report written to {final_dir}/report.md ({result['seconds']} s)", flush=True)
    return result


def _evaluate(recs, train_recs, tuning, predictions, out_dir, lo, hi, has_gt, load, backend, watershed_params,
              cellpose_model, sweep_levels, postfix, microssim, title, notes, t0, write_json) -> dict:
    """The body of :func:`evaluate_dataset` once every input is checked; writes into ``out_dir``."""
    seg_params = dict(watershed_params or {})
    tuning_rows = []
    if tuning:
        print(f"tuning the watershed on {len(train_recs)} real target(s) against their labels", flush=True)
        ims, gts, sp = [], [], None
        for r in train_recs:
            im, sp = load(r["label"])
            ims.append(im)
            gts.append(load(r["gt"])[0].astype(np.int64))
        seg_params, tuning_rows = tune_watershed(ims, gts, sp)
    seg_params = dict(DEFAULT_WATERSHED, **seg_params) if backend == "watershed" else {}

    def seg(img, sp):
        return segment(img, sp, backend, seg_params, cellpose_model)

    names = list(predictions)
    per_volume, pix = [], {n: [] for n in names}
    segs = {n: [] for n in ["target", *names]}
    gts_all, feats = [], {n: [] for n in ["target", *names]}
    gt_feats, hist_data = [], {n: [] for n in ["target", *names]}
    sweep_inputs = {n: [] for n in names}
    targets = []
    for i, r in enumerate(recs):
        print(f"[{i + 1}/{len(recs)}] {os.path.basename(r['image'])}", flush=True)
        tgt, sp = load(r["label"])
        sig, _ = load(r["image"])
        targets.append(tgt)
        fg = foreground_of(tgt)
        s_t = seg(tgt, sp)
        segs["target"].append(s_t)
        feats["target"].append(feature_table(s_t, tgt, sp))
        hist_data["target"].append(tgt.ravel())
        gt = None
        if has_gt:
            gt = remove_border_objects(load(r["gt"])[0].astype(np.int64))
            gts_all.append(gt)
            gt_feats.append(feature_table(gt, tgt, sp))
        vol = {"signal": r["image"], "target": r["label"]}
        preds_resc = {}
        for n in names:
            pred, _ = load(_find_prediction(predictions[n], r["image"], postfix))
            if pred.shape != tgt.shape:
                raise ValueError(f"{n}: prediction {pred.shape} and target {tgt.shape} differ in shape for {r['image']}")
            m = pixel_metrics(pred, tgt, (lo, hi), sp, fg=fg, microssim=microssim)
            pix[n].append(m)
            p = rescale_to_range(pred, lo, hi)
            preds_resc[n] = p
            sweep_inputs[n].append(pred)
            hist_data[n].append(p.ravel())
            s_p = seg(p, sp)
            segs[n].append(s_p)
            feats[n].append(feature_table(s_p, p, sp))
            vol[n] = m
        per_volume.append(vol)
        if i < 3:
            _save_mips(os.path.join(out_dir, f"mips_{i}.png"), sig, tgt, preds_resc, segs, i, sp, (lo, hi))

    # --- aggregate
    result = {"target_range": [lo, hi], "n_volumes": len(recs), "backend": backend,
              "watershed_params": seg_params if backend == "watershed" else None, "tuning": tuning_rows,
              "pixel": {}, "segmentation": {}, "segmentation_vs_target": {}, "features": {}, "sweep": {},
              "per_volume": per_volume}
    keys = list(pix[names[0]][0]) if names else []
    for n in names:
        result["pixel"][n] = {k: float(np.mean([m[k] for m in pix[n]])) for k in keys}
    result["pixel"]["target (reference)"] = {"bg_std": float(np.mean(
        [background_variability(t, foreground_of(t)) for t in targets]))}
    iou = [float(v) for v in DEFAULT_IOU_THRESHOLDS]
    if has_gt:
        for n in ["target", *names]:
            r = dataset_average_precision(gts_all, segs[n])
            result["segmentation"][n] = {"ap": r["ap"].tolist(), "iou": iou, "mAP": r["mAP"],
                                         "tp": r["tp"].tolist(), "fp": r["fp"].tolist(), "fn": r["fn"].tolist()}
    for n in names:
        r = dataset_average_precision(segs["target"], segs[n])
        result["segmentation_vs_target"][n] = {"ap": r["ap"].tolist(), "iou": iou, "mAP": r["mAP"]}
    ref = None
    if gt_feats:
        import pandas as pd

        ref = pd.concat(gt_feats, ignore_index=True)
    for n in names:
        pairs = list(zip(feats["target"], feats[n], segs["target"], segs[n]))
        result["features"][n] = feature_comparison(pairs, reference=ref if ref is not None and len(ref) else None)
    if sweep_levels:
        print(f"threshold sweep at levels {list(sweep_levels)}", flush=True)
        for n in names:
            result["sweep"][n] = threshold_sweep(sweep_inputs[n], targets, (lo, hi), sp,
                                                 gts_all if has_gt else None, sweep_levels,
                                                 seg_params if backend == "watershed" else None)
    result["seconds"] = round(time.time() - t0, 1)

    _save_histograms(os.path.join(out_dir, "histograms.png"), hist_data, (lo, hi))
    _save_metric_bars(os.path.join(out_dir, "metrics.png"), result, names)
    if has_gt:
        _save_ap_curves(os.path.join(out_dir, "ap_iou.png"), result)
    if result["sweep"]:
        _save_sweep(os.path.join(out_dir, "sweep.png"), result["sweep"])
    write_json(os.path.join(out_dir, "metrics.json"), result)
    _write_markdown(os.path.join(out_dir, "report.md"), result, names, title, notes, min(len(recs), 3))
    return result


# ----------------------------------------------------------------------------------------------
# figures and Markdown
# ----------------------------------------------------------------------------------------------
def _save_mips(path, sig, tgt, preds, segs, i, spacing, rng):
    from common.report import save_mip_figure

    vols = {"input": sig, "target": tgt}
    overlays = {"target": segs["target"][i]}
    for n, p in preds.items():
        vols[n] = p
        overlays[n] = segs[n][i]
    save_mip_figure(path, vols, spacing=spacing, overlays=overlays,
                    title="orthogonal max-projections; outlines: watershed segmentation of each stack")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_histograms(path, hist_data, rng):
    from common.report import save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(rng[0], rng[1], 120)
    for n, parts in hist_data.items():
        v = np.concatenate(parts)
        ax.hist(v, bins=bins, histtype="step", density=True, label=n, lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("intensity (target units; predictions rescaled onto the training target range)")
    ax.set_ylabel("density")
    ax.legend()
    save_figure(fig, path)


def _save_metric_bars(path, result, names):
    from common.report import save_figure

    plt = _plt()
    panels = [("PSNR (dB)", ["psnr", "psnr_fg"]), ("SSIM", ["ssim", "ssim_fg"]), ("Pearson r", ["pearson", "pearson_fg"]),
              ("MicroMS3IM", ["ms3im", "ms3im_fg"]), ("background std", ["bg_std"])]
    seg = result["segmentation"]
    colour = {n: f"C{j}" for j, n in enumerate(names)}
    colour["target"] = "0.5"
    fig, axes = plt.subplots(1, len(panels) + (1 if seg else 0), figsize=(3.2 * (len(panels) + 1), 3.4))
    for ax, (title, ks) in zip(axes, panels):
        x = np.arange(len(ks))
        w = 0.8 / max(len(names), 1)
        for j, n in enumerate(names):
            vals = [result["pixel"][n].get(k, np.nan) for k in ks]
            ax.bar(x + j * w, vals, w, label=n, color=colour[n])
        ax.set_xticks(x + w * (len(names) - 1) / 2, ["whole" if not k.endswith("_fg") else "foreground" for k in ks]
                      if len(ks) > 1 else [""])
        ax.set_title(title)
    if seg:
        ax = axes[-1]
        models = list(seg)
        x = np.arange(2)
        w = 0.8 / len(models)
        for j, n in enumerate(models):
            ax.bar(x + j * w, [seg[n]["ap"][0], seg[n]["ap"][5]], w, label=n, color=colour.get(n))
        ax.set_xticks(x + w * (len(models) - 1) / 2, ["AP@0.5", "AP@0.75"])
        ax.set_title("instance AP vs ground truth")
        ax.legend(fontsize=7)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def _save_ap_curves(path, result):
    from common.report import save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for n, r in result["segmentation"].items():
        ax.plot(r["iou"], r["ap"], "o-", label=f"{n} (mAP {r['mAP']:.3f})")
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("AP = TP / (TP + FP + FN)")
    ax.set_ylim(0, 1)
    ax.legend()
    save_figure(fig, path)


def _save_sweep(path, sweep):
    from common.report import save_figure

    plt = _plt()
    keys = [k for k in ("psnr", "psnr_fg", "bg_std", "ap50", "ap75") if k in next(iter(sweep.values()))[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2))
    for ax, k in zip(np.atleast_1d(axes), keys):
        for n, rows in sweep.items():
            ax.plot([r["level"] for r in rows], [r[k] for r in rows], "o-", label=n)
        ax.set_title(k)
        ax.set_xlabel("threshold (fraction of range)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    save_figure(fig, path)


def _write_markdown(path, result, names, title, notes, n_mips):
    from common.report import markdown_table

    lines = [f"# {title}\n", notes + "\n" if notes else "",
             f"{result['n_volumes']} held-out volume(s); predictions min-max rescaled onto the training "
             f"target range [{result['target_range'][0]:.1f}, {result['target_range'][1]:.1f}]; foreground = "
             "the target's Otsu foreground. Values are means over volumes.\n",
             "## Pixel level\n"]
    cols = ["psnr", "psnr_fg", "ssim", "ssim_fg", "ms3im", "ms3im_fg", "pearson", "pearson_fg", "fsc_res_um",
            "fsc_res_um_fg", "bg_std"]
    rows = [_fmt_row(n, result["pixel"][n], cols) for n in names]
    rows.append(_fmt_row("target (reference)", result["pixel"]["target (reference)"], ["bg_std"]))
    lines.append(markdown_table(rows, ["model", *cols]).replace("| nan |", "| - |").replace(" nan |", " - |"))
    lines.append("\n`_fg`: foreground only. `fsc_res_um`: Fourier shell correlation resolution against the target "
                 "(1/7 threshold, um, lower is better). `bg_std`: std of the rescaled prediction outside the "
                 "foreground (target intensity units).\n")
    if result["segmentation"]:
        wp = result["watershed_params"]
        lines.append("## Segmentation: instance AP against the ground-truth labels\n")
        if wp:
            shown = {k: wp[k] for k in ("sigma", "min_distance_um", "clip_limit", "min_size") if k in wp}
            lines.append(f"Otsu + watershed ({'tuned on the training targets' if result['tuning'] else 'fixed'}): "
                         f"{shown}; applied unchanged to every prediction. Objects touching the lateral border "
                         "are removed from segmentations and ground truth alike.\n")
        rows = []
        for n, r in result["segmentation"].items():
            rows.append({"segmented stack": n, "AP@0.50": r["ap"][0], "AP@0.75": r["ap"][5], "AP@0.90": r["ap"][8],
                         "mAP@0.5:0.95": r["mAP"], "TP@0.5": r["tp"][0], "FP@0.5": r["fp"][0], "FN@0.5": r["fn"][0]})
        lines.append(markdown_table(rows))
    if result["segmentation_vs_target"]:
        lines.append("\n## Segmentation of the prediction against the segmentation of the target\n")
        rows = [{"model": n, "AP@0.50": r["ap"][0], "AP@0.75": r["ap"][5], "mAP@0.5:0.95": r["mAP"]}
                for n, r in result["segmentation_vs_target"].items()]
        lines.append(markdown_table(rows))
    if result["features"]:
        lines.append("\n## Morphology features (target-based vs prediction-based objects)\n")
        rows = []
        for n, f in result["features"].items():
            rows.append({"model": n, "objects (target seg.)": f["n_target"], "objects (pred. seg.)": f["n_pred"],
                         "matched@0.5": f["n_matched"], "cosine distance of median profiles": f["cosine_distance"],
                         "mean per-feature r (matched)": f["mean_correlation"]})
        lines.append(markdown_table(rows))
        feats = list(next(iter(result["features"].values()))["correlation"])
        rows = [dict(model=n, **{k: f["correlation"][k] for k in feats}) for n, f in result["features"].items()]
        lines.append("\nPer-feature Pearson r over matched objects:\n\n" + markdown_table(rows, floatfmt=".2f"))
    if result["sweep"]:
        lines.append("\n## Threshold sweep (voxels below lo + level x range set to lo)\n")
        for n, rows in result["sweep"].items():
            lines.append(f"\n**{n}**\n\n" + markdown_table(rows))
    lines.append("\n## Figures\n")
    for i in range(n_mips):
        lines.append(f"![volume {i}](mips_{i}.png)\n")
    lines.append("![intensity histograms](histograms.png) ![metrics](metrics.png)\n")
    if result["segmentation"]:
        lines.append("![AP vs IoU](ap_iou.png)\n")
    if result["sweep"]:
        lines.append("![threshold sweep](sweep.png)\n")
    lines.append(f"\nEvaluation time {result['seconds']} s.\n")
    text = "\n".join(lines)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

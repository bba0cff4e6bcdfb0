"""FUCCI cell-cycle phases: reporter thresholds, per-nucleus table, phase distribution, agreement and plot."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi

from common.fucci.ground_truth import _labels3d, edge_footprint
from common.metrics import matching
from common.synthetic import PHASE_NAMES

__all__ = ["PHASE_NAMES", "phase_from_reporters", "reporter_thresholds", "nucleus_table", "assign_phases",
           "phase_distribution", "phase_agreement", "save_phase_plot"]


def phase_from_reporters(red_on, green_on) -> np.ndarray:
    """The FUCCI rules: Cy3 (red, mKO2-hCdt1) only = ``"G1"``; GFP (green, mAG-hGeminin) only =
    ``"S/G2/M"``; both = ``"G1/S"`` (transition); neither = ``"early_G1"`` (early G1 / M exit).

    Args:
        red_on, green_on: booleans or boolean arrays of equal shape.

    Returns:
        array of phase names (:data:`PHASE_NAMES`), the shape of the inputs.
    """
    r = np.asarray(red_on, dtype=bool)
    g = np.asarray(green_on, dtype=bool)
    if r.shape != g.shape:
        raise ValueError(f"red_on and green_on must have the same shape, got {r.shape} and {g.shape}")
    table = np.array([[PHASE_NAMES[3], PHASE_NAMES[1]], [PHASE_NAMES[0], PHASE_NAMES[2]]], dtype=object)
    return table[r.astype(int), g.astype(int)]


def reporter_thresholds(values: np.ndarray, method="otsu", log: bool = True) -> float:
    """Threshold separating reporter-on from reporter-off nuclei.

    ``method="otsu"``: :func:`skimage.filters.threshold_otsu` of the per-nucleus values, by default
    of their logarithm (on/off is a ratio: the "on" population spreads over a wide range of levels,
    and Otsu on the linear scale then cuts into it); values below ``1e-3`` of the largest are
    clipped there first. Needs both populations present; with one phase only, give a number.
    A number is used as is.

    Returns:
        the threshold in the units of ``values``.
    """
    if not isinstance(method, str):
        return float(method)
    if method != "otsu":
        raise ValueError(f"threshold must be 'otsu' or a number, got {method!r}")
    from skimage.filters import threshold_otsu

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or v.min() == v.max() or (log and v.max() <= 0):
        raise ValueError("Otsu needs at least two nuclei with different (positive) levels; give a threshold value")
    if not log:
        return float(threshold_otsu(v))
    lv = np.log(np.maximum(v, 1e-3 * v.max()))
    if lv.min() == lv.max():
        raise ValueError("Otsu needs at least two nuclei with different (positive) levels; give a threshold value")
    return float(np.exp(threshold_otsu(lv)))


def _background_levels(image: np.ndarray, instances: np.ndarray, background) -> np.ndarray:
    c = image.shape[0]
    if background is None:
        return np.zeros(c)
    if isinstance(background, str):
        if background != "auto":
            raise ValueError(f"background must be 'auto', None or one number per channel, got {background!r}")
        # median of the voxels at least 2 voxels (in-slice) away from every nucleus
        near = ndi.binary_dilation(instances > 0, structure=edge_footprint(2, per_slice=True))
        out = ~near
        if not out.any():
            return np.array([float(np.percentile(image[i], 1)) for i in range(c)])
        return np.array([float(np.median(image[i][out])) for i in range(c)])
    bg = np.atleast_1d(np.asarray(background, dtype=np.float64))
    if bg.size == 1:
        bg = np.repeat(bg, c)
    if bg.size != c:
        raise ValueError(f"{bg.size} background values for {c} channels")
    return bg


def nucleus_table(instances, image, channel_names: Sequence[str] = ("Cy3", "GFP", "Hoechst"),
                  spacing=(1.0, 1.0, 1.0), red: str = "Cy3", green: str = "GFP", normalise_by: str | None = None,
                  thresholds: Mapping[str, object] | str = "otsu", background="auto", statistic: str = "median",
                  spheroid: str | None = None):
    """Per-nucleus measurements and cell-cycle phase.

    For every instance: centroid (um), volume (um^3), mean and median intensity per channel (minus
    the channel's background level); the reporter levels ``red`` and ``green`` (the ``statistic``,
    median by default: a segmentation that spills into a neighbour of another phase moves the
    mean but not the median as long as most voxels are the nucleus' own), divided by the same
    statistic of ``normalise_by`` (a DNA stain) when given, so that the dimming with depth in a
    spheroid, which affects all channels alike, cancels; a reporter is *on* above its threshold
    (Otsu over the nuclei of this table, or a user value); the phase follows
    :func:`phase_from_reporters`.

    Args:
        instances: ``ZYX`` labels.
        image: ``CZYX`` raw intensities (channels named by ``channel_names``).
        spacing: ``ZYX`` voxel size (um).
        red, green: channel names of the G1 (Cy3 / mKO2-hCdt1) and S/G2/M (GFP / mAG-hGeminin)
            reporters.
        normalise_by: DNA channel to divide the reporter levels by, or ``None`` (raw levels).
        thresholds: ``"otsu"`` or ``{red: value or "otsu", green: value or "otsu"}`` in the units
            of the reporter levels (ratios when ``normalise_by`` is set); ``None`` measures only
            (no phase columns; see :func:`assign_phases`).
        background: ``"auto"`` (median away from nuclei), ``None`` (0) or one value per channel.
        statistic: ``"median"`` or ``"mean"`` per nucleus for the reporter levels.
        spheroid: name written in a ``spheroid`` column.

    Returns:
        ``(table, thresholds)``: a pandas DataFrame with columns ``id``, ``centroid_z_um``,
        ``centroid_y_um``, ``centroid_x_um``, ``volume_um3``, ``mean_<channel>`` and
        ``median_<channel>`` per channel,
        ``level_<red>``, ``level_<green>``, ``<red>_on``, ``<green>_on``, ``phase``
        (and ``spheroid``), and the thresholds used ``{red: t, green: t}``.
    """
    import pandas as pd

    lab = _labels3d(instances, "instances")
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4 or img.shape[1:] != lab.shape:
        raise ValueError(f"image must be CZYX with the labels' shape {lab.shape}, got {img.shape}")
    names = list(channel_names)
    if len(names) != img.shape[0]:
        raise ValueError(f"{len(names)} channel names {names} for an image with {img.shape[0]} channels")
    for ch in [red, green] + ([normalise_by] if normalise_by else []):
        if ch not in names:
            raise ValueError(f"channel {ch!r} not among the channel names {names}")
    sp = np.asarray(spacing if not np.isscalar(spacing) else [spacing] * 3, dtype=np.float64)
    ids = np.unique(lab)
    ids = ids[ids > 0]
    bg = _background_levels(img, lab, background)
    cols: dict = {"id": ids}
    if ids.size:
        count = ndi.sum_labels(np.ones_like(lab), lab, ids)
        coords = [ndi.sum_labels(np.broadcast_to(np.arange(n).reshape([-1 if a == i else 1 for a in range(3)]),
                                                 lab.shape), lab, ids) / count for i, n in enumerate(lab.shape)]
        means = np.stack([ndi.mean(img[c], lab, ids) - bg[c] for c in range(img.shape[0])], 1)
        medians = np.stack([np.atleast_1d(ndi.median(img[c], lab, ids)) - bg[c] for c in range(img.shape[0])], 1)
    else:
        count, coords = np.zeros(0), [np.zeros(0)] * 3
        means = medians = np.zeros((0, img.shape[0]))
    for ax, name in enumerate("zyx"):
        cols[f"centroid_{name}_um"] = coords[ax] * sp[ax]
    cols["volume_um3"] = count * float(np.prod(sp))
    for c, name in enumerate(names):
        cols[f"mean_{name}"] = means[:, c]
    for c, name in enumerate(names):
        cols[f"median_{name}"] = medians[:, c]
    table = pd.DataFrame(cols)
    if spheroid is not None:
        table.insert(0, "spheroid", spheroid)
    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean', got {statistic!r}")
    denom = table[f"{statistic}_{normalise_by}"].to_numpy() if normalise_by else np.ones(len(table))
    denom = np.where(denom > 0, denom, np.nan)
    for ch in (red, green):
        table[f"level_{ch}"] = table[f"{statistic}_{ch}"].to_numpy() / denom
    if thresholds is None:
        return table, {}
    return assign_phases(table, red, green, thresholds)


def assign_phases(table, red: str = "Cy3", green: str = "GFP", thresholds: Mapping[str, object] | str = "otsu"):
    """Reporter on/off and phase for every row of a :func:`nucleus_table` (columns ``level_<red>``,
    ``level_<green>``), e.g. after pooling the tables of all spheroids of an experiment so that one
    threshold serves all of them (a drug that arrests every cell in G1 leaves one population,
    which a per-spheroid Otsu would split).

    Returns:
        ``(table with <red>_on, <green>_on, phase columns, {red: t, green: t})``.
    """
    table = table.copy()
    th = thresholds if isinstance(thresholds, Mapping) else {red: thresholds, green: thresholds}
    used = {}
    for ch in (red, green):
        level = table[f"level_{ch}"].to_numpy(dtype=np.float64)
        used[ch] = reporter_thresholds(level, th.get(ch, "otsu")) if len(table) else float("nan")
        table[f"{ch}_on"] = level > used[ch]
    table["phase"] = phase_from_reporters(table[f"{red}_on"].to_numpy(), table[f"{green}_on"].to_numpy()) \
        if len(table) else np.zeros(0, dtype=object)
    return table, used


def phase_distribution(phases) -> dict:
    """Fraction of nuclei in each phase, ``{phase: fraction}`` over all of :data:`PHASE_NAMES` (0 if absent)."""
    ph = list(np.asarray(phases, dtype=object).ravel())
    unknown = sorted({str(p) for p in ph} - set(PHASE_NAMES))
    if unknown:
        raise ValueError(f"unknown phase name(s) {unknown}; expected {PHASE_NAMES}")
    n = len(ph)
    return {p: (ph.count(p) / n if n else float("nan")) for p in PHASE_NAMES}


def phase_agreement(gt_instances, gt_phases: Mapping[int, str], pred_instances, pred_phases: Mapping[int, str],
                    iou_threshold: float = 0.5) -> dict:
    """How well predicted phases agree with the truth.

    Nuclei are *correctly segmented* when matched one-to-one at IoU >= ``iou_threshold``
    (:func:`common.metrics.matching`).

    Returns:
        ``n_true``, ``n_pred``, ``n_matched``, ``accuracy`` (fraction of matched nuclei with the
        true phase), ``true_distribution`` (over all true nuclei), ``pred_distribution`` (over all
        predicted nuclei), ``max_abs_diff_pp`` (largest difference between the two, percentage
        points).
    """
    m = matching(np.asarray(gt_instances), np.asarray(pred_instances), thresholds=[iou_threshold])
    g, p = m["matched_gt"][0], m["matched_pred"][0]
    ok = [gt_phases[int(a)] == pred_phases[int(b)] for a, b in zip(g, p)]
    true_ids = [int(i) for i in np.unique(gt_instances) if i > 0]
    pred_ids = [int(i) for i in np.unique(pred_instances) if i > 0]
    td = phase_distribution([gt_phases[i] for i in true_ids])
    pdist = phase_distribution([pred_phases[i] for i in pred_ids])
    return {
        "n_true": len(true_ids), "n_pred": len(pred_ids), "n_matched": len(ok),
        "accuracy": float(np.mean(ok)) if ok else float("nan"),
        "true_distribution": td, "pred_distribution": pdist,
        "max_abs_diff_pp": float(max(abs(td[k] - pdist[k]) for k in PHASE_NAMES) * 100),
    }


def save_phase_plot(distributions: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
                    title: str = "cell-cycle phase per spheroid") -> str:
    """Stacked bars: one per spheroid, the fraction of nuclei in each phase (PNG, atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.report import save_figure

    names = list(distributions)
    colours = {"G1": "#d62728", "S/G2/M": "#2ca02c", "G1/S": "#ff7f0e", "early_G1": "#7f7f7f"}
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 4))
    bottom = np.zeros(len(names))
    for ph in PHASE_NAMES:
        vals = np.array([100 * float(distributions[n].get(ph, 0.0)) for n in names])
        ax.bar(names, vals, bottom=bottom, color=colours[ph], label=ph)
        bottom += vals
    ax.set_ylabel("% of nuclei")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return save_figure(fig, str(path))

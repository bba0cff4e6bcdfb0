"""The Spotlight evaluation protocol (Kalinin et al. 2025): pixel metrics, segmentation, features, threshold sweep.

For a set of predictions of a fluorescence stack against the real (measured) stack and, where
available, ground-truth instance labels:

* **pixel level** (:func:`pixel_metrics`), on the whole image and on the foreground only (the
  target's Otsu foreground): PSNR of the prediction min-max rescaled onto the target range of
  the *training set* (the paper's recipe, which makes models with different output units
  comparable), 3D SSIM, MicroMS3IM (``microssim``), the Fourier shell correlation resolution
  (1/7 threshold), Pearson's r, and the background variability (std of the rescaled prediction
  outside the target's foreground);
* **segmentation** (:func:`segment`, :func:`tune_watershed`): Otsu + watershed
  (:func:`common.segmentation.otsu_watershed`) with parameters tuned on the real fluorescence
  targets against the ground truth and then applied unchanged to the predictions, or Cellpose
  with user-supplied weights; instance AP = TP / (TP + FP + FN) at IoU 0.50:0.05:0.95 with
  one-to-one matching, counts accumulated over the data set
  (:func:`common.metrics.dataset_average_precision`);
* **features** (:func:`feature_table`, :func:`feature_comparison`): per-object 3D morphology of
  target-based and prediction-based segmentations, cosine distance between the median profiles,
  and per-feature Pearson r over objects matched at IoU >= 0.5;
* **threshold sweep** (:func:`threshold_sweep`): the metrics above for predictions whose voxels
  below a level are set to the floor of the range (paper Fig. 3: does simply thresholding a
  baseline's prediction do what the foreground-aware loss does?).

:func:`common.spotlight.report.evaluate_dataset` runs all of it over a manifest and writes the report.
Conventions: arrays are ``ZYX`` float; ``spacing`` is ``(dz, dy, dx)`` in micrometres.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from common.errors import ZooError
from common.metrics import (
    DegenerateInputError,
    background_variability,
    dataset_average_precision,
    feature_correlation,
    feature_profile_distance,
    fourier_ring_correlation,
    frc_resolution,
    matched_feature_rows,
    microssim_3d,
    object_features,
    pearson_r,
    psnr,
    rescale_to_range,
    ssim,
)
from common.metrics import INTENSITY_FEATURES, SHAPE_FEATURES
from common.segmentation import cellpose_segment, otsu_watershed, remove_border_objects
from common.transforms import otsu_threshold

__all__ = [
    "EvaluationInputError",
    "DEFAULT_WATERSHED",
    "DEFAULT_WATERSHED_GRID",
    "DEFAULT_SWEEP_LEVELS",
    "foreground_of",
    "remove_border_objects",
    "pixel_metrics",
    "segment",
    "tune_watershed",
    "feature_table",
    "feature_comparison",
    "threshold_sweep",
    "dataset_target_range",
]

#: Otsu + watershed parameters used when no tuning is asked for (tuned on the zoo's synthetic
#: DNA-stain phantoms at 0.29 um voxels: AP@0.5 ~0.95 against their ground truth).
DEFAULT_WATERSHED = dict(clahe=True, clip_limit=0.01, sigma=2.0, min_distance_um=1.5, min_size=30.0,
                         max_size=None, remove_border=True, border_z=False, fill_holes=True)
#: Grid searched by :func:`tune_watershed` (the rest comes from :data:`DEFAULT_WATERSHED`).
DEFAULT_WATERSHED_GRID = {"sigma": (1.0, 2.0), "min_distance_um": (1.5, 2.0)}
#: Levels of the threshold sweep, as fractions of the target range above its minimum.
DEFAULT_SWEEP_LEVELS = (0.0, 0.1, 0.2, 0.3)

class EvaluationInputError(ZooError):
    """An input of the evaluation is unusable (e.g. a file without a voxel size); the message names the
    file(s), the problem and what to do."""


_MS_SSIM_SMALL = dict(betas=(0.5, 0.5), kernel_size=7)  # 2 scales, 7-px kernel: fits slices >= 12 px


def foreground_of(target) -> np.ndarray:
    """The target's Otsu foreground ``target >= t_otsu`` (bool, ZYX); empty for a constant image."""
    target = np.asarray(target)
    t = otsu_threshold(target)
    if t is None:
        return np.zeros(target.shape, bool)
    return target >= t


def _fsc_resolution(p: np.ndarray, target: np.ndarray, spacing) -> float:
    """FSC resolution of ``p`` against ``target``; ``inf`` (nothing resolved) when ``p`` is constant."""
    if p.max() == p.min():
        return float("inf")
    return frc_resolution(*fourier_ring_correlation(p, target, spacing))


def _masked_copy(x: np.ndarray, mask: np.ndarray, fill: float) -> np.ndarray:
    out = np.array(x, dtype=np.float64, copy=True)
    out[~mask] = fill
    return out


def pixel_metrics(pred, target, target_range: Sequence[float], spacing=(1.0, 1.0, 1.0), fg=None,
                  microssim: bool = True, rescale: bool = True) -> dict:
    """Pixel-level metrics of one prediction, whole image and target foreground.

    Args:
        pred: ``ZYX`` prediction in any units.
        target: ``ZYX`` real stain (raw intensities).
        target_range: ``(lo, hi)``: the prediction is min-max rescaled onto it (``rescale``), and
            ``hi - lo`` is the data range of PSNR and SSIM.
        spacing: voxel size (um), for the FSC resolution.
        fg: foreground mask (default :func:`foreground_of` ``(target)``).
        microssim: compute MicroMS3IM (needs the ``microssim`` package; about 1 s per stack).
        rescale: ``False`` when ``pred`` is already in target units.

    Returns:
        dict with ``psnr``, ``ssim``, ``pearson``, ``ms3im``, ``fsc_res_um`` (whole image),
        the same with a ``_fg`` suffix (foreground only), and ``bg_std`` (std of the rescaled
        prediction outside the foreground). Foreground-only definitions: PSNR and Pearson over the
        foreground voxels; SSIM is the local SSIM map averaged over the foreground; MicroMS3IM
        and FSC, which need whole images, are computed on copies of both stacks whose background
        voxels are set to ``lo`` (so only foreground structure differs; the shared flat background
        inflates these two values, so compare them between models, not with the whole-image ones);
        MicroMS3IM over the z-slices that contain foreground.

        Degenerate cases: a constant prediction (a collapsed model) scores Pearson 0 and an FSC
        resolution of ``inf`` (nothing resolved; lower is better), the other metrics as they come.

    Raises:
        DegenerateInputError: a constant target (no foreground, nothing to compare with), an empty
            ``fg``, or ``hi <= lo``.
    """
    lo, hi = (float(v) for v in target_range)
    target = np.asarray(target, dtype=np.float64)
    if not hi > lo:
        raise DegenerateInputError(f"target_range ({lo}, {hi}) is empty; give lo < hi (the training targets' range)")
    if target.size == 0 or target.max() == target.min():
        raise DegenerateInputError(f"the target is constant (every value {target.flat[0] if target.size else '-'}): "
                                   "no foreground and no structure to compare a prediction with; leave it out")
    p = rescale_to_range(pred, lo, hi) if rescale else np.asarray(pred, dtype=np.float64)
    fg = foreground_of(target) if fg is None else np.asarray(fg, bool)
    dr = hi - lo
    win = min(7, *(s if s % 2 else s - 1 for s in target.shape))
    out = {
        "psnr": psnr(p, target, data_range=dr),
        "psnr_fg": psnr(p, target, data_range=dr, mask=fg),
        "ssim": ssim(p, target, data_range=dr, win_size=win),
        "ssim_fg": ssim(p, target, data_range=dr, mask=fg, win_size=win),
        "pearson": pearson_r(p, target),
        "pearson_fg": pearson_r(p, target, mask=fg),
        "fsc_res_um": _fsc_resolution(p, target, spacing),
        "bg_std": background_variability(p, fg),
    }
    pm, tm = _masked_copy(p, fg, lo), _masked_copy(target, fg, lo)
    out["fsc_res_um_fg"] = _fsc_resolution(pm, tm, spacing)
    if microssim:
        out["ms3im"] = microssim_3d(p, target, **_MS_SSIM_SMALL)
        zs = np.flatnonzero(fg.any(axis=(1, 2)))  # a slice without foreground is constant here: no SSIM
        out["ms3im_fg"] = microssim_3d(pm[zs], tm[zs], **_MS_SSIM_SMALL)  # fg is not empty (checked by psnr_fg)
    return out


def segment(image, spacing=(1.0, 1.0, 1.0), backend: str = "watershed", params: Mapping | None = None,
            cellpose_model: str | None = None, **cellpose_kwargs) -> np.ndarray:
    """Instance labels of a nuclear stain (real or predicted), ``ZYX`` int32.

    Args:
        backend: ``"watershed"`` (:func:`common.segmentation.otsu_watershed` with
            :data:`DEFAULT_WATERSHED` updated by ``params``) or ``"cellpose"``
            (:func:`common.segmentation.cellpose_segment` in 3D with the weights file
            ``cellpose_model``; objects touching the lateral border are removed as for the
            watershed).
    """
    if backend == "watershed":
        return otsu_watershed(image, spacing=spacing, **dict(DEFAULT_WATERSHED, **dict(params or {})))
    if backend == "cellpose":
        kw = dict(do_3D=True, anisotropy=float(spacing[0]) / float(spacing[-1]))
        kw.update(cellpose_kwargs)
        return remove_border_objects(cellpose_segment(np.asarray(image, np.float32), cellpose_model, **kw))
    raise ValueError(f"backend must be 'watershed' or 'cellpose', got {backend!r}")


def tune_watershed(images: Sequence[np.ndarray], gt_labels: Sequence[np.ndarray], spacing=(1.0, 1.0, 1.0),
                   grid: Mapping[str, Sequence] | None = None, base: Mapping | None = None,
                   border_z: bool = False, verbose: bool = True) -> tuple[dict, list[dict]]:
    """Grid-search Otsu + watershed parameters that maximise mAP (IoU 0.5:0.95) against ground truth.

    Tune on the *real* fluorescence targets, then apply the result unchanged to predictions.

    Args:
        images: ``ZYX`` real stains.
        gt_labels: their ground-truth instance labels (objects touching the lateral border are
            removed first, as the watershed removes its own).
        grid: ``{parameter: values}`` of :func:`common.segmentation.otsu_watershed` (default
            :data:`DEFAULT_WATERSHED_GRID`).
        base: the other parameters (default :data:`DEFAULT_WATERSHED`).

    Returns:
        ``(best_params, rows)``: the full parameter dict, and one row per grid point with its
        ``ap50``, ``ap75`` and ``mAP``.
    """
    grid = dict(DEFAULT_WATERSHED_GRID if grid is None else grid)
    base = dict(DEFAULT_WATERSHED, **dict(base or {}))
    gts = [remove_border_objects(g, border_z) for g in gt_labels]
    rows, best, best_key = [], None, None
    names = list(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        params = dict(base, **dict(zip(names, values)))
        segs = [otsu_watershed(im, spacing=spacing, **params) for im in images]
        r = dataset_average_precision(gts, segs)
        row = dict(zip(names, values), ap50=float(r["ap"][0]), ap75=float(r["ap"][5]), mAP=float(r["mAP"]))
        rows.append(row)
        if verbose:
            print(f"  watershed {dict(zip(names, values))}: AP@0.5 {row['ap50']:.3f}, mAP {row['mAP']:.3f}", flush=True)
        key = (row["mAP"], row["ap50"])
        if best_key is None or key > best_key:
            best, best_key = params, key
    return best, rows


def feature_table(labels, intensity, spacing) -> "pandas.DataFrame":  # noqa: F821
    """:func:`common.metrics.object_features` (empty table with the right columns when no object)."""
    return object_features(labels, intensity, spacing)


def feature_comparison(pairs: Sequence[tuple], reference=None, iou_threshold: float = 0.5) -> dict:
    """Compare target-based and prediction-based object features over a data set.

    Args:
        pairs: per image ``(feats_target, feats_pred, seg_target, seg_pred)``: the feature tables
            (:func:`feature_table`) of the segmentation of the target and of the prediction, and
            those label images.
        reference: population providing the z-score statistics of the profile distance (e.g. the
            ground-truth objects measured on the targets); default the target-based objects.
        iou_threshold: matching threshold for the per-feature correlation.

    Returns:
        dict: ``cosine_distance`` between the median profiles of the pooled populations
        (:func:`common.metrics.feature_profile_distance`), ``n_target``, ``n_pred``, ``n_matched``,
        ``correlation`` ``{feature: Pearson r over matched objects pooled over images}`` and
        ``mean_correlation`` (over features, NaN-free ones). Not available, NaN by design (and
        ``-`` in the report): ``cosine_distance`` and every correlation when either side has no
        object, a feature's r when fewer than 2 objects are matched (r of a constant feature is 0).
    """
    import pandas as pd

    ft = pd.concat([p[0] for p in pairs], ignore_index=True)
    fp = pd.concat([p[1] for p in pairs], ignore_index=True)
    cols = [c for c in (*SHAPE_FEATURES, *INTENSITY_FEATURES) if c in ft and c in fp]
    out = {"n_target": int(len(ft)), "n_pred": int(len(fp))}
    if len(ft) == 0 or len(fp) == 0:
        out.update(cosine_distance=float("nan"), n_matched=0, correlation={c: float("nan") for c in cols},
                   mean_correlation=float("nan"))
        return out
    out["cosine_distance"] = feature_profile_distance(ft, fp, features=cols, reference=reference)
    rows = [matched_feature_rows(f_t, f_p, s_t, s_p, cols, iou_threshold) for f_t, f_p, s_t, s_p in pairs]
    a = pd.concat([r[0] for r in rows], ignore_index=True)
    b = pd.concat([r[1] for r in rows], ignore_index=True)
    out["n_matched"] = int(len(a))
    out["correlation"] = feature_correlation(a, b, cols)
    vals = [v for v in out["correlation"].values() if np.isfinite(v)]
    out["mean_correlation"] = float(np.mean(vals)) if vals else float("nan")
    return out


def threshold_sweep(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], target_range: Sequence[float],
                    spacing=(1.0, 1.0, 1.0), gt_labels: Sequence[np.ndarray] | None = None,
                    levels: Sequence[float] = DEFAULT_SWEEP_LEVELS, seg_params: Mapping | None = None) -> list[dict]:
    """Metrics of thresholded predictions (paper Fig. 3).

    Each prediction is rescaled onto ``target_range = (lo, hi)``; at level ``f`` every voxel below
    ``lo + f (hi - lo)`` is set to ``lo``. Level 0 is the unthresholded prediction.

    Returns:
        one row per level: ``level``, mean ``psnr``, ``psnr_fg``, ``ssim``, ``pearson``, ``bg_std``
        over images and, with ``gt_labels``, the watershed's dataset ``ap50``, ``ap75``, ``mAP``.
    """
    lo, hi = (float(v) for v in target_range)
    rescaled = [rescale_to_range(p, lo, hi) for p in preds]
    fgs = [foreground_of(t) for t in targets]
    gts = [remove_border_objects(g) for g in gt_labels] if gt_labels is not None else None
    rows = []
    for f in levels:
        level = lo + float(f) * (hi - lo)
        th = [np.where(p >= level, p, lo) for p in rescaled]
        per = [pixel_metrics(q, t, (lo, hi), spacing, fg=m, microssim=False, rescale=False)
               for q, t, m in zip(th, targets, fgs)]
        row = {"level": float(f)}
        for k in ("psnr", "psnr_fg", "ssim", "pearson", "bg_std"):
            row[k] = float(np.mean([r[k] for r in per]))
        if gts is not None:
            segs = [segment(q, spacing, params=seg_params) for q in th]
            r = dataset_average_precision(gts, segs)
            row.update(ap50=float(r["ap"][0]), ap75=float(r["ap"][5]), mAP=float(r["mAP"]))
        rows.append(row)
    return rows


def dataset_target_range(target_paths: Sequence[str]) -> tuple[float, float]:
    """``(min, max)`` of the raw intensities over a set of target files (e.g. the training targets)."""
    from common.io import read_image

    lo, hi = np.inf, -np.inf
    for p in target_paths:
        arr, _, _ = read_image(p)
        lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
    if not hi > lo:
        raise DegenerateInputError(f"the targets {list(target_paths)} are constant (every value {lo:g}): no "
                                   "intensity range to rescale predictions onto; give --target_range lo,hi or "
                                   "targets with structure")
    return float(lo), float(hi)

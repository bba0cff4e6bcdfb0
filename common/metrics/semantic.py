"""Semantic segmentation scores per class: Dice, IoU, precision, recall."""

from __future__ import annotations

import numpy as np

from common.metrics.base import _safe_ratio

__all__ = ["per_class_scores"]


def per_class_scores(gt_sem, pred_sem, n_classes, zero_division=np.nan):
    """Per-class precision, recall, F1 (Dice) and IoU of semantic label maps.

    Args:
        gt_sem, pred_sem (ndarray of int, shape (...)): Class index per voxel, values in ``0 .. n_classes - 1``.
        n_classes (int):
        zero_division (float): Value for a score whose denominator is 0 (class absent from both images for
            F1/IoU, absent from the prediction for precision, from the ground truth for
            recall). Default NaN, so that ``np.nanmean`` skips absent classes.

    Returns:
        dict of ndarray, each shape (n_classes,) unless noted: ``precision`` TP/(TP+FP), ``recall`` TP/(TP+FN), ``f1``
            2TP/(2TP+FP+FN), ``iou`` TP/(TP+FP+FN), ``support`` (ground-truth voxel count), ``confusion`` (n_classes,
            n_classes) with rows = ground truth, columns = prediction.
    """
    gt_sem = np.asarray(gt_sem)
    pred_sem = np.asarray(pred_sem)
    if gt_sem.shape != pred_sem.shape:
        raise ValueError(f"gt_sem and pred_sem must have the same shape, got {gt_sem.shape} and {pred_sem.shape}")
    g = gt_sem.ravel().astype(np.int64)
    p = pred_sem.ravel().astype(np.int64)
    for name, a in (("gt_sem", g), ("pred_sem", p)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} has values outside 0..{n_classes - 1}")
    conf = np.bincount(g * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(conf).astype(np.float64)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    return {
        "precision": _safe_ratio(tp, tp + fp, zero_division),
        "recall": _safe_ratio(tp, tp + fn, zero_division),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn, zero_division),
        "iou": _safe_ratio(tp, tp + fp + fn, zero_division),
        "support": conf.sum(1),
        "confusion": conf,
    }

"""MONAI metric classes and ignite handlers: Pearson r, foreground Pearson r, range PSNR, data-set instance AP."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from common.metrics.base import DEFAULT_IOU_THRESHOLDS, DegenerateInputError
from common.metrics.instances import aggregated_jaccard_index, matching, scores_from_counts

__all__ = ["PearsonMetric", "PearsonR", "RangePSNRMetric", "RangePSNR", "ForegroundPearsonMetric", "ForegroundPearsonR",
           "InstanceMatchingMetric", "InstanceAP"]


def _batch_pearson(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson r of batch-first tensors (B, C, ...) -> (B, 1); constant -> 0."""
    if y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
    if y_pred.ndim < 2:
        raise ValueError("expected batch-first tensors (B, C, ...)")
    x = y_pred.detach().reshape(y_pred.shape[0], -1).double()
    t = y.detach().reshape(y.shape[0], -1).double().to(x.device)
    const = (x.amax(1) == x.amin(1)) | (t.amax(1) == t.amin(1))
    dx = x - x.mean(1, keepdim=True)
    dt = t - t.mean(1, keepdim=True)
    den = torch.sqrt((dx * dx).sum(1) * (dt * dt).sum(1))
    r = (dx * dt).sum(1) / torch.where(den > 0, den, torch.ones_like(den))
    r = torch.where(const | (den == 0), torch.zeros_like(r), r).clamp(-1.0, 1.0)
    return r.float().unsqueeze(1)


class PearsonMetric(CumulativeIterationMetric):
    """Per-sample Pearson correlation, accumulated over iterations (MONAI metric).

    Each batch item (all channels and voxels flattened) gives one r; a constant
    prediction or target gives r = 0 (not NaN). ``aggregate()`` reduces the buffer
    of shape (N, 1) with ``reduction`` (default: mean over all samples).

    Usage in a bundle config::

        {"_target_": "IgniteMetricHandler",
         "metric_fn": {"_target_": "common.metrics.PearsonMetric"},
         "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}

    or simply ``{"_target_": "common.metrics.PearsonR", ...}``.

    Args:
        reduction (MetricReduction or str): As in MONAI (``"mean"``, ``"none"``, ...).
        get_not_nans (bool): Also return the count of non-NaN values from ``aggregate``.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError(f"{type(self).__name__} needs both y_pred and y")
        return self._per_sample(y_pred, y)

    def _per_sample(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(B, 1)`` values of one batch; subclasses measure something else here."""
        return _batch_pearson(y_pred, y)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class PearsonR(IgniteMetricHandler):
    """Ignite handler computing the mean per-sample Pearson r (like ``monai.handlers.MeanDice``).

    Args:
        reduction (MetricReduction or str): Reduction over samples (default mean).
        output_transform (callable): Extracts ``(y_pred, y)`` from ``engine.state.output``, e.g.
            ``monai.handlers.from_engine(["pred", "label"])``.
        save_details (bool): Store per-sample values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=PearsonMetric(reduction=reduction),
            output_transform=output_transform,
            save_details=save_details,
        )


def _batch_range_psnr(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) with ``data_range = max(y) - min(y)`` of each target -> (B, 1).

    MONAI's ``PSNRMetric`` needs one fixed ``max_val``; z-scored microscopy targets have none, so
    each sample uses its own target range (the convention of :func:`psnr`). A perfect prediction
    gives +inf; a constant target (range 0) has no PSNR: NaN in the buffer, which MONAI's mean
    reduction leaves out (as MONAI's ``DiceMetric`` does with an empty ground truth) and which
    :meth:`RangePSNRMetric.aggregate` refuses when no sample is left.
    """
    x = y_pred.detach().reshape(y_pred.shape[0], -1).double()
    t = y.detach().reshape(y.shape[0], -1).double().to(x.device)
    mse = ((x - t) ** 2).mean(1)
    rng = t.amax(1) - t.amin(1)
    val = 10.0 * torch.log10(rng**2 / mse)
    if not bool(torch.isfinite(x).all()):
        raise DegenerateInputError("RangePSNR: the prediction holds NaN or infinite values (the network diverged, "
                                   "or its input is not finite); check the training loss and the input images")
    val = torch.where(rng > 0, val, torch.full_like(val, float("nan")))
    return val.float().unsqueeze(1)


class RangePSNRMetric(PearsonMetric):
    """Per-sample PSNR using each target's intensity range, accumulated like :class:`PearsonMetric`.

    Same value as :func:`psnr` ``(pred, target)`` per sample. Where :func:`psnr` raises for a
    constant target, this metric (which sees whole validation sets, following MONAI's convention)
    records NaN for that sample and leaves it out of the mean; ``get_not_nans=True`` returns how
    many samples counted. ``aggregate()`` raises :class:`DegenerateInputError` when every
    sample's target is constant, instead of MONAI's 0.
    """

    def _per_sample(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _batch_range_psnr(y_pred, y)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        data = self.get_buffer()
        if isinstance(data, torch.Tensor) and data.numel() and bool(torch.isnan(data).all()):
            raise DegenerateInputError(f"RangePSNR: all {data.shape[0]} target(s) are constant, so PSNR over the "
                                       "target's range is undefined; validate on targets with structure "
                                       "(scripts/check_data.py lists constant images)")
        return super().aggregate(reduction)


class RangePSNR(IgniteMetricHandler):
    """Ignite handler: mean per-sample PSNR (dB) with the target's range as ``data_range``."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, output_transform: Callable = lambda x: x,
                 save_details: bool = True) -> None:
        super().__init__(metric_fn=RangePSNRMetric(reduction=reduction), output_transform=output_transform,
                         save_details=save_details)


def _batch_foreground_pearson(y_pred: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-sample Pearson r over the voxels where ``y >= threshold`` -> (B, 1); < 2 voxels or constant -> 0."""
    if y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
    x = y_pred.detach().reshape(y_pred.shape[0], -1).double()
    t = y.detach().reshape(y.shape[0], -1).double().to(x.device)
    m = (t >= threshold).double()
    n = m.sum(1)
    nn_ = torch.where(n > 0, n, torch.ones_like(n))
    dx = (x - (x * m).sum(1, keepdim=True) / nn_[:, None]) * m
    dt = (t - (t * m).sum(1, keepdim=True) / nn_[:, None]) * m
    den = torch.sqrt((dx * dx).sum(1) * (dt * dt).sum(1))
    r = (dx * dt).sum(1) / torch.where(den > 0, den, torch.ones_like(den))
    r = torch.where((n < 2) | (den == 0), torch.zeros_like(r), r).clamp(-1.0, 1.0)
    return r.float().unsqueeze(1)


class ForegroundPearsonMetric(PearsonMetric):
    """Per-sample Pearson r restricted to the target's foreground ``y >= threshold``.

    With Otsu-standardised targets (:class:`common.spotlight.OtsuStandardize`) the default
    ``threshold=0.0`` is the target's Otsu foreground, where Spotlight's loss supervises
    intensities. Same value as ``pearson_r(pred, target, mask=target >= threshold)``; a sample
    with fewer than 2 foreground voxels or a constant prediction there gives 0.
    """

    def __init__(self, threshold: float = 0.0, reduction: MetricReduction | str = MetricReduction.MEAN,
                 get_not_nans: bool = False) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        self.threshold = float(threshold)

    def _per_sample(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _batch_foreground_pearson(y_pred, y, self.threshold)


class ForegroundPearsonR(IgniteMetricHandler):
    """Ignite handler: mean per-sample foreground Pearson r (see :class:`ForegroundPearsonMetric`)."""

    def __init__(self, threshold: float = 0.0, reduction: MetricReduction | str = MetricReduction.MEAN,
                 output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__(metric_fn=ForegroundPearsonMetric(threshold=threshold, reduction=reduction),
                         output_transform=output_transform, save_details=save_details)


class InstanceMatchingMetric(CumulativeIterationMetric):
    """Instance matching of predicted vs ground-truth label images, accumulated over a data set.

    Every image (each batch item, on every DDP rank) adds one buffer row
    ``[TP(T), FP(T), FN(T), AJI]`` from :func:`matching` and :func:`aggregated_jaccard_index`;
    ``aggregate()`` sums the counts over **all** images before dividing (every object weighs the
    same, as :func:`dataset_average_precision`; not only the last image of a batch) and returns:

    * ``"mAP"``: mean over the IoU thresholds of TP/(TP+FP+FN);
    * ``"ap"``, ``"f1"``, ``"precision"``, ``"recall"``: at ``iou_threshold``;
    * ``"aji"``: mean over images of the aggregated Jaccard index.

    Args:
        metric (str): One of the names above.
        thresholds (sequence of float): IoU thresholds (default 0.50, 0.55, ..., 0.95).
        iou_threshold (float): Threshold of ``"ap"``, ``"f1"``, ``"precision"``, ``"recall"`` (must be in
            ``thresholds``).

    Inputs ``y_pred``, ``y``: integer label images ``(B, 1, Y, X)`` / ``(B, 1, Z, Y, X)`` or lists
    of ``(1, ...)`` (images may differ in size).
    """

    METRICS = ("mAP", "ap", "f1", "precision", "recall", "aji")

    def __init__(self, metric: str = "mAP", thresholds=DEFAULT_IOU_THRESHOLDS, iou_threshold: float = 0.5) -> None:
        super().__init__()
        if metric not in self.METRICS:
            raise ValueError(f"metric must be one of {self.METRICS}, got {metric!r}")
        self.metric = metric
        self.thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        hits = np.flatnonzero(np.isclose(self.thresholds, iou_threshold))
        if metric in ("ap", "f1", "precision", "recall") and hits.size == 0:
            raise ValueError(f"iou_threshold {iou_threshold} is not among the thresholds {self.thresholds.tolist()}")
        self.index = int(hits[0]) if hits.size else 0

    @staticmethod
    def _labels(t: torch.Tensor) -> np.ndarray:
        a = t.detach().cpu().numpy()
        if a.shape[0] != 1:
            raise ValueError(f"expected one channel of instance labels, got shape {tuple(a.shape)}")
        return np.rint(a[0]).astype(np.int64)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("InstanceMatchingMetric needs both y_pred and y")
        if y_pred.shape[0] != y.shape[0] or y_pred.shape[2:] != y.shape[2:]:
            raise ValueError(f"y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)} do not match")
        rows = []
        for p, g in zip(y_pred, y):
            gl, pl = self._labels(g), self._labels(p)
            m = matching(gl, pl, self.thresholds)
            rows.append(np.concatenate([m["tp"], m["fp"], m["fn"], [aggregated_jaccard_index(gl, pl)]]))
        return torch.as_tensor(np.stack(rows), dtype=torch.float64)

    def counts(self):
        """Summed ``(tp, fp, fn)`` (each shape (T,)) and the per-image AJI, over everything seen so far."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("no image has been evaluated")
        d = data.reshape(-1, 3 * self.thresholds.size + 1).double().cpu().numpy()
        t = self.thresholds.size
        return d[:, :t].sum(0), d[:, t:2 * t].sum(0), d[:, 2 * t:3 * t].sum(0), d[:, -1]

    def aggregate(self):
        tp, fp, fn, aji = self.counts()
        if self.metric == "aji":
            return torch.tensor(float(aji.mean()), dtype=torch.float64)
        s = scores_from_counts(tp, fp, fn)
        if self.metric == "mAP":
            return torch.tensor(s["mAP"], dtype=torch.float64)
        return torch.tensor(float(s[self.metric][self.index]), dtype=torch.float64)


class InstanceAP(IgniteMetricHandler):
    """Ignite handler of :class:`InstanceMatchingMetric` (mAP by default) for validation/evaluation.

    Usage in a bundle config (the prediction post-processed to labels under ``pred_instances``,
    the ground truth under ``instances``)::

        {"_target_": "common.metrics.InstanceAP", "metric": "mAP",
         "output_transform": "$monai.handlers.from_engine(['pred_instances', 'instances'])"}
    """

    def __init__(self, metric: str = "mAP", thresholds=DEFAULT_IOU_THRESHOLDS, iou_threshold: float = 0.5,
                 output_transform: Callable = lambda x: x, save_details: bool = False) -> None:
        super().__init__(metric_fn=InstanceMatchingMetric(metric, thresholds, iou_threshold),
                         output_transform=output_transform, save_details=save_details)

"""ISL cell instances from the network's [distance, mask logit] output by h-maxima watershed (Bonte et al.)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from common.segmentation import _size_filter, hmaxima_watershed
from common.transforms import _channels_np, _like

__all__ = ["DistanceMaskToInstances", "DistanceMaskToInstancesd"]


class DistanceMaskToInstances(Transform):
    """Network output ``[distance, mask logit]`` -> instance labels (h-maxima watershed).

    The predicted distance map (negative values clipped to 0) is flooded from its h-maxima inside
    the predicted mask ``sigmoid(logit) > mask_threshold``, with
    :func:`common.segmentation.hmaxima_watershed`; objects smaller than ``min_size`` pixels are
    removed and the rest renumbered ``1..n``.

    Args:
        h: minimal dynamic of a distance maximum to seed a cell (units of the normalised distance).
        reconstruct: markers from the reconstruction of ``f - h`` under ``f`` (the authors' code)
            instead of plain h-maxima; see :func:`common.segmentation.hmaxima_watershed`.
        mask_threshold: probability threshold of the mask channel.
        logits: the mask channel holds logits (default; the bundle's network has no final
            activation). ``False``: it holds probabilities already.
        min_size: smallest object kept, in pixels.
        connectivity: neighbourhood (1 .. ndim) of markers and watershed.
        distance_channel, mask_channel: channel indices in the prediction.

    Input: ``CYX`` / ``CZYX`` (``C >= 2``) array or tensor.
    Output: ``1YX`` / ``1ZYX`` ``int32`` labels of the input's type (a ``MetaTensor`` keeps its meta).
    """

    def __init__(self, h: float = 0.3, reconstruct: bool = False, mask_threshold: float = 0.5, logits: bool = True,
                 min_size: int = 0, connectivity: int = 1, distance_channel: int = 0, mask_channel: int = 1):
        if not h > 0:
            raise ValueError(f"h must be > 0, got {h}")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"mask_threshold is a probability in (0, 1), got {mask_threshold}")
        self.h = float(h)
        self.reconstruct = bool(reconstruct)
        self.mask_threshold = float(mask_threshold)
        self.logits = bool(logits)
        self.min_size = int(min_size)
        self.connectivity = int(connectivity)
        self.distance_channel = int(distance_channel)
        self.mask_channel = int(mask_channel)

    def labels_np(self, pred: np.ndarray) -> np.ndarray:
        """``int32`` labels (no channel axis) from a ``CYX`` / ``CZYX`` numpy prediction."""
        pred = np.asarray(pred, dtype=np.float64)
        if pred.ndim not in (3, 4) or pred.shape[0] <= max(self.distance_channel, self.mask_channel):
            raise ValueError(f"expected a CYX/CZYX prediction with channels [distance, mask], got shape {pred.shape}")
        if not np.isfinite(pred).all():
            raise ValueError("prediction contains NaN/inf")
        dist = np.clip(pred[self.distance_channel], 0.0, None)
        m = pred[self.mask_channel]
        if self.logits:  # sigmoid(x) > t  <=>  x > logit(t), without overflow
            mask = m > np.log(self.mask_threshold / (1.0 - self.mask_threshold))
        else:
            mask = m > self.mask_threshold
        # a one-pixel background frame, kept although hmaxima_watershed frames its own input: without it
        # the MONAI Label result of the bundle differed from the in-process one (tests/
        # test_isl_cell_instance_bundle.py::test_monailabel_bundle_infer_task_returns_instance_labels)
        inner = tuple(slice(1, -1) for _ in range(dist.ndim))
        lab = hmaxima_watershed(np.pad(dist, 1), np.pad(mask, 1), h=self.h, reconstruct=self.reconstruct,
                                connectivity=self.connectivity)[inner]
        return _size_filter(lab, self.min_size)

    def __call__(self, img):
        return _like(img, self.labels_np(_channels_np(img))[None])


class DistanceMaskToInstancesd(MapTransform):
    """Dictionary version of :class:`DistanceMaskToInstances`.

    ``output_keys`` default to ``keys`` (the prediction is replaced by its labels); e.g.
    ``keys="pred", output_keys="pred_instances"`` keeps the raw maps as well.
    """

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection | None = None, h: float = 0.3,
                 reconstruct: bool = False, mask_threshold: float = 0.5, logits: bool = True, min_size: int = 0,
                 connectivity: int = 1, distance_channel: int = 0, mask_channel: int = 1,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        out = self.keys if output_keys is None else ([output_keys] if isinstance(output_keys, str) else list(output_keys))
        if len(out) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(out)} output_keys")
        self.output_keys = tuple(out)
        self.t = DistanceMaskToInstances(h, reconstruct, mask_threshold, logits, min_size, connectivity,
                                         distance_channel, mask_channel)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for k, o in self.key_iterator(d, self.output_keys):
            d[o] = self.t(d[k])
        return d

"""Intensity normalisation, resampling and patch helpers for microscopy volumes.

Array transforms take channel-first arrays or tensors (``CZYX`` / ``CYX``) and return the same
type; each has a dictionary twin (``Food``). MONAI's own transforms are used where they do the
job (``Spacingd`` for resampling, ``DivisiblePadd`` / ``SpatialPadd`` for padding,
``RandSpatialCropd`` for uniform random patches); what is here is what MONAI lacks.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Spacingd, Transform

__all__ = [
    "ZScoreNormalize",
    "ZScoreNormalized",
    "ResampleToSpacingd",
    "center_slices",
]


def center_slices(n_z: int, n_slices: int) -> slice:
    """The ``n_slices`` z-slices around the centre of a stack of ``n_z`` slices (all if fewer)."""
    if n_slices is None or n_slices >= n_z:
        return slice(0, n_z)
    start = (n_z - n_slices) // 2
    return slice(start, start + n_slices)


class ZScoreNormalize(Transform):
    """Per-channel z-score: ``(x - mean) / std``.

    ``mode="whole"`` takes the statistics of the whole image; ``mode="center_slices"`` takes them
    from the ``n_slices`` z-slices around the centre of a ``CZYX`` stack (pytorch_fnet's choice for
    the DNA channel, robust to empty slices at the top and bottom of a stack) and applies them to
    the whole stack. A constant channel has std 0: it becomes all zeros (no division by zero).

    Input/output: ``CZYX`` or ``CYX`` array or tensor, float32.
    """

    def __init__(self, mode: str = "whole", n_slices: int = 32, eps: float = 1e-8):
        if mode not in ("whole", "center_slices"):
            raise ValueError(f"mode must be 'whole' or 'center_slices', got {mode!r}")
        self.mode = mode
        self.n_slices = n_slices
        self.eps = eps

    def __call__(self, img):
        is_tensor = isinstance(img, torch.Tensor)
        x = img.float() if is_tensor else np.asarray(img, dtype=np.float32)
        out = []
        for c in range(x.shape[0]):
            ch = x[c]
            ref = ch
            if self.mode == "center_slices":
                if ch.ndim != 3:
                    raise ValueError("mode='center_slices' needs CZYX input")
                ref = ch[center_slices(ch.shape[0], self.n_slices)]
            mean = float(ref.mean())
            std = float(ref.std()) if not is_tensor else float(ref.double().std(unbiased=False))
            out.append((ch - mean) / std if std > self.eps else ch - mean)
        if is_tensor:
            res = torch.stack(out)
            if isinstance(img, MetaTensor):
                res = MetaTensor(res, affine=img.affine, meta=img.meta, applied_operations=img.applied_operations)
            return res
        return np.stack(out).astype(np.float32)


class ZScoreNormalized(MapTransform):
    """Dictionary version of :class:`ZScoreNormalize`."""

    def __init__(self, keys: KeysCollection, mode: str = "whole", n_slices: int = 32,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.t = ZScoreNormalize(mode, n_slices)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for k in self.key_iterator(d):
            d[k] = self.t(d[k])
        return d


class ResampleToSpacingd(Spacingd):
    """MONAI ``Spacingd`` that resamples to ``pixdim`` micrometres (ZYX order) only when it should.

    * ``pixdim=None`` disables resampling (the transform is the identity);
    * images whose file carried no voxel size (``meta["spacing_known"] is False``) are left as they
      are, with a warning, rather than blown up from an assumed 1 um to e.g. 0.29 um.

    It stays invertible (``Invertd`` maps predictions back to the input grid), because it *is*
    ``Spacingd`` whenever it resamples.
    """

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float] | float | None, skip_unknown: bool = True,
                 **kwargs):
        self.enabled = pixdim is not None
        self.skip_unknown = skip_unknown
        super().__init__(keys, pixdim=pixdim if pixdim is not None else 1.0, **kwargs)

    def __call__(self, data, lazy=None):
        if not self.enabled:
            return dict(data)
        d = dict(data)
        if self.skip_unknown:
            unknown = [k for k in self.key_iterator(d)
                       if isinstance(d[k], MetaTensor) and d[k].meta.get("spacing_known") is False]
            if unknown:
                names = [str(d[k].meta.get("filename_or_obj")) for k in unknown]
                warnings.warn(f"no voxel size in {names}; not resampling (set it in the file's OME metadata)")
                return d
        return super().__call__(d, lazy=lazy)

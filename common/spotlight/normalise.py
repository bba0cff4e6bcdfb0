"""Spotlight's standardisation, per channel (x - Otsu threshold) / std, and the pre-training foreground check."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Transform

from common.transforms import DictTwin, _channels_np, _like, otsu_threshold

__all__ = ["OtsuStandardize", "OtsuStandardized", "NoForegroundError", "check_foreground"]


class OtsuStandardize(Transform):
    """Per-channel ``(x - t_otsu) / std``: Spotlight's standardisation (Otsu threshold instead of the mean).

    The threshold and the standard deviation (population, ddof 0) are computed per image and
    channel on the raw intensities it receives (the paper's recipe). After it, ``x >= 0`` is
    exactly the image's Otsu foreground, so a fixed threshold of 0 gives the foreground of any
    patch cut from it. A constant channel (no threshold, std 0) becomes all zeros.
    ``MetaTensor`` inputs record ``meta["otsu_threshold"]`` and ``meta["otsu_std"]`` (one value per
    channel) so that predictions can be mapped back to intensities.

    Input/output: ``CZYX`` or ``CYX`` array or tensor, float32.
    """

    def __init__(self, nbins: int = 256, eps: float = 1e-8):
        self.nbins = int(nbins)
        self.eps = float(eps)

    def __call__(self, img):
        x = _channels_np(img).astype(np.float64)
        out = np.zeros(x.shape, np.float32)
        ts, ss = [], []
        for c in range(x.shape[0]):
            t = otsu_threshold(x[c], self.nbins)
            s = float(x[c].std())
            if t is None or s <= self.eps:
                ts.append(float(x[c].flat[0]) if x[c].size else 0.0)
                ss.append(0.0)
                continue
            out[c] = (x[c] - t) / s
            ts.append(t)
            ss.append(s)
        res = _like(img, out)
        if isinstance(res, MetaTensor):
            res.meta["otsu_threshold"] = ts
            res.meta["otsu_std"] = ss
        return res


class OtsuStandardized(DictTwin):
    """Dictionary version of :class:`OtsuStandardize`."""

    def __init__(self, keys: KeysCollection, nbins: int = 256, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.t = OtsuStandardize(nbins)


class NoForegroundError(ValueError):
    """A Spotlight target has (almost) no foreground: the loss would have nothing to focus on."""


def check_foreground(records: Sequence[dict], key: str = "label", threshold: float = 0.0,
                     min_fraction: float = 0.001, spatial_dims: int = 3) -> list[float]:
    """Foreground fraction of each record's target after :class:`OtsuStandardize` (``x >= threshold``).

    Spotlight's loss is a Dice term on the foreground; a target whose Otsu foreground is a handful
    of voxels (a blank or saturated-speck stack) trains silently to nonsense (loss ~1e4, foreground
    Pearson 0). Checked for every file before training starts, so all bad files are named at once.

    Returns:
        the fraction per record.

    Raises:
        NoForegroundError: one line per target below ``min_fraction``.
    """
    from common.io import read_image

    fractions, problems = [], []
    for rec in records:
        arr, _, _ = read_image(rec[key], spatial_dims=spatial_dims)
        x = OtsuStandardize()(arr)
        frac = float((np.asarray(x) >= threshold).mean()) if arr.size else 0.0
        fractions.append(frac)
        if frac < min_fraction:
            where = f"{rec.get('_manifest', 'datalist')} line {rec.get('_line', '?')}: " if "_line" in rec else ""
            problems.append(f"{where}{rec[key]}: target foreground is {frac:.4%} of the image "
                            f"({int(round(frac * arr.size))} voxels), below min_image_fg_fraction {min_fraction:.4%}")
    if problems:
        raise NoForegroundError(
            f"{len(problems)} target(s) without a usable foreground for Spotlight:\n  " + "\n  ".join(problems)
            + "\n  (remove these stacks from the manifest, check that the target column is the stain, "
              "or lower --min_image_fg_fraction)")
    return fractions

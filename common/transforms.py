"""Generic transforms: z-score, resampling, foreground masks and patches, instance-label reading.

Array transforms take channel-first arrays or tensors (``CZYX`` / ``CYX``) and return the same
type; each has a dictionary twin (``Xd`` for ``X``). Sections: z-score normalisation
(:class:`ZScoreNormalize`) and resampling (:class:`ResampleToSpacingd`); foreground
(:func:`otsu_threshold`, :class:`ForegroundMask`, :class:`RandForegroundPatchd`); instance label
images (:func:`as_instance_labels`). Method-specific transforms live in their packages
(``common.spotlight``, ``common.isl``, ``common.fucci``). MONAI's own transforms are used where they do the
job (``Spacingd`` for resampling, ``DivisiblePadd`` / ``SpatialPadd`` for padding,
``RandSpatialCropd`` for uniform random patches); what is here is what MONAI lacks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, NormalizeIntensity, Spacingd, Transform
from monai.utils import TraceKeys, convert_to_dst_type

__all__ = [
    "DictTwin",
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

    ``mode="whole"`` takes the statistics of the whole image (MONAI's
    ``NormalizeIntensity(channel_wise=True)``, returned as the input's type); ``mode="center_slices"`` takes them
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
        if self.mode == "whole":
            out = NormalizeIntensity(channel_wise=True, dtype=torch.float32 if is_tensor else np.float32)(img)
            if isinstance(img, MetaTensor):
                return out
            return out.as_tensor() if is_tensor else np.asarray(out, dtype=np.float32)
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


class DictTwin(MapTransform):
    """Dictionary twin of an array transform: ``self.t`` (set by the subclass) applied to every key in place."""

    t: Transform

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for k in self.key_iterator(d):
            d[k] = self.t(d[k])
        return d


class ZScoreNormalized(DictTwin):
    """Dictionary version of :class:`ZScoreNormalize`."""

    def __init__(self, keys: KeysCollection, mode: str = "whole", n_slices: int = 32,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.t = ZScoreNormalize(mode, n_slices)


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
        self._told = False
        super().__init__(keys, pixdim=pixdim if pixdim is not None else 1.0, **kwargs)

    def __call__(self, data, lazy=None):
        if not self.enabled:
            return dict(data)
        d = dict(data)
        if self.skip_unknown:
            unknown = [k for k in self.key_iterator(d)
                       if isinstance(d[k], MetaTensor) and d[k].meta.get("spacing_known") is False]
            if unknown:
                if not self._told:  # once per run, not once per file
                    names = [str(d[k].meta.get("filename_or_obj")) for k in unknown]
                    logging.getLogger("common.transforms").warning(
                        f"no voxel size in {names}: not resampled to {tuple(self.spacing_transform.pixdim)} um; the "
                        "output keeps the input's grid (write PhysicalSizeX/Y/Z into the OME-TIFF to resample); "
                        "said once for all files")
                    self._told = True
                return d
        return super().__call__(d, lazy=lazy)

    def inverse(self, data):
        """Undo the resampling of the keys this transform resampled; keys it left alone (no voxel size,
        or ``pixdim=None``) carry no record of it and are returned unchanged."""
        d = dict(data)
        own = id(self.spacing_transform.sp_resample)  # Spacing records its trace under its resampler
        for key in self.key_iterator(d):
            ops = getattr(d[key], "applied_operations", None)
            if ops and ops[-1].get(TraceKeys.ID) == own:
                d[key] = self.spacing_transform.inverse(d[key])
        return d


# ----------------------------------------------------------------------------------------------
# Foreground: Otsu threshold, foreground masks and checks, foreground-aware patches
# ----------------------------------------------------------------------------------------------
from monai.transforms import Randomizable, SpatialCrop  # noqa: E402

__all__ += [
    "otsu_threshold",
    "ForegroundMask",
    "ForegroundMaskd",
    "RandForegroundPatchd",
]


def _channels_np(img) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        return img.detach().cpu().numpy()
    return np.asarray(img)


def _like(img, arr: np.ndarray):
    """``arr`` (numpy) returned as the type of ``img``, keeping ``arr``'s dtype (MONAI's ``convert_to_dst_type``:
    a MetaTensor keeps affine and meta, a tensor its device)."""
    return convert_to_dst_type(arr, img, dtype=arr.dtype)[0]


def otsu_threshold(x, nbins: int = 256) -> float | None:
    """Otsu's threshold of the values of ``x`` (:func:`skimage.filters.threshold_otsu`, ``nbins`` bins).

    Returns ``None`` for a constant (or empty) array, which has no threshold.
    """
    from skimage.filters import threshold_otsu

    v = np.asarray(x, dtype=np.float64).ravel()
    if v.size == 0 or v.min() == v.max():
        return None
    return float(threshold_otsu(v, nbins=nbins))


class ForegroundMask(Transform):
    """Binary foreground per channel: ``x >= threshold``, 1.0 / 0.0 (float32).

    Args:
        threshold: a number (e.g. 0.0 for an Otsu-standardised image, which reproduces the
            per-image Otsu foreground of the raw intensities on any crop), or ``"otsu"`` for
            Otsu's threshold of the array given (per patch when applied after cropping). With
            ``"otsu"``, a constant channel has no foreground (empty mask).
        nbins: histogram bins for ``"otsu"``.

    Input/output: ``CZYX`` or ``CYX``; the output has the input's type (MetaTensor keeps its meta).
    """

    def __init__(self, threshold: float | str = 0.0, nbins: int = 256):
        if isinstance(threshold, str) and threshold != "otsu":
            raise ValueError(f"threshold must be a number or 'otsu', got {threshold!r}")
        self.threshold = threshold
        self.nbins = int(nbins)

    def mask_np(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        out = np.zeros(x.shape, np.float32)
        for c in range(x.shape[0]):
            if self.threshold == "otsu":
                t = otsu_threshold(x[c], self.nbins)
                if t is None:
                    continue
            else:
                t = float(self.threshold)
            out[c] = x[c] >= t
        return out

    def __call__(self, img):
        return _like(img, self.mask_np(_channels_np(img)))


class ForegroundMaskd(MapTransform):
    """Dictionary version of :class:`ForegroundMask`: ``d[output_key] = mask(d[key])``.

    ``output_keys`` default to ``keys`` (replace the image by its mask); use e.g.
    ``keys="label", output_keys="fg"`` to keep the target and add its mask.
    """

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection | None = None, threshold: float | str = 0.0,
                 nbins: int = 256, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        out = self.keys if output_keys is None else ([output_keys] if isinstance(output_keys, str) else list(output_keys))
        if len(out) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(out)} output_keys")
        self.output_keys = tuple(out)
        self.t = ForegroundMask(threshold, nbins)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for k, o in self.key_iterator(d, self.output_keys):
            d[o] = self.t(d[k])
        return d


def _window_counts(mask: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """Foreground voxels of every ``roi``-sized window (one entry per valid start), via a summed-area table.

    Own summed-area table: scipy's uniform_filter works in floating point and centres its window.
    """
    m = np.asarray(mask, dtype=np.int64)
    sat = np.pad(m, [(1, 0)] * m.ndim)
    for ax in range(m.ndim):
        sat = np.cumsum(sat, axis=ax)
    out_shape = [s - r + 1 for s, r in zip(m.shape, roi)]
    total = np.zeros(out_shape, np.int64)
    for corner in np.ndindex(*([2] * m.ndim)):  # inclusion-exclusion over the 2^ndim corners
        sl = tuple(slice(r, r + o) if c else slice(0, o) for c, r, o in zip(corner, roi, out_shape))
        sign = (-1) ** (m.ndim - sum(corner))
        total += sign * sat[sl]
    return total


class RandForegroundPatchd(Randomizable, MapTransform):
    """Random patch that contains at least ``min_fraction`` foreground (Spotlight's patch rule).

    A position is drawn uniformly; the foreground fraction is checked *after* the crop. Up to
    ``max_tries`` positions are tried. If none qualifies:

    * with a fixed foreground definition (``fg_threshold`` a number, or ``None`` for a mask key),
      every position is scored at once with a summed-area table and one qualifying position is
      drawn uniformly, so a qualifying patch is **always** returned when one exists (the result
      has the distribution of unbounded rejection sampling); when none exists, the patch with the
      most foreground is returned and a warning names the image;
    * with ``fg_threshold="otsu"`` (a per-patch Otsu foreground, which depends on the patch) the
      best of the tries is returned with a warning.

    All ``keys`` are cropped at the same position (MONAI ``SpatialCrop``, so the crop is recorded
    in MetaTensor metadata). Images must be at least ``roi_size`` (use ``SpatialPadd`` with
    ``mode="edge"`` first: constant 0 padding would be foreground after Otsu standardisation).

    Args:
        keys: keys to crop (``CZYX`` / ``CYX``).
        fg_key: key defining the foreground (usually the Otsu-standardised target ``"label"``).
        roi_size: patch size (spatial).
        min_fraction: minimum foreground fraction (paper: 0.001, i.e. 0.1%).
        max_tries: uniformly drawn positions tried before the fallback.
        fg_threshold: ``None``: ``d[fg_key]`` is a mask (> 0.5 is foreground); a number:
            ``d[fg_key] >= fg_threshold``; ``"otsu"``: Otsu's threshold of the patch. Channels are
            combined with "any".
    """

    def __init__(self, keys: KeysCollection, fg_key: str, roi_size: Sequence[int], min_fraction: float = 0.001,
                 max_tries: int = 10, fg_threshold: float | str | None = 0.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if isinstance(fg_threshold, str) and fg_threshold != "otsu":
            raise ValueError(f"fg_threshold must be None, a number or 'otsu', got {fg_threshold!r}")
        if not 0.0 <= min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
        self.fg_key = fg_key
        self.roi_size = tuple(int(r) for r in roi_size)
        self.min_fraction = float(min_fraction)
        self.max_tries = max(int(max_tries), 1)
        self.fg_threshold = fg_threshold
        self.last_fraction: float | None = None  # foreground fraction of the last patch returned
        self.last_tries: int = 0  # positions drawn for it (max_tries + 1 when the fallback ran)

    def _mask(self, x: np.ndarray) -> np.ndarray:
        if self.fg_threshold is None:
            m = x > 0.5
        elif self.fg_threshold == "otsu":
            m = ForegroundMask("otsu").mask_np(x) > 0
        else:
            m = x >= float(self.fg_threshold)
        return m.any(0)

    def randomize(self, data=None) -> None:  # positions are drawn in __call__ (one per try)
        pass

    def _start(self, spatial) -> tuple:
        return tuple(int(self.R.randint(0, s - r + 1)) for s, r in zip(spatial, self.roi_size))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        fg = _channels_np(d[self.fg_key])
        spatial = fg.shape[1:]
        if len(spatial) != len(self.roi_size):
            raise ValueError(f"roi_size {self.roi_size} does not match the image's spatial shape {spatial}")
        if any(s < r for s, r in zip(spatial, self.roi_size)):
            raise ValueError(f"image {spatial} is smaller than the patch {self.roi_size}: pad it first (SpatialPadd)")
        n_vox = int(np.prod(self.roi_size))
        need = self.min_fraction * n_vox
        best, best_count = None, -1
        start = None
        for i in range(self.max_tries):
            s = self._start(spatial)
            sl = (slice(None),) + tuple(slice(a, a + r) for a, r in zip(s, self.roi_size))
            count = int(self._mask(fg[sl]).sum())
            if count >= need - 1e-9:
                start, best_count = s, count
                self.last_tries = i + 1
                break
            if count > best_count:
                best, best_count = s, count
        if start is None:
            self.last_tries = self.max_tries + 1
            name = getattr(d[self.fg_key], "meta", {}).get("filename_or_obj", self.fg_key)
            if self.fg_threshold == "otsu":
                start = best
                warnings.warn(f"{name}: no patch with >= {self.min_fraction:.4%} foreground in {self.max_tries} "
                              f"tries; using the best ({best_count / n_vox:.4%})")
            else:
                counts = _window_counts(self._mask(fg), self.roi_size)
                ok = np.flatnonzero(counts.ravel() >= need - 1e-9)
                if ok.size:
                    flat = int(ok[self.R.randint(0, ok.size)])
                else:
                    flat = int(np.argmax(counts))
                    warnings.warn(f"{name}: no {self.roi_size} patch anywhere has >= {self.min_fraction:.4%} "
                                  f"foreground; using the one with the most ({counts.ravel()[flat] / n_vox:.4%})")
                start = tuple(int(v) for v in np.unravel_index(flat, counts.shape))
                best_count = int(counts.ravel()[flat])
        self.last_fraction = best_count / n_vox
        crop = SpatialCrop(roi_start=start, roi_end=[a + r for a, r in zip(start, self.roi_size)])
        for k in self.key_iterator(d):
            d[k] = crop(d[k])
        return d


# ----------------------------------------------------------------------------------------------
# Instance label images: ids or binary masks read as instance labels
# ----------------------------------------------------------------------------------------------
__all__ += [
    "LabelFormatError",
    "as_instance_labels",
]


class LabelFormatError(ValueError):
    """A label image cannot be read as instance labels (non-integer values, negative, several channels)."""


def _source_name(img) -> str:
    name = getattr(img, "meta", {}).get("filename_or_obj", "") if isinstance(img, MetaTensor) else ""
    return f"{name}: " if name else ""


def as_instance_labels(labels, label_components: bool | str = "auto", connectivity: int = 1,
                       channel_first: bool = True) -> np.ndarray:
    """Instance labels (``int32``, 0 = background) from an instance-label image or a binary mask.

    Args:
        labels: ``1YX`` / ``1ZYX`` array or tensor (``channel_first``), or ``YX`` / ``ZYX``.
        label_components: ``True``: the input is a binary mask (any non-zero value is foreground) and
            instances are its connected components (BBBC030's filled outlines; touching cells then
            merge). ``False``: the values are instance ids. ``"auto"``: connected components when the
            image holds a single non-zero value (a binary mask such as 0/255), ids otherwise.
        connectivity: neighbourhood of the connected components (1 .. ndim).
        channel_first: the input has a leading channel axis of size 1.

    Returns:
        ``int32`` array without the channel axis; labels keep their ids unless components are taken.

    Raises:
        LabelFormatError: several channels, non-integer or negative values (e.g. an intensity
            image given as the label), named with the file when the input is a ``MetaTensor``.
    """
    src = _source_name(labels)
    arr = _channels_np(labels)
    if channel_first:
        if arr.ndim not in (3, 4) or arr.shape[0] != 1:
            raise LabelFormatError(f"{src}label image of shape {arr.shape}: expected one channel of instance ids "
                                   "(1YX or 1ZYX)")
        arr = arr[0]
    elif arr.ndim not in (2, 3):
        raise LabelFormatError(f"{src}label image of shape {arr.shape}: expected YX or ZYX")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise LabelFormatError(f"{src}label image contains NaN/inf")
        if not np.array_equal(arr, np.round(arr)):
            raise LabelFormatError(f"{src}label image has non-integer values (an intensity image given as the label?);"
                                   " expected instance ids or a binary mask")
    elif arr.dtype.kind not in "uib":
        raise LabelFormatError(f"{src}label image has unsupported dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise LabelFormatError(f"{src}label image has negative values")
    if label_components not in (True, False, "auto"):
        raise ValueError(f"label_components must be True, False or 'auto', got {label_components!r}")
    binary = label_components is True
    if label_components == "auto":
        binary = np.unique(arr[arr != 0]).size == 1
    if binary:
        from skimage.measure import label as _label

        return _label(arr != 0, connectivity=connectivity).astype(np.int32)
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise LabelFormatError(f"{src}label ids exceed int32")
    return arr.astype(np.int32)

"""ISL cell instances: the 2-channel training target [normalised distance, mask] from instance labels (Bonte et al.)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import scipy.ndimage as _ndi
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from common.transforms import LabelFormatError, _like, as_instance_labels

__all__ = ["instance_distance_map", "DistanceMaskTarget", "DistanceMaskTargetd"]


def instance_distance_map(labels, spacing=None) -> np.ndarray:
    """Distance of every pixel to the edge of its own instance, normalised to ``[0, 1]`` per instance.

    For each instance ``k``: the Euclidean distance (``spacing`` units) to the nearest pixel that is
    not ``k`` (background or a neighbouring instance, so touching cells are separated by a valley
    of zeros), divided by its maximum inside ``k``. Every instance therefore peaks at exactly 1, small
    and large cells alike (Bonte et al.'s normalised distance target). The image border does not
    count as an edge: a cell cut by the border keeps its distances to its in-image outline.

    Args:
        labels: ``YX`` or ``ZYX`` integer instance labels, 0 = background.
        spacing: pixel size per axis (default 1).

    Returns:
        ``float32`` array of the same shape; 0 on background, ``(0, 1]`` inside instances.
    """
    lab = np.asarray(labels)
    if lab.dtype.kind not in "uib":
        raise LabelFormatError(f"instance_distance_map needs integer labels, got dtype {lab.dtype}")
    out = np.zeros(lab.shape, np.float32)
    for k, sl in enumerate(_ndi.find_objects(lab.astype(np.int64, copy=False)), start=1):
        if sl is None:
            continue
        # one pixel wider than the object so that its outside is in the window (not past the image border)
        sl = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(sl, lab.shape))
        m = lab[sl] == k
        if m.all():  # the instance fills the whole image: measure to the image border instead
            d = _ndi.distance_transform_edt(np.pad(m, 1), sampling=spacing)[tuple(slice(1, -1) for _ in m.shape)]
        else:
            d = _ndi.distance_transform_edt(m, sampling=spacing)
        top = float(d[m].max())
        out[sl][m] = (d[m] / top).astype(np.float32)
    return out


class DistanceMaskTarget(Transform):
    """Instance labels -> the 2-channel training target ``[normalised distance, mask]`` (Bonte et al.).

    Computed on the fly from the label image (nothing is stored as files): channel 0 is
    :func:`instance_distance_map`, channel 1 the binary foreground (1.0 inside any instance).

    Args:
        label_components: how the label image is read, see :func:`as_instance_labels`
            (``"auto"``: a binary mask such as BBBC030's 0/255 becomes connected components).
        connectivity: neighbourhood of the connected components.

    Input: ``1YX`` / ``1ZYX`` (or ``YX`` / ``ZYX``) instance ids or binary mask.
    Output: ``2YX`` / ``2ZYX`` float32, of the input's type (a ``MetaTensor`` keeps affine and meta).
    """

    def __init__(self, label_components: bool | str = "auto", connectivity: int = 1):
        self.label_components = label_components
        self.connectivity = int(connectivity)

    def instances(self, img) -> np.ndarray:
        """``int32`` instance labels without the channel axis."""
        return as_instance_labels(img, self.label_components, self.connectivity)

    def from_instances(self, inst: np.ndarray) -> np.ndarray:
        """``2YX`` target from ``int32`` instance labels (``YX`` / ``ZYX``)."""
        return np.stack([instance_distance_map(inst), (inst > 0).astype(np.float32)])

    def __call__(self, img):
        return _like(img, self.from_instances(self.instances(img)))


class DistanceMaskTargetd(MapTransform):
    """Dictionary version of :class:`DistanceMaskTarget`.

    ``d[key]`` is replaced by the 2-channel target; with ``instances_key`` the ``1YX`` ``int32``
    instance labels are kept under that key too (for instance metrics in validation and for
    foreground-aware cropping).
    """

    def __init__(self, keys: KeysCollection, instances_key: str | None = None, label_components: bool | str = "auto",
                 connectivity: int = 1, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if instances_key is not None and len(self.keys) != 1:
            raise ValueError("instances_key needs exactly one key")
        self.instances_key = instances_key
        self.t = DistanceMaskTarget(label_components, connectivity)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for k in self.key_iterator(d):
            inst = self.t.instances(d[k])
            if self.instances_key is not None:
                d[self.instances_key] = _like(d[k], inst[None])
            d[k] = _like(d[k], self.t.from_instances(inst))
        return d

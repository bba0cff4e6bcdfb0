"""FUCCI nucleus instances from a 3-class prediction: connected components, seeded watershed, edge give-back."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import scipy.ndimage as ndi
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.fucci.ground_truth import CLASS_NAMES, EDGE, NUCLEUS
from common.segmentation import _size_filter, connected_components, hmaxima_watershed

__all__ = ["instances_connected_components", "instances_watershed", "give_back_edges", "instances_from_prediction",
           "SemanticToInstancesd"]


def _nucleus_mask(pred) -> tuple[np.ndarray, np.ndarray | None]:
    """(nucleus mask, nucleus probability or None) of a ``(3, Z, Y, X)`` probability map or a ``ZYX`` semantic map."""
    p = np.asarray(pred)
    if p.ndim == 4 and p.shape[0] == 1:
        p = p[0]
    if p.ndim == 4:
        if p.shape[0] != len(CLASS_NAMES):
            raise ValueError(f"expected {len(CLASS_NAMES)} class probabilities, got shape {p.shape}")
        prob = p[NUCLEUS].astype(np.float32)
        return np.argmax(p, 0) == NUCLEUS, prob
    if p.ndim == 3:
        return p.astype(np.int64) == NUCLEUS, None
    raise ValueError(f"expected CZYX class probabilities or a ZYX semantic map, got shape {p.shape}")


def instances_connected_components(pred, min_size: int = 0, connectivity: int = 1) -> np.ndarray:
    """Nucleus instances as connected components of the nucleus class (the thesis' way).

    Args:
        pred: ``(3, Z, Y, X)`` class probabilities (the nucleus class is where it is the argmax)
            or a ``ZYX`` semantic map (0/1/2).
        min_size: drop components with fewer voxels.
        connectivity: 1 (faces) .. 3.

    Returns:
        ``ZYX`` int32 labels 1..n.
    """
    mask, _ = _nucleus_mask(pred)
    return connected_components(mask, connectivity=connectivity, min_size=min_size)


def instances_watershed(pred, spacing=(1.0, 1.0, 1.0), h_um: float = 1.0, min_size: int = 0,
                        use_probability: bool = True) -> np.ndarray:
    """Nucleus instances by a seeded watershed that splits touching nuclei.

    The nucleus mask (as :func:`instances_connected_components`) gets its Euclidean distance
    transform in micrometres (``sampling=spacing``, so 5 um z-steps count as 5 um); with
    probabilities and ``use_probability`` the distance is multiplied by the nucleus probability
    (low-confidence necks between nuclei become valleys). Seeds are the maxima of that map with a
    dynamic of at least ``h_um`` (h-maxima); the watershed floods its negative inside the mask
    (:func:`common.segmentation.hmaxima_watershed`). A neck narrower than ``2 (r - h_um)`` between
    two nuclei of radius ``r`` is cut.

    Returns:
        ``ZYX`` int32 labels 1..n.
    """
    mask, prob = _nucleus_mask(pred)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    sp = tuple(float(s) for s in (spacing if not np.isscalar(spacing) else [spacing] * 3))
    dist = ndi.distance_transform_edt(mask, sampling=sp)
    if prob is not None and use_probability:
        dist = dist * prob
    labels = hmaxima_watershed(dist, mask, h=float(h_um), connectivity=1)
    return _size_filter(labels, min_size)


def _edge_mask(pred) -> np.ndarray:
    p = np.asarray(pred)
    if p.ndim == 4 and p.shape[0] == 1:
        p = p[0]
    return (np.argmax(p, 0) == EDGE) if p.ndim == 4 else (p.astype(np.int64) == EDGE)


def give_back_edges(labels, pred, spacing=(1.0, 1.0, 1.0), max_um: float | None = None) -> np.ndarray:
    """Instances grown into the predicted edge class: each edge voxel within ``max_um`` (micrometres,
    anisotropic ``spacing`` respected) of an instance joins the nearest one.

    Instances are built from the nucleus class alone, but the network's edge class is a ring that
    straddles the nucleus boundary (the ground truth's ring lies just outside each mask), so the
    nucleus class alone gives shrunk masks. ``max_um`` limits the growth to the inner part of the
    ring; ``None`` gives every edge voxel connected to an instance to its nearest instance.

    Args:
        labels: ``ZYX`` instance labels (from the nucleus class).
        pred: ``(3, Z, Y, X)`` class probabilities or a ``ZYX`` semantic map (0/1/2).

    Returns:
        ``ZYX`` int32 labels, the same instances, grown.
    """
    from skimage.segmentation import expand_labels

    labels = np.asarray(labels).astype(np.int32)
    edge = _edge_mask(pred)
    if not edge.any() or not labels.any():
        return labels
    sp = tuple(float(v) for v in (spacing if not np.isscalar(spacing) else [spacing] * 3))
    if max_um is None:
        max_um = float(np.sum(np.array(edge.shape) * np.array(sp)))  # the whole ring
    grown = expand_labels(labels, distance=float(max_um), spacing=sp)
    take = (labels == 0) & edge & (grown > 0)
    out = labels.copy()
    out[take] = grown[take]
    return out


def instances_from_prediction(pred, method: str = "watershed", spacing=(1.0, 1.0, 1.0), h_um: float = 1.0,
                              min_size: int = 0, edge_um: float | None = 0.0) -> np.ndarray:
    """``method="watershed"`` (:func:`instances_watershed`) or ``"connected_components"``, then the
    edge class given back to the instances within ``edge_um`` micrometres (:func:`give_back_edges`;
    ``0`` keeps the nucleus class alone, ``None`` gives the whole ring)."""
    if method in ("connected_components", "cc"):
        labels = instances_connected_components(pred, min_size=min_size)
    elif method == "watershed":
        labels = instances_watershed(pred, spacing=spacing, h_um=h_um, min_size=min_size)
    else:
        raise ValueError(f"unknown instance method {method!r}: use 'watershed' or 'connected_components'")
    if edge_um is None or edge_um > 0:
        labels = give_back_edges(labels, pred, spacing, edge_um)
    return labels


class SemanticToInstancesd(MapTransform):
    """Post-processing: class probabilities -> nucleus instances (and optionally the semantic map).

    Reads ``keys`` (``(3, Z, Y, X)`` softmax probabilities, MetaTensor), writes
    ``instances_key`` = ``(1, Z, Y, X)`` int32 instance labels with the same meta (voxel size), and
    with ``argmax=True`` replaces ``keys`` by the ``(1, Z, Y, X)`` semantic map (0/1/2). The voxel
    size for the watershed comes from the MetaTensor (``pixdim``), else ``spacing``.
    """

    def __init__(self, keys: KeysCollection, instances_key: str = "instances", method: str = "watershed",
                 h_um: float = 1.0, min_size: int = 0, argmax: bool = True, spacing=None, edge_um: float | None = 0.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if method not in ("watershed", "connected_components", "cc"):
            raise ValueError(f"unknown instance method {method!r}: use 'watershed' or 'connected_components'")
        self.instances_key = instances_key
        self.method = method
        self.h_um = h_um
        self.min_size = min_size
        self.argmax = argmax
        self.spacing = spacing
        self.edge_um = edge_um

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for k in self.key_iterator(d):
            p = d[k]
            arr = p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
            spacing = self.spacing
            if spacing is None:
                spacing = tuple(float(v) for v in p.pixdim) if isinstance(p, MetaTensor) else (1.0, 1.0, 1.0)
            inst = instances_from_prediction(arr, self.method, spacing, self.h_um, self.min_size, self.edge_um)[None]
            d[self.instances_key] = _like_meta(p, inst.astype(np.int32))
            if self.argmax:
                d[k] = _like_meta(p, np.argmax(arr, 0)[None].astype(np.uint8) if arr.shape[0] > 1 else arr)
        return d


def _like_meta(ref, arr: np.ndarray):
    if isinstance(ref, MetaTensor):
        return MetaTensor(torch.as_tensor(arr), meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
    return torch.as_tensor(arr)

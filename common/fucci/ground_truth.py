"""FUCCI ground truth: per-slice cleaning of instance masks and the 3-class (background, edge, nucleus) semantic map."""

from __future__ import annotations

import os

import numpy as np
import scipy.ndimage as ndi

__all__ = ["CLASS_NAMES", "BACKGROUND", "EDGE", "NUCLEUS", "edge_footprint", "clean_instances",
           "semantic_from_instances", "prepare_ground_truth", "write_ground_truth"]


#: semantic classes of the 3-class ground truth
CLASS_NAMES = ("background", "edge", "nucleus")
BACKGROUND, EDGE, NUCLEUS = 0, 1, 2


def _labels3d(labels, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 3:
        raise ValueError(f"{name} must be a ZYX label volume, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"{name} must hold integer labels, got non-integer values ({labels.dtype})")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} has negative labels")
    return labels


def edge_footprint(width: int = 1, per_slice: bool = True) -> np.ndarray:
    """Footprint of ``width`` iterated face-connected dilations: a diamond (2D per slice or 3D).

    ``per_slice=True`` returns a ``(1, 2w+1, 2w+1)`` footprint, so edges lie within z-slices (the
    thesis draws them per slice; with 5 um z-steps a z-neighbour is another part of the nucleus).
    """
    if int(width) < 1:
        raise ValueError(f"edge width must be >= 1, got {width}")
    if per_slice:
        return ndi.iterate_structure(ndi.generate_binary_structure(2, 1), int(width))[None]
    return ndi.iterate_structure(ndi.generate_binary_structure(3, 1), int(width))


def clean_instances(instances, min_area: int = 0, smooth_sigma: float = 0.0) -> np.ndarray:
    """Per-slice cleaning of instance masks (Cellpose output or manual labels).

    1. ``min_area``: in every z-slice, the cross-section of an instance with fewer than
       ``min_area`` pixels is removed (small caps at the top and bottom of a nucleus, specks);
    2. ``smooth_sigma``: boundary smoothing, per instance and slice, by thresholding its
       Gaussian-blurred mask (sigma in pixels) at 0.5; a smoothed mask only grows into background
       and never takes pixels of another instance.

    Args:
        instances: ``ZYX`` integer labels (0 = background).

    Returns:
        ``ZYX`` int32 labels (same ids; instances that vanish entirely are gone).
    """
    lab = _labels3d(instances, "instances").copy()
    if min_area > 0:
        for z in range(lab.shape[0]):
            sl = lab[z]
            area = np.bincount(sl.ravel())
            small = area < min_area
            small[0] = False
            if small.any():
                sl[small[sl]] = 0
    if smooth_sigma and smooth_sigma > 0:
        pad = int(np.ceil(3 * smooth_sigma)) + 1
        out = lab.copy()
        for z in range(lab.shape[0]):
            sl = lab[z]
            for k, box in enumerate(ndi.find_objects(sl), start=1):
                if box is None:
                    continue
                box = tuple(slice(max(b.start - pad, 0), min(b.stop + pad, n)) for b, n in zip(box, sl.shape))
                m = sl[box] == k
                smooth = ndi.gaussian_filter(m.astype(np.float32), smooth_sigma) > 0.5
                dst = out[z][box]
                dst[(dst == k) & ~smooth] = 0
                dst[smooth & (sl[box] == 0) & (dst == 0)] = k
        lab = out
    return lab.astype(np.int32)


def semantic_from_instances(instances, edge_width: int = 1, per_slice: bool = True) -> np.ndarray:
    """The 3-class map of instance masks: 0 background, 1 edge, 2 nucleus.

    ``edge = U_k (dilation(M_k) - M_k)`` over instances ``M_k`` (dilation by
    :func:`edge_footprint`); ``nucleus = U_k M_k - edge``. Where two nuclei touch, each one's
    ring lies on the other, so touching nuclei are separated by edge voxels (what lets connected
    components of the nucleus class split them).

    Computed without a loop over instances: a voxel is edge iff its footprint neighbourhood holds a
    non-zero label different from its own (grey dilation / erosion of the label image).

    Returns:
        ``ZYX`` uint8.
    """
    lab = _labels3d(instances, "instances")
    fp = edge_footprint(edge_width, per_slice)
    big = int(lab.max(initial=0)) + 1  # "no label" for the minimum (exact in scipy's float cval)
    hi = ndi.maximum_filter(lab, footprint=fp, mode="constant", cval=0)
    lo = ndi.minimum_filter(np.where(lab > 0, lab, big), footprint=fp, mode="constant", cval=big)
    edge = ((hi > 0) & (hi != lab)) | ((lo < big) & (lo != lab))
    sem = np.where(lab > 0, NUCLEUS, BACKGROUND).astype(np.uint8)
    sem[edge] = EDGE
    return sem


def prepare_ground_truth(instances, min_area: int = 0, smooth_sigma: float = 0.0, edge_width: int = 1,
                         per_slice: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`clean_instances` then :func:`semantic_from_instances`.

    Returns:
        ``(semantic, instances)``: ``ZYX`` uint8 (0/1/2) and the cleaned ``ZYX`` int32 instances.
    """
    inst = clean_instances(instances, min_area=min_area, smooth_sigma=smooth_sigma)
    return semantic_from_instances(inst, edge_width=edge_width, per_slice=per_slice), inst


def write_ground_truth(out_dir: str | os.PathLike, stem: str, semantic, instances, spacing=None) -> tuple[str, str]:
    """Write ``<stem>_semantic.ome.tif`` (uint8 0/1/2) and ``<stem>_instances.ome.tif`` (uint16), atomically.

    Returns:
        the two paths.
    """
    from common.io import write_ome_tiff

    inst = np.asarray(instances)
    if inst.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"{stem}: more than 65535 instances cannot be written as uint16")
    sem_path = os.path.join(str(out_dir), f"{stem}_semantic.ome.tif")
    inst_path = os.path.join(str(out_dir), f"{stem}_instances.ome.tif")
    write_ome_tiff(sem_path, np.asarray(semantic).astype(np.uint8), "ZYX", spacing)
    write_ome_tiff(inst_path, inst.astype(np.uint16), "ZYX", spacing)
    return sem_path, inst_path

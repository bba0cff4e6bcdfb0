"""FUCCI spheroids: ground truth for 3-class segmentation, instances, evaluation score, cell-cycle phases.

After Tiling (Leiden MSc thesis 2024, "Segmenting and Analysing 3D images of FUCCI-reporter induced
breast cancer nuclei spheroids"), extended with the per-nucleus cell-cycle analysis.

Pure functions, numpy in / numpy out (scikit-image style), plus one MONAI post-processing
transform (:class:`SemanticToInstancesd`).

* Data: :func:`load_fucci_manifest` (training manifests, checked before training),
  :func:`list_fucci_images` (inference inputs).
* Ground truth: :func:`clean_instances` (per-slice minimum area, boundary smoothing),
  :func:`semantic_from_instances` (background 0, edge 1, nucleus 2), :func:`prepare_ground_truth`.
* Instances from a prediction: :func:`instances_connected_components` (the thesis' way) and
  :func:`instances_watershed` (seeded watershed on the distance transform, splits touching nuclei),
  both through :func:`instances_from_prediction`.
* Evaluation: :func:`evaluation_score` (the thesis' ``(0.95 subregion Dice + 1.05 full Dice) / 2``
  per nucleus), :func:`segmentation_report` (per-class scores, instance AP, the score).
* Cell cycle: :func:`phase_from_reporters` (the FUCCI rules), :func:`nucleus_table` (per-nucleus
  centroid, volume, mean intensities, phase), :func:`phase_distribution`,
  :func:`phase_agreement`, :func:`save_phase_plot`.

Arrays are ``ZYX`` (labels, one channel) and ``CZYX`` (images); ``spacing`` is the voxel size in
micrometres, ``ZYX``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.metrics import matching, per_class_scores
from common.segmentation import _size_filter, connected_components, hmaxima_watershed
from common.synthetic import PHASE_NAMES

__all__ = [
    "CLASS_NAMES",
    "load_fucci_manifest",
    "list_fucci_images",
    "BACKGROUND",
    "EDGE",
    "NUCLEUS",
    "PHASE_NAMES",
    "edge_footprint",
    "clean_instances",
    "semantic_from_instances",
    "prepare_ground_truth",
    "write_ground_truth",
    "instances_connected_components",
    "instances_watershed",
    "instances_from_prediction",
    "colour_change",
    "split_by_reporter_change",
    "instance_contacts",
    "merge_oversplit",
    "SemanticToInstancesd",
    "give_back_edges",
    "evaluation_score",
    "segmentation_report",
    "phase_from_reporters",
    "reporter_thresholds",
    "nucleus_table",
    "assign_phases",
    "phase_distribution",
    "phase_agreement",
    "save_phase_plot",
    "save_preprocessing_preview",
]

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


# --------------------------------------------------------------------------------------------- data


def _check_channels(records: Sequence[dict], key: str, input_channels) -> list:
    """Problems (strings) of images with too few channels for ``input_channels``."""
    from common.io import ImageReadError, read_image

    if input_channels is None:
        return []
    need = max(int(c) for c in input_channels) + 1
    problems = []
    for rec in records:
        try:
            arr, _, _ = read_image(rec[key], spatial_dims=3)
        except ImageReadError:
            continue  # reported by validate_records
        if arr.shape[0] < need:
            where = f"{rec.get('_manifest', 'input')} line {rec.get('_line', '?')}: " if "_line" in rec else ""
            problems.append(f"{where}{rec[key]}: {arr.shape[0]} channel(s), but input_channels={list(input_channels)} "
                            f"needs {need} (CZYX with channels Cy3, GFP, Hoechst?)")
    return problems


def load_fucci_manifest(csv_path: str | os.PathLike, input_channels: Sequence[int] | None = None,
                        n_classes: int = 3) -> list[dict]:
    """Training/validation manifest of the unet3d_fucci bundle, every file checked before training.

    Columns: ``path_image`` (``ZYX`` or ``CZYX`` stack), ``path_label`` (the 3-class map 0/1/2
    written by ``scripts/fucci_prepare_gt.py``), optional ``path_instances`` (instance labels, for
    instance metrics). Paths relative to the CSV.

    Raises one :class:`common.data.ManifestError` listing every problem: unreadable files, wrong
    dimensions, NaN/inf, shape mismatch, constant image, label values outside ``0..n_classes-1``
    (an instance map given as label), a label without any nucleus voxel, too few channels for
    ``input_channels``.

    Returns:
        ``[{"image": path, "label": path[, "instances": path]}, ...]``.
    """
    from common.data import ManifestError, read_manifest, validate_records
    from common.io import ImageReadError, read_image

    records = read_manifest(csv_path, keys={"path_image": "image", "path_label": "label"},
                            optional={"path_instances": "instances"})
    keys = ["image", "label"] + (["instances"] if any("instances" in r for r in records) else [])
    problems = []
    try:
        validate_records(records, image_keys=keys, spatial_dims=3, same_shape=keys, nonconstant=["image"],
                         nonempty=["label"])
    except ManifestError as e:
        problems += [line.strip() for line in str(e).splitlines()[1:]]
    problems += _check_channels(records, "image", input_channels)
    for rec in records:
        where = f"{rec['_manifest']} line {rec['_line']}"
        try:
            lab, _, _ = read_image(rec["label"], spatial_dims=3)
        except ImageReadError:
            continue
        if lab.shape[0] != 1:
            problems.append(f"{where}: {rec['label']}: label has {lab.shape[0]} channels, expected one ZYX class map")
            continue
        if not np.all(np.mod(lab, 1) == 0) or lab.min() < 0 or lab.max() >= n_classes:
            problems.append(f"{where}: {rec['label']}: label values {lab.min():g}..{lab.max():g} are not classes "
                            f"0..{n_classes - 1} (an instance map? make the 3-class map with "
                            "`python scripts/fucci_prepare_gt.py from_masks ...`)")
        elif lab.max() > 0 and not (lab == NUCLEUS).any():
            problems.append(f"{where}: {rec['label']}: label has no nucleus voxel (class {NUCLEUS})")
    if problems:
        raise ManifestError(f"{len(problems)} problem(s) found before any work:\n  " + "\n  ".join(problems))
    return records


def list_fucci_images(source: str | os.PathLike, input_channels: Sequence[int] | None = None,
                      pattern: str | None = None) -> list[dict]:
    """Inference inputs (:func:`common.data.list_images`: folder, CSV manifest column ``path_image``
    or one file), each opened and checked, including the channel count for ``input_channels``."""
    from common.data import ManifestError, list_images

    records = list_images(source, key="image", column="path_image", spatial_dims=3, pattern=pattern)
    problems = _check_channels(records, "image", input_channels)
    if problems:
        raise ManifestError(f"{len(problems)} problem(s) found before inference:\n  " + "\n  ".join(problems))
    return records


# ------------------------------------------------------------------------------------- ground truth


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


# ---------------------------------------------------------------------------------------- instances


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


def _slice_medians(image: np.ndarray, labels: np.ndarray, z: int, ids: np.ndarray) -> np.ndarray:
    """``(len(ids), C)`` per-channel medians of the cross-sections ``labels[z] == id`` in ``image[:, z]``."""
    return np.stack([np.atleast_1d(ndi.median(image[c, z], labels[z], ids)) for c in range(image.shape[0])], 1)


def colour_change(a, b, floor) -> np.ndarray:
    """Largest relative change of per-channel levels between two cross-sections.

    ``max_c |a_c - b_c| / max(a_c, b_c, floor_c)``; ``floor_c`` (same units as the levels, e.g.
    background-subtracted photo-electrons) keeps a reporter that is off in both (levels near 0)
    from counting as a large relative change.

    Args:
        a, b: ``(..., C)`` per-channel levels.
        floor: ``(C,)`` smallest denominator per channel.

    Returns:
        ``(...)`` relative change (0 = same colour; 1 = on in one, off in the other).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.maximum(np.maximum(a, b), np.asarray(floor, np.float64))
    return np.max(np.abs(a - b) / den, axis=-1)


def _labels_and_image(instances, image) -> tuple[np.ndarray, np.ndarray]:
    """``ZYX`` labels and the image as float64 ``CZYX`` (a ``ZYX`` image becomes one channel), checked."""
    lab = _labels3d(instances, "instances")
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[None]
    if img.shape[1:] != lab.shape:
        raise ValueError(f"image must be CZYX with the labels' shape {lab.shape}, got {img.shape}")
    return lab, img


def split_by_reporter_change(instances, image, tol: float = 0.45, floor_fraction: float = 0.25,
                             background="auto", min_size: int = 0) -> np.ndarray:
    """Cut instances along z where the per-slice colour (reporter and DNA levels) changes.

    With z-steps as large as a nucleus (5 um here), nuclei stacked along z touch face to face; the
    per-slice edge class cannot separate them and the watershed on the distance transform merges
    them. The FUCCI reporters and the DNA stain are (nearly) uniform within a nucleus, while
    stacked neighbours differ in phase or level, so an instance is cut between slices ``z`` and
    ``z + 1`` when :func:`colour_change` of the medians of its two cross-sections exceeds ``tol``;
    every run of uncut slices becomes its own instance.

    Args:
        instances: ``ZYX`` labels (e.g. :func:`instances_watershed`).
        image: ``CZYX`` raw intensities, all channels used (Cy3, GFP, Hoechst).
        tol: largest relative change kept within one nucleus (on the training spheroids of
            ``scripts/fucci_synthetic_experiment.py`` the same nucleus changes by < 0.3 between
            slices in 90% of cases, stacked different nuclei by > 0.3 in 90%).
        floor_fraction: ``floor_c`` of :func:`colour_change` as a fraction of the channel's 95th
            percentile (background-subtracted) inside the instances.
        background: as :func:`nucleus_table` (``"auto"``: median away from the instances).
        min_size: drop resulting instances with fewer voxels.

    Returns:
        ``ZYX`` int32 labels 1..n.
    """
    lab, img = _labels_and_image(instances, image)
    out = lab.copy()
    if not lab.any():
        return out.astype(np.int32)
    img = img - _background_levels(img, lab, background)[:, None, None, None]
    floor = float(floor_fraction) * np.array([np.percentile(img[c][lab > 0], 95) for c in range(img.shape[0])])
    floor = np.maximum(floor, 1e-12)
    nxt = int(lab.max()) + 1
    for k, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None or box[0].stop - box[0].start < 2:
            continue
        sub, im = lab[box], img[(slice(None),) + box]
        zs = [z for z in range(sub.shape[0]) if (sub[z] == k).any()]
        med = {z: _slice_medians(im, sub, z, np.array([k]))[0] for z in zs}
        piece = k
        for z0, z1 in zip(zs[:-1], zs[1:]):
            if z1 != z0 + 1 or colour_change(med[z0], med[z1], floor) > tol:
                piece, nxt = nxt, nxt + 1
            if piece != k:
                dst = out[box][z1]
                dst[sub[z1] == k] = piece
    return _size_filter(out, min_size)


def instance_contacts(instances, semantic=None, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Shared boundary of every pair of face-touching instances, in um^2, and its edge-class support.

    Two instances touch where voxels of both share a face (6-connectivity). A face between
    slices (along z) has area ``dy * dx``, a face within a slice ``dz * dx`` (along y) or
    ``dz * dy`` (along x); at 5 x 0.5 x 0.5 um one in-plane face (2.5 um^2) counts 10 z-faces.
    With ``semantic`` (``ZYX`` classes, or ``(3, Z, Y, X)`` probabilities, then their argmax),
    an in-plane pair ``A | edge | B`` (one :data:`EDGE` voxel between two instances along y or
    x) is a boundary the network marked; the per-slice edge class cannot mark boundaries along z,
    so z-faces do not enter the support.

    Args:
        instances: ``ZYX`` labels.
        semantic: optional ``ZYX`` semantic map (0/1/2) or ``CZYX`` class probabilities.
        spacing: voxel size ``(dz, dy, dx)`` in um.

    Returns:
        ``{(i, j): {"area": direct contact (um^2), "area_xy": its in-plane part (um^2),
        "area_edge": in-plane area bridged by one edge voxel (um^2)}}`` for ``i < j``; pairs
        that only meet across edge voxels are listed too (``area`` 0).
    """
    lab = _labels3d(instances, "instances")
    sp = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    face = (sp[1] * sp[2], sp[0] * sp[2], sp[0] * sp[1])
    sem = None
    if semantic is not None:
        sem = np.asarray(semantic)
        if sem.ndim == 4 and sem.shape[0] == 1:
            sem = sem[0]
        if sem.ndim == 4:
            sem = np.argmax(sem, 0)
        if sem.shape != lab.shape:
            raise ValueError(f"semantic must be ZYX (or CZYX probabilities) of shape {lab.shape}, got {sem.shape}")
    out: dict = {}

    def add(a, b, key, area, in_plane):
        m = (a > 0) & (b > 0) & (a != b)
        if not m.any():
            return
        pairs, counts = np.unique(np.sort(np.stack([a[m], b[m]], 1), 1), axis=0, return_counts=True)
        for (i, j), n in zip(pairs, counts):
            d = out.setdefault((int(i), int(j)), {"area": 0.0, "area_xy": 0.0, "area_edge": 0.0})
            d[key] += n * area
            if key == "area" and in_plane:
                d["area_xy"] += n * area

    for ax in range(3):
        a = np.moveaxis(lab, ax, 0)
        add(a[:-1], a[1:], "area", face[ax], ax > 0)
        if ax > 0 and sem is not None:
            e = np.moveaxis(sem, ax, 0)[1:-1] == EDGE
            add(np.where(e, a[:-2], 0), a[2:], "area_edge", face[ax], True)
    return out


def merge_oversplit(instances, image, semantic=None, spacing=(1.0, 1.0, 1.0), tol: float = 0.45,
                    max_volume_um3: float = np.inf, fragment_um3: float = 0.0, max_edge_fraction: float = 0.5,
                    floor_fraction: float = 0.25, background="auto") -> np.ndarray:
    """Merge touching pieces of one nucleus (undo over-segmentation); the complement of
    :func:`split_by_reporter_change`.

    Two face-touching instances ``A``, ``B`` (:func:`instance_contacts`) are merged when all hold:

    * their boundary is not marked by the network: the edge-bridged share of the in-plane
      boundary, ``area_edge / (area_edge + area_xy)``, is at most ``max_edge_fraction`` (0 when
      they touch only along z or without ``semantic``);
    * their colour is the same: :func:`colour_change` of their whole-instance medians is at most
      ``tol`` (the tolerance of :func:`split_by_reporter_change`);
    * the union still fits one nucleus: volume ``<= max_volume_um3``.

    Besides, a *fragment* (volume ``< fragment_um3``, smaller than a nucleus can be) joins the
    same-colour neighbour with which it shares the largest boundary, whatever the other two
    conditions. Merges are greedy, largest shared boundary first (a cut through one nucleus
    leaves a broad interface, two nuclei pressed together a narrower one); after each merge the
    medians, volumes and contacts of the union are updated, so chains of pieces are merged
    only while the whole still fits one nucleus.

    Args:
        instances: ``ZYX`` labels (e.g. :func:`split_by_reporter_change` of :func:`instances_watershed`).
        image: ``CZYX`` raw intensities, all channels used (Cy3, GFP, Hoechst).
        semantic: optional ``ZYX`` predicted semantic map (0/1/2) or ``CZYX`` probabilities (argmax).
        spacing: voxel size ``(dz, dy, dx)`` in um.
        tol: largest :func:`colour_change` between merged instances.
        max_volume_um3: largest merged volume (um^3), e.g. a high percentile of nucleus volumes.
        fragment_um3: instances below this volume (um^3) are fragments (see above); 0: none.
        max_edge_fraction: largest edge-marked share of the in-plane boundary for a merge.
        floor_fraction, background: as :func:`split_by_reporter_change`.

    Returns:
        ``ZYX`` int32 labels 1..n.
    """
    lab, img = _labels_and_image(instances, image)
    if tol < 0 or max_volume_um3 <= 0 or fragment_um3 < 0 or not 0 <= max_edge_fraction <= 1:
        raise ValueError("need tol >= 0, max_volume_um3 > 0, fragment_um3 >= 0 and 0 <= max_edge_fraction <= 1")
    sp = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    if not lab.any():
        return lab.astype(np.int32)
    img = img - _background_levels(img, lab, background)[:, None, None, None]
    floor = float(floor_fraction) * np.array([np.percentile(img[c][lab > 0], 95) for c in range(img.shape[0])])
    floor = np.maximum(floor, 1e-12)
    contacts = instance_contacts(lab, semantic, sp)
    ids = np.unique(lab[lab > 0])
    vol = dict(zip(ids.tolist(), (np.bincount(lab.ravel())[ids] * float(np.prod(sp))).tolist()))
    med = dict(zip(ids.tolist(), np.stack([np.atleast_1d(ndi.median(img[c], lab, ids))
                                           for c in range(img.shape[0])], 1)))
    out = lab.copy()

    def mergeable(i, j, c):
        if c["area"] <= 0 or colour_change(med[i], med[j], floor) > tol:
            return False
        if min(vol[i], vol[j]) < fragment_um3:
            return True
        bound = c["area_edge"] + c["area_xy"]
        support = c["area_edge"] / bound if bound > 0 else 0.0
        return support <= max_edge_fraction and vol[i] + vol[j] <= max_volume_um3

    while True:
        cands = [(c["area"], p) for p, c in contacts.items() if mergeable(*p, c)]
        if not cands:
            break
        small = [(a, p) for a, p in cands if min(vol[p[0]], vol[p[1]]) < fragment_um3]
        _, (i, j) = max(small or cands)
        out[out == j] = i
        vol[i] += vol.pop(j)
        med[i] = np.array([ndi.median(img[c], out == i) for c in range(img.shape[0])])
        med.pop(j)
        merged: dict = {}
        for (a, b), c in contacts.items():
            a, b = (i if a == j else a), (i if b == j else b)
            if a == b:
                continue
            d = merged.setdefault((min(a, b), max(a, b)), {"area": 0.0, "area_xy": 0.0, "area_edge": 0.0})
            for k in d:
                d[k] += c[k]
        contacts = merged
    return _size_filter(out, 0)


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


# --------------------------------------------------------------------------------------- evaluation


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def evaluation_score(gt_instances, pred_instances, weights: Sequence[float] = (0.95, 1.05), edge_width: int = 1,
                     per_slice: bool = True) -> dict:
    """The thesis' evaluation score per nucleus, ``(0.95 * subregion Dice + 1.05 * full Dice) / 2``.

    For every ground-truth nucleus ``G_k``:

    * **full Dice** ``2 |G_k & P_j| / (|G_k| + |P_j|)`` with ``P_j`` the predicted instance that
      overlaps ``G_k`` most (0 when none does): the whole nucleus;
    * **subregion Dice**: the mean over the two sub-regions *edge* and *nucleus* of the Dice of
      that class between the 3-class maps of ground truth and prediction
      (:func:`semantic_from_instances` of each, so both sides get edges by the same rule), inside
      the bounding box of ``G_k`` and its edge ring (Dice 1 when the class is absent from both).

    The brief states the weights and the formula but not the sub-regions; this reading (BraTS-style
    sub-regions edge / nucleus, plus the full nucleus) is ours. The mean over nuclei is reported
    per input channel by the experiment scripts (one model per reporter channel).

    Args:
        gt_instances, pred_instances: ``ZYX`` integer labels.
        weights: ``(w_subregion, w_full)``; the score is ``(w_sub * sub + w_full * full) / 2``.

    Returns:
        dict with ``score``, ``subregion_dice``, ``full_dice`` (means over ground-truth nuclei, NaN
        without any) and ``per_nucleus``: a list of ``{label, subregion_dice, full_dice, score}``.
    """
    gt = _labels3d(gt_instances, "gt_instances")
    pr = _labels3d(pred_instances, "pred_instances")
    if gt.shape != pr.shape:
        raise ValueError(f"gt and pred must have the same shape, got {gt.shape} and {pr.shape}")
    w_sub, w_full = (float(w) for w in weights)
    sem_gt = semantic_from_instances(gt, edge_width, per_slice)
    sem_pr = semantic_from_instances(pr, edge_width, per_slice)
    pad = (0 if per_slice else edge_width, edge_width, edge_width)
    pred_sizes = np.bincount(pr.ravel())
    rows = []
    for k, box in enumerate(ndi.find_objects(gt), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(box, pad, gt.shape))
        g = gt[box] == k
        over = pr[box][g]
        over = over[over > 0]
        full = 0.0
        if over.size:
            j = np.bincount(over).argmax()
            inter = int((over == j).sum())
            full = 2.0 * inter / (int(g.sum()) + int(pred_sizes[j]))
        sg, sp = sem_gt[box], sem_pr[box]
        sub = float(np.mean([_dice(sg == c, sp == c) for c in (EDGE, NUCLEUS)]))
        rows.append({"label": k, "subregion_dice": sub, "full_dice": full, "score": (w_sub * sub + w_full * full) / 2})

    def mean(key):
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    return {"score": mean("score"), "subregion_dice": mean("subregion_dice"), "full_dice": mean("full_dice"),
            "per_nucleus": rows}


def segmentation_report(gt_semantic, pred_semantic, gt_instances, pred_instances) -> dict:
    """Per-class precision / recall / F1 / IoU (:func:`common.metrics.per_class_scores`), instance AP
    at IoU 0.5:0.95 (:func:`common.metrics.matching`) and :func:`evaluation_score`.

    Returns:
        flat dict: ``precision_<class>``, ``recall_<class>``, ``f1_<class>``, ``iou_<class>`` for
        background / edge / nucleus; ``ap50``, ``ap75``, ``mAP`` (mean AP over 0.50..0.95);
        ``n_true``, ``n_pred``; ``score``, ``subregion_dice``, ``full_dice``.
    """
    pc = per_class_scores(np.asarray(gt_semantic), np.asarray(pred_semantic), len(CLASS_NAMES))
    out: dict = {}
    for i, name in enumerate(CLASS_NAMES):
        for m in ("precision", "recall", "f1", "iou"):
            out[f"{m}_{name}"] = float(pc[m][i])
    m = matching(np.asarray(gt_instances), np.asarray(pred_instances))
    th = list(np.round(m["thresholds"], 2))
    out["ap50"] = float(m["ap"][th.index(0.5)])
    out["ap75"] = float(m["ap"][th.index(0.75)])
    out["mAP"] = float(np.mean(m["ap"]))
    out["n_true"], out["n_pred"] = m["n_true"], m["n_pred"]
    ev = evaluation_score(gt_instances, pred_instances)
    out.update(score=ev["score"], subregion_dice=ev["subregion_dice"], full_dice=ev["full_dice"])
    return out


# -------------------------------------------------------------------------------------- cell cycle


def phase_from_reporters(red_on, green_on) -> np.ndarray:
    """The FUCCI rules: Cy3 (red, mKO2-hCdt1) only = ``"G1"``; GFP (green, mAG-hGeminin) only =
    ``"S/G2/M"``; both = ``"G1/S"`` (transition); neither = ``"early_G1"`` (early G1 / M exit).

    Args:
        red_on, green_on: booleans or boolean arrays of equal shape.

    Returns:
        array of phase names (:data:`PHASE_NAMES`), the shape of the inputs.
    """
    r = np.asarray(red_on, dtype=bool)
    g = np.asarray(green_on, dtype=bool)
    if r.shape != g.shape:
        raise ValueError(f"red_on and green_on must have the same shape, got {r.shape} and {g.shape}")
    table = np.array([[PHASE_NAMES[3], PHASE_NAMES[1]], [PHASE_NAMES[0], PHASE_NAMES[2]]], dtype=object)
    return table[r.astype(int), g.astype(int)]


def reporter_thresholds(values: np.ndarray, method="otsu", log: bool = True) -> float:
    """Threshold separating reporter-on from reporter-off nuclei.

    ``method="otsu"``: :func:`skimage.filters.threshold_otsu` of the per-nucleus values, by default
    of their logarithm (on/off is a ratio: the "on" population spreads over a wide range of levels,
    and Otsu on the linear scale then cuts into it); values below ``1e-3`` of the largest are
    clipped there first. Needs both populations present; with one phase only, give a number.
    A number is used as is.

    Returns:
        the threshold in the units of ``values``.
    """
    if not isinstance(method, str):
        return float(method)
    if method != "otsu":
        raise ValueError(f"threshold must be 'otsu' or a number, got {method!r}")
    from skimage.filters import threshold_otsu

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or v.min() == v.max() or (log and v.max() <= 0):
        raise ValueError("Otsu needs at least two nuclei with different (positive) levels; give a threshold value")
    if not log:
        return float(threshold_otsu(v))
    lv = np.log(np.maximum(v, 1e-3 * v.max()))
    if lv.min() == lv.max():
        raise ValueError("Otsu needs at least two nuclei with different (positive) levels; give a threshold value")
    return float(np.exp(threshold_otsu(lv)))


def _background_levels(image: np.ndarray, instances: np.ndarray, background) -> np.ndarray:
    c = image.shape[0]
    if background is None:
        return np.zeros(c)
    if isinstance(background, str):
        if background != "auto":
            raise ValueError(f"background must be 'auto', None or one number per channel, got {background!r}")
        # median of the voxels at least 2 voxels (in-slice) away from every nucleus
        near = ndi.binary_dilation(instances > 0, structure=edge_footprint(2, per_slice=True))
        out = ~near
        if not out.any():
            return np.array([float(np.percentile(image[i], 1)) for i in range(c)])
        return np.array([float(np.median(image[i][out])) for i in range(c)])
    bg = np.atleast_1d(np.asarray(background, dtype=np.float64))
    if bg.size == 1:
        bg = np.repeat(bg, c)
    if bg.size != c:
        raise ValueError(f"{bg.size} background values for {c} channels")
    return bg


def nucleus_table(instances, image, channel_names: Sequence[str] = ("Cy3", "GFP", "Hoechst"),
                  spacing=(1.0, 1.0, 1.0), red: str = "Cy3", green: str = "GFP", normalise_by: str | None = None,
                  thresholds: Mapping[str, object] | str = "otsu", background="auto", statistic: str = "median",
                  spheroid: str | None = None):
    """Per-nucleus measurements and cell-cycle phase.

    For every instance: centroid (um), volume (um^3), mean and median intensity per channel (minus
    the channel's background level); the reporter levels ``red`` and ``green`` (the ``statistic``,
    median by default: a segmentation that spills into a neighbour of another phase moves the
    mean but not the median as long as most voxels are the nucleus' own), divided by the same
    statistic of ``normalise_by`` (a DNA stain) when given, so that the dimming with depth in a
    spheroid, which affects all channels alike, cancels; a reporter is *on* above its threshold
    (Otsu over the nuclei of this table, or a user value); the phase follows
    :func:`phase_from_reporters`.

    Args:
        instances: ``ZYX`` labels.
        image: ``CZYX`` raw intensities (channels named by ``channel_names``).
        spacing: ``ZYX`` voxel size (um).
        red, green: channel names of the G1 (Cy3 / mKO2-hCdt1) and S/G2/M (GFP / mAG-hGeminin)
            reporters.
        normalise_by: DNA channel to divide the reporter levels by, or ``None`` (raw levels).
        thresholds: ``"otsu"`` or ``{red: value or "otsu", green: value or "otsu"}`` in the units
            of the reporter levels (ratios when ``normalise_by`` is set); ``None`` measures only
            (no phase columns; see :func:`assign_phases`).
        background: ``"auto"`` (median away from nuclei), ``None`` (0) or one value per channel.
        statistic: ``"median"`` or ``"mean"`` per nucleus for the reporter levels.
        spheroid: name written in a ``spheroid`` column.

    Returns:
        ``(table, thresholds)``: a pandas DataFrame with columns ``id``, ``centroid_z_um``,
        ``centroid_y_um``, ``centroid_x_um``, ``volume_um3``, ``mean_<channel>`` and
        ``median_<channel>`` per channel,
        ``level_<red>``, ``level_<green>``, ``<red>_on``, ``<green>_on``, ``phase``
        (and ``spheroid``), and the thresholds used ``{red: t, green: t}``.
    """
    import pandas as pd

    lab = _labels3d(instances, "instances")
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4 or img.shape[1:] != lab.shape:
        raise ValueError(f"image must be CZYX with the labels' shape {lab.shape}, got {img.shape}")
    names = list(channel_names)
    if len(names) != img.shape[0]:
        raise ValueError(f"{len(names)} channel names {names} for an image with {img.shape[0]} channels")
    for ch in [red, green] + ([normalise_by] if normalise_by else []):
        if ch not in names:
            raise ValueError(f"channel {ch!r} not among the channel names {names}")
    sp = np.asarray(spacing if not np.isscalar(spacing) else [spacing] * 3, dtype=np.float64)
    ids = np.unique(lab)
    ids = ids[ids > 0]
    bg = _background_levels(img, lab, background)
    cols: dict = {"id": ids}
    if ids.size:
        count = ndi.sum_labels(np.ones_like(lab), lab, ids)
        coords = [ndi.sum_labels(np.broadcast_to(np.arange(n).reshape([-1 if a == i else 1 for a in range(3)]),
                                                 lab.shape), lab, ids) / count for i, n in enumerate(lab.shape)]
        means = np.stack([ndi.mean(img[c], lab, ids) - bg[c] for c in range(img.shape[0])], 1)
        medians = np.stack([np.atleast_1d(ndi.median(img[c], lab, ids)) - bg[c] for c in range(img.shape[0])], 1)
    else:
        count, coords = np.zeros(0), [np.zeros(0)] * 3
        means = medians = np.zeros((0, img.shape[0]))
    for ax, name in enumerate("zyx"):
        cols[f"centroid_{name}_um"] = coords[ax] * sp[ax]
    cols["volume_um3"] = count * float(np.prod(sp))
    for c, name in enumerate(names):
        cols[f"mean_{name}"] = means[:, c]
    for c, name in enumerate(names):
        cols[f"median_{name}"] = medians[:, c]
    table = pd.DataFrame(cols)
    if spheroid is not None:
        table.insert(0, "spheroid", spheroid)
    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean', got {statistic!r}")
    denom = table[f"{statistic}_{normalise_by}"].to_numpy() if normalise_by else np.ones(len(table))
    denom = np.where(denom > 0, denom, np.nan)
    for ch in (red, green):
        table[f"level_{ch}"] = table[f"{statistic}_{ch}"].to_numpy() / denom
    if thresholds is None:
        return table, {}
    return assign_phases(table, red, green, thresholds)


def assign_phases(table, red: str = "Cy3", green: str = "GFP", thresholds: Mapping[str, object] | str = "otsu"):
    """Reporter on/off and phase for every row of a :func:`nucleus_table` (columns ``level_<red>``,
    ``level_<green>``), e.g. after pooling the tables of all spheroids of an experiment so that one
    threshold serves all of them (a drug that arrests every cell in G1 leaves one population,
    which a per-spheroid Otsu would split).

    Returns:
        ``(table with <red>_on, <green>_on, phase columns, {red: t, green: t})``.
    """
    table = table.copy()
    th = thresholds if isinstance(thresholds, Mapping) else {red: thresholds, green: thresholds}
    used = {}
    for ch in (red, green):
        level = table[f"level_{ch}"].to_numpy(dtype=np.float64)
        used[ch] = reporter_thresholds(level, th.get(ch, "otsu")) if len(table) else float("nan")
        table[f"{ch}_on"] = level > used[ch]
    table["phase"] = phase_from_reporters(table[f"{red}_on"].to_numpy(), table[f"{green}_on"].to_numpy()) \
        if len(table) else np.zeros(0, dtype=object)
    return table, used


def phase_distribution(phases) -> dict:
    """Fraction of nuclei in each phase, ``{phase: fraction}`` over all of :data:`PHASE_NAMES` (0 if absent)."""
    ph = list(np.asarray(phases, dtype=object).ravel())
    unknown = sorted({str(p) for p in ph} - set(PHASE_NAMES))
    if unknown:
        raise ValueError(f"unknown phase name(s) {unknown}; expected {PHASE_NAMES}")
    n = len(ph)
    return {p: (ph.count(p) / n if n else float("nan")) for p in PHASE_NAMES}


def phase_agreement(gt_instances, gt_phases: Mapping[int, str], pred_instances, pred_phases: Mapping[int, str],
                    iou_threshold: float = 0.5) -> dict:
    """How well predicted phases agree with the truth.

    Nuclei are *correctly segmented* when matched one-to-one at IoU >= ``iou_threshold``
    (:func:`common.metrics.matching`).

    Returns:
        ``n_true``, ``n_pred``, ``n_matched``, ``accuracy`` (fraction of matched nuclei with the
        true phase), ``true_distribution`` (over all true nuclei), ``pred_distribution`` (over all
        predicted nuclei), ``max_abs_diff_pp`` (largest difference between the two, percentage
        points).
    """
    m = matching(np.asarray(gt_instances), np.asarray(pred_instances), thresholds=[iou_threshold])
    g, p = m["matched_gt"][0], m["matched_pred"][0]
    ok = [gt_phases[int(a)] == pred_phases[int(b)] for a, b in zip(g, p)]
    true_ids = [int(i) for i in np.unique(gt_instances) if i > 0]
    pred_ids = [int(i) for i in np.unique(pred_instances) if i > 0]
    td = phase_distribution([gt_phases[i] for i in true_ids])
    pdist = phase_distribution([pred_phases[i] for i in pred_ids])
    return {
        "n_true": len(true_ids), "n_pred": len(pred_ids), "n_matched": len(ok),
        "accuracy": float(np.mean(ok)) if ok else float("nan"),
        "true_distribution": td, "pred_distribution": pdist,
        "max_abs_diff_pp": float(max(abs(td[k] - pdist[k]) for k in PHASE_NAMES) * 100),
    }


def save_phase_plot(distributions: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
                    title: str = "cell-cycle phase per spheroid") -> str:
    """Stacked bars: one per spheroid, the fraction of nuclei in each phase (PNG, atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.report import save_figure

    names = list(distributions)
    colours = {"G1": "#d62728", "S/G2/M": "#2ca02c", "G1/S": "#ff7f0e", "early_G1": "#7f7f7f"}
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 4))
    bottom = np.zeros(len(names))
    for ph in PHASE_NAMES:
        vals = np.array([100 * float(distributions[n].get(ph, 0.0)) for n in names])
        ax.bar(names, vals, bottom=bottom, color=colours[ph], label=ph)
        bottom += vals
    ax.set_ylabel("% of nuclei")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return save_figure(fig, str(path))


def save_preprocessing_preview(path: str | os.PathLike, image: str | os.PathLike, config: str | os.PathLike,
                               input_channels: Sequence[int] = (0,), **overrides) -> str:
    """Before/after PNG of a bundle's preprocessing: the ``intensity`` transform list of ``config``
    (e.g. ``bundles/unet3d_fucci/configs/inference.json``) applied step by step to one stack, one
    panel of orthogonal max-projections per enabled step (first input channel shown).

    Args:
        path: PNG to write (atomically).
        image: a ``ZYX`` / ``CZYX`` stack.
        config: bundle config holding ``intensity`` (and ``input_channels``, ``preproc``).
        input_channels: channels fed to the network.
        **overrides: config overrides (``"preproc#gamma": 0.7``; ``__`` may stand for ``#``).
    """
    from monai.bundle import ConfigParser

    from common.io import LoadMicroscopy
    from common.report import save_mip_figure

    parser = ConfigParser()
    parser.read_config(str(config))
    parser["input_channels"] = [int(c) for c in np.atleast_1d(input_channels)]
    for k, v in overrides.items():
        parser[k.replace("__", "#")] = v
    steps = parser.get_parsed_content("intensity")
    img = LoadMicroscopy(spatial_dims=3)(str(image))
    d = {"image": img}
    panels = {}
    for t in steps:
        d = t(d)
        name = type(t).__name__.removesuffix("d")
        if name == "Lambda":
            panels["input"] = np.asarray(d["image"][0])
        elif getattr(getattr(t, "t", None), "enabled", True):
            panels["scaled to [0, 1]" if name == "ScaleIntensityRangePercentiles" else name] = np.asarray(d["image"][0])
    return save_mip_figure(str(path), panels, spacing=tuple(float(s) for s in img.pixdim),
                           title=f"preprocessing of {os.path.basename(str(image))} (max-projections, left to right)")

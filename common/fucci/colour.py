"""FUCCI colour split and merge: split nuclei whose reporter colour changes, merge over-split touching ones."""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

from common.fucci.ground_truth import EDGE, _labels3d
from common.fucci.phases import _background_levels
from common.segmentation import _size_filter

__all__ = ["colour_change", "split_by_reporter_change", "instance_contacts", "merge_oversplit"]


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
            ``experiments/fucci_synthetic_experiment.py`` the same nucleus changes by < 0.3 between
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

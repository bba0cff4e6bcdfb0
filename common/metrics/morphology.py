"""Per-object 3D morphology features and the comparison of feature profiles between segmentations."""

from __future__ import annotations

import numpy as np

from common.metrics.base import DegenerateInputError, _spacing_tuple
from common.metrics.image import pearson_r
from common.metrics.instances import _check_labels, matching

__all__ = ["SHAPE_FEATURES", "INTENSITY_FEATURES", "object_features", "feature_profile_distance",
           "matched_feature_rows", "feature_correlation", "matched_feature_correlation"]


#: Feature columns produced by :func:`object_features` that describe shape/intensity
#: (identifiers and positions excluded); used by the profile comparisons.
SHAPE_FEATURES = (
    "volume",
    "surface_area",
    "sphericity",
    "axis_major_length",
    "axis_medium_length",
    "axis_minor_length",
    "extent",
    "solidity",
)
INTENSITY_FEATURES = ("intensity_mean", "intensity_std", "intensity_max", "intensity_min")


def object_features(labels, intensity=None, spacing=(1.0, 1.0, 1.0)):
    """Per-object 3D morphology (and intensity) features.

    Args:
        labels (ndarray of int, shape (Z, Y, X)): Instance labels (0 = background).
        intensity (ndarray, shape (Z, Y, X), optional): Intensity image for the ``intensity_*`` columns.
        spacing (sequence of 3 float): Voxel size (dz, dy, dx) in micrometres.

    Returns:
        pandas.DataFrame: One row per object with columns ``label``; ``centroid_z/y/x`` (um);
            ``volume`` (um^3, voxel count x voxel volume); ``surface_area`` (um^2, area
            of the marching-cubes mesh at level 0.5 of the zero-padded binary object,
            :func:`skimage.measure.marching_cubes` + ``mesh_surface_area``, with
            ``spacing``); ``sphericity`` = pi^(1/3) (6 V)^(2/3) / A (1 for a sphere);
            ``axis_major/medium/minor_length`` (um, full lengths of the ellipsoid with
            the same second moments: ``sqrt(10 (l_j + l_k - l_i))`` from the
            eigenvalues l of regionprops' spacing-aware inertia tensor); ``extent``
            (volume / bounding-box volume); ``solidity`` (volume / convex-hull volume);
            and with ``intensity``: ``intensity_mean/std/max/min``.
    """
    import pandas as pd
    from skimage import measure

    labels = _check_labels(labels, "labels")
    if labels.ndim != 3:
        raise ValueError(f"object_features expects a ZYX label volume, got ndim={labels.ndim}")
    sp = _spacing_tuple(spacing, 3)
    if intensity is not None:
        intensity = np.asarray(intensity, dtype=np.float64)
        if intensity.shape != labels.shape:
            raise ValueError(f"intensity shape {intensity.shape} does not match labels {labels.shape}")
    cols = ["label", "centroid_z", "centroid_y", "centroid_x", *SHAPE_FEATURES]
    if intensity is not None:
        cols += list(INTENSITY_FEATURES)
    rows = []
    for rp in measure.regionprops(labels, intensity_image=intensity, spacing=sp):
        crop = np.pad(rp.image, 1).astype(np.float32)
        verts, faces, _, _ = measure.marching_cubes(crop, level=0.5, spacing=sp)
        area = float(measure.mesh_surface_area(verts, faces))
        vol = float(rp.area)
        ev = np.sort(np.asarray(rp.inertia_tensor_eigvals, dtype=np.float64))[::-1]  # l0 >= l1 >= l2
        major = np.sqrt(max(10.0 * (ev[0] + ev[1] - ev[2]), 0.0))
        medium = np.sqrt(max(10.0 * (ev[0] - ev[1] + ev[2]), 0.0))
        minor = np.sqrt(max(10.0 * (-ev[0] + ev[1] + ev[2]), 0.0))
        try:
            solidity = float(rp.solidity)
        except Exception:  # flat / tiny objects have no 3D convex hull (QhullError)
            solidity = 1.0
        row = [
            int(rp.label),
            *map(float, rp.centroid),
            vol,
            area,
            float(np.pi ** (1 / 3) * (6 * vol) ** (2 / 3) / area) if area > 0 else np.nan,
            float(major),
            float(medium),
            float(minor),
            float(rp.extent),
            solidity,
        ]
        if intensity is not None:
            row += [
                float(rp.intensity_mean),
                float(rp.intensity_std),
                float(rp.intensity_max),
                float(rp.intensity_min),
            ]
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _feature_columns(feats_a, feats_b, features):
    if features is None:
        features = [c for c in (*SHAPE_FEATURES, *INTENSITY_FEATURES) if c in feats_a and c in feats_b]
    if not features:
        raise ValueError("no common feature column")
    return list(features)


def feature_profile_distance(feats_a, feats_b, features=None, reference=None):
    """Cosine distance between the median feature profiles of two object populations.

    Each feature is z-scored with the mean and std of ``reference`` (default
    ``feats_a``, e.g. objects segmented in the real stain), then the per-feature
    median over objects forms each population's profile;
    ``distance = 1 - <m_a, m_b> / (|m_a| |m_b|)``.

    Note: with the default reference, ``m_a`` is the median of z-scores of ``a``
    itself, i.e. a measure of the skew of ``a``'s distributions and close to 0, so
    the cosine is sensitive to noise; pass a separate control population as
    ``reference`` for a stable profile comparison.

    Args:
        feats_a, feats_b (pandas.DataFrame (or dict of 1D arrays)): Outputs of :func:`object_features`.
        features (sequence of str, optional): Columns to use (default: all shape and intensity features present in
            both).
        reference (DataFrame, optional): Population providing the z-score statistics (default ``feats_a``).

    Returns:
        float: Cosine distance in [0, 2]; 0.0 if both profiles are the zero vector, 1.0 if
            exactly one is. Features with zero std in the reference are only centred.

    Raises:
        DegenerateInputError: A population without any object.
    """
    import pandas as pd

    fa = pd.DataFrame(feats_a)
    fb = pd.DataFrame(feats_b)
    ref = fa if reference is None else pd.DataFrame(reference)
    cols = _feature_columns(fa, fb, features)
    if len(fa) == 0 or len(fb) == 0:
        raise DegenerateInputError(f"feature profiles need at least one object in each population, got {len(fa)} "
                                   f"and {len(fb)}; check the segmentations (no object found?)")
    mu = ref[cols].to_numpy(np.float64).mean(0)
    sd = ref[cols].to_numpy(np.float64).std(0)
    sd = np.where(sd > 0, sd, 1.0)
    ma = np.nanmedian((fa[cols].to_numpy(np.float64) - mu) / sd, axis=0)
    mb = np.nanmedian((fb[cols].to_numpy(np.float64) - mu) / sd, axis=0)
    na, nb = np.linalg.norm(ma), np.linalg.norm(mb)
    if na == 0 and nb == 0:
        return 0.0
    if na == 0 or nb == 0:
        return 1.0
    return float(np.clip(1.0 - np.dot(ma, mb) / (na * nb), 0.0, 2.0))


def matched_feature_rows(feats_gt, feats_pred, gt_labels, pred_labels, features=None, iou_threshold=0.5):
    """Feature rows of the ground-truth and predicted objects matched by IoU, in matching order.

    Objects are paired by :func:`common.metrics.instances.matching` at ``iou_threshold`` (unique at >= 0.5).

    Args:
        feats_gt: :func:`object_features` table (``pandas.DataFrame``, column ``label``) of ``gt_labels``.
        feats_pred: the same of ``pred_labels``.
        gt_labels: the ground-truth label image the features were measured on.
        pred_labels: the predicted label image.
        features: columns to keep (default: shape and intensity features present in both).
        iou_threshold: matching threshold.

    Returns:
        tuple: two ``DataFrame`` with the columns ``features``, row ``i`` of each is the ``i``-th matched pair.
    """
    import pandas as pd

    fg = pd.DataFrame(feats_gt).set_index("label")
    fp = pd.DataFrame(feats_pred).set_index("label")
    cols = _feature_columns(fg, fp, features)
    m = matching(gt_labels, pred_labels, thresholds=[iou_threshold])
    return (fg.loc[m["matched_gt"][0], cols].reset_index(drop=True),
            fp.loc[m["matched_pred"][0], cols].reset_index(drop=True))


def feature_correlation(rows_a, rows_b, features=None) -> dict:
    """Per-feature Pearson r between paired rows of two feature tables (e.g. :func:`matched_feature_rows`).

    Args:
        rows_a: ``DataFrame`` of features, one row per object.
        rows_b: ``DataFrame`` with the same columns, row ``i`` paired with row ``i`` of ``rows_a``.
        features: columns to correlate (default: all columns of ``rows_a``).

    Returns:
        dict: ``{feature: r}``; r = 0.0 when a feature is constant over the pairs, NaN when fewer than 2 pairs.
    """
    cols = list(rows_a.columns) if features is None else list(features)
    return {c: pearson_r(rows_b[c].to_numpy(), rows_a[c].to_numpy()) if len(rows_a) >= 2 else float("nan")
            for c in cols}


def matched_feature_correlation(feats_gt, feats_pred, gt_labels, pred_labels, features=None, iou_threshold=0.5):
    """Per-feature Pearson r between ground-truth and predicted objects matched by IoU.

    The arguments are those of :func:`matched_feature_rows`.

    Returns:
        dict: ``{feature: r}`` (:func:`feature_correlation` of :func:`matched_feature_rows`) plus ``"n_matched"``.
    """
    a, b = matched_feature_rows(feats_gt, feats_pred, gt_labels, pred_labels, features, iou_threshold)
    out = feature_correlation(a, b)
    out["n_matched"] = int(len(a))
    return out

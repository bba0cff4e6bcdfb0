"""Evaluation metrics shared by the zoo's bundles, one module per kind; every public name is re-exported here.

* :mod:`~common.metrics.image`: image similarity for virtual staining (Ounkomol et al. 2018;
  Kalinin et al., "Spotlight"): :func:`pearson_r`, :func:`psnr`, :func:`ssim`,
  :func:`rescale_to_range`, :func:`microssim_3d`, :func:`background_variability`.
* :mod:`~common.metrics.resolution`: :func:`fourier_ring_correlation` (FRC in 2D, FSC in 3D),
  :func:`frc_resolution`.
* :mod:`~common.metrics.instances`: instance segmentation (StarDist / Cellpose definitions):
  :func:`match_instances`, :func:`matching`, :func:`average_precision`,
  :func:`dataset_average_precision`, :func:`scores_from_counts`, :func:`aggregated_jaccard_index`.
* :mod:`~common.metrics.semantic`: :func:`per_class_scores`.
* :mod:`~common.metrics.morphology`: :func:`object_features`, :func:`feature_profile_distance`,
  :func:`matched_feature_rows`, :func:`feature_correlation`, :func:`matched_feature_correlation`.
* :mod:`~common.metrics.handlers`: MONAI ``CumulativeIterationMetric`` classes and their ignite
  handlers: :class:`PearsonR`, :class:`ForegroundPearsonR`, :class:`RangePSNR`, :class:`InstanceAP`.

Arrays are ``YX`` (2D) or ``ZYX`` (3D); ``spacing`` is the voxel size in micrometres in the same
axis order. Label images use 0 for background and positive integers for objects (labels need not
be consecutive).

A metric that is undefined on its input (constant reference image, empty mask, image smaller than
the metric's window, all-constant validation set) raises :class:`DegenerateInputError` (a
``ValueError``) saying what is wrong and what to do. Where a value is meaningful it is returned
and documented instead: Pearson's r of a constant image is 0.0, instance scores of two empty label
images are 1.0, PSNR of identical images is ``inf``. No function returns NaN unless its docstring
says so.
"""

from common.metrics.base import DEFAULT_IOU_THRESHOLDS, DegenerateInputError
from common.metrics.handlers import (ForegroundPearsonMetric, ForegroundPearsonR, InstanceAP, InstanceMatchingMetric,
                                     PearsonMetric, PearsonR, RangePSNR, RangePSNRMetric)
from common.metrics.image import background_variability, microssim_3d, pearson_r, psnr, rescale_to_range, ssim
from common.metrics.instances import (aggregated_jaccard_index, average_precision, dataset_average_precision,
                                      match_instances, matching, scores_from_counts)
from common.metrics.morphology import (INTENSITY_FEATURES, SHAPE_FEATURES, feature_correlation,
                                       feature_profile_distance, matched_feature_correlation, matched_feature_rows,
                                       object_features)
from common.metrics.resolution import fourier_ring_correlation, frc_resolution
from common.metrics.semantic import per_class_scores

__all__ = [
    "DEFAULT_IOU_THRESHOLDS", "DegenerateInputError",
    "pearson_r", "psnr", "ssim", "rescale_to_range", "microssim_3d", "background_variability",
    "fourier_ring_correlation", "frc_resolution",
    "match_instances", "matching", "average_precision", "dataset_average_precision", "scores_from_counts",
    "aggregated_jaccard_index",
    "per_class_scores",
    "SHAPE_FEATURES", "INTENSITY_FEATURES", "object_features", "feature_profile_distance", "matched_feature_rows",
    "feature_correlation", "matched_feature_correlation",
    "PearsonMetric", "PearsonR", "RangePSNRMetric", "RangePSNR", "ForegroundPearsonMetric", "ForegroundPearsonR",
    "InstanceMatchingMetric", "InstanceAP",
]

"""In-silico labeling (ISL, Bonte et al.) method package: stages, distance+mask targets, loss, h-maxima instances.

* :mod:`common.isl.stages`: the stage-0 (ISL: label-free -> stain) / stage-1 (segmentation)
  manifest reading and network initialisation shared by ``isl_nucleus_seg`` and ``isl_cell_instance``.
* :mod:`common.isl.targets`: :func:`instance_distance_map` and :class:`DistanceMaskTargetd`
  (instance labels -> ``[normalised distance, mask]``).
* :mod:`common.isl.losses`: :class:`DistanceMaskLoss` (``MSE + alpha BCE``). The stage-1 soft
  Jaccard loss of ``isl_nucleus_seg`` is MONAI's ``DiceLoss(jaccard=True, smooth_nr=2 s, smooth_dr=2 s)``,
  which equals ``1 - (I + s) / (U + s)`` for one channel.
* :mod:`common.isl.instances`: :class:`DistanceMaskToInstancesd` (h-maxima watershed of the
  predicted distance inside the predicted mask).

The package imports only the generic layer of ``common``.
"""

from common.isl.instances import DistanceMaskToInstances, DistanceMaskToInstancesd
from common.isl.losses import DistanceMaskLoss
from common.isl.stages import ISL_INITS, STAGE_COLUMNS, initialise_isl_network, load_isl_manifest
from common.isl.targets import DistanceMaskTarget, DistanceMaskTargetd, instance_distance_map

__all__ = [
    "STAGE_COLUMNS", "ISL_INITS", "load_isl_manifest", "initialise_isl_network",
    "instance_distance_map", "DistanceMaskTarget", "DistanceMaskTargetd",
    "DistanceMaskLoss",
    "DistanceMaskToInstances", "DistanceMaskToInstancesd",
]

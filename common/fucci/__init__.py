"""FUCCI spheroids method package: data, ground truth, instances, colour split/merge, evaluation, phases.

After Tiling (Leiden MSc thesis 2024, "Segmenting and Analysing 3D images of FUCCI-reporter induced
breast cancer nuclei spheroids"), extended with the per-nucleus cell-cycle analysis. Pure functions,
numpy in / numpy out (scikit-image style), plus one MONAI post-processing transform.

* :mod:`common.fucci.data`: :func:`load_fucci_manifest` (training manifests, checked before
  training), :func:`list_fucci_images` (inference inputs).
* :mod:`common.fucci.preprocessing`: the optional per-channel steps (:class:`BackgroundThresholdd`,
  :class:`GammaCorrectiond`, :class:`CLAHEd`, :class:`MedianFilterd`, :class:`TopHatRemovald`).
* :mod:`common.fucci.ground_truth`: :func:`clean_instances` (per-slice minimum area, boundary
  smoothing), :func:`semantic_from_instances` (background 0, edge 1, nucleus 2),
  :func:`prepare_ground_truth`, :func:`write_ground_truth`.
* :mod:`common.fucci.instances`: :func:`instances_connected_components` (the thesis' way),
  :func:`instances_watershed` (seeded watershed on the distance transform), :func:`give_back_edges`,
  :func:`instances_from_prediction`, :class:`SemanticToInstancesd`.
* :mod:`common.fucci.colour`: :func:`split_by_reporter_change`, :func:`merge_oversplit`.
* :mod:`common.fucci.evaluation`: :func:`evaluation_score` (the thesis'
  ``(0.95 subregion Dice + 1.05 full Dice) / 2`` per nucleus), :func:`segmentation_report`.
* :mod:`common.fucci.phases`: :func:`phase_from_reporters` (the FUCCI rules), :func:`nucleus_table`,
  :func:`assign_phases`, :func:`phase_distribution`, :func:`phase_agreement`, :func:`save_phase_plot`.

Arrays are ``ZYX`` (labels, one channel) and ``CZYX`` (images); ``spacing`` is the voxel size in
micrometres, ``ZYX``. The package imports only the generic layer of ``common``.
"""

from common.fucci.colour import colour_change, instance_contacts, merge_oversplit, split_by_reporter_change
from common.fucci.data import list_fucci_images, load_fucci_manifest
from common.fucci.evaluation import evaluation_score, segmentation_report
from common.fucci.ground_truth import (BACKGROUND, CLASS_NAMES, EDGE, NUCLEUS, clean_instances, edge_footprint,
                                       prepare_ground_truth, semantic_from_instances, write_ground_truth)
from common.fucci.instances import (SemanticToInstancesd, give_back_edges, instances_connected_components,
                                    instances_from_prediction, instances_watershed)
from common.fucci.phases import (PHASE_NAMES, assign_phases, nucleus_table, phase_agreement, phase_distribution,
                                 phase_from_reporters, reporter_thresholds, save_phase_plot)
from common.fucci.preprocessing import (CLAHE, BackgroundThreshold, BackgroundThresholdd, CLAHEd, GammaCorrection,
                                        GammaCorrectiond, MedianFilter, MedianFilterd, TopHatRemoval, TopHatRemovald)

__all__ = [
    "CLASS_NAMES", "BACKGROUND", "EDGE", "NUCLEUS", "PHASE_NAMES",
    "load_fucci_manifest", "list_fucci_images",
    "BackgroundThreshold", "BackgroundThresholdd", "GammaCorrection", "GammaCorrectiond", "CLAHE", "CLAHEd",
    "MedianFilter", "MedianFilterd", "TopHatRemoval", "TopHatRemovald",
    "edge_footprint", "clean_instances", "semantic_from_instances", "prepare_ground_truth", "write_ground_truth",
    "instances_connected_components", "instances_watershed", "give_back_edges", "instances_from_prediction",
    "SemanticToInstancesd",
    "colour_change", "split_by_reporter_change", "instance_contacts", "merge_oversplit",
    "evaluation_score", "segmentation_report",
    "phase_from_reporters", "reporter_thresholds", "nucleus_table", "assign_phases", "phase_distribution",
    "phase_agreement", "save_phase_plot",
]

"""In-silico labeling (ISL) as pretraining for segmentation (Bonte et al.): data and initialisation glue.

Shared by ``isl_nucleus_seg`` and ``isl_cell_instance``. The two stages read the same manifest
(``path_signal,path_target,path_label``, paths relative to the CSV):

* stage 0 (ISL): ``image`` = label-free channels (``CYX``, e.g. two bright-field planes and
  phase contrast) -> ``label`` = the stain (``path_target``, e.g. DAPI max projection);
* stage 1: ``image`` -> ``label`` = the mask (``path_label``: binary or instance labels).

The pieces that already exist elsewhere are used as they are: per-channel standardisation of
the inputs is MONAI's ``NormalizeIntensityd(channel_wise=True)`` (a constant channel becomes 0),
the stain is mapped to ``[0, 1]`` with ``ScaleIntensityRangePercentilesd`` (so that the stage-1
shifted sigmoid's threshold 0.5 means "half the nuclear level"), and random crops that skip
crops without foreground are :class:`common.transforms.RandForegroundPatchd`.
"""

from __future__ import annotations

import os
from torch import nn

from common.data import read_manifest, validate_records

__all__ = ["STAGE_COLUMNS", "load_isl_manifest", "initialise_isl_network", "ISL_INITS"]

#: manifest column of the training target per stage
STAGE_COLUMNS = {0: "path_target", 1: "path_label"}
#: initialisations per stage: stage 0 from scratch or ImageNet; stage 1 also from the stage-0 network
ISL_INITS = {0: ("scratch", "imagenet"), 1: ("isl", "scratch", "imagenet")}


def _stage(stage) -> int:
    try:
        s = int(stage)
    except (TypeError, ValueError):
        s = None
    if s not in STAGE_COLUMNS:
        raise ValueError(f"stage must be 0 (in-silico labeling) or 1 (segmentation), got {stage!r}")
    return s


def load_isl_manifest(csv_path: str | os.PathLike, stage: int, in_channels: int | None = None, validate: bool = True,
                      label_column: str | None = None) -> list[dict]:
    """Records ``{"image": ..., "label": ...}`` of an ISL manifest for ``stage``, every file checked first.

    Args:
        csv_path: manifest with ``path_signal`` and ``path_target`` (stage 0) / ``path_label`` (stage 1).
        stage: 0 or 1.
        in_channels: the network's input channels; every signal must have exactly this many.
        validate: open every file and raise one :class:`common.data.ManifestError` listing all
            problems: unreadable / missing files, wrong number of dimensions, NaN/inf, a signal
            with the wrong number of channels, signal and target/mask of different sizes, a
            constant signal or stain, an empty mask (stage 1: nothing to learn, and the paper's
            crop rule needs foreground).
        label_column: override the target column (e.g. another mask column).

    Returns:
        list of dicts with absolute paths (other columns copied as strings).
    """
    stage = _stage(stage)
    col = label_column or STAGE_COLUMNS[stage]
    records = read_manifest(csv_path, keys={"path_signal": "image", col: "label"})
    if validate:
        validate_records(records, image_keys=("image", "label"), spatial_dims=2, same_shape=("image", "label"),
                         nonconstant=("image", "label") if stage == 0 else ("image",),
                         nonempty=("label",) if stage == 1 else (),
                         channels={"image": int(in_channels)} if in_channels is not None else None)
    return records


def initialise_isl_network(net: nn.Module, stage: int, init: str, stage0_ckpt: str | None = None,
                           imagenet_weights: str | None = None) -> nn.Module:
    """Check the initialisation choice and apply it; returns ``net``.

    ``init``: ``"scratch"`` (random), ``"imagenet"`` (the encoder was built with
    ``pretrained_path=imagenet_weights``; this only checks that a file was given) or, in stage 1,
    ``"isl"`` (whole-network transfer of the stage-0 checkpoint ``stage0_ckpt`` with
    :func:`common.networks.densenet_unet.load_stage0_weights`). Errors are raised here, before
    any training starts.
    """
    from common.networks.densenet_unet import load_stage0_weights

    stage = _stage(stage)
    if init not in ISL_INITS[stage]:
        raise ValueError(f"init={init!r} is not available in stage {stage}; choose one of {ISL_INITS[stage]}")
    if init == "imagenet" and not imagenet_weights:
        raise ValueError("init='imagenet' needs imagenet_weights: the path of torchvision's densenet121 weights "
                         "(nothing is downloaded)")
    if init == "isl":
        if not stage0_ckpt:
            raise ValueError("init='isl' needs stage0_ckpt, the stage-0 model file")
        load_stage0_weights(net, stage0_ckpt)
    return net

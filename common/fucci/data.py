"""FUCCI inputs: training manifests checked before training, inference image lists."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from common.fucci.ground_truth import NUCLEUS

__all__ = ["load_fucci_manifest", "list_fucci_images"]


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

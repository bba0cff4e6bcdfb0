"""CSV manifests -> MONAI datasets, every row checked before any training starts.

A manifest is a CSV with a header. Paths are relative to the CSV's folder (or absolute). The
pytorch_fnet convention ``path_signal,path_target[,path_label]`` is understood, so Allen-style
manifests work; bundles map columns to dictionary keys (``image``, ``label``, ...).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.io import ImageReadError, read_image

__all__ = ["ManifestError", "read_manifest", "validate_records", "load_manifest", "list_images", "RandomPatchDataset"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".nii", ".nii.gz")

DEFAULT_KEYS = {"path_signal": "image", "path_target": "label"}


class ManifestError(ValueError):
    """A manifest, or a file it names, is unusable. The message lists every problem found."""


def read_manifest(csv_path: str | os.PathLike, keys: Mapping[str, str] | None = None,
                  optional: Mapping[str, str] | None = None) -> list[dict]:
    """Read a CSV manifest into a list of ``{key: absolute path}`` dictionaries.

    Args:
        csv_path: the manifest.
        keys: required column -> dictionary key (default ``path_signal -> image``, ``path_target -> label``).
        optional: columns used when present (e.g. ``{"path_label": "seg"}``).

    Other columns are copied as they are (strings), so bundle-specific columns travel along.
    """
    csv_path = str(csv_path)
    keys = dict(DEFAULT_KEYS if keys is None else keys)
    optional = dict(optional or {})
    if not os.path.isfile(csv_path):
        raise ManifestError(f"{csv_path}: manifest not found")
    base = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in keys if c not in header]
        if missing:
            raise ManifestError(f"{csv_path}: missing column(s) {missing}; header is {header}")
        rows = list(reader)
    if not rows:
        raise ManifestError(f"{csv_path}: no rows")
    records = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        rec = {"_manifest": csv_path, "_line": i}
        for col, val in row.items():
            if col is None:
                continue
            key = keys.get(col) or optional.get(col)
            if key is None:
                rec[col] = val
                continue
            val = (val or "").strip()
            if not val:
                if col in keys:
                    raise ManifestError(f"{csv_path} line {i}: empty value in column '{col}'")
                continue
            rec[key] = val if os.path.isabs(val) else os.path.normpath(os.path.join(base, val))
        records.append(rec)
    return records


def validate_records(records: Sequence[dict], image_keys: Sequence[str] = ("image", "label"), spatial_dims: int = 3,
                     same_shape: Sequence[str] | None = None, nonconstant: Sequence[str] | None = None,
                     nonempty: Sequence[str] = (), channels: Mapping[str, int] | None = None) -> None:
    """Open every file of every record and raise one :class:`ManifestError` listing all problems.

    Checks: the file exists and is readable, has ``spatial_dims`` spatial dimensions, has no NaN/inf,
    ``same_shape`` keys share one spatial shape, ``nonconstant`` keys are not constant images,
    ``nonempty`` keys (masks) contain foreground, ``channels`` keys have that many channels.
    """
    same_shape = list(image_keys if same_shape is None else same_shape)
    nonconstant = list(image_keys if nonconstant is None else nonconstant)
    channels = dict(channels or {})
    problems = []
    for rec in records:
        where = f"{rec.get('_manifest', 'datalist')} line {rec.get('_line', '?')}"
        shapes = {}
        for k in image_keys:
            if k not in rec:
                continue
            path = rec[k]
            try:
                arr, _, _ = read_image(path, spatial_dims=spatial_dims)
            except ImageReadError as e:
                problems.append(f"{where}: {e}")
                continue
            shapes[k] = arr.shape[1:]
            if k in channels and arr.shape[0] != channels[k]:
                problems.append(f"{where}: {path}: {arr.shape[0]} channel(s), expected {channels[k]}")
            if k in nonconstant and arr.size and arr.min() == arr.max():
                problems.append(f"{where}: {path}: constant image (every value {arr.flat[0]}), nothing to learn from")
            if k in nonempty and not np.any(arr):
                problems.append(f"{where}: {path}: mask is empty (no foreground)")
        ref = [k for k in same_shape if k in shapes]
        if len(ref) > 1 and len({shapes[k] for k in ref}) > 1:
            desc = ", ".join(f"{k} {tuple(shapes[k])} ({rec[k]})" for k in ref)
            problems.append(f"{where}: shape mismatch between {desc}")
    if problems:
        n = len(problems)
        raise ManifestError(f"{n} problem(s) found before training:\n  " + "\n  ".join(problems))


def load_manifest(csv_path: str | os.PathLike, keys: Mapping[str, str] | None = None,
                  optional: Mapping[str, str] | None = None, spatial_dims: int = 3, validate: bool = True,
                  **validate_kwargs) -> list[dict]:
    """:func:`read_manifest` then :func:`validate_records` over every image column."""
    records = read_manifest(csv_path, keys, optional)
    if validate:
        image_keys = list((keys or DEFAULT_KEYS).values()) + list((optional or {}).values())
        validate_kwargs.setdefault("same_shape", image_keys)
        validate_kwargs.setdefault("nonconstant", list((keys or DEFAULT_KEYS).values()))
        validate_records(records, image_keys=image_keys, spatial_dims=spatial_dims, **validate_kwargs)
    return records


def list_images(source: str | os.PathLike, key: str = "image", column: str = "path_signal", spatial_dims: int = 3,
                validate: bool = True, pattern: str | None = None) -> list[dict]:
    """Inputs for inference: ``[{key: path}, ...]`` from a folder of images, a CSV manifest
    (its ``column``) or a single image file. Every file is opened and checked first.

    Args:
        source: folder, ``.csv`` manifest or image file.
        pattern: substring a file name in a folder must contain (e.g. ``"signal"``), optional.
    """
    source = str(source)
    if source.lower().endswith(".csv"):
        records = [{key: r[key]} for r in read_manifest(source, keys={column: key})]
    elif os.path.isdir(source):
        names = sorted(n for n in os.listdir(source)
                       if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".") and (pattern is None or pattern in n))
        records = [{key: os.path.join(source, n)} for n in names]
        if not records:
            raise ManifestError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) found"
                                + (f" with '{pattern}' in the name" if pattern else ""))
    elif os.path.isfile(source):
        records = [{key: source}]
    else:
        raise ManifestError(f"{source}: not found (give a folder, a .csv manifest or an image file)")
    if validate:
        validate_records(records, image_keys=(key,), spatial_dims=spatial_dims)
    return records


class RandomPatchDataset(Dataset):
    """Random patches drawn uniformly across images and positions, ``num_patches`` per epoch.

    Item ``i`` takes image ``i % len(dataset)`` (so with a shuffling sampler every image is used
    equally often) and applies ``patch_transform`` (e.g. ``SpatialPadd`` + ``RandSpatialCropd``,
    whose position is uniform). ``dataset`` is typically a ``CacheDataset`` of whole, normalised
    volumes, so files are read once.
    """

    def __init__(self, dataset: Dataset, patch_transform, num_patches: int):
        if len(dataset) == 0:
            raise ValueError("RandomPatchDataset needs at least one image")
        self.dataset = dataset
        self.patch_transform = patch_transform
        self.num_patches = int(num_patches)

    def __len__(self) -> int:
        return self.num_patches

    def __getitem__(self, i: int):
        item = self.dataset[i % len(self.dataset)]
        item = dict(item) if isinstance(item, Mapping) else item
        out = self.patch_transform(item)
        if isinstance(out, Mapping):
            out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
        return out

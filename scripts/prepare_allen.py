"""Turn the Allen Institute label-free dataset (Ounkomol et al. 2018) into the zoo's manifests.

    python scripts/prepare_allen.py --csv path/to/dna.csv --out_dir data/allen_dna
    python scripts/prepare_allen.py --csv metadata.csv --data_root /data/aics --out_dir data/allen_dna --limit 40

Input: the dataset's CSV of multi-channel 3D images, one row per field of view, in either convention

* pytorch_fnet's ``path_czi,channel_signal,channel_target`` (``data/csvs/<structure>.csv``; for the DNA
  model ``channel_target`` is the Hoechst/DNA channel), or a ``path_tiff`` column for OME-TIFF copies;
* the Quilt ``aics/pipeline_integrated_cell`` ``metadata.csv``: ``SourceReadPath``,
  ``ChannelNumberBrightfield`` (signal) and ``ChannelNumber405`` (DNA).

Paths are relative to the CSV's folder, or to ``--data_root``. CZI files need ``pip install czifile``;
(OME-)TIFF files are read with ``common.io``.

For each row it takes the transmitted-light (signal) and DNA (target) channels, resamples both to
``--spacing_um`` isotropic voxels (0.29 um, as the F-net paper; linear interpolation, MONAI ``Spacing``
as the bundles use), using the file's voxel size or, when the file has none, ``--source_spacing_um``
(the Allen Institute's 100x stacks: 0.29 um in z, 0.108 um in y and x), and writes float32 OME-TIFFs
``images/<name>_signal.ome.tif`` / ``images/<name>_target.ome.tif`` that record the new voxel size.
The rows are split at random (``--seed``) into ``train.csv`` / ``val.csv`` / ``test.csv`` with the
columns ``path_signal,path_target,source`` (paths relative to the manifest), which the
``fnet_baseline`` and ``spotlight_dna`` bundles read (``train_manifest`` / ``val_manifest``).

Every row is checked before any image is converted (columns, channel numbers, files present); a file that
cannot be read is named with its CSV line. Existing outputs are kept (the run resumes) unless
``--overwrite``; files and manifests are written atomically.
"""

from __future__ import annotations

import csv
import functools
import os
import sys
import tempfile
import xml.etree.ElementTree as ET

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PATH_COLUMNS = ("path_czi", "path_tiff", "path", "SourceReadPath")
SIGNAL_COLUMNS = ("channel_signal", "ChannelNumberBrightfield")
TARGET_COLUMNS = ("channel_target", "ChannelNumber405")
ALLEN_SPACING_UM = (0.29, 0.108, 0.108)


class PrepareError(ValueError):
    """The CSV or a file it names is unusable; the message says which and why."""


# ------------------------------------------------------------------------------------------ reading
def czi_scaling_um(metadata_xml: str) -> dict:
    """Voxel size (micrometres) by axis letter from a CZI's metadata XML (``Scaling/Items/Distance``, metres)."""
    root = ET.fromstring(metadata_xml)
    out = {}
    for dist in root.iter("Distance"):
        axis = dist.get("Id")
        value = dist.find("Value")
        if axis in ("X", "Y", "Z") and value is not None and value.text:
            out[axis] = float(value.text) * 1e6
    return out


def read_czi(path: str) -> tuple[np.ndarray, dict]:
    """``(CZYX array, {axis: um})`` of a CZI file (singleton scene/time/sample axes dropped)."""
    try:
        import czifile
    except ImportError as e:
        raise PrepareError(f"{path}: reading CZI files needs the czifile package (pip install czifile)") from e
    with czifile.CziFile(path) as czi:
        data = czi.asarray()
        axes = czi.axes
        sizes = czi_scaling_um(czi.metadata())
    keep = []
    for i, ax in enumerate(axes):
        if ax in "CZYX":
            keep.append(ax)
        elif data.shape[i] != 1:
            raise PrepareError(f"{path}: axis '{ax}' has size {data.shape[i]} (axes {axes}); one scene/time point per file")
    data = data.reshape([s for s, ax in zip(data.shape, axes) if ax in "CZYX"])
    if "C" not in keep:
        data, keep = data[None], ["C"] + keep
    order = [keep.index(a) for a in "CZYX" if a in keep]
    if len(order) != 4:
        raise PrepareError(f"{path}: expected C, Z, Y and X axes, found {axes}")
    return np.transpose(data, order), sizes


def read_stack(path: str) -> tuple[np.ndarray, tuple | None]:
    """``(CZYX array, spacing ZYX in um or None when the file does not say)``."""
    if path.lower().endswith(".czi"):
        data, sizes = read_czi(path)
        spacing = tuple(sizes[a] for a in "ZYX") if all(a in sizes for a in "ZYX") else None
        return data, spacing
    from common.io import read_image

    data, spacing, known = read_image(path, spatial_dims=3)
    return data, (spacing if known else None)


def resample(volume: np.ndarray, spacing_um, target_um) -> np.ndarray:
    """Linear resampling of a ``ZYX`` volume to ``target_um`` (MONAI ``Spacing``, as the bundles' loader)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    if np.allclose(spacing_um, target_um):
        return volume.astype(np.float32)
    affine = np.diag(list(spacing_um) + [1.0])
    img = MetaTensor(torch.as_tensor(volume[None].astype(np.float32)), affine=torch.as_tensor(affine))
    out = Spacing(pixdim=tuple(target_um), mode="bilinear", padding_mode="border")(img)
    return out[0].numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------ the CSV
def _pick(header, wanted, given, what):
    if given:
        if given not in header:
            raise PrepareError(f"--{what} column {given!r} not in the CSV header {header}")
        return given
    for c in wanted:
        if c in header:
            return c
    raise PrepareError(f"no {what} column: expected one of {list(wanted)}, header is {header}")


def read_rows(csv_path: str, data_root: str | None = None, path_column=None, signal_column=None,
              target_column=None) -> list[dict]:
    """``[{"path", "signal", "target", "line", "name"}]``, every row checked (columns, channels, files)."""
    if not os.path.isfile(csv_path):
        raise PrepareError(f"{csv_path}: CSV not found")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    pc = _pick(header, PATH_COLUMNS, path_column, "path_column")
    sc = _pick(header, SIGNAL_COLUMNS, signal_column, "signal_column")
    tc = _pick(header, TARGET_COLUMNS, target_column, "target_column")
    base = data_root or os.path.dirname(os.path.abspath(csv_path))
    out, problems, names = [], [], set()
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path} line {line}"
        path = (row.get(pc) or "").strip()
        if not path:
            problems.append(f"{where}: empty {pc}")
            continue
        path = path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
        try:
            sig, tgt = int(float(row[sc])), int(float(row[tc]))
        except (TypeError, ValueError):
            problems.append(f"{where}: channel numbers {row.get(sc)!r} / {row.get(tc)!r} are not integers")
            continue
        if not os.path.isfile(path):
            problems.append(f"{where}: {path}: file not found")
            continue
        stem = os.path.basename(path)
        for suffix in (".ome.tiff", ".ome.tif", ".czi", ".tiff", ".tif"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        name, k = stem, 1
        while name in names:  # the same file name in two folders
            k += 1
            name = f"{stem}_{k}"
        names.add(name)
        out.append({"path": path, "signal": sig, "target": tgt, "line": line, "name": name})
    if problems:
        raise PrepareError(f"{len(problems)} problem(s) in {csv_path}, nothing converted:\n  " + "\n  ".join(problems))
    if not out:
        raise PrepareError(f"{csv_path}: no rows")
    return out


def split_rows(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Random split of ``n`` rows: ``{"train": [...], "val": [...], "test": [...]}`` (indices). At least one
    validation row when there are three rows or more (the bundles validate during training)."""
    idx = np.random.default_rng(seed).permutation(n).tolist()
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n >= 3 and val_fraction > 0:
        n_val = max(1, n_val)
    n_test = min(n_test, max(0, n - n_val - 1))
    return {"val": idx[:n_val], "test": idx[n_val:n_val + n_test], "train": idx[n_val + n_test:]}


def _write_manifest(path: str, rows: list) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".csv", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path_signal", "path_target", "source"])
            w.writerows(rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ------------------------------------------------------------------------------------------ main
def prepare(csv: str, out_dir: str, data_root: str | None = None, spacing_um: float = 0.29,
            source_spacing_um=ALLEN_SPACING_UM, val_fraction: float = 0.1, test_fraction: float = 0.2,
            seed: int = 0, limit: int | None = None, overwrite: bool = False, path_column: str | None = None,
            signal_column: str | None = None, target_column: str | None = None) -> dict:
    """Convert the rows of ``csv``; returns ``{"train": path, "val": path, "test": path}`` of the manifests.

    Args:
        csv: the dataset's CSV (see the module docstring for the accepted columns).
        out_dir: output folder (``images/`` and the three manifests).
        data_root: folder the CSV's relative paths start from (default: the CSV's folder).
        spacing_um: isotropic output voxel size.
        source_spacing_um: ZYX voxel size used when a file does not state its own.
        val_fraction, test_fraction: share of rows for validation / test (the rest trains).
        seed: seed of the random split.
        limit: convert only the first ``limit`` rows (e.g. 40, as pytorch_fnet's example).
        overwrite: convert again rows whose outputs exist.
    """
    rows = read_rows(csv, data_root, path_column, signal_column, target_column)  # checked before heavy imports
    from common.io import write_ome_tiff

    if limit:
        rows = rows[: int(limit)]
    src_default = tuple(float(s) for s in (source_spacing_um.split(",") if isinstance(source_spacing_um, str)
                                           else source_spacing_um))
    if len(src_default) != 3:
        raise PrepareError(f"--source_spacing_um needs 3 values (Z,Y,X), got {source_spacing_um!r}")
    target = (float(spacing_um),) * 3
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    records = []
    for i, row in enumerate(rows, 1):
        sig_out = os.path.join(img_dir, f"{row['name']}_signal.ome.tif")
        tgt_out = os.path.join(img_dir, f"{row['name']}_target.ome.tif")
        if overwrite or not (os.path.isfile(sig_out) and os.path.isfile(tgt_out)):
            try:
                data, spacing = read_stack(row["path"])
            except PrepareError:
                raise
            except Exception as e:  # corrupt files raise many kinds of errors
                raise PrepareError(f"{csv} line {row['line']}: {row['path']}: unreadable ({type(e).__name__}: {e})") from e
            n_ch = data.shape[0]
            for ch, what in ((row["signal"], "signal"), (row["target"], "target")):
                if not 0 <= ch < n_ch:
                    raise PrepareError(f"{csv} line {row['line']}: {row['path']}: {what} channel {ch} but the file has "
                                       f"{n_ch} channel(s) (0..{n_ch - 1})")
            spacing = spacing or src_default
            for ch, out in ((row["signal"], sig_out), (row["target"], tgt_out)):
                write_ome_tiff(out, resample(data[ch], spacing, target), axes="ZYX", spacing_um=target)
            print(f"[{i}/{len(rows)}] {row['path']}: {tuple(data.shape[1:])} at {tuple(round(s, 4) for s in spacing)} um "
                  f"-> {row['name']}", flush=True)
        else:
            print(f"[{i}/{len(rows)}] {row['name']}: already converted", flush=True)
        records.append([os.path.relpath(sig_out, out_dir), os.path.relpath(tgt_out, out_dir), row["path"]])
    parts = split_rows(len(records), val_fraction, test_fraction, seed)
    manifests = {}
    for part in ("train", "val", "test"):
        path = os.path.join(out_dir, f"{part}.csv")
        _write_manifest(path, [records[j] for j in sorted(parts[part])])
        manifests[part] = path
    print(f"manifests: {', '.join(f'{k} {len(parts[k])} rows' for k in ('train', 'val', 'test'))} in {out_dir}")
    return manifests


@functools.wraps(prepare)
def main(*args, **kwargs):
    """Command line (see the module docstring); exits with status 1 and a named problem on bad input."""
    try:
        prepare(*args, **kwargs)
    except PrepareError as e:
        sys.exit(f"prepare_allen: error: {e}")


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(main)

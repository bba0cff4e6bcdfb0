"""Arrange the real ISL data sets as OME-TIFF + CSV manifests for isl_nucleus_seg (and isl_cell_instance).

    python scripts/prepare_isl_data.py aisegcell --out data/aisegcell --downsample 2
    python scripts/prepare_isl_data.py isl_phase_dapi --out data/isl_phase_dapi

``aisegcell`` (../shared/data/aisegcell_bf_nuc, Schirmacher et al., CC-BY 4.0): bright field ->
nuclear fluorescence, with nucleus masks. The split (fields, never pixels, are held out):

* ``stage0_train.csv``: fig3a field ``train_field`` (p0001) + (``timelapse=True``) the 4
  fig2a_timelapse time points (bright field w00 -> nuclear w02, nucleus mask w02_m00);
* ``test.csv``: the two other fig3a fields (p0011, p0013), for stage-0 Pearson r and stage-1 IoU;
* ``pool.csv``: the few-shot "images": ``tile`` x ``tile`` tiles of the training fig3a field
  that contain at least one nucleus pixel (tiles/), in a seeded random order.

``isl_phase_dapi`` (../shared/data/isl_phase_dapi, Christiansen et al. 2018, CC-BY 4.0): the 13
phase-contrast planes as a 13-channel signal -> DAPI, no masks; one field, so the held-out part
is the right ``test_fraction`` of the columns (``train.csv`` / ``test.csv``).

``downsample`` (integer) averages ``k x k`` blocks of the images (masks: a pixel is nucleus when
at least half of its block is), so a CPU can train on the data; say so wherever a number is
reported. Files are written atomically; the manifests use paths relative to themselves.
"""

from __future__ import annotations

import glob
import os

import numpy as np


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def _down(img: np.ndarray, k: int, mask: bool = False) -> np.ndarray:
    """``YX`` block mean by ``k`` (skimage's downscale_local_mean; edges that do not fill a block are cut)."""
    from skimage.transform import downscale_local_mean

    img = np.asarray(img, np.float32)
    if k > 1:
        img = img[: img.shape[0] // k * k, : img.shape[1] // k * k]
        img = downscale_local_mean(img, (k, k))
    if mask:  # the input is 0/1: nucleus when at least half of the block is
        return (img >= 0.5).astype(np.uint8)
    return img.astype(np.float32)


def _read2d(path: str) -> np.ndarray:
    from common.io import read_image  # lazily: MONAI's import costs seconds, --help should not

    arr, _, _ = read_image(path, spatial_dims=2, grayscale="always")
    if arr.shape[0] != 1:
        raise ValueError(f"{path}: expected one channel, got {arr.shape[0]}")
    return arr[0]


def _write_manifest(path: str, rows: list, header=("path_signal", "path_target", "path_label")) -> str:
    from common.data import write_manifest

    return write_manifest(path, [dict(zip(header, r)) for r in rows], header)


def _field(out: str, name: str, signal: np.ndarray, target: np.ndarray, label: np.ndarray | None) -> tuple:
    from common.io import write_ome_tiff  # lazily: MONAI's import costs seconds, --help should not

    files = [f"{name}_signal.ome.tif", f"{name}_target.ome.tif"]
    write_ome_tiff(os.path.join(out, files[0]), signal[None] if signal.ndim == 2 else signal, "CYX")
    write_ome_tiff(os.path.join(out, files[1]), target, "YX")
    if label is not None:
        files.append(f"{name}_mask.ome.tif")
        write_ome_tiff(os.path.join(out, files[2]), label, "YX")
    return tuple(files)


def aisegcell(out: str = "data/aisegcell", src: str | None = None, downsample: int = 2, train_field: str = "p0001",
              tile: int = 256, seed: int = 0, timelapse: bool = True) -> dict:
    """Write the aiSEGcell fields (see the module docstring); returns the manifest paths.

    ``timelapse=False`` leaves the fig2a time points out of ``stage0_train.csv`` (stage 0 on the
    fig3a training field only, the domain of the held-out fields).
    """
    src = src or os.path.join(SHARED, "aisegcell_bf_nuc")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: aiSEGcell data not found (it sits at ../shared/data beside the project)")
    k = int(downsample)
    os.makedirs(out, exist_ok=True)
    rows = {"stage0_train": [], "test": []}
    fig3a = sorted(glob.glob(os.path.join(src, "fig3a", "images", "*.png")))
    if not fig3a:
        raise FileNotFoundError(f"{src}/fig3a/images: no PNG files")
    train_arrays = None
    for path in fig3a:
        stem = os.path.splitext(os.path.basename(path))[0]
        field = stem.split("_")[1]
        bf = _down(_read2d(path), k)
        nuc = _down(_read2d(os.path.join(src, "fig3a", "nuc", stem + ".png")), k)
        gt = _down(_read2d(os.path.join(src, "fig3a", "gt", stem + ".png")) > 0, k, mask=True)
        files = _field(out, f"fig3a_{field}", bf, nuc, gt)
        if field == train_field:
            rows["stage0_train"].append(files)
            train_arrays = (bf, nuc, gt)
        else:
            rows["test"].append(files)
        print(f"fig3a {field}: {bf.shape} ({'train' if field == train_field else 'test'})", flush=True)
    if train_arrays is None:
        raise ValueError(f"train_field {train_field!r} is not one of the fig3a fields in {src}")
    for path in sorted(glob.glob(os.path.join(src, "fig2a_timelapse", "t*_w00.png"))) if timelapse else []:
        t = os.path.basename(path)[: -len("_w00.png")]
        base = os.path.join(src, "fig2a_timelapse", t)
        bf = _down(_read2d(path), k)
        nuc = _down(_read2d(base + "_w02.png"), k)
        gt = _down(_read2d(base + "_w02_m00_mask.png") > 0, k, mask=True)
        rows["stage0_train"].append(_field(out, f"timelapse_{t}", bf, nuc, gt))
        print(f"timelapse {t}: {bf.shape} (stage-0 train)", flush=True)
    # few-shot pool: tiles of the training field with at least one nucleus pixel
    bf, nuc, gt = train_arrays
    tiles_dir = os.path.join(out, "tiles")
    os.makedirs(tiles_dir, exist_ok=True)
    pool = []
    for y in range(0, bf.shape[0] - tile + 1, tile):
        for x in range(0, bf.shape[1] - tile + 1, tile):
            sl = (slice(y, y + tile), slice(x, x + tile))
            if gt[sl].any():
                files = _field(tiles_dir, f"{train_field}_y{y:04d}_x{x:04d}", bf[sl], nuc[sl], gt[sl])
                pool.append(tuple(os.path.join("tiles", f) for f in files))
    order = np.random.default_rng(seed).permutation(len(pool))
    pool = [pool[i] for i in order]
    print(f"few-shot pool: {len(pool)} tiles of {tile}x{tile} with nuclei", flush=True)
    out_paths = {name: _write_manifest(os.path.join(out, f"{name}.csv"), r) for name, r in rows.items()}
    out_paths["pool"] = _write_manifest(os.path.join(out, "pool.csv"), pool)
    return out_paths


def isl_phase_dapi(out: str = "data/isl_phase_dapi", src: str | None = None, downsample: int = 1,
                   test_fraction: float = 0.25) -> dict:
    """Write the 13-plane phase-contrast -> DAPI field, split by columns; returns the manifest paths."""
    src = src or os.path.join(SHARED, "isl_phase_dapi")
    planes = [os.path.join(src, f"z_depth-{i}_PHASE_CONTRAST.png") for i in range(13)]
    missing = [p for p in planes if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"isl_phase_dapi planes missing: {missing[:3]}")
    k = int(downsample)
    sig = np.stack([_down(_read2d(p), k) for p in planes])
    dapi = _down(_read2d(os.path.join(src, "MAXPROJECT_DAPI_CONFOCAL.png")), k)
    os.makedirs(out, exist_ok=True)
    cut = int(round(sig.shape[2] * (1 - float(test_fraction))))
    train = _field(out, "left", sig[:, :, :cut], dapi[:, :cut], None)
    test = _field(out, "right", sig[:, :, cut:], dapi[:, cut:], None)
    hdr = ("path_signal", "path_target")
    return {"train": _write_manifest(os.path.join(out, "train.csv"), [train], hdr),
            "test": _write_manifest(os.path.join(out, "test.csv"), [test], hdr)}


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire({"aisegcell": aisegcell, "isl_phase_dapi": isl_phase_dapi})

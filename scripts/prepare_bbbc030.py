"""Manifests (and, on request, downsampled copies) of BBBC030 for the isl_cell_instance bundle.

    python scripts/prepare_bbbc030.py --out_dir data/bbbc030                    # manifests -> the original PNGs
    python scripts/prepare_bbbc030.py --out_dir data/bbbc030_x2 --downsample 2 --subsets 1,5,20

BBBC030v1 (Koos et al. 2016; Broad Bioimage Benchmark Collection, arranged by Nelson-Gon/cytounet):
``train/images/cho21..40.png`` and ``test/images/cho41..60.png`` (DIC, 1032 x 1376, grey stored as
RGB) with binary masks ``*/masks/choNN.png`` (255 = cell). The bundle takes the masks as they are:
its ``label_components="auto"`` turns a binary mask into instances (connected components).

Written to ``out_dir``:

* ``train.csv`` / ``val.csv``: the train folder, its last ``n_val`` images held out for validation;
* ``test.csv``: the test folder;
* ``train_n<N>.csv`` for every ``N`` in ``subsets``: few-shot training sets, nested (the first ``N`` of
  one seeded order of the train folder in which the ``n_val`` validation images come last, so they
  enter only when ``N > 20 - n_val``);
* with ``downsample=f > 1``: ``images/`` and ``masks/`` with ``f x f`` block-mean copies (OME-TIFF,
  float32 images; masks: block mean >= 0.5, uint8 0/1), the images first cropped to a multiple of
  ``f`` (at most ``f - 1`` pixels at the bottom/right edge), and ``test_images/`` holding only the
  test inputs (a folder for ``inference.json``).

Manifest columns: ``path_signal,path_label`` (paths relative to the manifest). Every file is read
and checked first; a missing or malformed file stops the script with its name.
"""

from __future__ import annotations

import csv
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_SOURCE = os.path.join(os.path.dirname(ROOT), "shared", "data", "bbbc030_dic_cells")


class DatasetError(ValueError):
    """The BBBC030 folder is missing or a file in it is unusable."""


def _pairs(source: str, split: str) -> list[tuple[str, str]]:
    img_dir, mask_dir = os.path.join(source, split, "images"), os.path.join(source, split, "masks")
    if not os.path.isdir(img_dir) or not os.path.isdir(mask_dir):
        raise DatasetError(f"{source}: expected folders {split}/images and {split}/masks (BBBC030 as arranged by "
                           "cytounet); pass --source")
    names = sorted(n for n in os.listdir(img_dir) if n.lower().endswith(".png"))
    if not names:
        raise DatasetError(f"{img_dir}: no PNG images")
    missing = [n for n in names if not os.path.isfile(os.path.join(mask_dir, n))]
    if missing:
        raise DatasetError(f"{mask_dir}: no mask for {missing}")
    return [(os.path.join(img_dir, n), os.path.join(mask_dir, n)) for n in names]


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """``f x f`` block mean of a ``YX`` array cropped to a multiple of ``f``.

    Own reshape-mean: skimage's downscale_local_mean pads the edge with zeros instead of cropping.
    """
    y, x = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:y, :x].reshape(y // f, f, x // f, f).mean(axis=(1, 3))


def _read_pair(img_path: str, mask_path: str):
    from common.io import read_image

    img, _, _ = read_image(img_path, spatial_dims=2)
    mask, _, _ = read_image(mask_path, spatial_dims=2)
    if img.shape[0] != 1 or mask.shape[0] != 1:
        raise DatasetError(f"{img_path} / {mask_path}: expected grey images, got {img.shape[0]} / {mask.shape[0]} channels")
    if img.shape != mask.shape:
        raise DatasetError(f"{img_path} {img.shape[1:]} and {mask_path} {mask.shape[1:]}: shape mismatch")
    if not np.any(mask):
        raise DatasetError(f"{mask_path}: empty mask")
    return img[0], mask[0]


def _write_csv(path: str, rows: list[tuple[str, str]]) -> str:
    base = os.path.dirname(os.path.abspath(path))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path_signal", "path_label"])
        for a, b in rows:
            w.writerow([os.path.relpath(a, base), os.path.relpath(b, base)])
    os.replace(tmp, path)
    return path


def prepare(out_dir: str, source: str = DEFAULT_SOURCE, downsample: int = 1, n_val: int = 2, subsets=(),
            seed: int = 0) -> dict:
    """Write the manifests (and downsampled copies) described in the module docstring.

    Args:
        out_dir: output folder.
        source: the ``bbbc030_dic_cells`` folder.
        downsample: integer block-mean factor (1: point at the original PNGs).
        n_val: images of the train folder held out for validation.
        subsets: few-shot sizes, e.g. ``1,5,20``.
        seed: order of the few-shot subsets.

    Returns:
        ``{name: manifest path}`` (plus ``"test_images"``: the folder of test inputs).
    """
    from common.io import write_ome_tiff

    f = int(downsample)
    if f < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    source = os.path.abspath(str(source))
    out_dir = os.path.abspath(str(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    splits = {"train": _pairs(source, "train"), "test": _pairs(source, "test")}
    n_train = len(splits["train"])
    if not 0 <= int(n_val) < n_train:
        raise ValueError(f"n_val must be in [0, {n_train - 1}], got {n_val}")
    subsets = [int(s) for s in (subsets.split(",") if isinstance(subsets, str) else
                                (subsets if isinstance(subsets, (list, tuple)) else [subsets]))]
    bad = [s for s in subsets if not 1 <= s <= n_train]
    if bad:
        raise ValueError(f"subset sizes must be in [1, {n_train}], got {bad}")

    out = {}
    test_dir = os.path.join(source, "test", "images")
    for split, pairs in splits.items():
        new = []
        for img_path, mask_path in pairs:
            img, mask = _read_pair(img_path, mask_path)
            if f == 1:
                new.append((img_path, mask_path))
                continue
            stem = os.path.splitext(os.path.basename(img_path))[0]
            d_img = _block_mean(img.astype(np.float32), f).astype(np.float32)
            d_mask = (_block_mean((mask > 0).astype(np.float32), f) >= 0.5).astype(np.uint8)
            ip = write_ome_tiff(os.path.join(out_dir, "images", f"{stem}.ome.tif"), d_img, "YX")
            mp = write_ome_tiff(os.path.join(out_dir, "masks", f"{stem}.ome.tif"), d_mask, "YX")
            if split == "test":
                test_dir = os.path.join(out_dir, "test_images")
                write_ome_tiff(os.path.join(test_dir, f"{stem}.ome.tif"), d_img, "YX")
            new.append((ip, mp))
        splits[split] = new
    n_val = int(n_val)
    train, val = splits["train"][: n_train - n_val], splits["train"][n_train - n_val:]
    out["train"] = _write_csv(os.path.join(out_dir, "train.csv"), train)
    if val:
        out["val"] = _write_csv(os.path.join(out_dir, "val.csv"), val)
    out["test"] = _write_csv(os.path.join(out_dir, "test.csv"), splits["test"])
    rng = np.random.default_rng(seed)
    order = [train[i] for i in rng.permutation(len(train))] + val
    for s in subsets:
        out[f"train_n{s}"] = _write_csv(os.path.join(out_dir, f"train_n{s}.csv"), order[:s])
    out["test_images"] = test_dir
    return out


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(prepare)

#!/usr/bin/env python
"""Write synthetic microscopy data sets (OME-TIFF + CSV manifests) from ``common.synthetic``.

Examples::

    python scripts/make_synthetic.py cells3d --out_dir data/cells3d --n_volumes 4 --shape 32,128,128 --seed 0
    python scripts/make_synthetic.py isl2d --out_dir data/isl --n_images 8 --shape 256,256
    python scripts/make_synthetic.py dic2d --out_dir data/dic --n_images 8 --n_planes 3
    python scripts/make_synthetic.py fucci --out_dir data/fucci --n_spheroids 4 --shape 24,128,128 --n_val 1 --n_test 1

Beside ``manifest.csv`` (every item) each command writes the split the bundles train on:
``train.csv``, ``val.csv`` (``--n_val`` items, default 1) and ``test.csv`` (``--n_test``, default 1),
consecutive items in that order; ``dic2d`` also writes ``pretrain_train.csv`` and ``pretrain_val.csv``
(the same items) for stage 0 of ``isl_cell_instance``. Each command prints the folder it wrote.
For your own data, ``scripts/split_manifest.py`` makes the same split of any manifest.
"""

from __future__ import annotations

import os

from common.cli import strict_fire


def _shape(value, ndim: int) -> tuple:
    """Accept ``32,128,128`` (fire gives a tuple), ``"32x128x128"``, ``"32,128,128"`` or an int."""
    if isinstance(value, (int, float)):
        return (int(value),) * ndim
    if isinstance(value, str):
        parts = value.replace("x", ",").replace(" ", "").strip("()[]").split(",")
        value = [p for p in parts if p]
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise ValueError(f"shape {value!r} must have {ndim} entries")
    return out


def _spacing(value, ndim: int) -> tuple:
    if isinstance(value, (int, float)):
        return (float(value),) * ndim
    if isinstance(value, str):
        value = [p for p in value.strip("()[]").split(",") if p]
    out = tuple(float(v) for v in value)
    if len(out) != ndim:
        raise ValueError(f"spacing {value!r} must have {ndim} entries")
    return out


def _check_split(n: int, n_val: int, n_test: int, what: str) -> None:
    """Before any file is written: the split must leave at least one training item."""
    if min(n_val, n_test) < 0 or n - n_val - n_test < 1:
        raise SystemExit(f"make_synthetic: error: {n} {what} cannot hold {n_val} validation + {n_test} test items and "
                         f"at least one for training; raise the count or lower --n_val/--n_test")


def _split(manifest: str, n_val: int, n_test: int, pretrain: bool = False) -> str:
    """train.csv / val.csv / test.csv beside ``manifest`` (consecutive items); returns the folder."""
    from common.data import split_manifest, write_manifest

    parts = split_manifest(manifest, {"train": None, "val": int(n_val), "test": int(n_test)}, seed=None)
    if pretrain:
        import csv

        for name in ("train", "val"):
            with open(parts[name], newline="") as f:
                rows = list(csv.DictReader(f))
            write_manifest(os.path.join(os.path.dirname(manifest), f"pretrain_{name}.csv"), rows)
    folder = os.path.dirname(os.path.abspath(manifest))
    print(f"{folder}: manifest.csv, " + ", ".join(os.path.basename(p) for p in parts.values())
          + (", pretrain_train.csv, pretrain_val.csv" if pretrain else ""))
    return folder


def cells3d(out_dir: str, n_volumes: int = 4, shape=(32, 128, 128), seed: int = 0, n_cells: int = 12,
            spacing_um=(0.29, 0.29, 0.29), n_val: int = 1, n_test: int = 1) -> str:
    """3D bright field -> DNA stain volumes with nucleus labels (signal/target/labels)."""
    from common import synthetic

    _check_split(n_volumes, n_val, n_test, "volumes")
    return _split(synthetic.write_dataset_3d(out_dir, n_volumes=n_volumes, shape=_shape(shape, 3), seed=seed,
                                             spacing_um=_spacing(spacing_um, 3), n_cells=n_cells), n_val, n_test)


def isl2d(out_dir: str, n_images: int = 4, shape=(256, 256), seed: int = 0, n_cells: int = 20, n_val: int = 1,
          n_test: int = 1) -> str:
    """2D bright field (2 planes) + phase contrast -> DAPI with nucleus and cell labels."""
    from common import synthetic

    _check_split(n_images, n_val, n_test, "images")
    return _split(synthetic.write_dataset_2d_isl(out_dir, n_images=n_images, shape=_shape(shape, 2), seed=seed,
                                                 n_cells=n_cells), n_val, n_test)


def dic2d(out_dir: str, n_images: int = 4, shape=(256, 256), seed: int = 0, n_cells: int = 15,
          n_planes: int = 1, n_val: int = 1, n_test: int = 1) -> str:
    """2D DIC -> membrane stain with touching-cell instance labels."""
    from common import synthetic

    _check_split(n_images, n_val, n_test, "images")
    return _split(synthetic.write_dataset_2d_dic(out_dir, n_images=n_images, shape=_shape(shape, 2), seed=seed,
                                                 n_planes=n_planes, n_cells=n_cells), n_val, n_test, pretrain=True)


def fucci(out_dir: str, n_spheroids: int = 4, shape=(24, 128, 128), seed: int = 0, n_nuclei: int = 40,
          spacing_um=(5.0, 0.5, 0.5), n_val: int = 1, n_test: int = 1) -> str:
    """FUCCI spheroids (Cy3, GFP, Hoechst) with nucleus labels and a phase table per spheroid."""
    from common import synthetic

    _check_split(n_spheroids, n_val, n_test, "spheroids")
    return _split(synthetic.write_fucci_dataset(out_dir, n_spheroids=n_spheroids, shape=_shape(shape, 3), seed=seed,
                                                n_nuclei=n_nuclei, spacing_um=_spacing(spacing_um, 3)), n_val, n_test)


def main():
    strict_fire({"cells3d": cells3d, "isl2d": isl2d, "dic2d": dic2d, "fucci": fucci}, serialize=lambda out: None)


if __name__ == "__main__":
    main()

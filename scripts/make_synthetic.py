#!/usr/bin/env python
"""Write synthetic microscopy data sets (OME-TIFF + CSV manifest) from ``common.synthetic``.

Examples::

    python scripts/make_synthetic.py cells3d --out_dir data/cells3d --n_volumes 4 --shape 32,128,128 --seed 0
    python scripts/make_synthetic.py isl2d --out_dir data/isl --n_images 8 --shape 256,256
    python scripts/make_synthetic.py dic2d --out_dir data/dic --n_images 8 --n_planes 3
    python scripts/make_synthetic.py fucci --out_dir data/fucci --n_spheroids 4 --shape 24,128,128

Each command prints the path of the manifest it wrote.
"""

from __future__ import annotations

import os
import sys

try:
    import common.synthetic  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # running from a checkout that is not installed: use the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire

from common import synthetic


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


def cells3d(out_dir: str, n_volumes: int = 4, shape=(32, 128, 128), seed: int = 0, n_cells: int = 12,
            spacing_um=(0.29, 0.29, 0.29)) -> str:
    """3D bright field -> DNA stain volumes with nucleus labels (signal/target/labels)."""
    return synthetic.write_dataset_3d(out_dir, n_volumes=n_volumes, shape=_shape(shape, 3), seed=seed,
                                      spacing_um=_spacing(spacing_um, 3), n_cells=n_cells)


def isl2d(out_dir: str, n_images: int = 4, shape=(256, 256), seed: int = 0, n_cells: int = 20) -> str:
    """2D bright field (2 planes) + phase contrast -> DAPI with nucleus and cell labels."""
    return synthetic.write_dataset_2d_isl(out_dir, n_images=n_images, shape=_shape(shape, 2), seed=seed,
                                          n_cells=n_cells)


def dic2d(out_dir: str, n_images: int = 4, shape=(256, 256), seed: int = 0, n_cells: int = 15,
          n_planes: int = 1) -> str:
    """2D DIC -> membrane stain with touching-cell instance labels."""
    return synthetic.write_dataset_2d_dic(out_dir, n_images=n_images, shape=_shape(shape, 2), seed=seed,
                                          n_planes=n_planes, n_cells=n_cells)


def fucci(out_dir: str, n_spheroids: int = 4, shape=(24, 128, 128), seed: int = 0, n_nuclei: int = 40,
          spacing_um=(5.0, 0.5, 0.5)) -> str:
    """FUCCI spheroids (Cy3, GFP, Hoechst) with nucleus labels and a phase table per spheroid."""
    return synthetic.write_fucci_dataset(out_dir, n_spheroids=n_spheroids, shape=_shape(shape, 3), seed=seed,
                                         n_nuclei=n_nuclei, spacing_um=_spacing(spacing_um, 3))


def main():
    fire.Fire({"cells3d": cells3d, "isl2d": isl2d, "dic2d": dic2d, "fucci": fucci})


if __name__ == "__main__":
    main()

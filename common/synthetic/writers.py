"""Writers of phantom data sets: OME-TIFF files with voxel sizes and a CSV manifest (common.data.write_manifest)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from common.data import write_manifest
from common.synthetic.cell_field import make_cell_field_3d
from common.synthetic.dic import make_dic_membrane_2d
from common.synthetic.fucci import make_fucci_spheroid
from common.synthetic.isl2d import make_isl_2d

__all__ = ["write_dataset_3d", "write_dataset_2d_isl", "write_dataset_2d_dic", "write_fucci_dataset"]


def _write_manifest(path: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return write_manifest(path, [dict(zip(header, r)) for r in rows], header)


def _as_uint16_labels(labels: np.ndarray) -> np.ndarray:
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError("more than 65535 labels cannot be written as uint16")
    return labels.astype(np.uint16)


def write_dataset_3d(out_dir: str | os.PathLike, n_volumes: int = 4, shape: Sequence[int] = (32, 128, 128),
                     seed: int = 0, spacing_um: Sequence[float] = (0.29, 0.29, 0.29), **params) -> str:
    """Write :func:`make_cell_field_3d` volumes as OME-TIFF plus a ``manifest.csv``.

    Files: ``signal_XX.ome.tif`` (bright field), ``target_XX.ome.tif`` (DNA stain),
    ``labels_XX.ome.tif`` (uint16 nucleus labels), all ``ZYX`` with the voxel size; volume ``i``
    uses seed ``seed + i``. The manifest has the header ``path_signal,path_target,path_label``
    and paths relative to its folder.

    Returns:
        the manifest path.
    """
    from common.io import write_ome_tiff

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(int(n_volumes)):
        d = make_cell_field_3d(shape=shape, spacing_um=spacing_um, seed=seed + i, **params)
        names = (f"signal_{i:02d}.ome.tif", f"target_{i:02d}.ome.tif", f"labels_{i:02d}.ome.tif")
        write_ome_tiff(os.path.join(out_dir, names[0]), d["signal"], "ZYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[1]), d["target"], "ZYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[2]), _as_uint16_labels(d["labels"]), "ZYX", d["spacing_um"])
        rows.append(names)
    return _write_manifest(os.path.join(out_dir, "manifest.csv"), ["path_signal", "path_target", "path_label"], rows)


def write_dataset_2d_isl(out_dir: str | os.PathLike, n_images: int = 4, shape: Sequence[int] = (256, 256),
                         seed: int = 0, **params) -> str:
    """Write :func:`make_isl_2d` images as OME-TIFF plus a ``manifest.csv``.

    Files: ``brightfield_XX.ome.tif`` (``CYX``: bright field at -dz, +dz, phase contrast),
    ``dapi_XX.ome.tif`` (``YX``), ``nuclei_XX.ome.tif`` (``YX`` uint16 labels) and
    ``cells_XX.ome.tif`` (``YX`` uint16 labels). Manifest columns
    ``path_signal,path_target,path_label,path_cells`` (relative paths); image ``i`` uses
    seed ``seed + i``. ``params`` go to :func:`make_isl_2d`.

    Returns:
        the manifest path.
    """
    from common.io import write_ome_tiff

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(int(n_images)):
        d = make_isl_2d(shape=shape, seed=seed + i, **params)
        sig = np.concatenate([d["brightfield"], d["phase"][None]], 0)
        names = (f"brightfield_{i:02d}.ome.tif", f"dapi_{i:02d}.ome.tif", f"nuclei_{i:02d}.ome.tif",
                 f"cells_{i:02d}.ome.tif")
        write_ome_tiff(os.path.join(out_dir, names[0]), sig, "CYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[1]), d["dapi"], "YX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[2]), _as_uint16_labels(d["nuclei"]), "YX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[3]), _as_uint16_labels(d["cells"]), "YX", d["spacing_um"])
        rows.append(names)
    return _write_manifest(os.path.join(out_dir, "manifest.csv"),
                           ["path_signal", "path_target", "path_label", "path_cells"], rows)


def write_dataset_2d_dic(out_dir: str | os.PathLike, n_images: int = 4, shape: Sequence[int] = (256, 256),
                         seed: int = 0, n_planes: int = 1, **params) -> str:
    """Write :func:`make_dic_membrane_2d` images as OME-TIFF plus a ``manifest.csv``.

    Files: ``dic_XX.ome.tif`` (``CYX``, one channel per focal plane), ``membrane_XX.ome.tif``
    (``YX``), ``cells_XX.ome.tif`` (``YX`` uint16 labels). Manifest columns
    ``path_signal,path_target,path_label`` (relative paths); image ``i`` uses seed ``seed + i``.

    Returns:
        the manifest path.
    """
    from common.io import write_ome_tiff

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(int(n_images)):
        d = make_dic_membrane_2d(shape=shape, seed=seed + i, n_planes=n_planes, **params)
        names = (f"dic_{i:02d}.ome.tif", f"membrane_{i:02d}.ome.tif", f"cells_{i:02d}.ome.tif")
        write_ome_tiff(os.path.join(out_dir, names[0]), d["dic"], "CYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[1]), d["membrane"], "YX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[2]), _as_uint16_labels(d["cells"]), "YX", d["spacing_um"])
        rows.append(names)
    return _write_manifest(os.path.join(out_dir, "manifest.csv"), ["path_signal", "path_target", "path_label"], rows)


def write_fucci_dataset(out_dir: str | os.PathLike, n_spheroids: int = 4, shape: Sequence[int] = (24, 128, 128),
                        seed: int = 0, n_nuclei: int = 40, spacing_um: Sequence[float] = (5.0, 0.5, 0.5),
                        **params) -> str:
    """Write :func:`make_fucci_spheroid` volumes plus a ``manifest.csv``.

    Files: ``image_XX.ome.tif`` (``CZYX``: Cy3, GFP, Hoechst), ``labels_XX.ome.tif`` (``ZYX``
    uint16), ``phases_XX.csv`` (header ``label,phase``). Manifest columns
    ``path_image,path_label,path_phases`` (relative paths); spheroid ``i`` uses seed ``seed + i``.

    Returns:
        the manifest path.
    """
    from common.io import write_ome_tiff

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(int(n_spheroids)):
        d = make_fucci_spheroid(shape=shape, n_nuclei=n_nuclei, spacing_um=spacing_um, seed=seed + i, **params)
        names = (f"image_{i:02d}.ome.tif", f"labels_{i:02d}.ome.tif", f"phases_{i:02d}.csv")
        write_ome_tiff(os.path.join(out_dir, names[0]), d["image"], "CZYX", d["spacing_um"])
        write_ome_tiff(os.path.join(out_dir, names[1]), _as_uint16_labels(d["labels"]), "ZYX", d["spacing_um"])
        _write_manifest(os.path.join(out_dir, names[2]), ["label", "phase"],
                        [(lab, ph) for lab, ph in sorted(d["phases"].items())])
        rows.append(names)
    return _write_manifest(os.path.join(out_dir, "manifest.csv"), ["path_image", "path_label", "path_phases"], rows)

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


def _labels(key: str):
    return lambda d: _as_uint16_labels(d[key])


def _write_dataset(out_dir, n: int, make, columns: Sequence[str], files: Sequence[tuple], extra=None) -> str:
    """Write ``n`` phantoms ``make(i)`` and their manifest; returns the manifest path.

    Args:
        out_dir: the folder (created).
        n: how many phantoms.
        make: ``i -> dict`` of arrays with ``spacing_um``.
        columns: the manifest header, one column per written file.
        files: per OME-TIFF ``(stem, key or function of the dict, axes)``; written as ``{stem}_{i:02d}.ome.tif``.
        extra: optional ``(out_dir, i, d) -> [names]`` writing more files per phantom.
    """
    from common.io import write_ome_tiff

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(int(n)):
        d = make(i)
        names = []
        for stem, get, axes in files:
            names.append(f"{stem}_{i:02d}.ome.tif")
            arr = get(d) if callable(get) else d[get]
            write_ome_tiff(os.path.join(out_dir, names[-1]), arr, axes, d["spacing_um"])
        rows.append(names + (list(extra(out_dir, i, d)) if extra else []))
    return _write_manifest(os.path.join(out_dir, "manifest.csv"), columns, rows)


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
    return _write_dataset(out_dir, n_volumes, lambda i: make_cell_field_3d(shape=shape, spacing_um=spacing_um,
                                                                           seed=seed + i, **params),
                          ["path_signal", "path_target", "path_label"],
                          [("signal", "signal", "ZYX"), ("target", "target", "ZYX"),
                           ("labels", _labels("labels"), "ZYX")])


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
    return _write_dataset(out_dir, n_images, lambda i: make_isl_2d(shape=shape, seed=seed + i, **params),
                          ["path_signal", "path_target", "path_label", "path_cells"],
                          [("brightfield", lambda d: np.concatenate([d["brightfield"], d["phase"][None]], 0), "CYX"),
                           ("dapi", "dapi", "YX"), ("nuclei", _labels("nuclei"), "YX"),
                           ("cells", _labels("cells"), "YX")])


def write_dataset_2d_dic(out_dir: str | os.PathLike, n_images: int = 4, shape: Sequence[int] = (256, 256),
                         seed: int = 0, n_planes: int = 1, **params) -> str:
    """Write :func:`make_dic_membrane_2d` images as OME-TIFF plus a ``manifest.csv``.

    Files: ``dic_XX.ome.tif`` (``CYX``, one channel per focal plane), ``membrane_XX.ome.tif``
    (``YX``), ``cells_XX.ome.tif`` (``YX`` uint16 labels). Manifest columns
    ``path_signal,path_target,path_label`` (relative paths); image ``i`` uses seed ``seed + i``.

    Returns:
        the manifest path.
    """
    return _write_dataset(out_dir, n_images,
                          lambda i: make_dic_membrane_2d(shape=shape, seed=seed + i, n_planes=n_planes, **params),
                          ["path_signal", "path_target", "path_label"],
                          [("dic", "dic", "CYX"), ("membrane", "membrane", "YX"), ("cells", _labels("cells"), "YX")])


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

    def phases(out_dir, i, d):
        name = f"phases_{i:02d}.csv"
        _write_manifest(os.path.join(out_dir, name), ["label", "phase"], sorted(d["phases"].items()))
        return [name]

    return _write_dataset(out_dir, n_spheroids, lambda i: make_fucci_spheroid(shape=shape, n_nuclei=n_nuclei,
                                                                              spacing_um=spacing_um, seed=seed + i,
                                                                              **params),
                          ["path_image", "path_label", "path_phases"],
                          [("image", "image", "CZYX"), ("labels", _labels("labels"), "ZYX")], extra=phases)

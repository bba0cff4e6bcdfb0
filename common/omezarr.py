"""OME-Zarr (OME-NGFF) images and HCS plates: read, write, list plate fields.

Built on ``ome-zarr`` (ome-zarr-py), the OME reference implementation and the reader that
napari's OME-Zarr plugin (napari-ome-zarr) uses, so what is written here opens in napari, and in
Fiji/MoBIE or iohub/VisCy as NGFF 0.4 plates.

Paths
-----
* a single image: ``image.zarr`` (a group with ``multiscales``);
* a field of an HCS plate: ``plate.zarr/B/3/0`` (row / column / field), itself an image group;
* one channel of either, by name or index: ``plate.zarr/B/3/0#DNA`` or ``image.zarr#1`` (so one
  plate that holds signal and target channels side by side feeds a training manifest).

Arrays follow the zoo's convention (``CZYX`` / ``CYX``); the voxel size in micrometres comes from
the ``scale`` of the first ``multiscales`` dataset. Writing makes a chunked array with a
multiscale pyramid (2x in Y/X per level, Z kept) and the voxel size of every level, through a
temporary group renamed into place, so a killed writer never leaves a half image under the
final name. Plate outputs are written field by field: processes that take different fields
(``torchrun`` ranks) write into the one plate without touching each other's fields.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from common.io import ImageDimensionError, ImageReadError, writable_array

__all__ = ["is_omezarr", "split_channel", "open_image", "read_omezarr", "write_omezarr", "write_plate",
           "plate_fields", "is_plate", "output_path", "write_prediction", "ensure_plate_like", "plate_manifest",
           "image_shape", "pyramid_factors", "NGFF_FORMAT"]

ZARR_SUFFIX = ".zarr"
_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "meter": 1e6, "angstrom": 1e-4, None: 1.0}


def NGFF_FORMAT():  # noqa: N802 - a constant that needs a lazy import
    """The NGFF version written: 0.4 (zarr v2), which napari, Fiji/MoBIE, iohub and VisCy all read."""
    from ome_zarr.format import FormatV04

    return FormatV04()


def split_channel(path: str | os.PathLike) -> tuple[str, str | None]:
    """``"p.zarr/B/3/0#DNA"`` -> ``("p.zarr/B/3/0", "DNA")``; no ``#`` -> ``(path, None)``."""
    path = str(path)
    if "#" in path and is_omezarr(path.split("#", 1)[0]):
        base, channel = path.rsplit("#", 1)
        return base, channel
    return path, None


def is_omezarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an OME-Zarr group (a ``.zarr`` folder or a group inside one)."""
    parts = os.path.normpath(str(path).split("#", 1)[0]).split(os.sep)
    return any(p.lower().endswith(ZARR_SUFFIX) for p in parts)


def _attrs(path: str) -> dict:
    """OME attributes of a group (NGFF 0.5 nests them under ``ome``)."""
    import zarr

    attrs = dict(zarr.open_group(path, mode="r").attrs)
    return dict(attrs.get("ome", attrs))


def is_plate(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the root of an HCS plate."""
    try:
        return "plate" in _attrs(str(path))
    except Exception:
        return False


def plate_fields(path: str | os.PathLike) -> list[dict]:
    """Every field of an HCS plate: ``[{"path": "p.zarr/B/3/0", "row": "B", "column": "3", "field": "0"}, ...]``.

    Order: wells as the plate lists them, fields as each well lists them.
    """
    path = str(path)
    plate = _attrs(path).get("plate")
    if plate is None:
        raise ImageReadError(path, "is not an HCS plate (no 'plate' metadata)", "give an OME-Zarr plate or image")
    out = []
    for well in plate.get("wells", []):
        wpath = well["path"]
        row, col = wpath.split("/")[:2]
        images = _attrs(os.path.join(path, wpath)).get("well", {}).get("images", [])
        for im in images:
            out.append({"path": os.path.join(path, wpath, im["path"]), "row": row, "column": col, "field": im["path"]})
    return out


def _multiscales_node(path: str):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    loc = parse_url(path, mode="r", fmt=NGFF_FORMAT())
    if loc is None:
        raise ImageReadError(path, "not an OME-Zarr group", "give an .zarr image, or a plate field plate.zarr/B/3/0")
    for node in Reader(loc)():
        if any(isinstance(s, Multiscales) for s in node.specs):
            return node
        break
    if is_plate(path):
        raise ImageReadError(path, "is an HCS plate, not one image",
                             "give a field (plate.zarr/<row>/<column>/<field>) or list the plate as a folder")
    raise ImageReadError(path, "has no OME-Zarr multiscales image", "is this an OME-Zarr image group?")


def open_image(path: str | os.PathLike) -> tuple:
    """Open the full-resolution level of an OME-Zarr image lazily.

    Returns:
        ``(array, axes, spacing, channel_names)``: ``array`` a dask array (nothing read yet), ``axes``
        lower-case letters (e.g. ``"czyx"``), ``spacing`` ``{axis: micrometres}`` for the spatial axes
        with a scale, ``channel_names`` (or ``None``).
    """
    base, _ = split_channel(path)
    if not os.path.isdir(base):
        raise ImageReadError(base, "OME-Zarr group not found", "check the path; manifest paths are relative to the CSV")
    node = _multiscales_node(base)
    meta = node.metadata
    axes_meta = meta.get("axes") or [{"name": a} for a in "tczyx"[-node.data[0].ndim:]]
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in axes_meta).lower()
    spacing = {}
    cts = meta.get("coordinateTransformations") or []
    if cts:
        for t in cts[0]:
            if t.get("type") == "scale":
                for a, s, ax in zip(axes, t["scale"], axes_meta):
                    unit = ax.get("unit") if isinstance(ax, dict) else None
                    if a in "zyx":
                        spacing[a] = float(s) * _UM.get(unit, 1.0)
    return node.data[0], axes, spacing, meta.get("channel_names")


def image_shape(path: str | os.PathLike) -> tuple:
    """Shape of the full-resolution array (all axes), from the metadata only."""
    return tuple(open_image(path)[0].shape)


def read_omezarr(path: str | os.PathLike, spatial_dims: int = 3, lazy: bool = False):
    """Read an OME-Zarr image (or one channel of it) as ``CZYX`` / ``CYX``.

    Returns:
        ``(array, axes, sizes)`` as the zoo's other readers: ``axes`` ``"CZYX"``/``"CYX"``, ``sizes``
        ``{"Z"|"Y"|"X": micrometres}``. ``lazy=True`` returns the dask array unread.
    """
    base, channel = split_channel(path)
    data, axes, spacing, names = open_image(base)
    if "t" in axes:
        t = axes.index("t")
        if data.shape[t] != 1:
            raise ImageDimensionError(base, f"has {data.shape[t]} time points", "save one time point per image")
        data = data[(slice(None),) * t + (0,)]
        axes = axes.replace("t", "")
    if "c" not in axes:
        data, axes = data[None], "c" + axes
    elif axes.index("c") != 0:
        data = np.moveaxis(data, axes.index("c"), 0) if not hasattr(data, "dask") else data.transpose(
            [axes.index("c")] + [i for i, a in enumerate(axes) if a != "c"])
        axes = "c" + axes.replace("c", "")
    if spatial_dims == 2 and "z" in axes:
        if data.shape[axes.index("z")] != 1:
            raise ImageDimensionError(base, f"is a z-stack (shape {tuple(data.shape)}, axes {axes})",
                                      "this bundle needs 2D images (YX): give one plane per image")
        data, axes = data[:, 0], axes.replace("z", "")
    if spatial_dims == 3 and "z" not in axes:
        raise ImageDimensionError(base, f"is a 2D image (axes {axes})", "this bundle needs a 3D stack (ZYX)")
    if axes != "c" + "zyx"[-spatial_dims:]:
        raise ImageDimensionError(base, f"axes '{axes}' are not supported", "use (t)(c)(z)yx axes")
    if channel is not None:
        if names and channel in names:
            idx = list(names).index(channel)
        elif channel.isdigit() and int(channel) < data.shape[0]:
            idx = int(channel)
        else:
            raise ImageReadError(base, f"has no channel '{channel}' (channels: {names or data.shape[0]})",
                                 "name a channel by its name or index after '#'")
        data = data[idx:idx + 1]
    if not lazy:
        data = np.asarray(data)
    sizes = {a.upper(): s for a, s in spacing.items()}
    return data, axes.upper(), sizes


def pyramid_factors(shape_yx: Sequence[int], min_size: int = 64, max_levels: int = 4) -> list[int]:
    """Y/X downsampling factors of the pyramid levels below full resolution (2, 4, ...), while the
    smallest side stays at least ``min_size`` pixels."""
    out, f = [], 2
    while len(out) < max_levels and min(shape_yx) // f >= min_size:
        out.append(f)
        f *= 2
    return out


def _tmp_name(final: str) -> str:
    folder, name = os.path.split(os.path.abspath(final))
    return os.path.join(folder, f".tmp_{os.getpid()}_{uuid.uuid4().hex[:8]}_{name}")


def _replace_dir(tmp: str, final: str) -> None:
    """Rename the finished group ``tmp`` to ``final`` (the previous ``final`` is removed first)."""
    if os.path.exists(final):
        old = _tmp_name(final)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _omero_channel(label: str, array, index: int, axes: str) -> dict:
    """An ``omero`` channel entry (label, colour, display window from the data when in memory)."""
    colours = ["FFFFFF", "00FF00", "FF00FF", "00FFFF", "FFFF00", "FF0000", "0000FF"]
    if isinstance(array, np.ndarray) and array.size:
        plane = array.take(index, axis=axes.index("c")) if "c" in axes else array
        lo, hi = float(np.min(plane)), float(np.max(plane))
    elif np.issubdtype(array.dtype, np.integer):
        lo, hi = float(np.iinfo(array.dtype).min), float(np.iinfo(array.dtype).max)
    else:
        lo, hi = 0.0, 1.0
    return {"label": label, "active": True, "color": colours[index % len(colours)],
            "window": {"min": lo, "max": hi, "start": lo, "end": hi}}


def write_omezarr(path: str | os.PathLike, array, axes: str = "CZYX", spacing_um: Sequence[float] | None = None,
                  chunks: Sequence[int] | None = None, pyramid: bool = True, channel_names: Sequence[str] | None = None,
                  name: str | None = None) -> str:
    """Write an OME-Zarr image with a multiscale pyramid, atomically (temporary group + rename).

    Args:
        path: the image group to write (``out.zarr`` or a plate field ``plate.zarr/B/3/0`` whose
            plate and well exist, see :func:`ensure_plate_like`).
        array: numpy or dask array with axes ``axes`` (``CZYX``, ``ZYX``, ``CYX``, ``YX``).
        spacing_um: voxel size in micrometres of the spatial axes (``ZYX``/``YX`` order), or ``None``.
        chunks: chunk shape (default: one channel, up to 32 planes, 256x256 in Y/X).
        pyramid: add 2x/4x/... Y/X levels while the smallest side is >= 64 pixels.
        channel_names: names stored as ``omero`` channel labels.
    """
    import dask.array as da
    from ome_zarr.writer import write_image

    path = os.path.normpath(str(path))
    axes = axes.lower()
    array = writable_array(array, axes, path, lazy_types=(da.Array,))
    spatial = [a for a in axes if a in "zyx"]
    if chunks is None:
        want = {"c": 1, "t": 1, "z": 32, "y": 256, "x": 256}
        chunks = tuple(min(want[a], n) for a, n in zip(axes, array.shape))
    shape_yx = [n for a, n in zip(axes, array.shape) if a in "yx"]
    factors = pyramid_factors(shape_yx) if pyramid else []
    scale = None
    if spacing_um is not None:
        if len(spacing_um) != len(spatial):
            raise ValueError(f"{path}: {len(spacing_um)} spacings for spatial axes {''.join(spatial)}")
        scale = {a: float(s) for a, s in zip(spatial, spacing_um)}
    metadata = {}
    if channel_names is not None:
        metadata["omero"] = {"channels": [_omero_channel(str(n), array, i, axes) for i, n in enumerate(channel_names)]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write_image(array, tmp, scale_factors=tuple(factors), fmt=NGFF_FORMAT(), axes=axes,
                    scale=scale, axes_units={a: "micrometer" for a in spatial} if scale else None,
                    storage_options={"chunks": tuple(chunks)}, name=name or os.path.basename(path), **metadata)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_plate(path: str | os.PathLike, fields: Mapping[tuple, object], axes: str = "CZYX",
                spacing_um: Sequence[float] | None = None, channel_names: Sequence[str] | None = None,
                name: str | None = None, pyramid: bool = True) -> str:
    """Write an HCS plate: ``fields[(row, column, field)] = array`` (e.g. ``("B", "3", "0")``).

    Plate and well metadata come from ``ome-zarr``'s writers; each field is a multiscale image.
    """
    import zarr
    from ome_zarr.writer import write_plate_metadata, write_well_metadata

    path = os.path.normpath(str(path))
    keys = [tuple(str(k) for k in key) for key in fields]
    rows = sorted({k[0] for k in keys})
    cols = sorted({k[1] for k in keys}, key=lambda c: (len(c), c))
    wells = sorted({f"{r}/{c}" for r, c, _ in keys})
    tmp = _tmp_name(path)
    try:
        root = zarr.open_group(tmp, mode="w", zarr_format=2)
        write_plate_metadata(root, rows, cols, wells, fmt=NGFF_FORMAT(), name=name or os.path.basename(path),
                             field_count=max(sum(1 for k in keys if f"{k[0]}/{k[1]}" == w) for w in wells))
        for w in wells:
            g = root.require_group(w)
            write_well_metadata(g, [f for r, c, f in keys if f"{r}/{c}" == w], fmt=NGFF_FORMAT())
        for key, arr in zip(keys, fields.values()):
            write_omezarr(os.path.join(tmp, *key), arr, axes=axes, spacing_um=spacing_um, channel_names=channel_names,
                          pyramid=pyramid)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _field_parts(path: str) -> tuple[str, str] | None:
    """``"x/p.zarr/B/3/0"`` -> ``("x/p.zarr", "B/3/0")`` when the group is a plate field, else ``None``."""
    path = os.path.normpath(path)
    parts = path.split(os.sep)
    for i, p in enumerate(parts):
        if p.lower().endswith(ZARR_SUFFIX):
            rest = parts[i + 1:]
            if len(rest) == 3:
                return os.sep.join(parts[: i + 1]), "/".join(rest)
            return None
    return None


def output_path(source: str | os.PathLike, output_dir: str, postfix: str) -> str:
    """Where the prediction of ``source`` goes: ``<out>/<stem><postfix>.zarr`` for an image (of any
    format), ``<out>/<plate stem><postfix>.zarr/B/3/0`` for a plate field (one output plate)."""
    base, _ = split_channel(source)
    fp = _field_parts(base) if is_omezarr(base) else None
    if fp is not None:
        plate, field = fp
        stem = os.path.basename(plate)[: -len(ZARR_SUFFIX)]
        return os.path.join(output_dir, f"{stem}{postfix}{ZARR_SUFFIX}", *field.split("/"))
    name = os.path.basename(os.path.normpath(base))
    from common.io import SaveOmeTiff

    stem = name[: -len(ZARR_SUFFIX)] if name.lower().endswith(ZARR_SUFFIX) else SaveOmeTiff.stem(name)
    return os.path.join(output_dir, f"{stem}{postfix}{ZARR_SUFFIX}")


def ensure_plate_like(out_plate: str, in_plate: str) -> str:
    """Create ``out_plate`` with the plate and well layout of ``in_plate`` (no images) unless it exists.

    Safe with several processes: the layout is built in a temporary group and renamed; a process
    that loses the race drops its copy and uses the winner's (the content is the same).
    """
    import zarr
    from ome_zarr.writer import write_plate_metadata, write_well_metadata

    out_plate = os.path.normpath(out_plate)
    if os.path.isdir(out_plate) and is_plate(out_plate):
        return out_plate
    plate = _attrs(in_plate)["plate"]
    tmp = _tmp_name(out_plate)
    os.makedirs(os.path.dirname(os.path.abspath(out_plate)), exist_ok=True)
    try:
        root = zarr.open_group(tmp, mode="w", zarr_format=2)
        wells = [w["path"] for w in plate["wells"]]
        write_plate_metadata(root, [r["name"] for r in plate["rows"]], [c["name"] for c in plate["columns"]], wells,
                             fmt=NGFF_FORMAT(), name=os.path.basename(out_plate), field_count=plate.get("field_count"))
        for w in wells:
            images = _attrs(os.path.join(in_plate, w)).get("well", {}).get("images", [])
            write_well_metadata(root.require_group(w), [im["path"] for im in images], fmt=NGFF_FORMAT())
        try:
            os.rename(tmp, out_plate)
        except OSError:  # another process made it first
            if not is_plate(out_plate):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_plate


def write_prediction(out: str, array, axes: str, spacing_um, source: str, channel_names=None) -> str:
    """Write a prediction to ``out`` (from :func:`output_path`); a plate field gets its plate first."""
    fp = _field_parts(out)
    src_fp = _field_parts(split_channel(source)[0]) if is_omezarr(source) else None
    if fp is not None and src_fp is not None:
        ensure_plate_like(fp[0], src_fp[0])
    return write_omezarr(out, array, axes=axes, spacing_um=spacing_um, channel_names=channel_names)


def plate_manifest(plate: str | os.PathLike, csv_path: str | os.PathLike, signal: str, target: str | None = None,
                   label: str | None = None) -> str:
    """Write a training/inference manifest of every field of a plate, channels chosen by name or index.

    Columns: ``path_signal`` (``<field>#<signal>``), ``path_target`` / ``path_label`` when given, and
    ``row,column,field``. Paths are relative to the CSV, as every zoo manifest.
    """
    from common.data import write_manifest

    csv_path = str(csv_path)
    base = os.path.dirname(os.path.abspath(csv_path))
    rows = []
    for f in plate_fields(plate):
        rel = os.path.relpath(os.path.abspath(f["path"]), base)
        row = {"path_signal": f"{rel}#{signal}"}
        if target is not None:
            row["path_target"] = f"{rel}#{target}"
        if label is not None:
            row["path_label"] = f"{rel}#{label}"
        row.update(row=f["row"], column=f["column"], field=f["field"])
        rows.append(row)
    return write_manifest(csv_path, rows)


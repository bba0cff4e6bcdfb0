"""Readers and writers for microscopy images, as MONAI transforms.

Formats: TIFF / OME-TIFF (tifffile), PNG (Pillow), NIfTI (nibabel), OME-Zarr images and HCS plate
fields (ome-zarr, see :mod:`common.omezarr`; ``image.zarr``, ``plate.zarr/B/3/0``, ``...#<channel>``).

Conventions
-----------
* Arrays are channel-first: ``CZYX`` for 3D, ``CYX`` for 2D (``C`` is added when the
  file has none).
* The voxel size in micrometres (``ZYX`` / ``YX`` order) lives in one place only: the
  diagonal of the MetaTensor ``affine`` (so MONAI's ``Spacing`` and ``pixdim`` work).
  ``meta["spacing_known"]`` says whether it came from the file or is the default 1.0.
* Every error names the file and what is wrong with it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Transform

from common.transforms import DictTwin

__all__ = [
    "ImageReadError",
    "ImageDimensionError",
    "NonFiniteImageError",
    "read_image",
    "write_ome_tiff",
    "spacing_of",
    "voxel_count",
    "LoadMicroscopy",
    "LoadMicroscopyd",
    "SaveOmeTiff",
    "SaveOmeTiffd",
]

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
NIFTI_SUFFIXES = (".nii", ".nii.gz")

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6, "Å": 1e-4}


class ImageReadError(ValueError):
    """A file could not be read as an image (missing, corrupt, unsupported)."""

    def __init__(self, path, problem: str, hint: str = ""):
        self.path = str(path)
        self.problem = problem
        msg = f"{self.path}: {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ImageDimensionError(ImageReadError):
    """The image has the wrong number of dimensions for the task (e.g. 2D where 3D is expected)."""


class NonFiniteImageError(ImageReadError):
    """The image contains NaN or infinite values."""


def _suffix(path: str | os.PathLike) -> str:
    name = str(path).lower()
    for s in NIFTI_SUFFIXES + TIFF_SUFFIXES + PNG_SUFFIXES:
        if name.endswith(s):
            return s
    return Path(name).suffix


def _ome_physical_sizes(ome_xml: str) -> dict:
    """Physical sizes (micrometres) of the first image's Pixels element, by axis letter."""
    root = ET.fromstring(ome_xml)
    pixels = None
    for el in root.iter():
        if el.tag.endswith("Pixels"):
            pixels = el
            break
    out = {}
    if pixels is None:
        return out
    for ax in "XYZ":
        val = pixels.get(f"PhysicalSize{ax}")
        if val is None:
            continue
        unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
        out[ax] = float(val) * _UNIT_TO_UM.get(unit, 1.0)
    return out


def _read_tiff(path: str):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        data = series.asarray()
        axes = series.axes.upper()
        sizes = {}
        if tif.is_ome and tif.ome_metadata:
            try:
                sizes = _ome_physical_sizes(tif.ome_metadata)
            except ET.ParseError:
                sizes = {}
        elif tif.is_imagej:
            ij = tif.imagej_metadata or {}
            if "spacing" in ij:
                sizes["Z"] = float(ij["spacing"])
            page = tif.pages[0]
            xres = page.tags.get("XResolution")
            yres = page.tags.get("YResolution")
            if xres is not None and xres.value[0]:
                sizes["X"] = xres.value[1] / xres.value[0]
            if yres is not None and yres.value[0]:
                sizes["Y"] = yres.value[1] / yres.value[0]
    # drop singleton time/other axes; keep C Z Y X S and tifffile's positional Q / I axes
    keep = []
    for i, ax in enumerate(axes):
        if ax in "CZYXSQI":
            keep.append(i)
        elif data.shape[i] != 1:
            raise ImageDimensionError(path, f"axis '{ax}' of size {data.shape[i]} is not supported (axes {axes})",
                                      "save one time point / position per file")
    drop = tuple(i for i in range(len(axes)) if i not in keep)
    data = data.squeeze(axis=drop) if drop else data
    axes = "".join(axes[i] for i in keep)
    # tifffile names unknown leading axes Q/I; those were dropped above only when singleton
    return data, axes, sizes


def _read_png(path: str):
    from PIL import Image

    with Image.open(path) as im:
        data = np.asarray(im)
    if data.ndim == 3:
        axes = "YXS"
    else:
        axes = "YX"
    return data, axes, {}


def _read_nifti(path: str):
    import nibabel as nib

    img = nib.load(path)
    data = np.asarray(img.dataobj)
    zooms = img.header.get_zooms()
    if data.ndim == 2:
        return data.T, "YX", {"X": float(zooms[0]), "Y": float(zooms[1])}
    if data.ndim == 3:
        # NIfTI stores XYZ; our convention is ZYX
        return data.transpose(2, 1, 0), "ZYX", {"X": float(zooms[0]), "Y": float(zooms[1]), "Z": float(zooms[2])}
    if data.ndim == 4:
        return data.transpose(3, 2, 1, 0), "CZYX", {"X": float(zooms[0]), "Y": float(zooms[1]), "Z": float(zooms[2])}
    raise ImageDimensionError(path, f"NIfTI with {data.ndim} dimensions is not supported")


def read_image(path: str | os.PathLike, spatial_dims: int = 3, grayscale: str = "auto", check_finite: bool = True):
    """Read an image file into a channel-first array and its voxel size.

    Args:
        path: a ``.tif/.tiff/.ome.tif``, ``.png`` or ``.nii/.nii.gz`` file.
        spatial_dims: 3 for ``ZYX`` data, 2 for ``YX`` data. A 3D file where 2D is expected
            (or the reverse) raises :class:`ImageDimensionError`.
        grayscale: for RGB(A) samples: ``"auto"`` keeps one channel when all colour channels
            are equal (grey stored as RGB), ``"always"`` averages them, ``"never"`` keeps them
            as channels.
        check_finite: raise :class:`NonFiniteImageError` on NaN/inf.

    Returns:
        ``(array, spacing, spacing_known)``: ``array`` is ``CZYX`` or ``CYX``; ``spacing`` the
        voxel size in micrometres in ``ZYX``/``YX`` order (1.0 where the file does not say).
    """
    path = str(path)
    from common import omezarr

    zarr_input = omezarr.is_omezarr(path)
    if not zarr_input and not os.path.isfile(path):
        raise ImageReadError(path, "file not found", "check the path; manifest paths are relative to the CSV")
    suffix = _suffix(path)
    try:
        if zarr_input:
            data, axes, sizes = omezarr.read_omezarr(path, spatial_dims)
        elif suffix in TIFF_SUFFIXES:
            data, axes, sizes = _read_tiff(path)
        elif suffix in PNG_SUFFIXES:
            data, axes, sizes = _read_png(path)
        elif suffix in NIFTI_SUFFIXES:
            data, axes, sizes = _read_nifti(path)
        else:
            raise ImageReadError(path, f"unsupported file type '{suffix}'", "use TIFF/OME-TIFF, PNG or NIfTI")
    except ImageReadError:
        raise
    except Exception as e:  # corrupt or truncated files raise many different errors
        raise ImageReadError(path, f"unreadable ({type(e).__name__}: {e})", "is the file complete and a valid image?") from e

    # a plain TIFF written without metadata: tifffile calls leading axes Q/I, or a leading 'S'
    # when it guesses RGB planes; in a 3D read those are positional (C)ZYX axes, not colours
    if spatial_dims == 3 and "Z" not in axes and axes.endswith("YX") and data.ndim >= 3:
        axes = "Q" * (data.ndim - 2) + "YX"
    # colour samples -> channels (or merged); a colour picture is never a z-stack
    if spatial_dims == 3 and "S" in axes and "Z" not in axes:
        raise ImageDimensionError(
            path, f"is a 2D colour image (axes {axes}, shape {tuple(data.shape)}), not a z-stack",
            "this bundle needs a 3D stack (ZYX): export the stack as a multi-page TIFF, OME-TIFF or NIfTI")
    if "S" in axes:
        s = axes.index("S")
        data = np.moveaxis(data, s, 0)
        axes = "S" + axes.replace("S", "")
        if data.shape[0] == 4:  # drop alpha
            data = data[:3]
        if grayscale == "always" or (grayscale == "auto" and all(np.array_equal(data[0], c) for c in data[1:])):
            data = data.mean(0).astype(data.dtype) if grayscale == "always" else data[0]
            axes = axes[1:]
        else:
            axes = "C" + axes[1:]
    if data.ndim == spatial_dims:
        data = data[None]
    elif data.ndim == spatial_dims + 1:
        pass  # leading axis is the channel (CZYX / CYX convention)
    else:
        want = "ZYX or CZYX" if spatial_dims == 3 else "YX or CYX"
        raise ImageDimensionError(
            path, f"has {data.ndim} dimensions (shape {tuple(data.shape)}), expected {want}",
            "a 2D file where a 3D stack is expected?" if data.ndim < spatial_dims else "too many axes",
        )
    if data.dtype.kind not in "uifb":
        raise ImageReadError(path, f"unsupported pixel type {data.dtype}")
    if check_finite and data.dtype.kind == "f" and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise NonFiniteImageError(path, f"contains {n_bad} NaN/inf values", "clean or re-export the image")
    letters = "ZYX"[-spatial_dims:]
    spacing = tuple(float(sizes.get(a, 1.0)) for a in letters)
    known = all(a in sizes for a in letters)
    return data, spacing, known


def spacing_of(img) -> tuple:
    """Voxel size (micrometres, ``ZYX``/``YX``) of a MetaTensor, from its affine."""
    if isinstance(img, MetaTensor):
        return tuple(float(v) for v in img.pixdim)
    raise TypeError("spacing_of expects a MetaTensor")


def voxel_count(path: str | os.PathLike) -> int:
    """Number of array elements of an image file, from its header (the pixels are not read)."""
    path = str(path)
    suffix = _suffix(path)
    from common import omezarr

    if omezarr.is_omezarr(path):
        return int(np.prod(omezarr.image_shape(omezarr.split_channel(path)[0])))
    if suffix in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return int(np.prod(tif.series[0].shape))
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        return int(np.prod(nib.load(path).shape))
    if suffix in PNG_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            return int(im.size[0] * im.size[1] * len(im.getbands()))
    return 0


def writable_array(array, axes: str, path: str, lazy_types: tuple = ()):
    """An array ready to be written: numpy (or one of ``lazy_types``, kept as is), float64 as float32, bool as uint8.

    Args:
        array: numpy array, tensor or a lazy array of ``lazy_types`` (e.g. dask), with axes ``axes``.
        axes: one letter per dimension; only its length is checked.
        path: the file being written, named in the error.

    Raises:
        ValueError: the array's number of dimensions differs from ``len(axes)``.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if not (lazy_types and isinstance(array, lazy_types)):
        array = np.asarray(array)
    if array.ndim != len(axes):
        raise ValueError(f"{path}: array has {array.ndim} dims but axes '{axes}' has {len(axes)}")
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


def write_ome_tiff(path: str | os.PathLike, array, axes: str = "ZYX", spacing_um: Sequence[float] | None = None,
                   compression: str | None = "zlib") -> str:
    """Write ``array`` as OME-TIFF with physical sizes, atomically (temporary file + rename).

    Args:
        path: output file (``.ome.tif`` recommended).
        array: numpy array or tensor with axes ``axes`` (e.g. ``ZYX``, ``CZYX``, ``YX``, ``CYX``).
        spacing_um: voxel size in micrometres for the spatial axes in the order they appear
            (``ZYX`` or ``YX``); ``None`` writes no physical size.
    """
    import tifffile

    path = str(path)
    axes = axes.upper()
    array = writable_array(array, axes, path)
    metadata = {"axes": axes}
    if spacing_um is not None:
        spatial = [a for a in axes if a in "ZYX"]
        if len(spacing_um) != len(spatial):
            raise ValueError(f"{path}: {len(spacing_um)} spacings for spatial axes {''.join(spatial)}")
        for a, s in zip(spatial, spacing_um):
            metadata[f"PhysicalSize{a}"] = float(s)
            metadata[f"PhysicalSize{a}Unit"] = "µm"
    from common.outputs import atomic_write

    with atomic_write(path, suffix=".ome.tif") as tmp:
        tifffile.imwrite(tmp, array, ome=True, metadata=metadata, compression=compression, photometric="minisblack")
    return path


class LoadMicroscopy(Transform):
    """Load a TIFF/OME-TIFF, PNG or NIfTI file as a channel-first float MetaTensor.

    Output shape ``CZYX`` (``spatial_dims=3``) or ``CYX`` (``spatial_dims=2``); the affine is
    ``diag(spacing)`` in micrometres, ``meta["filename_or_obj"]`` the source path.
    """

    def __init__(self, spatial_dims: int = 3, dtype=np.float32, grayscale: str = "auto", check_finite: bool = True):
        self.spatial_dims = spatial_dims
        self.dtype = dtype
        self.grayscale = grayscale
        self.check_finite = check_finite

    def __call__(self, path):
        data, spacing, known = read_image(path, self.spatial_dims, self.grayscale, self.check_finite)
        affine = np.eye(self.spatial_dims + 1)
        affine[: self.spatial_dims, : self.spatial_dims] = np.diag(spacing)
        meta = {
            "filename_or_obj": str(path),
            "spacing_known": known,
            "original_dtype": str(data.dtype),
            "spatial_shape": np.asarray(data.shape[1:]),
        }
        arr = data.astype(self.dtype, copy=False) if self.dtype is not None else data
        return MetaTensor(torch.as_tensor(np.ascontiguousarray(arr)), affine=torch.as_tensor(affine), meta=meta)


class LoadMicroscopyd(DictTwin):
    """Dictionary version of :class:`LoadMicroscopy`: replaces each path under ``keys`` by the image."""

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, dtype=np.float32, grayscale: str = "auto",
                 check_finite: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.t = LoadMicroscopy(spatial_dims, dtype, grayscale, check_finite)


class SaveOmeTiff(Transform):
    """Write a channel-first MetaTensor (``CZYX``/``CYX``) as OME-TIFF with its voxel size.

    The file name is ``<output_dir>/<source stem><output_postfix>.ome.tif``; a single channel is
    written without the ``C`` axis. Returns the image unchanged (and records the path in
    ``meta["saved_to"]``). ``output_format="auto"`` writes OME-Zarr (chunked, with a pyramid) when
    the source was OME-Zarr (a plate field lands at its row/column/field of one output plate
    ``<output_dir>/<plate stem><output_postfix>.zarr``); ``"ome-zarr"`` always, ``"ome-tiff"`` never.
    """

    def __init__(self, output_dir: str, output_postfix: str = "_pred", dtype=np.float32, squeeze_channel: bool = True,
                 output_format: str = "auto"):
        if output_format not in ("auto", "ome-tiff", "ome-zarr"):
            raise ValueError(f"output_format must be 'auto', 'ome-tiff' or 'ome-zarr', not {output_format!r}")
        self.output_format = output_format
        self.output_dir = str(output_dir)
        self.output_postfix = output_postfix
        self.dtype = dtype
        self.squeeze_channel = squeeze_channel

    @staticmethod
    def stem(name: str) -> str:
        base = os.path.basename(str(name))
        for s in (".ome.tiff", ".ome.tif") + NIFTI_SUFFIXES + TIFF_SUFFIXES + PNG_SUFFIXES:
            if base.lower().endswith(s):
                return base[: -len(s)]
        return os.path.splitext(base)[0]

    def __call__(self, img, meta: dict | None = None):
        meta = meta if meta is not None else (img.meta if isinstance(img, MetaTensor) else {})
        src = meta.get("filename_or_obj", "image")
        if isinstance(src, (list, tuple)):
            src = src[0]
        spatial_dims = img.ndim - 1
        # a file that carried no voxel size gives an output that claims none either
        spacing = spacing_of(img) if isinstance(img, MetaTensor) and meta.get("spacing_known", True) else None
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if self.dtype is not None:
            arr = arr.astype(self.dtype, copy=False)
        axes = "C" + "ZYX"[-spatial_dims:]
        if self.squeeze_channel and arr.shape[0] == 1:
            arr, axes = arr[0], axes[1:]
        from common import omezarr

        if self.output_format == "ome-zarr" or (self.output_format == "auto" and omezarr.is_omezarr(src)):
            out = omezarr.output_path(src, self.output_dir, self.output_postfix)
            omezarr.write_prediction(out, arr, axes=axes, spacing_um=spacing, source=str(src))
        else:
            out = os.path.join(self.output_dir, f"{self.stem(src)}{self.output_postfix}.ome.tif")
            write_ome_tiff(out, arr, axes=axes, spacing_um=spacing)
        if isinstance(img, MetaTensor):
            img.meta["saved_to"] = out
        return img


class SaveOmeTiffd(DictTwin):
    """Dictionary version of :class:`SaveOmeTiff`."""

    def __init__(self, keys: KeysCollection, output_dir: str, output_postfix: str = "_pred", dtype=np.float32,
                 squeeze_channel: bool = True, allow_missing_keys: bool = False, output_format: str = "auto"):
        super().__init__(keys, allow_missing_keys)
        self.t = SaveOmeTiff(output_dir, output_postfix, dtype, squeeze_channel, output_format)

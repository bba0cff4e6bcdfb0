"""Every bundle's inference on the files a microscope and its software write.

OME-TIFF with a voxel size, plain TIFF without, ImageJ TIFF, NIfTI, PNG (grey, 16-bit, RGB with
equal channels), stacks thinner than a patch, odd sizes, uint8/uint16/float32. The output has the
input's grid (shape) and carries the input's voxel size exactly when the input had one.
"""

import os

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from common.io import read_image, write_ome_tiff
from zoo_testing import run_bundle_inprocess, tiny_model

pytestmark = pytest.mark.slow

ALL = ["fnet_baseline", "spotlight_dna", "isl_nucleus_seg", "isl_cell_instance", "unet3d_fucci"]
DIMS = {"fnet_baseline": 3, "spotlight_dna": 3, "isl_nucleus_seg": 2, "isl_cell_instance": 2, "unet3d_fucci": 3}
OUTPUTS = {"fnet_baseline": ["_pred"], "spotlight_dna": ["_pred"], "isl_nucleus_seg": ["_nuclei"],
           "isl_cell_instance": ["_instances"], "unet3d_fucci": ["_semantic", "_instances"]}


def _rand(shape, dtype, seed=0):
    x = np.random.default_rng(seed).random(shape)
    if dtype == np.uint8:
        return (x * 255).astype(np.uint8)
    if dtype == np.uint16:
        return (x * 4000 + 100).astype(np.uint16)
    return x.astype(np.float32)


# writers: (name, function(path_without_suffix) -> (path, spatial shape, voxel size or None))
def _ome(stem, shape, dtype, spacing):
    p = stem + ".ome.tif"
    write_ome_tiff(p, _rand(shape, dtype), axes="ZYX"[-len(shape):], spacing_um=spacing)
    return p, shape, spacing


def _plain(stem, shape, dtype):
    p = stem + ".tif"
    tifffile.imwrite(p, _rand(shape, dtype))
    return p, shape, None


def _imagej(stem, shape, dtype, spacing):
    p = stem + ".tif"
    meta = {"unit": "um"}
    if len(shape) == 3:
        meta["spacing"] = spacing[0]
    tifffile.imwrite(p, _rand(shape, dtype), imagej=True, resolution=(1 / spacing[-1], 1 / spacing[-2]),
                     metadata=meta)
    return p, shape, spacing


def _nifti(stem, shape, spacing):
    p = stem + ".nii.gz"
    arr = _rand(shape, np.float32)
    zooms = list(spacing[::-1]) + [1.0] * (4 - len(spacing))
    img = nib.Nifti1Image(arr.T, np.diag(zooms))  # NIfTI stores XYZ, with a 4x4 affine
    nib.save(img, p)
    return p, shape, spacing


def _png(stem, shape, mode):
    p = stem + ".png"
    if mode == "grey8":
        Image.fromarray(_rand(shape, np.uint8)).save(p)
    elif mode == "grey16":
        Image.fromarray(_rand(shape, np.uint16)).save(p)
    else:  # RGB with equal channels: a grey image saved as colour
        g = _rand(shape, np.uint8)
        Image.fromarray(np.stack([g, g, g], -1)).save(p)
    return p, shape, None


FORMATS_3D = {
    "ome_float32_voxel": lambda s: _ome(s, (12, 40, 44), np.float32, (0.5, 0.3, 0.3)),
    "plain_uint16": lambda s: _plain(s, (10, 36, 40), np.uint16),
    "imagej_uint8": lambda s: _imagej(s, (9, 33, 35), np.uint8, (0.6, 0.25, 0.25)),
    "nifti": lambda s: _nifti(s, (8, 30, 34), (1.0, 0.4, 0.4)),
    "thinner_than_patch": lambda s: _ome(s, (3, 40, 40), np.uint16, (2.0, 0.29, 0.29)),
    "odd_size_plain": lambda s: _plain(s, (7, 37, 53), np.float32),
}
FORMATS_2D = {
    "ome_float32_pixel": lambda s: _ome(s, (70, 66), np.float32, (0.3, 0.3)),
    "plain_uint16": lambda s: _plain(s, (64, 72), np.uint16),
    "imagej_uint8": lambda s: _imagej(s, (60, 68), np.uint8, (0.5, 0.5)),
    "png_grey8": lambda s: _png(s, (65, 67), "grey8"),
    "png_grey16": lambda s: _png(s, (64, 64), "grey16"),
    "png_rgb_equal": lambda s: _png(s, (61, 70), "rgb"),
    "nifti": lambda s: _nifti(s, (66, 64), (0.7, 0.7)),
    "smaller_than_patch": lambda s: _plain(s, (21, 19), np.uint8),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random weights with their record; isl_nucleus_seg takes one channel here (as the grey formats)."""
    root = tmp_path_factory.mktemp("format_models")
    out = {}
    for b in ALL:
        one_channel = {"in_channels": 1} if b == "isl_nucleus_seg" else {}
        out[b] = tiny_model(b, root / b, one_channel, **one_channel)
    return out


CASES = [(b, f) for b in ALL for f in (FORMATS_3D if DIMS[b] == 3 else FORMATS_2D)]


@pytest.mark.parametrize("bundle,fmt", CASES, ids=[f"{b}-{f}" for b, f in CASES])
def test_inference_reads_the_format_and_keeps_its_grid(bundle, fmt, models, tmp_path):
    writers = FORMATS_3D if DIMS[bundle] == 3 else FORMATS_2D
    (tmp_path / "in").mkdir()
    path, shape, spacing = writers[fmt](str(tmp_path / "in" / "img"))
    ov = {"dataset_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"), "ckpt_path": str(models[bundle])}
    if bundle == "isl_nucleus_seg":
        ov["stage"] = 1
    run_bundle_inprocess(bundle, "inference.json", ov)
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == sorted(f"img{pf}.ome.tif" for pf in OUTPUTS[bundle]), written
    for name in written:
        arr, out_spacing, known = read_image(tmp_path / "out" / name, spatial_dims=DIMS[bundle])
        assert arr.shape[1:] == tuple(shape), (name, arr.shape, shape)
        assert np.isfinite(arr).all()
        assert known == (spacing is not None), (name, known)
        if spacing is not None:
            np.testing.assert_allclose(out_spacing, spacing, rtol=1e-4)

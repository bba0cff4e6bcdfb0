import os

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from common.io import (ImageDimensionError, ImageReadError, LoadMicroscopy, LoadMicroscopyd, NonFiniteImageError,
                       SaveOmeTiffd, read_image, spacing_of, write_ome_tiff)


def test_ome_tiff_round_trip_keeps_voxel_size(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.random((5, 12, 17)).astype(np.float32)
    p = write_ome_tiff(tmp_path / "v.ome.tif", vol, axes="ZYX", spacing_um=(0.87, 0.29, 0.3))
    arr, spacing, known = read_image(p, spatial_dims=3)
    assert arr.shape == (1, 5, 12, 17)
    np.testing.assert_array_equal(arr[0], vol)
    assert known and np.allclose(spacing, (0.87, 0.29, 0.3))
    # no temporary file left behind
    assert sorted(os.listdir(tmp_path)) == ["v.ome.tif"]


def test_czyx_and_metatensor_affine(tmp_path):
    vol = np.arange(2 * 3 * 4 * 5, dtype=np.uint16).reshape(2, 3, 4, 5)
    p = write_ome_tiff(tmp_path / "c.ome.tif", vol, axes="CZYX", spacing_um=(2.0, 0.5, 0.25))
    img = LoadMicroscopy(spatial_dims=3)(p)
    assert tuple(img.shape) == (2, 3, 4, 5) and img.dtype == torch.float32
    assert spacing_of(img) == (2.0, 0.5, 0.25)
    np.testing.assert_array_equal(img.numpy(), vol.astype(np.float32))


def test_plain_tiff_without_metadata_defaults_to_unknown_spacing(tmp_path):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, np.ones((4, 8, 8), np.uint8))
    _, spacing, known = read_image(p)
    assert spacing == (1.0, 1.0, 1.0) and known is False


def test_imagej_spacing_is_read(tmp_path):
    p = tmp_path / "ij.tif"
    tifffile.imwrite(p, np.ones((4, 8, 8), np.uint16), imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"spacing": 1.5, "unit": "um", "axes": "ZYX"})
    _, spacing, known = read_image(p)
    assert known and np.allclose(spacing, (1.5, 0.25, 0.25))


def test_png_grey_stored_as_rgb_becomes_one_channel(tmp_path):
    g = (np.arange(64).reshape(8, 8) * 3).astype(np.uint8)
    Image.fromarray(np.stack([g, g, g], -1)).save(tmp_path / "g.png")
    arr, spacing, _ = read_image(tmp_path / "g.png", spatial_dims=2)
    assert arr.shape == (1, 8, 8) and spacing == (1.0, 1.0)
    np.testing.assert_array_equal(arr[0], g)
    rgb = np.stack([g, g // 2, g // 3], -1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    arr, _, _ = read_image(tmp_path / "c.png", spatial_dims=2)
    assert arr.shape == (3, 8, 8)
    np.testing.assert_array_equal(arr[1], g // 2)


def test_nifti_is_transposed_to_zyx(tmp_path):
    xyz = np.random.default_rng(1).random((6, 5, 4)).astype(np.float32)  # X, Y, Z
    img = nib.Nifti1Image(xyz, np.diag([0.3, 0.4, 2.0, 1.0]))
    img.header.set_zooms((0.3, 0.4, 2.0))
    nib.save(img, tmp_path / "v.nii.gz")
    arr, spacing, known = read_image(tmp_path / "v.nii.gz")
    assert arr.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(arr[0], xyz.transpose(2, 1, 0))
    assert np.allclose(spacing, (2.0, 0.4, 0.3)) and known


def test_named_errors(tmp_path):
    with pytest.raises(ImageReadError, match="missing.tif: file not found"):
        read_image(tmp_path / "missing.tif")
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage that is not a tiff")
    with pytest.raises(ImageReadError, match="broken.tif: unreadable"):
        read_image(bad)
    flat = write_ome_tiff(tmp_path / "flat.ome.tif", np.ones((8, 8), np.float32), axes="YX")
    with pytest.raises(ImageDimensionError, match="flat.ome.tif: has 2 dimensions"):
        read_image(flat, spatial_dims=3)
    nan = np.ones((3, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    p = write_ome_tiff(tmp_path / "nan.ome.tif", nan)
    with pytest.raises(NonFiniteImageError, match="nan.ome.tif: contains 1 NaN/inf"):
        read_image(p)
    with pytest.raises(ImageReadError, match="unsupported file type"):
        (tmp_path / "x.jpg").write_bytes(b"\xff\xd8")
        read_image(tmp_path / "x.jpg")


def test_save_uses_metatensor_spacing_and_source_name(tmp_path):
    vol = np.random.default_rng(2).random((3, 10, 11)).astype(np.float32)
    src = write_ome_tiff(tmp_path / "in" / "cell_07.ome.tif", vol, spacing_um=(1.0, 0.2, 0.2))
    d = LoadMicroscopyd(keys="image")({"image": src})
    SaveOmeTiffd(keys="image", output_dir=str(tmp_path / "out"), output_postfix="_pred")(d)
    out = tmp_path / "out" / "cell_07_pred.ome.tif"
    arr, spacing, known = read_image(out)
    assert known and np.allclose(spacing, (1.0, 0.2, 0.2))
    np.testing.assert_allclose(arr[0], vol)

"""common.intensity: percentiles that ignore zero padding and saturation (by hand), flat-field division."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRangePercentiles

from common.errors import ZooError
from common.intensity import (DivideBackground, DivideBackgroundd, NormalisationError, RobustScaleIntensity,
                              RobustScaleIntensityd, robust_percentiles, valid_mask)

# one channel: two zero-padding pixels, valid values 1..5, two saturated pixels at 10
X = np.array([[[0, 0, 1, 2, 3, 4, 5, 10, 10]]], np.float32)


def test_zeros_and_saturation_left_out_by_hand():
    assert valid_mask(X[0]).tolist() == [[False, False, True, True, True, True, True, False, False]]
    np.testing.assert_allclose(robust_percentiles(X, 0, 100), [[1.0, 5.0]])
    np.testing.assert_allclose(robust_percentiles(X, 25, 75), [[2.0, 4.0]])
    # MONAI's version takes every pixel: low percentile 0, high 10
    np.testing.assert_allclose(robust_percentiles(X, 0, 100, ignore_zeros=False, ignore_saturated=False), [[0, 10]])
    y = RobustScaleIntensity(0, 100, fill_zeros=False)(X)
    # (x - 1) / (5 - 1): 1 -> 0, 3 -> 0.5, 5 -> 1, saturated 10 -> 2.25, zeros -> -0.25
    np.testing.assert_allclose(y[0, 0], [-0.25, -0.25, 0, 0.25, 0.5, 0.75, 1, 2.25, 2.25])
    # zero padding filled with the median valid value (0.5), clip to [b_min, b_max]
    y = RobustScaleIntensity(0, 100, b_min=-1, b_max=1, clip=True)(X)
    np.testing.assert_allclose(y[0, 0], [0, 0, -1, -0.5, 0, 0.5, 1, 1, 1])


def test_matches_monai_on_the_valid_pixels_only():
    rng = np.random.default_rng(0)
    img = rng.gamma(3.0, 20.0, (2, 40, 50)).astype(np.float32)
    valid = img.copy()
    img[:, :5] = 0  # zero padding
    img[:, -3:, :10] = img.max() + 1  # a saturated patch (at the maximum)
    ours = RobustScaleIntensity(2, 98, fill_zeros=False)(img)
    for c in range(2):
        v = np.concatenate([valid[c, 5:-3].ravel(), valid[c, -3:, 10:].ravel()])
        lo, hi = np.percentile(v, [2, 98])
        np.testing.assert_allclose(ours[c], (img[c] - lo) / (hi - lo), rtol=1e-5, atol=1e-5)
        # MONAI on the valid pixels alone gives the same values there
        ref = ScaleIntensityRangePercentiles(2, 98, 0, 1)(torch.as_tensor(v[None]))
        np.testing.assert_allclose(((v - lo) / (hi - lo)), np.asarray(ref[0]), rtol=1e-5, atol=1e-5)
    # channels are scaled separately
    assert not np.allclose(robust_percentiles(img, 2, 98)[0], robust_percentiles(img, 2, 98)[1])


def test_single_brightest_pixel_is_not_saturation_and_constant_channel():
    x = np.array([[[1, 2, 3, 4, 9]]], np.float32)
    np.testing.assert_allclose(robust_percentiles(x, 0, 100), [[1, 9]])
    c = RobustScaleIntensity(1, 99, b_min=0.2)(np.full((1, 4, 4), 7, np.float32))
    assert np.all(c == 0.2)


def test_dict_twin_tensor_and_metatensor():
    t = MetaTensor(torch.as_tensor(X), meta={"filename_or_obj": "a.tif"})
    d = RobustScaleIntensityd("image", 0, 100)({"image": t, "label": np.ones(3)})
    assert isinstance(d["image"], MetaTensor) and d["image"].meta["filename_or_obj"] == "a.tif"
    np.testing.assert_allclose(d["image"].numpy(), RobustScaleIntensity(0, 100)(X))
    assert d["image"].dtype == torch.float32 and np.array_equal(d["label"], np.ones(3))


def test_bad_percentiles_named():
    for lo, hi in [(50, 10), (-1, 99), (1, 101)]:
        with pytest.raises(NormalisationError) as e:
            RobustScaleIntensity(lo, hi)
        assert isinstance(e.value, ZooError)
    with pytest.raises(NormalisationError):
        DivideBackground(sigma=-1)


def test_divide_background_flattens_a_gradient_and_ignores_zero_padding():
    yy, xx = np.mgrid[0:64, 0:96].astype(np.float32)
    gradient = 100 * np.exp(-xx / 60.0)  # smooth vignetting
    spots = np.ones_like(gradient)
    spots[30:33, 40:43] = 0.5  # a small dark object (3 px)
    img = (gradient * spots)[None]
    out = DivideBackground(sigma=8)(img)
    # the gradient is gone: away from the borders (2 sigma) the background is 1 within 3 %, and the
    # object keeps a contrast near 0.5
    inner = np.zeros_like(spots, bool)
    inner[16:-16, 16:-16] = True
    bg = out[0][(spots == 1) & inner]
    assert abs(np.median(bg) - 1) < 0.01 and np.percentile(np.abs(bg - 1), 99) < 0.03
    assert out[0, 31, 41] < 0.65
    # a constant field with zero padding on the left: exactly 1 right next to the padding, 0 in it
    flat = np.full((1, 32, 32), 4.0, np.float32)
    flat[:, :, :10] = 0
    o = DivideBackground(sigma=5)(flat)
    np.testing.assert_allclose(o[0, :, 10:], 1.0, rtol=1e-5)
    assert np.all(o[0, :, :10] == 0)
    # sigma 0 / None: unchanged; the dict twin equals the array transform
    np.testing.assert_array_equal(DivideBackground(sigma=0)(img), img)
    d = DivideBackgroundd("image", sigma=8)({"image": torch.as_tensor(img)})
    np.testing.assert_allclose(d["image"].numpy(), out)

"""Spotlight's loss and preprocessing: values by hand, VisCy cross-check, the foreground patch sampler."""

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from skimage.filters import threshold_otsu

from common.metrics import ForegroundPearsonMetric, pearson_r
from common.spotlight import OtsuStandardize, OtsuStandardized, SpotlightLoss, masked_mse, soft_dice_loss, soft_threshold
from common.transforms import ForegroundMask, ForegroundMaskd, RandForegroundPatchd, _window_counts, otsu_threshold


def t(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


# ------------------------------------------------------------------ sigma_k
def test_soft_threshold_known_points():
    k = -0.95
    x = t([0.0, 1.0, -1.0, 0.5, -0.5, 2.0])
    raw = soft_threshold(x, k, clamp=False)
    # sigma(0)=0, sigma(+-1)=+-1, sigma(0.5) = 0.975 / (0.05 + 0.95) = 0.975 (odd)
    expect = [0.0, 1.0, -1.0, 0.975, -0.975, 1.95 * 2 / (0.05 + 1.9 * 2)]
    np.testing.assert_allclose(raw.numpy(), expect, rtol=1e-12)
    assert raw[5] > 1  # |x| > 1 exceeds 1 slightly ...
    big = soft_threshold(t([1e6, -1e6]), k, clamp=False).numpy()
    np.testing.assert_allclose(big, [1.95 / 1.9, -1.95 / 1.9], rtol=1e-5)  # ... bounded by (1-k)/(-2k)
    # the zoo's default clamps below only: background exactly 0, x > 1 keeps its raw value (> 1)
    np.testing.assert_allclose(soft_threshold(x, k).numpy(), [0.0, 1.0, 0.0, 0.975, 0.0, expect[5]], rtol=1e-12)
    # VisCy's [0, 1] clamp saturates at 1
    np.testing.assert_allclose(soft_threshold(x, k, "both").numpy(), [0.0, 1.0, 0.0, 0.975, 0.0, 1.0], rtol=1e-12)
    assert torch.equal(soft_threshold(x, k, True), soft_threshold(x, k, "both"))
    assert torch.equal(soft_threshold(x, k, "none"), raw)
    # another k by the formula
    np.testing.assert_allclose(soft_threshold(t([0.25]), -0.5, clamp=False).numpy(), [0.375 / 0.75])
    with pytest.raises(ValueError, match="k must be"):
        soft_threshold(x, k=0.5)
    with pytest.raises(ValueError, match="clamp"):
        soft_threshold(x, clamp="max")


def test_upper_clamp_blinds_dice_to_overpredicted_background_lower_clamp_is_needed():
    """Why the zoo clamps sigma_k below only: measured gradients and a pole of the raw formula."""
    target = t([[[1.0, 1.0, -1.0, -1.0]]])
    pred = t([[[1.2, 0.8, 1.5, -0.5]]]).requires_grad_(True)  # voxel 2: background predicted at 1.5
    for clamp, zero in (("both", True), ("min", False)):
        pred.grad = None
        SpotlightLoss(lambda_mse=0.0, clamp=clamp)(pred, target).backward()
        g = float(pred.grad[0, 0, 2])
        assert (g == 0.0) if zero else (g > 0.0)  # > 0: gradient descent lowers the over-prediction
    # without any clamp, negative background enters the Dice denominator: mostly-background patches
    # push sum(S) + sum(M) through zero and the "Dice loss" leaves [0, 1]
    soft = soft_threshold(t([[[2.0] + [-3.0] * 9]]), clamp="none")
    mask = t([[[1.0] + [0.0] * 9]])
    assert float(soft_dice_loss(soft, mask)) > 1.0  # 1 - 2(1.013) / (1.013 - 9(1.017) + 1) = 1.28
    # clamped below, sigma is in [0, 1.026): the loss stays in [1 - 1.026, 1] (here 1 - 2.026 / 2.013)
    got = float(soft_dice_loss(soft_threshold(t([[[2.0] + [-3.0] * 9]])), mask))
    assert got == pytest.approx(1 - 2 * (3.9 / 3.85) / (3.9 / 3.85 + 1 + 1e-6)) and -0.026 < got < 1.0


# ------------------------------------------------------------------ MMSE / Dice / Spotlight by hand
def test_masked_mse_by_hand_and_empty_mask():
    pred = t([[[[1, 2], [3, 4]]], [[[1, 2], [3, 4]]]])  # (B=2, C=1, 2, 2)
    target = torch.zeros_like(pred)
    mask = t([[[[1, 0], [0, 1]]], [[[0, 0], [0, 0]]]])
    out = masked_mse(pred, target, mask)
    assert out.shape == (2, 1)
    # sample 0: (1 + 16) / 2; sample 1 has no foreground: plain MSE (1 + 4 + 9 + 16) / 4
    np.testing.assert_allclose(out.numpy().ravel(), [8.5, 7.5])


def test_soft_dice_by_hand():
    soft = t([[[0.5, 1.0, 0.0, 0.25]]])
    mask = t([[[1, 1, 0, 0]]])
    # 1 - 2 * 1.5 / (1.75 + 2)
    np.testing.assert_allclose(soft_dice_loss(soft, mask, eps=0).numpy(), [[1 - 3 / 3.75]])
    # both empty: defined (eps) -> 1
    np.testing.assert_allclose(soft_dice_loss(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)).numpy(), [[1.0]])


def _by_hand_case():
    pred = t([[[[0.5, 2.0], [-1.0, 0.0]]]])
    target = t([[[[1.0, 1.0], [-1.0, -2.0]]]])
    mask = (target >= 0).double()  # [[1, 1], [0, 0]]
    mmse = ((0.5 - 1) ** 2 + (2 - 1) ** 2) / 2  # 0.625
    s = [0.975, 3.9 / 3.85, 0.0, 0.0]  # sigma_k of the prediction, clamped below at 0
    dice = 1 - 2 * (s[0] + s[1]) / (sum(s) + 2 + 1e-6)
    return pred, target, mask, mmse, dice


@pytest.mark.parametrize("lam", [0.5, 0.3])
def test_spotlight_loss_by_hand_both_label_layouts(lam):
    pred, target, mask, mmse, dice = _by_hand_case()
    loss = SpotlightLoss(lambda_mse=lam)
    expect = lam * mmse + (1 - lam) * dice
    assert float(loss(pred, torch.cat([target, mask], 1))) == pytest.approx(expect, rel=1e-12)
    # a 1-channel label: mask = target >= fg_threshold (0 after Otsu standardisation)
    assert float(loss(pred, target)) == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="channels"):
        loss(pred, torch.cat([target, mask, mask], 1))


@pytest.mark.parametrize("clamp,s", [("none", [0.975, 3.9 / 3.85, -1.0, 0.0]), ("both", [0.975, 1.0, 0.0, 0.0])])
def test_spotlight_other_clamps_by_hand(clamp, s):
    pred, target, mask, mmse, _ = _by_hand_case()
    dice = 1 - 2 * (s[0] + s[1]) / (sum(s) + 2 + 1e-6)
    got = float(SpotlightLoss(clamp=clamp)(pred, torch.cat([target, mask], 1)))
    assert got == pytest.approx(0.5 * mmse + 0.5 * dice, rel=1e-12)


def test_spotlight_empty_masks_are_finite_and_defined():
    torch.manual_seed(0)
    pred = torch.randn(2, 1, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 1, 4, 8, 8)
    empty = torch.zeros_like(target)
    loss = SpotlightLoss()
    # no foreground anywhere: Dice term 0, MMSE falls back to plain MSE
    val = loss(pred, torch.cat([target, empty], 1))
    assert torch.isfinite(val)
    assert float(val.detach()) == pytest.approx(0.5 * float(((pred - target) ** 2).mean()), rel=1e-6)
    val.backward()
    assert torch.isfinite(pred.grad).all()
    # one sample empty, one not: Dice averages over the sample with foreground only
    mask = torch.stack([empty[0], (target[1] >= 0).float()])
    lab = torch.cat([target, mask], 1)
    mm = masked_mse(pred, target, mask).mean()
    d1 = soft_dice_loss(soft_threshold(pred[1:]), mask[1:])[0, 0]
    assert float(loss(pred, lab).detach()) == pytest.approx(float((0.5 * mm + 0.5 * d1).detach()), rel=1e-6)


def _viscy_spotlight():
    """VisCy's SpotlightLoss from the installed viscy-utils, loaded by file (its package __init__
    imports lightning, which the loss does not need)."""
    spec = importlib.util.find_spec("viscy_utils")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("viscy-utils not installed (PyPI viscy-utils 0.1.0 declares Python >= 3.12 and numpy >= 2.4; "
                    "install with: pip install --no-deps --ignore-requires-python viscy-utils==0.1.0)")
    path = os.path.join(spec.submodule_search_locations[0], "losses", "spotlight.py")
    if not os.path.isfile(path):
        pytest.skip(f"viscy-utils has no {path}")
    mspec = importlib.util.spec_from_file_location("_viscy_spotlight", path)
    mod = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(mod)
    except Exception as e:  # pragma: no cover - depends on the installed version
        pytest.skip(f"viscy-utils' spotlight.py cannot be imported: {e}")
    return mod.SpotlightLoss


@pytest.mark.parametrize("lam,k", [(0.5, -0.95), (0.7, -0.8)])
def test_equals_viscy_spotlight_loss(lam, k):
    Viscy = _viscy_spotlight()
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 1, 6, 12, 12, generator=g, dtype=torch.float64)
    target = torch.randn(3, 1, 6, 12, 12, generator=g, dtype=torch.float64)
    mask = (target >= 0).double()  # every sample has foreground and background: the definitions agree
    ours = SpotlightLoss(lambda_mse=lam, k=k, clamp="both")  # VisCy clamps sigma_k to [0, 1]
    theirs = Viscy(lambda_mse=lam, sigmoid_k=k, eps=1e-6)
    a = ours(pred, torch.cat([target, mask], 1))
    np.testing.assert_allclose(float(a), float(theirs(pred, target, fg_mask=mask)), rtol=1e-6)
    np.testing.assert_allclose(float(ours(pred, target)), float(Viscy(lam, k, 1e-6, fg_threshold=0.0)(pred, target)),
                               rtol=1e-6)
    # gradients agree too
    p1 = pred.clone().requires_grad_(True)
    p2 = pred.clone().requires_grad_(True)
    ours(p1, torch.cat([target, mask], 1)).backward()
    theirs(p2, target, fg_mask=mask).backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ Otsu standardisation and masks
def _bimodal(seed=0, shape=(8, 24, 24)):
    rng = np.random.default_rng(seed)
    x = rng.normal(100, 5, shape)
    x[:, 6:14, 6:14] += 200 + rng.normal(0, 20, (shape[0], 8, 8))
    return x.astype(np.float32)


def test_otsu_standardize_by_hand_and_metadata():
    x = _bimodal()
    img = np.stack([x, 2 * x + 7])
    th = [threshold_otsu(img[c].astype(np.float64)) for c in range(2)]
    sd = [img[c].astype(np.float64).std() for c in range(2)]
    out = OtsuStandardize()(img)
    for c in range(2):
        np.testing.assert_allclose(out[c], (img[c] - th[c]) / sd[c], rtol=1e-5, atol=1e-5)
    # affine intensity changes do not change the result (threshold and std scale together)
    np.testing.assert_allclose(out[0], out[1], atol=1e-4)
    mt = OtsuStandardized("im")({"im": MetaTensor(torch.as_tensor(img))})["im"]
    assert isinstance(mt, MetaTensor)
    np.testing.assert_allclose(mt.meta["otsu_threshold"], th, rtol=1e-6)
    np.testing.assert_allclose(mt.meta["otsu_std"], sd, rtol=1e-6)
    # a constant channel has no threshold: all zeros, never NaN
    const = OtsuStandardize()(np.full((1, 4, 4, 4), 3.0, np.float32))
    assert np.array_equal(const, np.zeros((1, 4, 4, 4)))


def test_otsu_mask_per_image_and_per_patch():
    x = _bimodal(1)[None]
    ref = x >= threshold_otsu(x[0].astype(np.float64))
    np.testing.assert_array_equal(ForegroundMask("otsu")(x) > 0, ref)
    # per-image recipe: after Otsu standardisation a fixed threshold 0 gives the same foreground ...
    z = OtsuStandardize()(x)
    np.testing.assert_array_equal(ForegroundMask(0.0)(z) > 0, ref)
    # ... on any crop, while a per-patch Otsu of a background-only crop splits its noise in two
    crop = z[:, :, 16:, 16:]
    assert not (ForegroundMask(0.0)(crop) > 0).any()
    per_patch = ForegroundMask("otsu")(crop) > 0
    assert 0.2 < per_patch.mean() < 0.8
    np.testing.assert_array_equal(per_patch, crop >= threshold_otsu(crop[0].astype(np.float64)))
    # constant: empty mask for "otsu"; dictionary twin keeps the source
    assert not ForegroundMask("otsu")(np.ones((1, 3, 3, 3))).any()
    d = ForegroundMaskd("label", output_keys="fg", threshold=0.0)({"label": torch.as_tensor(z)})
    assert set(d) == {"label", "fg"} and torch.equal(d["fg"] > 0, torch.as_tensor(ref))
    assert otsu_threshold(np.ones(5)) is None
    with pytest.raises(ValueError, match="otsu"):
        ForegroundMask("mean")


def test_foreground_pearson_metric_equals_masked_pearson():
    g = torch.Generator().manual_seed(2)
    p, y = torch.randn(3, 1, 4, 8, 8, generator=g), torch.randn(3, 1, 4, 8, 8, generator=g)
    got = ForegroundPearsonMetric(threshold=0.2)(p, y).numpy().ravel()
    want = [pearson_r(p[i].numpy(), y[i].numpy(), mask=y[i].numpy() >= 0.2) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------------ foreground-aware patches
def test_window_counts_equals_brute_force():
    m = np.random.default_rng(0).random((7, 9, 8)) > 0.7
    roi = (3, 4, 5)
    got = _window_counts(m, roi)
    want = np.array([[[m[z:z + 3, y:y + 4, x:x + 5].sum() for x in range(4)] for y in range(6)] for z in range(5)])
    np.testing.assert_array_equal(got, want)


def _sparse_volume():
    """Otsu-standardised-like label: background -1, one 3-voxel foreground speck; image encodes position."""
    label = np.full((1, 20, 40, 40), -1.0, np.float32)
    label[0, 15, 31, 30:33] = 1.0
    image = np.arange(20 * 40 * 40, dtype=np.float32).reshape(1, 20, 40, 40)
    return image, label


def test_patch_sampler_never_below_threshold_when_a_patch_exists():
    image, label = _sparse_volume()
    roi = (8, 16, 16)
    # 3 / 2048 >= 0.1%: only patches containing the whole speck qualify (a small fraction of positions)
    tr = RandForegroundPatchd(["image", "label"], fg_key="label", roi_size=roi, min_fraction=0.001, max_tries=1)
    tr.set_random_state(0)
    fallbacks = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a qualifying patch exists: never a warning
        for _ in range(60):
            out = tr({"image": torch.as_tensor(image), "label": torch.as_tensor(label)})
            lab, img = out["label"].numpy(), out["image"].numpy()
            assert lab.shape == (1, *roi)
            assert (lab >= 0).sum() >= 3 and tr.last_fraction >= 0.001
            # image and label were cut at the same position
            z0, rem = divmod(int(img[0, 0, 0, 0]), 1600)
            y0, x0 = divmod(rem, 40)
            np.testing.assert_array_equal(lab, label[:, z0:z0 + 8, y0:y0 + 16, x0:x0 + 16])
            fallbacks += tr.last_tries > 1
    assert fallbacks > 30  # random single tries mostly miss: the exhaustive fallback was exercised


def test_patch_sampler_warns_and_returns_best_when_none_exists():
    image, label = _sparse_volume()
    label[0, 15, 31, 31:33] = -1.0  # 1 foreground voxel: no 2048-voxel patch reaches 0.1%
    tr = RandForegroundPatchd(["image", "label"], fg_key="label", roi_size=(8, 16, 16), max_tries=3)
    tr.set_random_state(1)
    with pytest.warns(UserWarning, match="no .* patch anywhere"):
        out = tr({"image": torch.as_tensor(image), "label": torch.as_tensor(label)})
    assert (out["label"] >= 0).sum() == 1  # the best available: it contains the speck
    with pytest.raises(ValueError, match="pad it first"):
        tr({"image": torch.as_tensor(image[:, :4]), "label": torch.as_tensor(label[:, :4])})


def test_patch_sampler_per_patch_otsu_and_mask_key():
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 1, (1, 16, 32, 32)).astype(np.float32)
    vol[0, 4:12, 8:20, 8:20] += 8
    tr = RandForegroundPatchd(["label"], fg_key="label", roi_size=(8, 16, 16), min_fraction=0.3, max_tries=50,
                              fg_threshold="otsu")
    tr.set_random_state(0)
    for _ in range(10):
        out = tr({"label": torch.as_tensor(vol)})
        frac = (ForegroundMask("otsu")(out["label"]) > 0).float().mean().item()
        assert frac >= 0.3 and frac == pytest.approx(tr.last_fraction)
    # a precomputed mask key (fg_threshold=None): > 0.5 is foreground
    mask = np.zeros((1, 16, 32, 32), np.float32)
    mask[0, 0:2, 0:3, 0:3] = 1
    tr = RandForegroundPatchd(["m"], fg_key="m", roi_size=(8, 16, 16), min_fraction=0.004, max_tries=1,
                              fg_threshold=None)
    tr.set_random_state(3)
    for _ in range(10):
        assert tr({"m": torch.as_tensor(mask)})["m"].sum() >= 0.004 * 2048


K = -0.95
POINTS = [-2.0, -1.0, -0.5, -0.1, 0.1, 0.5, 0.99, 1.5, 3.0]  # below -1, between -1 and 0, (0, 1), above 1


def _raw(x, k=K):
    return (x - k * x) / (k - 2 * k * abs(x) + 1)


def _slope(x, k=K):  # d sigma_k / dx, by hand
    return (1 - k) * (1 + k) / (1 + k - 2 * k * abs(x)) ** 2


def _expected(variant, x):
    r, g = _raw(x), _slope(x)
    if variant == "none":
        return r, g
    if variant == "min":
        return (r, g) if r > 0 else (0.0, 0.0)
    if variant == "both":
        return (min(max(r, 0.0), 1.0), g if 0 < r < 1 else 0.0)
    # rescaled: (clamp(sigma, -1, 1) + 1) / 2
    return ((min(max(r, -1.0), 1.0) + 1) / 2, g / 2 if -1 < r < 1 else 0.0)


@pytest.mark.parametrize("variant", ["min", "both", "none", "rescaled"])
@pytest.mark.parametrize("x", POINTS)
def test_soft_threshold_variants_value_and_gradient_by_hand(variant, x):
    from common.spotlight import soft_threshold

    t = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    y = soft_threshold(t, K, variant)
    y.sum().backward()
    want_v, want_g = _expected(variant, x)
    assert y.item() == pytest.approx(want_v, abs=1e-9)
    assert t.grad.item() == pytest.approx(want_g, abs=1e-9)


def test_rescaled_variant_pulls_background_down_between_minus_one_and_zero():
    """Only the rescaled variant gives the Dice term a gradient on a background voxel predicted at -0.5
    (pushing it further down); min-clamp and [0, 1] clamp give none there."""
    from common.spotlight import SpotlightLoss

    pred = torch.tensor([1.0, 1.0, -0.5, -0.5]).reshape(1, 1, 2, 2).requires_grad_(True)
    target = torch.tensor([1.0, 1.0, -1.0, -1.0]).reshape(1, 1, 2, 2)
    label = torch.cat([target, (target > 0).float()], 1)
    grads = {}
    for variant in ("min", "both", "rescaled"):
        pred.grad = None
        SpotlightLoss(lambda_mse=0.0, k=K, clamp=variant)(pred, label).backward()
        grads[variant] = pred.grad.flatten()[2].item()
    assert grads["min"] == 0.0 and grads["both"] == 0.0
    assert grads["rescaled"] > 0  # gradient descent lowers the background voxel

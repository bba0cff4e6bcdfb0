"""Tests for common.metrics: values checked against scikit-image / scipy / cellpose and by hand."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from scipy.stats import pearsonr
from skimage.measure import label
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common import metrics as M

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------------
# image similarity
# ----------------------------------------------------------------------------------
def _pair3d(shape=(12, 20, 24), seed=0):
    rng = np.random.default_rng(seed)
    t = ndi.gaussian_filter(rng.random(shape), 1.5)
    p = t + 0.05 * rng.standard_normal(shape)
    return p, t


def test_pearson_matches_scipy_whole_and_masked():
    p, t = _pair3d()
    assert M.pearson_r(p, t) == pytest.approx(pearsonr(p.ravel(), t.ravel())[0], abs=1e-12)
    mask = t > np.median(t)
    assert M.pearson_r(p, t, mask=mask) == pytest.approx(pearsonr(p[mask], t[mask])[0], abs=1e-12)
    assert M.pearson_r(-p, t) == pytest.approx(-M.pearson_r(p, t), abs=1e-12)


def test_pearson_constant_is_zero_not_nan():
    t = RNG.random((8, 8))
    assert M.pearson_r(np.full((8, 8), 0.1), t) == 0.0
    assert M.pearson_r(t, np.full((8, 8), 3.0)) == 0.0
    with pytest.raises(ValueError, match="empty"):
        M.pearson_r(t, t, mask=np.zeros((8, 8), bool))


def test_psnr_matches_skimage_and_hand():
    p, t = _pair3d()
    ref = peak_signal_noise_ratio(t, p, data_range=t.max() - t.min())
    assert M.psnr(p, t) == pytest.approx(ref, rel=1e-12)
    assert M.psnr(p, t, data_range=2.0) == pytest.approx(peak_signal_noise_ratio(t, p, data_range=2.0), rel=1e-12)
    # by hand: MSE = 1/4, range 3 -> 10 log10(9 / 0.25) = 10 log10(36)
    target = np.array([[0.0, 1.0], [2.0, 3.0]])
    pred = target + np.array([[0.0, 0.0], [0.0, 1.0]])
    assert M.psnr(pred, target) == pytest.approx(10 * np.log10(36.0), rel=1e-12)
    # masked by hand: voxels {1, 3} -> target {1, 3}, pred {1, 4}: MSE 1/2; range of the
    # whole target (3) -> 10 log10(9 / 0.5)
    mask = np.array([[False, True], [False, True]])
    assert M.psnr(pred, target, mask=mask) == pytest.approx(10 * np.log10(18.0), rel=1e-12)
    m3 = t > np.median(t)
    ref_m = peak_signal_noise_ratio(t[m3], p[m3], data_range=t.max() - t.min())
    assert M.psnr(p, t, mask=m3) == pytest.approx(ref_m, rel=1e-12)
    assert M.psnr(target, target) == np.inf
    with pytest.raises(ValueError, match="data_range"):
        M.psnr(pred, np.ones((2, 2)))


@pytest.mark.parametrize("shape", [(40, 48), (12, 20, 24)])
def test_ssim_matches_skimage_and_masked(shape):
    p, t = _pair3d(shape)
    dr = t.max() - t.min()
    ref, smap = structural_similarity(t, p, data_range=dr, full=True)
    assert M.ssim(p, t) == pytest.approx(ref, abs=1e-12)
    # all-True mask reproduces skimage (same interior crop)
    assert M.ssim(p, t, mask=np.ones(shape, bool)) == pytest.approx(ref, abs=1e-12)
    # masked by hand: mean of the map over mask & interior (pad 3 for win 7)
    mask = t > np.median(t)
    inner = np.zeros(shape, bool)
    inner[tuple(slice(3, s - 3) for s in shape)] = True
    assert M.ssim(p, t, mask=mask) == pytest.approx(smap[mask & inner].mean(), abs=1e-12)
    for sigma in (1.5, 0.8):
        g = structural_similarity(t, p, data_range=dr, gaussian_weights=True, sigma=sigma, use_sample_covariance=False)
        ours = M.ssim(p, t, gaussian_weights=True, sigma=sigma, use_sample_covariance=False)
        assert ours == pytest.approx(g, abs=1e-12)


def test_rescale_to_range_and_background_variability():
    p = np.array([2.0, 4.0, 6.0])
    np.testing.assert_allclose(M.rescale_to_range(p, -1.0, 1.0), [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(M.rescale_to_range(np.ones(3), 5.0, 9.0), [5.0, 5.0, 5.0])
    img = np.array([1.0, 3.0, 100.0, 200.0])
    fg = np.array([False, False, True, True])
    assert M.background_variability(img, fg) == pytest.approx(1.0)  # std of {1, 3}
    with pytest.raises(ValueError):
        M.background_variability(img, np.ones(4, bool))


def test_microssim_3d_runs_and_orders():
    pytest.importorskip("microssim")
    p, t = _pair3d((3, 48, 48))
    kw = dict(betas=(0.5, 0.5), kernel_size=7)
    same = M.microssim_3d(t * 3 + 1, t, **kw)
    noisy = M.microssim_3d(t + 0.3 * RNG.standard_normal(t.shape), t, **kw)
    assert same == pytest.approx(1.0, abs=1e-3)  # range-invariant: affine copy scores 1
    assert noisy < same


# ----------------------------------------------------------------------------------
# Fourier ring / shell correlation
# ----------------------------------------------------------------------------------
def test_frc_self_is_one_and_noise_is_zero():
    a = RNG.standard_normal((128, 128))
    f, c = M.fourier_ring_correlation(a, a, spacing=0.2)
    assert f.size == 64 and f[-1] < 1 / (2 * 0.2) and f[-1] > 0.95 / (2 * 0.2)
    np.testing.assert_allclose(c, 1.0, atol=1e-12)
    b = RNG.standard_normal((128, 128))
    _, c = M.fourier_ring_correlation(a, b, spacing=0.2)
    # independent noise: mean ~0 and each ring within a few standard errors, where a
    # ring k holds ~pi k independent coefficients (std ~1/sqrt(pi k), x~1.4 for Hann)
    k = np.arange(c.size)
    assert abs(c[1:].mean()) < 0.03
    assert (np.abs(c[2:]) * np.sqrt(np.pi * k[2:])).max() < 5


def test_fsc_3d_anisotropic_shells():
    a = RNG.standard_normal((16, 64, 64))
    f, c = M.fourier_ring_correlation(a, a, spacing=(0.5, 0.1, 0.1))
    # shells stop at the axial Nyquist 1/(2*0.5) = 1/um; the coarsest frequency step is
    # lateral, 1/(64*0.1) = 0.156/um -> floor(6.4) = 6 shells of width 1/6
    assert f.size == 6 and f[-1] == pytest.approx(1.0 - 1 / 12)
    np.testing.assert_allclose(c, 1.0, atol=1e-12)
    # independent noise: shell k holds ~2 pi k^2 independent coefficients, so |FSC_k|
    # shrinks like 1/k (k * |FSC_k| stays below ~0.8 without window, ~1.4 with Hann)
    a, b = RNG.standard_normal((2, 32, 64, 64))
    k = np.arange(16)
    for window, bound in (("hann", 2.5), (None, 1.5)):
        f2, c2 = M.fourier_ring_correlation(a, b, spacing=(0.2, 0.1, 0.1), window=window)
        assert f2.size == 16
        assert (np.abs(c2[2:]) * k[2:]).max() < bound


def test_frc_resolution_blur_is_worse_and_matches_theory():
    n, px, sigma_px = 256, 0.5, 2.0
    s = RNG.standard_normal((n, n))
    vn = 0.01
    sharp = [s + np.sqrt(vn) * RNG.standard_normal((n, n)) for _ in range(2)]
    blur_s = ndi.gaussian_filter(s, sigma_px, mode="wrap")
    blurred = [blur_s + np.sqrt(vn) * RNG.standard_normal((n, n)) for _ in range(2)]
    r_sharp = M.frc_resolution(*M.fourier_ring_correlation(*sharp, spacing=px))
    r_blur = M.frc_resolution(*M.fourier_ring_correlation(*blurred, spacing=px))
    assert r_blur > 1.5 * r_sharp
    assert r_sharp == pytest.approx(2 * px, rel=0.05)  # never crosses: sampling limit
    # white signal through a Gaussian (|T|^2 = exp(-4 pi^2 s^2 f^2)) + white noise:
    # FRC = T^2 / (T^2 + vn) = 1/7 at f_c = sqrt(ln(6 / vn)) / (2 pi sigma)
    f_c = np.sqrt(np.log(6 / vn)) / (2 * np.pi * sigma_px * px)
    assert r_blur == pytest.approx(1 / f_c, rel=0.1)


# ----------------------------------------------------------------------------------
# MONAI Pearson metric / handler
# ----------------------------------------------------------------------------------
def test_pearson_metric_matches_numpy_and_constant_zero():
    y_pred = torch.rand(4, 2, 8, 8)
    y = y_pred + 0.3 * torch.rand(4, 2, 8, 8)
    y_pred[2] = 0.7  # constant prediction for sample 2
    metric = M.PearsonMetric()
    per = metric(y_pred, y)
    assert per.shape == (4, 1)
    expected = [M.pearson_r(y_pred[i].numpy(), y[i].numpy()) for i in range(4)]
    assert expected[2] == 0.0
    np.testing.assert_allclose(per[:, 0].numpy(), expected, atol=1e-6)
    # lists of channel-first tensors (decollated engine output) give the same values
    per_list = metric(list(y_pred[:2]), list(y[:2]))  # also a second accumulated iteration
    np.testing.assert_allclose(per_list[:, 0].numpy(), expected[:2], atol=1e-6)
    agg = metric.aggregate()
    assert not torch.isnan(agg).any()
    np.testing.assert_allclose(float(agg), np.mean(expected + expected[:2]), atol=1e-6)


def test_pearson_handler_in_ignite_engine():
    from ignite.engine import Engine
    from monai.handlers import from_engine

    batches = [{"pred": torch.rand(2, 1, 6, 6)} for _ in range(3)]
    for b in batches:
        b["label"] = 2 * b["pred"] + 1
    batches[1]["label"] = torch.ones(2, 1, 6, 6)  # constant target -> r = 0

    engine = Engine(lambda e, batch: batch)
    M.PearsonR(output_transform=from_engine(["pred", "label"])).attach(engine, "pearson")
    engine.run(batches, max_epochs=1)
    assert engine.state.metrics["pearson"] == pytest.approx(4 / 6, abs=1e-6)


# ----------------------------------------------------------------------------------
# instance matching and AP
# ----------------------------------------------------------------------------------
def _row(segments, n=45):
    """1 x n label image from {label: (start, stop_inclusive)}."""
    img = np.zeros((1, n), np.int32)
    for lab, (a, b) in segments.items():
        img[0, a : b + 1] = lab
    return img


GT = _row({1: (0, 9), 2: (20, 29), 3: (35, 39)})  # 10, 10, 5 px
PRED = _row({7: (0, 5), 9: (25, 32)})  # IoU 6/10 with gt 1, 5/13 with gt 2


def test_match_instances_iou_by_hand():
    iou, gi, pi = M.match_instances(GT, PRED, return_labels=True)
    np.testing.assert_allclose(iou, [[0.6, 0.0], [0.0, 5 / 13], [0.0, 0.0]])
    np.testing.assert_array_equal(gi, [1, 2, 3])
    np.testing.assert_array_equal(pi, [7, 9])
    sp = M.match_instances(GT, PRED, sparse=True)
    np.testing.assert_allclose(sp.toarray(), iou)


def test_matching_by_hand():
    m = M.matching(GT, PRED, thresholds=[0.35, 0.5, 0.65])
    np.testing.assert_array_equal(m["tp"], [2, 1, 0])
    np.testing.assert_array_equal(m["fp"], [0, 1, 2])
    np.testing.assert_array_equal(m["fn"], [1, 2, 3])
    np.testing.assert_allclose(m["ap"], [2 / 3, 1 / 4, 0.0])
    np.testing.assert_allclose(m["f1"], [4 / 5, 2 / 5, 0.0])
    np.testing.assert_array_equal(m["matched_gt"][1], [1])
    np.testing.assert_array_equal(m["matched_pred"][1], [7])


def test_matching_is_optimal_not_greedy():
    # P overlaps X (IoU 8/14) and Y (4/18); Q overlaps X only (IoU 0.2).
    # At 0.2 greedy (P-X first) finds 1 match, the optimal assignment 2 (P-Y, Q-X).
    gt = _row({1: (0, 9), 2: (10, 19)}, n=20)
    pred = _row({5: (2, 13), 6: (0, 1)}, n=20)
    m = M.matching(gt, pred, thresholds=[0.2, 0.5])
    np.testing.assert_array_equal(m["tp"], [2, 1])
    np.testing.assert_array_equal(m["matched_pred"][0], [6, 5])


def test_empty_images_have_defined_scores():
    z = np.zeros((5, 5), np.int32)
    m = M.matching(z, z, thresholds=[0.5])
    assert m["ap"][0] == 1.0 and m["f1"][0] == 1.0
    one = z.copy()
    one[1:3, 1:3] = 1
    m = M.matching(one, z, thresholds=[0.5])
    assert m["ap"][0] == 0.0 and m["fn"][0] == 1 and m["precision"][0] == 0.0
    assert M.aggregated_jaccard_index(z, z) == 1.0


def _random_labels(shape, seed, sigma=2.0, q=0.6):
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return label(field > np.quantile(field, q)).astype(np.int32), field


@pytest.mark.parametrize("shape", [(96, 96), (20, 40, 40)])
def test_average_precision_equals_cellpose(shape):
    cp_metrics = pytest.importorskip("cellpose.metrics", reason="cellpose not installed")
    gts, preds = [], []
    for seed in range(3):
        gt, field = _random_labels(shape, seed)
        noisy = field + 0.4 * field.std() * np.random.default_rng(100 + seed).standard_normal(shape)
        pred = label(ndi.gaussian_filter(noisy, 1.0) > np.quantile(field, 0.62)).astype(np.int32)
        gts.append(gt)
        preds.append(pred)
    th = np.array([0.1, 0.3, 0.5, 0.75, 0.9])
    ap, tp, fp, fn = M.average_precision(gts, preds, th)
    ap_c, tp_c, fp_c, fn_c = cp_metrics.average_precision(gts, preds, th)
    assert tp.sum() > 0 and (tp_c[:, 0] > tp_c[:, -1]).all()  # a non-trivial comparison
    np.testing.assert_array_equal(tp, tp_c)
    np.testing.assert_array_equal(fp, fp_c)
    np.testing.assert_array_equal(fn, fn_c)
    np.testing.assert_allclose(ap, ap_c, rtol=1e-6)
    # single-image call mirrors cellpose too
    ap1, tp1, _, _ = M.average_precision(gts[0], preds[0], th)
    np.testing.assert_array_equal(tp1, tp_c[0])


def test_dataset_ap_accumulates_counts():
    # image 1: one object found perfectly (AP 1); image 2: three objects missed (AP 0)
    g1 = np.zeros((10, 10), np.int32)
    g1[1:4, 1:4] = 1
    g2 = np.zeros((10, 10), np.int32)
    g2[0:2, 0:2], g2[4:6, 4:6], g2[7:9, 7:9] = 1, 2, 3
    res = M.dataset_average_precision([g1, g2], [g1.copy(), np.zeros_like(g2)], thresholds=[0.5, 0.9])
    np.testing.assert_array_equal(res["tp"], [1, 1])
    np.testing.assert_array_equal(res["fn"], [3, 3])
    np.testing.assert_allclose(res["ap"], [0.25, 0.25])  # 1 / (1 + 0 + 3)
    np.testing.assert_allclose(res["per_image_ap"].mean(0), [0.5, 0.5])  # what it must NOT be
    assert res["mAP"] == pytest.approx(0.25)
    np.testing.assert_allclose(res["f1"], [2 / 5, 2 / 5])


def test_aggregated_jaccard_index_by_hand():
    gt = _row({1: (0, 9), 2: (20, 29), 3: (35, 38)}, n=50)
    pred = _row({4: (0, 5), 5: (25, 32), 6: (40, 44)}, n=50)
    # C = 6 + 5; U = 10 + 13 (gt2 u pred5) + 4 (gt3 unmatched) + 5 (pred6 unused)
    assert M.aggregated_jaccard_index(gt, pred) == pytest.approx(11 / 32)
    assert M.aggregated_jaccard_index(gt, gt) == 1.0


def test_per_class_scores_by_hand():
    gt = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    s = M.per_class_scores(gt, pred, n_classes=4)
    np.testing.assert_allclose(s["precision"][:3], [1 / 2, 2 / 3, 1])
    np.testing.assert_allclose(s["recall"][:3], [1 / 2, 1, 1 / 2])
    np.testing.assert_allclose(s["f1"][:3], [1 / 2, 4 / 5, 2 / 3])
    np.testing.assert_allclose(s["iou"][:3], [1 / 3, 2 / 3, 1 / 2])
    assert np.isnan(s["iou"][3])  # class absent from both
    np.testing.assert_array_equal(s["support"], [2, 2, 2, 0])
    with pytest.raises(ValueError):
        M.per_class_scores(gt, pred, n_classes=2)


# ----------------------------------------------------------------------------------
# morphology
# ----------------------------------------------------------------------------------
def _ellipsoid(shape, centre, semi_axes_um, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    c = [ci * s for ci, s in zip(centre, spacing)]
    return sum(((g - ci) / a) ** 2 for g, ci, a in zip(grids, c, semi_axes_um)) <= 1.0


def test_object_features_ball_ellipsoid_and_spacing():
    r = 8.0
    lab = np.zeros((24, 24, 64), np.int32)
    lab[_ellipsoid(lab.shape, (12, 12, 12), (r, r, r), (1, 1, 1))] = 1
    lab[_ellipsoid(lab.shape, (12, 12, 44), (4, 4, 14), (1, 1, 1))] = 2
    inten = np.where(lab == 1, 5.0, 0.0) + np.where(lab == 2, 2.0, 0.0)
    f = M.object_features(lab, intensity=inten, spacing=(1, 1, 1)).set_index("label")
    ball, ell = f.loc[1], f.loc[2]
    assert ball.volume == pytest.approx(4 / 3 * np.pi * r**3, rel=0.03)
    assert ball.surface_area == pytest.approx(4 * np.pi * r**2, rel=0.1)
    assert ball.sphericity > 0.85
    assert ell.sphericity < ball.sphericity - 0.1
    assert ball.axis_major_length == pytest.approx(2 * r, rel=0.05)
    assert ell.axis_major_length == pytest.approx(28, rel=0.05)
    assert ell.axis_minor_length == pytest.approx(8, rel=0.1)
    assert ball.intensity_mean == 5.0 and ell.intensity_max == 2.0 and ball.intensity_std == 0.0

    # the same 8-um ball sampled with 2-um z steps: physical size is preserved
    sp = (2.0, 1.0, 1.0)
    lab2 = _ellipsoid((12, 24, 24), (6, 12, 12), (r, r, r), sp).astype(np.int32)
    g = M.object_features(lab2, spacing=sp).iloc[0]
    assert g.volume == pytest.approx(2.0 * lab2.sum())
    assert g.volume == pytest.approx(4 / 3 * np.pi * r**3, rel=0.05)
    assert g.axis_major_length == pytest.approx(2 * r, rel=0.1)
    assert g.axis_minor_length == pytest.approx(2 * r, rel=0.1)
    assert g.sphericity > 0.8


def test_feature_profiles_and_matched_correlation():
    shape = (20, 40, 100)
    gt = np.zeros(shape, np.int32)
    for k, rad in enumerate([3, 4, 5, 6, 7]):
        gt[_ellipsoid(shape, (10, 20, 10 + 19 * k), (rad, rad, rad + k), (1, 1, 1))] = k + 1
    pred = np.where(gt > 0, gt + 10, 0)  # same objects, other label ids
    fg = M.object_features(gt)
    fp = M.object_features(pred)
    assert M.feature_profile_distance(fg, fp) == pytest.approx(0.0, abs=1e-12)
    r = M.matched_feature_correlation(fg, fp, gt, pred)
    assert r["n_matched"] == 5
    assert r["volume"] == pytest.approx(1.0) and r["surface_area"] == pytest.approx(1.0)
    # a population of bigger objects has a different profile
    big = fp.copy()
    big["volume"] *= 3
    big["surface_area"] *= 2
    assert M.feature_profile_distance(fg, big) > 0.05


# ----------------------------------------------------------------------------------
# degenerate inputs: the project's named error or a documented value, never a silent NaN
# ----------------------------------------------------------------------------------
def test_degenerate_error_is_a_value_error_with_advice():
    assert issubclass(M.DegenerateInputError, ValueError)
    t = np.full((8, 8), 3.0)
    with pytest.raises(M.DegenerateInputError, match=r"constant target.*pass data_range explicitly"):
        M.psnr(t + 1, t)
    with pytest.raises(M.DegenerateInputError, match=r"constant target.*pass data_range explicitly"):
        M.ssim(t + 1, t)
    # with an explicit range both are defined: MSE 1, range 2 -> 10 log10(4) dB
    assert M.psnr(t + 1, t, data_range=2.0) == pytest.approx(10 * np.log10(4.0))


@pytest.mark.parametrize("fn", [M.pearson_r, M.psnr])
def test_empty_mask_is_named(fn):
    p, t = _pair3d()
    with pytest.raises(M.DegenerateInputError, match="mask is empty.*mask=None"):
        fn(p, t, mask=np.zeros(t.shape, bool))


def test_ssim_window_larger_than_image_or_mask_interior_is_named():
    p, t = _pair3d((5, 20, 24))
    with pytest.raises(M.DegenerateInputError, match="win_size=7.*smaller odd win_size"):
        M.ssim(p, t)
    p, t = _pair3d((12, 20, 24))
    border = np.zeros(t.shape, bool)
    border[0] = True  # only the first slice: no voxel 3 from the border
    with pytest.raises(M.DegenerateInputError, match="no voxel at least 3"):
        M.ssim(p, t, mask=border)


def test_background_variability_edge_cases():
    x = np.array([[1.0, 3.0], [5.0, 7.0]])
    assert M.background_variability(x, np.zeros((2, 2), bool)) == pytest.approx(np.sqrt(5.0))  # whole image
    assert M.background_variability(x, np.array([[True, True], [False, False]])) == pytest.approx(1.0)
    with pytest.raises(M.DegenerateInputError, match="covers the whole image"):
        M.background_variability(x, np.ones((2, 2), bool))


def test_microssim_3d_constant_target_and_small_slices_are_named():
    pytest.importorskip("microssim")
    rng = np.random.default_rng(3)
    t, p = rng.random((3, 40, 40)), rng.random((3, 40, 40))
    with pytest.raises(M.DegenerateInputError, match="target is constant"):
        M.microssim_3d(p, np.full_like(t, 2.0), betas=(0.5, 0.5), kernel_size=7)
    # default settings: 5 scales with an 11-px window need 176 px (the package's own error said 160)
    with pytest.raises(M.DegenerateInputError, match=r"40x40 px are smaller than the 176 px.*betas=\(0.5, 0.5\)"):
        M.microssim_3d(p, t)
    # the exact minimum of each setting works, one pixel less is the named error
    for kw, need in [({"betas": (0.5, 0.5), "kernel_size": 7}, 12), ({"kernel_size": 7}, 112), ({}, 176)]:
        a, b = rng.random((1, need, need + 3)), rng.random((1, need, need + 3))
        assert np.isfinite(M.microssim_3d(a, b, **kw))
        with pytest.raises(M.DegenerateInputError, match=f"smaller than the {need} px"):
            M.microssim_3d(a[:, 1:], b[:, 1:], **kw)


def test_microssim_3d_leaves_out_constant_target_slices():
    microssim = pytest.importorskip("microssim")
    rng = np.random.default_rng(4)
    t, p = ndi.gaussian_filter(rng.random((4, 32, 32)), 1), rng.random((4, 32, 32))
    t[0] = t[3] = 0.0  # blank (padded) slices at both ends
    kw = {"betas": (0.5, 0.5), "kernel_size": 7}
    got = M.microssim_3d(p, t, **kw)
    ref = microssim.MicroMS3IM(bg_percentile=3)
    ref.fit(t, p)
    expected = np.mean([float(ref.score(t[z], p[z], **kw)) for z in (1, 2)])
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-6)
    # the package scores a blank slice with a data range of 0 (0 here, NaN for a blank stack): arbitrary values
    # that would pull the mean; they are left out
    assert float(ref.score(t[0], p[0], **kw)) == 0.0


def test_range_psnr_metric_agrees_with_psnr_on_constant_targets():
    t = torch.ones(1, 1, 4, 4)
    p = torch.zeros(1, 1, 4, 4)
    with pytest.raises(M.DegenerateInputError):
        M.psnr(p[0, 0].numpy(), t[0, 0].numpy())
    m = M.RangePSNRMetric()
    m(p, t)
    with pytest.raises(M.DegenerateInputError, match="all 1 target.*constant"):
        m.aggregate()  # MONAI's reduction alone would return 0 dB
    # a constant target beside a real one: left out of the mean and counted
    rng = np.random.default_rng(0)
    good_t = rng.random((4, 4)).astype(np.float32)
    good_p = (good_t + 0.1).astype(np.float32)  # MSE 0.01
    m = M.RangePSNRMetric(get_not_nans=True)
    m(torch.stack([p[0], torch.as_tensor(good_p)[None]]), torch.stack([t[0], torch.as_tensor(good_t)[None]]))
    value, counted = m.aggregate()
    expected = 10 * np.log10(float(good_t.max() - good_t.min()) ** 2 / 0.01)
    assert float(value) == pytest.approx(expected, rel=1e-4) and float(counted) == 1
    assert float(value) == pytest.approx(M.psnr(good_p, good_t), rel=1e-4)


def test_range_psnr_metric_names_a_diverged_prediction():
    """A NaN prediction is not reported as a constant target (it was, when an F-net run diverged)."""
    t = torch.rand(1, 1, 4, 4)
    with pytest.raises(M.DegenerateInputError, match="prediction holds NaN"):
        M.RangePSNRMetric()(torch.full((1, 1, 4, 4), float("nan")), t)


@pytest.mark.parametrize("a, b", [(np.zeros((32, 32)), np.zeros((32, 32))),
                                  (np.ones((32, 32)), RNG.random((32, 32))),
                                  (RNG.random((8, 16, 16)), np.full((8, 16, 16), 7.0))])
def test_frc_of_a_constant_image_is_named(a, b):
    with pytest.raises(M.DegenerateInputError, match="is constant"):
        M.fourier_ring_correlation(a, b)


def test_frc_resolution_by_hand_and_degenerate_curves():
    freqs = np.array([0.1, 0.2, 0.3, 0.4])
    # first drop below 1/7 between 0.2 (0.5) and 0.3 (0.1): f_c = 0.2 + (0.5 - 1/7) * 0.1 / 0.4
    fc = 0.2 + (0.5 - 1 / 7) * 0.1 / 0.4
    assert M.frc_resolution(freqs, np.array([1.0, 0.5, 0.1, 0.0])) == pytest.approx(1 / fc)
    assert M.frc_resolution(freqs, np.array([1.0, 0.9, 0.8, 0.7])) == pytest.approx(1 / 0.4)  # never drops
    with pytest.raises(M.DegenerateInputError, match="0 in every bin"):
        M.frc_resolution(freqs, np.zeros(4))
    with pytest.raises(M.DegenerateInputError, match="NaN/inf"):
        M.frc_resolution(freqs, np.array([1.0, np.nan, 0.1, 0.0]))


def test_feature_profile_distance_without_objects_is_named():
    import pandas as pd

    a = pd.DataFrame({"label": [1, 2], "volume": [10.0, 12.0]})
    with pytest.raises(M.DegenerateInputError, match="at least one object.*got 2 and 0"):
        M.feature_profile_distance(a, a.iloc[:0])

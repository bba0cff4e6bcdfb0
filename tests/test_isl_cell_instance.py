"""isl_cell_instance building blocks: distance-map target, distance+mask loss, head, post-processing,
dataset-level instance AP (against cellpose.metrics.average_precision)."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from monai.data import MetaTensor
from skimage.measure import label as sk_label
from skimage.segmentation import relabel_sequential

from common.metrics import InstanceAP, InstanceMatchingMetric, aggregated_jaccard_index, matching
from common.isl import (DistanceMaskLoss, DistanceMaskTarget, DistanceMaskTargetd, DistanceMaskToInstances,
                        DistanceMaskToInstancesd, instance_distance_map)
from common.networks.cell_instance import DistanceMaskHead
from common.transforms import LabelFormatError, as_instance_labels


def _brute_force_distance(lab):
    """Per-instance distance to the nearest pixel of another value inside the image, by exhaustive search."""
    yy, xx = np.mgrid[: lab.shape[0], : lab.shape[1]]
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    flat = lab.ravel()
    out = np.zeros(lab.shape)
    for k in np.unique(flat[flat > 0]):
        inside = flat == k
        d = np.sqrt(((pts[inside][:, None, :] - pts[~inside][None, :, :]) ** 2).sum(-1)).min(1)
        out.ravel()[inside] = d / d.max()
    return out


def test_distance_map_square_by_hand():
    lab = np.zeros((9, 9), np.int32)
    lab[2:7, 2:7] = 3  # 5 x 5 square: centre 3 px from the background, rim 1 px
    d = instance_distance_map(lab)
    assert d.dtype == np.float32 and d[4, 4] == 1.0
    np.testing.assert_allclose(d[2, 2:7], 1 / 3)
    np.testing.assert_allclose(d[3, 3], 2 / 3)
    assert d[lab == 0].max() == 0


def test_distance_map_touching_cells_and_image_border_match_brute_force():
    lab = np.zeros((14, 20), np.int32)
    lab[2:12, 1:9] = 1
    lab[3:11, 9:15] = 2  # touches cell 1
    lab[0:5, 15:20] = 7  # cut by the top and right image borders, touches cell 2
    d = instance_distance_map(lab)
    np.testing.assert_allclose(d, _brute_force_distance(lab), atol=1e-6)
    for k in (1, 2, 7):  # every cell peaks at exactly 1
        assert d[lab == k].max() == pytest.approx(1.0)
    # touching cells are separated by a valley: pixels next to the neighbour have the smallest values
    assert d[6, 8] < 0.3 and d[6, 9] < 0.4


def test_as_instance_labels_binary_ids_and_errors():
    binary = np.zeros((1, 10, 12), np.uint8)
    binary[0, 1:4, 1:4] = 255
    binary[0, 6:9, 6:11] = 255
    lab = as_instance_labels(binary)  # "auto": one non-zero value -> connected components
    assert lab.dtype == np.int32 and lab.max() == 2 and lab[2, 2] != lab[7, 7]
    ids = binary.astype(np.int32)
    ids[0, 6:9, 6:11] = 9
    np.testing.assert_array_equal(as_instance_labels(ids)[7, 7], 9)  # ids are kept
    joined = binary.copy()
    joined[0, 3:7, 3] = 255
    joined[0, 6, 3:7] = 255  # a bridge: one component
    assert as_instance_labels(joined).max() == 1
    assert as_instance_labels(np.where(binary > 0, 5, 0), label_components=False).max() == 5
    intensity = MetaTensor(torch.rand(1, 8, 8) * 10, meta={"filename_or_obj": "/data/dic_as_label.tif"})
    with pytest.raises(LabelFormatError, match="dic_as_label.tif.*non-integer"):
        as_instance_labels(intensity)
    with pytest.raises(LabelFormatError, match="negative"):
        as_instance_labels(-np.ones((1, 4, 4), np.int32))
    with pytest.raises(LabelFormatError, match="one channel"):
        as_instance_labels(np.zeros((2, 4, 4), np.int32))


def test_distance_mask_target_dict_keeps_meta_and_instances():
    lab = np.zeros((1, 12, 12), np.float32)
    lab[0, 2:6, 2:6] = 255
    lab[0, 7:11, 5:11] = 255
    img = MetaTensor(torch.as_tensor(lab), meta={"filename_or_obj": "m.png"})
    out = DistanceMaskTargetd(keys="label", instances_key="instances")({"label": img})
    t, inst = out["label"], out["instances"]
    assert isinstance(t, MetaTensor) and t.shape == (2, 12, 12) and t.meta["filename_or_obj"] == "m.png"
    assert inst.shape == (1, 12, 12) and int(inst.max()) == 2
    np.testing.assert_array_equal(t[1].numpy(), (lab[0] > 0).astype(np.float32))
    np.testing.assert_allclose(t[0].numpy(), instance_distance_map(inst[0].numpy().astype(np.int32)))
    np.testing.assert_allclose(DistanceMaskTarget()(lab), t.numpy())  # numpy in, numpy out


def _discs(r1, r2, overlap=3, shape=(60, 90)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    c2 = 30 + r1 + r2 - overlap
    d1 = (yy - 30) ** 2 + (xx - 30) ** 2 <= r1**2
    d2 = (yy - 30) ** 2 + (xx - c2) ** 2 <= r2**2
    return d1, d2, (30, 30), (30, c2)


def _lower_peak_dynamic(d, p1, p2):
    lo, hi = 0.0, min(d[p1], d[p2])
    for _ in range(40):  # bisection on the connectivity of {d >= t}
        t = 0.5 * (lo + hi)
        lab = sk_label(d >= t, connectivity=1)
        lo, hi = (t, hi) if lab[p1] == lab[p2] else (lo, t)
    return min(d[p1], d[p2]) - lo


def _prediction(distance, mask, logit=8.0):
    """A 2-channel 'network output' [distance, mask logit] as the bundle's network produces."""
    return MetaTensor(torch.as_tensor(np.stack([distance, np.where(mask, logit, -logit)]).astype(np.float32)),
                      meta={"filename_or_obj": "pred.tif"})


@pytest.mark.parametrize("reconstruct", [False, True])
def test_postprocessing_two_touching_discs_known_distance_map(reconstruct):
    """Union distance map of two touching discs -> exactly two instances; a larger h merges them."""
    d1, d2, p1, p2 = _discs(13, 9)
    mask = d1 | d2
    dist = ndi.distance_transform_edt(mask)
    dist /= dist.max()
    dyn = _lower_peak_dynamic(dist, p1, p2)
    assert 0.2 < dyn < 0.8
    post = DistanceMaskToInstancesd(keys="pred", output_keys="pred_instances", reconstruct=reconstruct,
                                    h=dyn - 0.05)
    out = post({"pred": _prediction(dist, mask)})
    two = out["pred_instances"]
    assert isinstance(two, MetaTensor) and two.shape == (1, 60, 90) and two.dtype == torch.int32
    two = two[0].numpy()
    assert set(np.unique(two)) == {0, 1, 2} and two[p1] != two[p2]
    np.testing.assert_array_equal(two > 0, mask)  # the instances tile the predicted mask
    truth = np.where(d1, 1, np.where(d2, 2, 0))
    m = matching(truth, two, thresholds=[0.85])
    assert m["tp"][0] == 2  # each disc found, cut near the neck
    one = DistanceMaskToInstances(h=dyn + 0.05, reconstruct=reconstruct)(_prediction(dist, mask))[0].numpy()
    assert one.max() == 1
    np.testing.assert_array_equal(one > 0, mask)


def test_postprocessing_recovers_instances_from_the_training_target():
    """Target built from touching instances, fed back as a perfect prediction, gives the instances back."""
    d1, d2, _, _ = _discs(11, 11)
    truth = np.where(d1, 1, np.where(d2, 2, 0)).astype(np.int32)
    target = DistanceMaskTarget(label_components=False)(truth[None])  # per-cell distance has a valley at the border
    pred = np.stack([target[0], np.where(target[1] > 0, 6.0, -6.0)])
    lab = DistanceMaskToInstances(h=0.5, reconstruct=True)(pred)[0]
    assert lab.max() == 2
    assert matching(truth, lab, thresholds=[1.0])["tp"][0] == 2  # the same two cells, pixel for pixel (IoU 1)
    # plain h-maxima keeps every one of several equally high tops of a cell (here the truncated
    # discs' distance maps peak at 1 on separate pixels): it may split a cell but never joins two
    plain = DistanceMaskToInstances(h=0.5, reconstruct=False)(pred)[0]
    assert plain.max() > 2
    for k in np.unique(plain[plain > 0]):
        assert np.unique(truth[plain == k]).size == 1
    # a larger h than the valley depth merges them when markers are reconstructed caps
    assert DistanceMaskToInstances(h=0.98, reconstruct=True)(pred)[0].max() == 1


def test_postprocessing_threshold_clip_min_size_and_errors():
    dist = np.zeros((20, 30), np.float32)
    mask = np.zeros((20, 30), bool)
    mask[2:12, 2:12] = True
    mask[15:17, 25:27] = True  # 4-pixel speck
    dist[mask] = 0.5
    dist[~mask] = -3.0  # negative distances are clipped, not flooded
    prob = np.stack([dist, np.where(mask, 0.7, 0.2)])
    assert DistanceMaskToInstances(logits=False, mask_threshold=0.5)(prob)[0].max() == 2
    assert DistanceMaskToInstances(logits=False, mask_threshold=0.8)(prob)[0].max() == 0
    lab = DistanceMaskToInstances(logits=False, min_size=5)(prob)[0]
    assert lab.max() == 1 and lab[16, 26] == 0
    # a mask over the whole image with a nearly flat distance map is one cell, not none
    flat = np.stack([np.full((16, 16), 0.2) + 0.01 * np.random.default_rng(0).random((16, 16)), np.full((16, 16), 5.0)])
    for reconstruct in (False, True):
        np.testing.assert_array_equal(DistanceMaskToInstances(reconstruct=reconstruct)(flat)[0], 1)
    with pytest.raises(ValueError, match="distance, mask"):
        DistanceMaskToInstances()(dist[None])
    with pytest.raises(ValueError, match="NaN"):
        DistanceMaskToInstances()(np.full((2, 4, 4), np.nan))
    with pytest.raises(ValueError, match="h must be > 0"):
        DistanceMaskToInstances(h=0)


def test_distance_mask_loss_by_hand():
    pred = torch.tensor([[[[0.2, 0.9]], [[2.0, -1.0]]]])  # (B=1, C=2, 1, 2)
    label = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])
    mse = ((0.2 - 0.0) ** 2 + (0.9 - 1.0) ** 2) / 2
    bce = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))) / 2  # -log sigmoid(2), -log(1 - sigmoid(-1))
    for alpha in (1.0, 2000.0):
        assert DistanceMaskLoss(alpha=alpha)(pred, label).item() == pytest.approx(mse + alpha * bce, rel=1e-5)
    bce_w = (3.0 * np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))) / 2  # foreground pixel weighted 3x
    assert DistanceMaskLoss(alpha=1.0, pos_weight=3.0)(pred, label).item() == pytest.approx(mse + bce_w, rel=1e-5)
    # an all-background patch (empty mask) is a finite, trainable target
    p = torch.randn(2, 2, 8, 8, requires_grad=True)
    loss = DistanceMaskLoss()(p, torch.zeros(2, 2, 8, 8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        DistanceMaskLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))


def test_head_shapes_activation_and_torchscript():
    torch.manual_seed(0)
    head = DistanceMaskHead(hidden_channels=4).eval()
    x = torch.randn(2, 1, 16, 24)
    y = head(x)
    assert y.shape == (2, 2, 16, 24) and (y < 0).any()  # raw logits may be negative
    relu = DistanceMaskHead(hidden_channels=4, final_activation="relu").eval()
    assert (relu(x) >= 0).all()  # the paper's head: mask logits >= 0, i.e. sigmoid >= 0.5 everywhere
    torch.testing.assert_close(torch.jit.script(head)(x), y)
    with pytest.raises(ValueError):
        DistanceMaskHead(final_activation="sigmoid")


def _perturbed_pairs(n=5, seed=0):
    """Ground-truth cell labels (synthetic colony) and imperfect predictions: shifted, eroded, merged, missed."""
    from common.synthetic import make_dic_membrane_2d

    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        gt = make_dic_membrane_2d((96, 96), n_cells=10, seed=seed + i, pixel_size_um=0.8)["cells"]
        pred = np.roll(gt, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
        pred = np.where(ndi.binary_erosion(pred > 0, iterations=int(rng.integers(0, 3))), pred, 0)
        ids = np.unique(pred[pred > 0])
        if ids.size > 2:
            pred[pred == ids[0]] = 0  # a missed cell
            pred[pred == ids[1]] = ids[2]  # two cells merged
        pred[rng.integers(0, 80):, :5] = 999  # a false positive strip
        pairs.append((relabel_sequential(gt)[0], relabel_sequential(pred)[0]))
    return pairs


def test_instance_ap_accumulates_whole_dataset_and_equals_cellpose():
    from cellpose import metrics as cp_metrics

    pairs = _perturbed_pairs()
    th = np.round(np.arange(0.5, 1.0, 0.05), 2)
    _, tp, fp, fn = cp_metrics.average_precision([g for g, _ in pairs], [p for _, p in pairs], threshold=list(th))
    tp, fp, fn = tp.sum(0), fp.sum(0), fn.sum(0)
    ap_cp = tp / (tp + fp + fn)
    metrics = {name: InstanceMatchingMetric(name) for name in ("mAP", "ap", "f1", "aji")}
    batches = [pairs[:2], pairs[2:4], pairs[4:]]  # uneven batches, as a data loader's last one
    for batch in batches:
        y_pred = torch.as_tensor(np.stack([p for _, p in batch])[:, None])
        y = torch.as_tensor(np.stack([g for g, _ in batch])[:, None])
        for m in metrics.values():
            m(y_pred, y)
    assert metrics["mAP"].aggregate().item() == pytest.approx(ap_cp.mean(), abs=1e-6)  # cellpose: float32
    assert metrics["ap"].aggregate().item() == pytest.approx(ap_cp[0], abs=1e-6)
    assert metrics["f1"].aggregate().item() == pytest.approx(2 * tp[0] / (2 * tp[0] + fp[0] + fn[0]), abs=1e-6)
    assert metrics["aji"].aggregate().item() == pytest.approx(
        np.mean([aggregated_jaccard_index(g, p) for g, p in pairs]), abs=1e-12)
    # not the mean over the last image of every batch (the authors' evaluation code)
    last = [b[-1] for b in batches]
    _, tl, fl, nl = cp_metrics.average_precision([g for g, _ in last], [p for _, p in last], threshold=list(th))
    assert abs((tl.sum(0) / (tl.sum(0) + fl.sum(0) + nl.sum(0))).mean() - ap_cp.mean()) > 1e-3
    c_tp, c_fp, c_fn, _ = metrics["mAP"].counts()
    np.testing.assert_array_equal(c_tp, tp)
    np.testing.assert_array_equal(c_fp, fp)
    np.testing.assert_array_equal(c_fn, fn)


def test_instance_ap_end_to_end_from_network_maps_equals_cellpose():
    """Post-processed 2-channel predictions scored by the bundle's handler equal cellpose's AP."""
    from cellpose import metrics as cp_metrics

    pairs = _perturbed_pairs(n=3, seed=7)
    post = DistanceMaskToInstances(h=0.3)
    preds, gts = [], []
    for gt, p in pairs:
        maps = DistanceMaskTarget(label_components=False)(p[None].astype(np.int32))
        maps = np.stack([maps[0] + 0.05 * np.random.default_rng(1).standard_normal(maps[0].shape),
                         np.where(maps[1] > 0, 4.0, -4.0)])
        preds.append(relabel_sequential(post(maps)[0])[0])
        gts.append(gt)
    handler = InstanceAP(metric="mAP")
    handler.metric_fn([torch.as_tensor(p[None]) for p in preds], [torch.as_tensor(g[None]) for g in gts])
    _, tp, fp, fn = cp_metrics.average_precision(gts, preds, threshold=list(np.round(np.arange(0.5, 1.0, 0.05), 2)))
    tp, fp, fn = tp.sum(0), fp.sum(0), fn.sum(0)
    assert handler.metric_fn.aggregate().item() == pytest.approx((tp / (tp + fp + fn)).mean(), abs=1e-6)
    assert 0.05 < handler.metric_fn.aggregate().item() < 0.95  # a non-trivial case


def test_instance_ap_empty_images_and_bad_arguments():
    m = InstanceMatchingMetric("mAP")
    z = torch.zeros(1, 1, 8, 8, dtype=torch.int32)
    m(z, z)
    assert m.aggregate().item() == 1.0  # nothing to find, nothing found
    one = z.clone()
    one[..., 2:5, 2:5] = 1
    m(z, one)  # a missed cell
    assert m.aggregate().item() == 0.0
    with pytest.raises(ValueError, match="not among the thresholds"):
        InstanceMatchingMetric("ap", iou_threshold=0.52)
    with pytest.raises(ValueError, match="metric must be"):
        InstanceMatchingMetric("dice")

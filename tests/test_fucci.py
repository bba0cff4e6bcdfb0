"""unet3d_fucci building blocks: ground truth, losses, preprocessing, network, instances, evaluation
score, FUCCI phase rules. Values by hand or against an independent implementation."""

import math
import os

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from monai.data import MetaTensor

from common import fucci as F
from common.fucci import (CLAHE, BackgroundThreshold, BackgroundThresholdd, CLAHEd, GammaCorrection, MedianFilter,
                          TopHatRemoval)
from common.losses import SoftmaxFocalLoss, WeightedCrossEntropyLoss, WeightedSoftIoULoss, make_class_loss
from common.networks.unet3d import UNet3D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ ground truth


def _edge_by_definition(inst, footprint):
    """Independent implementation: union over instances of dilation(M_k) minus M_k."""
    edge = np.zeros(inst.shape, bool)
    for k in np.unique(inst)[1:]:
        m = inst == k
        edge |= ndi.binary_dilation(m, structure=footprint) & ~m
    return edge


def _toy_instances():
    inst = np.zeros((3, 16, 20), np.int32)
    inst[1, 2:6, 2:6] = 1  # isolated square
    inst[0:3, 8:12, 3:7] = 2  # a column through all slices
    inst[1, 3:9, 10:14] = 3  # 3 and 4 touch along x = 13 | 14
    inst[1, 3:9, 14:18] = 4
    return inst


@pytest.mark.parametrize("per_slice", [True, False])
@pytest.mark.parametrize("width", [1, 2])
def test_semantic_edge_exactly_dilation_minus_mask(per_slice, width):
    inst = _toy_instances()
    sem = F.semantic_from_instances(inst, edge_width=width, per_slice=per_slice)
    edge = _edge_by_definition(inst, F.edge_footprint(width, per_slice))
    assert sem.dtype == np.uint8 and set(np.unique(sem)) <= {0, 1, 2}
    np.testing.assert_array_equal(sem == F.EDGE, edge)
    np.testing.assert_array_equal(sem == F.NUCLEUS, (inst > 0) & ~edge)
    np.testing.assert_array_equal(sem == F.BACKGROUND, (inst == 0) & ~edge)


def test_semantic_by_hand_single_voxel_and_touching_pair():
    inst = np.zeros((3, 5, 5), np.int32)
    inst[1, 2, 2] = 1
    sem = F.semantic_from_instances(inst)  # per slice, width 1: the 4-neighbours in the same slice
    want = np.zeros((3, 5, 5), np.uint8)
    want[1, 2, 2] = 2
    want[1, [1, 3, 2, 2], [2, 2, 1, 3]] = 1
    np.testing.assert_array_equal(sem, want)
    sem3 = F.semantic_from_instances(inst, per_slice=False)  # 3D: z-neighbours too
    assert sem3[0, 2, 2] == 1 and sem3[2, 2, 2] == 1 and sem3[1, 1, 1] == 0
    # two touching 1-voxel-wide bars: each one's ring lies on the other, so both become edge
    pair = np.zeros((1, 3, 4), np.int32)
    pair[0, :, 1], pair[0, :, 2] = 1, 2
    np.testing.assert_array_equal(F.semantic_from_instances(pair)[0], np.ones((3, 4), np.uint8))


def test_clean_instances_per_slice_min_area_and_smoothing():
    inst = np.zeros((3, 12, 12), np.int32)
    inst[0, 2:4, 2:4] = 1  # 4 px cross-section in slice 0
    inst[1, 2:8, 2:8] = 1  # 36 px in slice 1
    inst[2, 9:11, 9:10] = 2  # 2 px only: the whole instance goes
    out = F.clean_instances(inst, min_area=5)
    assert out.dtype == np.int32
    assert not out[0].any() and (out[1] == 1).sum() == 36 and not (out == 2).any()
    # smoothing removes a 1-px spike and never takes pixels of a neighbour
    sq = np.zeros((1, 16, 16), np.int32)
    sq[0, 4:12, 4:12] = 1
    sq[0, 7, 12] = 1  # spike
    sq[0, 4:12, 13:15] = 2
    sm = F.clean_instances(sq, smooth_sigma=1.0)
    assert sm[0, 7, 12] == 0 and sm[0, 8, 8] == 1
    assert not np.any((sq == 2) & (sm == 1))


def test_prepare_ground_truth_returns_semantic_and_clean_instances():
    inst = _toy_instances()
    inst[2, 14, 0] = 9  # a 1-px speck
    sem, clean = F.prepare_ground_truth(inst, min_area=2)
    assert 9 not in clean and set(np.unique(clean)) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(sem, F.semantic_from_instances(clean))


# ------------------------------------------------------------------------------------------ losses


def test_weighted_cross_entropy_by_hand():
    # two voxels, 3 classes; probabilities softmax([0, 0, ln 2]) = [1/4, 1/4, 1/2]
    logits = torch.tensor([[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]).T.reshape(1, 3, 1, 1, 2)
    label = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 1, 2)
    w = [1.0, 3.0, 2.0]
    want = (3 * -math.log(0.25) + 2 * -math.log(0.5)) / (3 + 2)
    assert WeightedCrossEntropyLoss(w)(logits, label).item() == pytest.approx(want, rel=1e-6)
    assert WeightedCrossEntropyLoss(None)(logits, label).item() == pytest.approx(
        (-math.log(0.25) - math.log(0.5)) / 2, rel=1e-6)


def test_focal_loss_by_hand_and_gamma0_is_cross_entropy():
    logits = torch.tensor([[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]).T.reshape(1, 3, 1, 1, 2)
    label = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 1, 2)
    w = [1.0, 3.0, 2.0]
    want = (3 * (1 - 0.25) ** 2 * -math.log(0.25) + 2 * (1 - 0.5) ** 2 * -math.log(0.5)) / 2
    assert SoftmaxFocalLoss(2.0, w)(logits, label).item() == pytest.approx(want, rel=1e-5)
    x = torch.randn(2, 3, 4, 5, 6)
    y = torch.randint(0, 3, (2, 1, 4, 5, 6)).float()
    assert SoftmaxFocalLoss(0.0)(x, y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(x, y[:, 0].long()).item(), rel=1e-5)


def test_weighted_soft_iou_by_hand():
    # 2 voxels: p = [1/4, 1/4, 1/2] at both; labels 1 and 2
    logits = torch.tensor([[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]).T.reshape(1, 3, 1, 1, 2)
    label = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 1, 2)
    # IoU_c = sum p y / sum(p + y - p y)
    iou0 = 0.0 / (0.5 + 0 - 0)
    iou1 = 0.25 / (0.5 + 1 - 0.25)
    iou2 = 0.5 / (1.0 + 1 - 0.5)
    w = [1.0, 3.0, 2.0]
    want = (1 * (1 - iou0) + 3 * (1 - iou1) + 2 * (1 - iou2)) / 6
    assert WeightedSoftIoULoss(w)(logits, label).item() == pytest.approx(want, abs=1e-4)
    # a perfect one-hot prediction has (nearly) zero loss; the factory gives the same modules
    perfect = torch.nn.functional.one_hot(label[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float() * 50
    assert make_class_loss("soft_iou", w)(perfect, label).item() < 1e-4


def test_losses_reject_instance_maps_and_backprop():
    x = torch.randn(1, 3, 2, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="class indices"):
        make_class_loss("weighted_ce")(x, torch.full((1, 1, 2, 4, 4), 7.0))
    with pytest.raises(ValueError, match="unknown loss"):
        make_class_loss("dice++")
    y = torch.randint(0, 3, (1, 1, 2, 4, 4)).float()
    for name in ("weighted_ce", "focal", "soft_iou"):
        loss = make_class_loss(name)(x, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------- preprocessing


def test_preprocessing_steps_shapes_ranges_and_values():
    rng = np.random.default_rng(0)
    img = MetaTensor(torch.as_tensor(rng.random((2, 4, 32, 32), dtype=np.float32)),
                     affine=torch.diag(torch.tensor([5.0, 0.5, 0.5, 1.0])))
    for t in (BackgroundThreshold(0.3), GammaCorrection(0.5), CLAHE(0.02, (4, 4)), MedianFilter((1, 3, 3)),
              TopHatRemoval((0, 2, 2))):
        out = t(img)
        assert isinstance(out, MetaTensor) and out.shape == img.shape and out.dtype == torch.float32
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        assert np.allclose(out.pixdim, (5.0, 0.5, 0.5))
    x = np.array([[[[0.1, 0.25, 0.5, 1.0]]]], np.float32)  # CZYX
    np.testing.assert_allclose(BackgroundThreshold(0.3)(x), [[[[0, 0, 0.5, 1.0]]]])
    np.testing.assert_allclose(GammaCorrection(0.5)(x), np.sqrt(x), rtol=1e-6)
    assert GammaCorrection(2.0, enabled=False)(x) is x
    # numpy in -> numpy out; dict twin
    d = BackgroundThresholdd(keys="image", threshold=0.3)({"image": x})
    assert isinstance(d["image"], np.ndarray)


def test_clahe_raises_local_contrast_per_slice():
    # a dim and a bright half: CLAHE brings up detail in the dim half, range stays [0, 1]
    rng = np.random.default_rng(1)
    img = np.zeros((1, 2, 64, 64), np.float32)
    img[0, :, :, :32] = 0.1 + 0.02 * rng.random((2, 64, 32))
    img[0, :, :, 32:] = 0.8 + 0.2 * rng.random((2, 64, 32))
    out = CLAHE(0.03, (4, 4))(img)
    assert out[0, :, :, :32].std() > 3 * img[0, :, :, :32].std()
    assert CLAHE((0.01), (8, 8)).kernel_size((3, 64, 48)) == (1, 8, 6)
    assert CLAHE(0.01, (2, 4, 4)).kernel_size((6, 64, 48)) == (3, 16, 12)
    const = np.full((1, 2, 8, 8), 0.5, np.float32)
    np.testing.assert_array_equal(CLAHEd(keys="i")({"i": const})["i"], const)


def test_median_and_tophat_remove_small_bright_things_keep_nuclei():
    img = np.zeros((1, 1, 32, 32), np.float32)
    yy, xx = np.mgrid[:32, :32]
    img[0, 0][(yy - 16) ** 2 + (xx - 16) ** 2 <= 36] = 0.6  # a nucleus, radius 6
    img[0, 0, 3, 3] = 1.0  # a 1-px artefact
    med = MedianFilter((1, 3, 3))(img)
    assert med[0, 0, 3, 3] == 0 and med[0, 0, 16, 16] == pytest.approx(0.6)
    top = TopHatRemoval((0, 2, 2))(img)
    assert top[0, 0, 3, 3] == 0 and top[0, 0, 16, 16] == pytest.approx(0.6)
    assert np.all(top <= img + 1e-7)


def test_library_steps_match_the_hand_written_ones():
    """MedianFilter is MONAI's MedianSmooth: the values of scipy's median_filter(mode="nearest");
    BackgroundThreshold is MONAI's ThresholdIntensity: values up to the threshold become 0."""
    import scipy.ndimage as ndi

    x = np.random.default_rng(3).random((2, 5, 24, 20), dtype=np.float32)
    for size in [(1, 3, 3), (3, 3, 3), 3, (1, 5, 1)]:
        ref = np.stack([ndi.median_filter(c, size=size, mode="nearest") for c in x])
        np.testing.assert_array_equal(MedianFilter(size)(x), ref)
    with pytest.raises(ValueError, match="odd"):
        MedianFilter((1, 2, 2))
    y = np.array([[[[0.0, 0.2999, 0.3, 0.3001, 1.0]]]], np.float32)
    np.testing.assert_array_equal(BackgroundThreshold(0.3)(y), np.where(y > np.float32(0.3), y, 0))


def test_preprocessing_rejects_unscaled_input():
    with pytest.raises(ValueError, match=r"expects intensities in \[0, 1\].*ScaleIntensityRangePercentilesd"):
        CLAHE()(np.full((1, 2, 8, 8), 300.0, np.float32))
    with pytest.raises(ValueError, match="gamma must be > 0"):
        GammaCorrection(0)


# ------------------------------------------------------------------------------------------ network


def test_unet3d_shapes_levels_and_torchscript():
    net = UNet3D(in_channels=2, out_channels=3, features=[4, 8, 16])
    assert net.size_multiple == (4, 4, 4)
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool3d)]
    ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert len(pools) == 2 and len(ups) == 2 and net.head.kernel_size == (1, 1, 1)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    x = torch.randn(1, 2, 8, 16, 12)
    y = net(x)
    assert y.shape == (1, 3, 8, 16, 12)
    ts = torch.jit.script(net)
    torch.testing.assert_close(ts(x), y)
    aniso = UNet3D(1, 3, [4, 8, 16], pool_size=(1, 2, 2))
    assert aniso.size_multiple == (1, 4, 4) and aniso(torch.randn(1, 1, 3, 8, 8)).shape == (1, 3, 3, 8, 8)
    with pytest.raises(ValueError, match="norm"):
        UNet3D(norm="group")


# ---------------------------------------------------------------------------------------- instances


def _two_touching_balls():
    zz, yy, xx = np.mgrid[:16, :32, :48]
    a = (zz - 8) ** 2 + (yy - 16) ** 2 + (xx - 14) ** 2 <= 64
    b = (zz - 8) ** 2 + (yy - 16) ** 2 + (xx - 29) ** 2 <= 64
    gt = np.zeros(a.shape, np.int32)
    gt[a] = 1
    gt[b & ~a] = 2
    prob = np.zeros((3,) + a.shape, np.float32)
    prob[0] = 1.0
    prob[:, a | b] = np.array([0.0, 0.1, 0.9])[:, None]
    return gt, prob


def test_watershed_splits_touching_nuclei_that_connected_components_merge():
    from common.metrics import matching

    gt, prob = _two_touching_balls()
    cc = F.instances_connected_components(prob)
    ws = F.instances_watershed(prob, spacing=(1.0, 1.0, 1.0), h_um=1.0)
    assert cc.max() == 1
    assert ws.max() == 2
    assert matching(gt, ws, thresholds=[0.8])["tp"][0] == 2
    # the semantic map gives the same connected components
    sem = np.argmax(prob, 0)
    np.testing.assert_array_equal(F.instances_connected_components(sem), cc)
    with pytest.raises(ValueError, match="unknown instance method"):
        F.instances_from_prediction(prob, method="magic")


def test_colour_change_by_hand():
    a, b = np.array([10.0, 0.0, 5.0]), np.array([5.0, 0.0, 5.0])
    assert F.colour_change(a, b, [1.0, 1.0, 1.0]) == pytest.approx(0.5)  # |10 - 5| / 10
    assert F.colour_change(a, b, [20.0, 1.0, 1.0]) == pytest.approx(0.25)  # |10 - 5| / floor 20
    assert F.colour_change(a, a, [1.0, 1.0, 1.0]) == 0.0
    # off in both (leakage 0.5 vs 0): the floor keeps it small; on vs off is 1
    assert F.colour_change([0.5, 100.0], [0.0, 0.0], [25.0, 25.0]) == pytest.approx(1.0)
    assert F.colour_change([[0.5, 100.0]], [[0.0, 100.0]], [25.0, 25.0]).tolist() == [pytest.approx(0.02)]


def test_split_by_reporter_change_cuts_stacked_nuclei_of_different_colour():
    lab = np.zeros((6, 8, 12), np.int32)
    lab[0:4, 2:6, 1:5] = 1  # slices 0-1 red, 2-3 green: two stacked nuclei merged into one instance
    lab[0:3, 2:6, 7:11] = 2  # one red nucleus over 3 slices, 10% dimmer per slice: kept
    lab[5, 2:4, 1:3] = 3  # one slice only: never cut
    img = np.zeros((2, 6, 8, 12))
    img[0][lab == 1] = 100.0
    img[0, 2:4][lab[2:4] == 1] = 0.0
    img[1, 2:4][lab[2:4] == 1] = 100.0
    for z in range(3):
        img[0, z][lab[z] == 2] = 100.0 * 0.9 ** z
    img[:, 5][:, lab[5] == 3] = 50.0
    out = F.split_by_reporter_change(lab, img, tol=0.45, background=0.0)
    assert out.dtype == np.int32 and out.max() == 4
    assert len(np.unique(out[0:2][lab[0:2] == 1])) == 1 and len(np.unique(out[2:4][lab[2:4] == 1])) == 1
    assert out[0, 3, 2] != out[2, 3, 2]  # the cut lies between slices 1 and 2
    assert len(np.unique(out[lab == 2])) == 1 and len(np.unique(out[lab == 3])) == 1
    np.testing.assert_array_equal(out > 0, lab > 0)  # only labels change, never the foreground
    # a tolerance above every change keeps the input; min_size drops the 4-voxel one-slice nucleus
    keep = F.split_by_reporter_change(lab, img, tol=1.5, background=0.0)
    assert keep.max() == 3 and all(len(np.unique(keep[lab == k])) == 1 for k in (1, 2, 3))
    assert F.split_by_reporter_change(lab, img, background=0.0, min_size=5).max() == 3
    # a gap along z separates pieces of one label even without a colour change
    gap = np.zeros((3, 4, 4), np.int32)
    gap[0, :2, :2] = gap[2, :2, :2] = 1
    assert F.split_by_reporter_change(gap, np.ones((1, 3, 4, 4)), background=0.0).max() == 2
    with pytest.raises(ValueError, match="CZYX"):
        F.split_by_reporter_change(lab, img[:, :3])


def test_instance_contacts_areas_by_hand():
    lab = np.zeros((2, 4, 6), np.int32)
    lab[0, 0:2, 0:2] = 1
    lab[0, 0:2, 2:4] = 2  # touches 1 along x on 2 rows: 2 faces of dz * dy = 5 * 0.5 um^2
    lab[1, 0:2, 0:2] = 3  # on top of 1: 4 faces of dy * dx = 0.25 um^2
    lab[0, 3, 0:2] = 4  # below 1 across an edge row: bridged, not touching
    sem = np.zeros(lab.shape, np.uint8)
    sem[0, 2, 0:2] = F.EDGE
    c = F.instance_contacts(lab, sem, spacing=(5.0, 0.5, 0.5))
    assert c[(1, 2)] == pytest.approx({"area": 5.0, "area_xy": 5.0, "area_edge": 0.0})
    assert c[(1, 3)] == pytest.approx({"area": 1.0, "area_xy": 0.0, "area_edge": 0.0})
    assert c[(1, 4)] == pytest.approx({"area": 0.0, "area_xy": 0.0, "area_edge": 5.0})
    assert set(c) == {(1, 2), (1, 3), (1, 4)}  # 2 and 3 meet only along a voxel edge: no face
    # probabilities give the same as their argmax; without a semantic map nothing is bridged
    prob = np.stack([sem == k for k in range(3)]).astype(np.float32)
    assert F.instance_contacts(lab, prob, spacing=(5.0, 0.5, 0.5)) == c
    assert (1, 4) not in F.instance_contacts(lab, None, spacing=(5.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="semantic"):
        F.instance_contacts(lab, sem[:, :3])


def _oversplit_toy():
    """Two halves of one red nucleus (1, 2), touching red / green nuclei (3, 4), a red 4-voxel
    fragment on 3 (5) and two red pieces whose boundary the edge class mostly marks (6, 7)."""
    lab = np.zeros((2, 11, 20), np.int32)
    lab[0:2, 1:5, 1:4], lab[0:2, 1:5, 4:7] = 1, 2
    lab[0:2, 1:5, 9:12], lab[0:2, 1:5, 12:15] = 3, 4
    lab[0:2, 5, 9:11] = 5
    lab[0:2, 7:10, 1:4], lab[0:2, 7:10, 5:8], lab[0, 9, 4] = 6, 7, 6
    sem = np.where(lab > 0, F.NUCLEUS, F.BACKGROUND).astype(np.uint8)
    sem[0, 7:9, 4] = sem[1, 7:10, 4] = F.EDGE  # 5 of the 6 in-plane boundary faces of 6 | 7 are edge
    img = np.zeros((2,) + lab.shape)
    img[0][np.isin(lab, (1, 2, 3, 5, 6, 7))] = 100.0
    img[0][lab == 2] = 80.0  # same nucleus, a bit dimmer: colour change 0.2
    img[1][lab == 4] = 100.0
    return lab, sem, img


def test_merge_oversplit_merges_halves_and_fragments_not_different_colours():
    lab, sem, img = _oversplit_toy()
    out = F.merge_oversplit(lab, img, sem, spacing=(1.0, 1.0, 1.0), tol=0.45, max_volume_um3=50.0,
                            fragment_um3=10.0, background=0.0)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out > 0, lab > 0)  # only labels change, never the foreground
    same = lambda *ks: len(np.unique(out[np.isin(lab, ks)])) == 1  # noqa: E731
    assert same(1, 2)  # halves of one nucleus (24 + 24 <= 50 um^3, no edge, colour change 0.2)
    assert not same(3, 4)  # touching, but red vs green
    assert same(3, 5)  # the red fragment joins its red neighbour
    assert not same(6, 7)  # 5/6 of their in-plane boundary is marked edge (19 + 18 <= 50 um^3)
    assert out.max() == 5
    # without the semantic map nothing marks the boundary of 6 and 7: merged
    assert F.merge_oversplit(lab, img, None, spacing=1.0, max_volume_um3=50.0, background=0.0).max() == 4
    assert F.merge_oversplit(lab, img, sem, max_volume_um3=50.0, max_edge_fraction=0.9, background=0.0).max() == 4
    # a union bound below every pair leaves only the fragment rule: 5 joins 3, 1 and 2 stay apart
    frag = F.merge_oversplit(lab, img, sem, max_volume_um3=1.0, fragment_um3=10.0, background=0.0)
    assert frag.max() == 6 and len(np.unique(frag[np.isin(lab, (3, 5))])) == 1
    assert F.merge_oversplit(lab, img, sem, max_volume_um3=1.0, fragment_um3=0.0, background=0.0).max() == 7
    # a tolerance of 0.1 keeps the halves (change 0.2) apart
    assert F.merge_oversplit(lab, img, sem, tol=0.1, max_volume_um3=50.0, background=0.0).max() == 6
    # with voxels of 2 x 1 x 1 um the union of 1 and 2 is 96 um^3 > 50: kept apart (5, 8 um^3, joins 3)
    assert F.merge_oversplit(lab, img, sem, spacing=(2.0, 1.0, 1.0), max_volume_um3=50.0, fragment_um3=10.0,
                             background=0.0).max() == 6
    assert F.merge_oversplit(np.zeros((2, 3, 3), int), np.zeros((1, 2, 3, 3))).max() == 0


def test_merge_oversplit_rejects_bad_arguments():
    lab, sem, img = _oversplit_toy()
    with pytest.raises(ValueError, match="CZYX"):
        F.merge_oversplit(lab, img[:, :, :5])
    with pytest.raises(ValueError, match="semantic"):
        F.merge_oversplit(lab, img, sem[:, :5], background=0.0)
    with pytest.raises(ValueError, match="ZYX label"):
        F.merge_oversplit(lab[0], img)
    for bad in ({"tol": -0.1}, {"max_volume_um3": 0.0}, {"fragment_um3": -1.0}, {"max_edge_fraction": 1.5}):
        with pytest.raises(ValueError, match="need tol"):
            F.merge_oversplit(lab, img, sem, background=0.0, **bad)


def test_semantic_to_instances_transform_keeps_meta():
    _, prob = _two_touching_balls()
    p = MetaTensor(torch.as_tensor(prob), affine=torch.diag(torch.tensor([2.0, 0.5, 0.5, 1.0])),
                   meta={"filename_or_obj": "x.tif"})
    d = F.SemanticToInstancesd(keys="pred", method="watershed", h_um=0.5)({"pred": p})
    assert d["instances"].shape == (1, 16, 32, 48) and d["instances"].dtype == torch.int32
    assert d["pred"].shape == (1, 16, 32, 48) and set(torch.unique(d["pred"]).tolist()) == {0, 2}
    assert d["instances"].meta["filename_or_obj"] == "x.tif" and np.allclose(d["instances"].pixdim, (2.0, 0.5, 0.5))
    assert int(d["instances"].max()) == 2


# --------------------------------------------------------------------------------- evaluation score


def test_evaluation_score_formula_by_hand():
    gt = np.zeros((1, 12, 12), np.int32)
    gt[0, 2:6, 2:6] = 1  # 16 voxels
    pred = np.zeros_like(gt)
    pred[0, 2:6, 2:4] = 5  # left half: 8 voxels
    ev = F.evaluation_score(gt, pred)
    (row,) = ev["per_nucleus"]
    assert row["full_dice"] == pytest.approx(2 * 8 / (16 + 8))
    # subregion Dice by an independent count inside the bounding box of gt + its ring
    sg = F.semantic_from_instances(gt)[0, 1:7, 1:7]
    sp = F.semantic_from_instances(pred)[0, 1:7, 1:7]
    dice = [2 * np.sum((sg == c) & (sp == c)) / (np.sum(sg == c) + np.sum(sp == c)) for c in (1, 2)]
    assert row["subregion_dice"] == pytest.approx(np.mean(dice))
    assert row["score"] == pytest.approx((0.95 * np.mean(dice) + 1.05 * 2 * 8 / 24) / 2)
    assert ev["score"] == pytest.approx(row["score"])
    assert F.evaluation_score(gt, gt)["score"] == pytest.approx(1.0)
    assert F.evaluation_score(gt, np.zeros_like(gt))["score"] == 0.0
    assert F.evaluation_score(gt, pred, weights=(1.0, 1.0))["score"] == pytest.approx(
        (row["subregion_dice"] + row["full_dice"]) / 2)


def test_segmentation_report_perfect_and_merged():
    gt, prob = _two_touching_balls()
    sem_gt = F.semantic_from_instances(gt)
    r = F.segmentation_report(sem_gt, sem_gt, gt, gt)
    assert r["f1_nucleus"] == 1.0 and r["ap50"] == 1.0 and r["mAP"] == 1.0 and r["score"] == pytest.approx(1.0)
    merged = (gt > 0).astype(np.int32)
    r = F.segmentation_report(sem_gt, sem_gt, gt, merged)
    assert r["n_pred"] == 1 and r["ap50"] <= 0.5 and r["score"] < 1.0


# ------------------------------------------------------------------------------------- phase rules


def test_phase_rules():
    red = [True, False, True, False]
    green = [False, True, True, False]
    assert list(F.phase_from_reporters(red, green)) == ["G1", "S/G2/M", "G1/S", "early_G1"]
    assert F.phase_from_reporters(True, False) == "G1"
    with pytest.raises(ValueError):
        F.phase_from_reporters([True], [True, False])


def _four_nuclei():
    lab = np.zeros((2, 10, 40), np.int32)
    img = np.full((3, 2, 10, 40), 10.0)  # background 10 in every channel
    levels = {1: (100, 10), 2: (10, 100), 3: (100, 100), 4: (10, 10)}  # (Cy3, GFP) means
    for k, (r, g) in levels.items():
        sl = (slice(0, 2), slice(2, 6), slice(10 * (k - 1) + 2, 10 * (k - 1) + 6))
        lab[sl] = k
        img[0][sl], img[1][sl], img[2][sl] = r, g, 50.0
    return lab, img


def test_nucleus_table_by_hand_with_user_thresholds_and_otsu():
    lab, img = _four_nuclei()
    tab, th = F.nucleus_table(lab, img, spacing=(5.0, 0.5, 0.5), normalise_by=None, background=10.0,
                              thresholds={"Cy3": 45.0, "GFP": 45.0})
    assert list(tab["phase"]) == ["G1", "S/G2/M", "G1/S", "early_G1"]
    assert th == {"Cy3": 45.0, "GFP": 45.0}
    np.testing.assert_allclose(tab["volume_um3"], 32 * 5.0 * 0.25)
    np.testing.assert_allclose(tab["centroid_z_um"], 0.5 * 5.0)
    np.testing.assert_allclose(tab["centroid_x_um"], [(10 * k + 3.5) * 0.5 for k in range(4)])
    np.testing.assert_allclose(tab["mean_Cy3"], [90, 0, 90, 0])  # background subtracted
    # Otsu (log levels) finds the same split; Hoechst normalisation leaves it unchanged
    tab2, th2 = F.nucleus_table(lab, img, spacing=(5.0, 0.5, 0.5), normalise_by="Hoechst", background="auto")
    assert list(tab2["phase"]) == list(tab["phase"])
    assert 0 < th2["Cy3"] < 90 / 40
    d = F.phase_distribution(tab["phase"])
    assert d == {"G1": 0.25, "S/G2/M": 0.25, "G1/S": 0.25, "early_G1": 0.25}
    with pytest.raises(ValueError, match="channel 'mCherry'"):
        F.nucleus_table(lab, img, red="mCherry")


def test_phase_agreement_counts_only_matched_nuclei():
    lab, _ = _four_nuclei()
    truth = {1: "G1", 2: "S/G2/M", 3: "G1/S", 4: "early_G1"}
    pred = lab.copy()
    pred[pred == 4] = 0  # nucleus 4 missed
    called = {1: "G1", 2: "G1", 3: "G1/S"}
    a = F.phase_agreement(lab, truth, pred, called)
    assert a["n_matched"] == 3 and a["accuracy"] == pytest.approx(2 / 3)
    assert a["pred_distribution"]["G1"] == pytest.approx(2 / 3)
    assert a["max_abs_diff_pp"] == pytest.approx(100 * (2 / 3 - 0.25))


def test_phases_on_synthetic_spheroid_with_true_masks():
    """Otsu (log) phase calls on a synthetic FUCCI spheroid with its true masks: >= 90% correct."""
    from common.synthetic import make_fucci_spheroid

    d = make_fucci_spheroid(shape=(16, 96, 96), n_nuclei=30, seed=5)
    tab, _ = F.nucleus_table(d["labels"], d["image"], spacing=d["spacing_um"], normalise_by=None)
    truth = np.array([d["phases"][int(i)] for i in tab["id"]])
    assert (tab["phase"].to_numpy() == truth).mean() >= 0.9


# ------------------------------------------------------------------------------------ data and GT


def test_load_fucci_manifest_names_bad_labels_and_channels(tmp_path):
    from common.data import ManifestError
    from common.io import write_ome_tiff

    img = np.random.default_rng(0).random((3, 4, 16, 16)).astype(np.float32)
    inst = np.zeros((4, 16, 16), np.uint16)
    inst[1:3, 4:8, 4:8] = 7
    write_ome_tiff(tmp_path / "img.ome.tif", img, "CZYX")
    write_ome_tiff(tmp_path / "inst.ome.tif", inst, "ZYX")
    write_ome_tiff(tmp_path / "sem.ome.tif", F.semantic_from_instances(inst), "ZYX")
    (tmp_path / "ok.csv").write_text("path_image,path_label\nimg.ome.tif,sem.ome.tif\n")
    recs = F.load_fucci_manifest(tmp_path / "ok.csv", input_channels=[2])
    assert recs[0]["label"].endswith("sem.ome.tif")
    (tmp_path / "bad.csv").write_text("path_image,path_label\nimg.ome.tif,inst.ome.tif\nimg.ome.tif,nope.tif\n")
    with pytest.raises(ManifestError) as e:
        F.load_fucci_manifest(tmp_path / "bad.csv", input_channels=[5])
    msg = str(e.value)
    assert "line 2" in msg and "inst.ome.tif: label values 0..7" in msg and "fucci_prepare_gt.py" in msg
    assert "nope.tif: file not found" in msg and "input_channels=[5] needs 6" in msg


def _prepare_gt_module():
    from scripts import fucci_prepare_gt

    return fucci_prepare_gt


def test_prepare_gt_from_masks_round_trip(tmp_path):
    from common.io import read_image, write_ome_tiff

    inst = _toy_instances().astype(np.uint16)
    write_ome_tiff(tmp_path / "m" / "s1_instances.ome.tif", inst, "ZYX", (5.0, 0.5, 0.5))
    write_ome_tiff(tmp_path / "i" / "s1.ome.tif", np.random.default_rng(0).random(inst.shape).astype(np.float32),
                   "ZYX", (5.0, 0.5, 0.5))
    man = _prepare_gt_module().from_masks(str(tmp_path / "m"), str(tmp_path / "gt"), images=str(tmp_path / "i"),
                                          min_area=0, smooth_sigma=0)
    sem, sp, known = read_image(tmp_path / "gt" / "s1_semantic.ome.tif")
    np.testing.assert_array_equal(sem[0], F.semantic_from_instances(inst))
    assert known and np.allclose(sp, (5.0, 0.5, 0.5))
    recs = F.load_fucci_manifest(man)
    assert recs[0]["instances"].endswith("s1_instances.ome.tif") and recs[0]["image"].endswith("s1.ome.tif")


def test_prepare_gt_from_cellpose_wiring(tmp_path, monkeypatch):
    """The Cellpose path: masks from `cellpose_segment` (stubbed: no weights here) become ground truth."""
    import common.segmentation
    from common.io import read_image, write_ome_tiff

    mod = _prepare_gt_module()
    inst = _toy_instances()
    img = np.stack([np.zeros(inst.shape), np.zeros(inst.shape), inst * 100.0]).astype(np.float32)
    write_ome_tiff(tmp_path / "stacks" / "a.ome.tif", img, "CZYX", (5.0, 0.5, 0.5))
    weights = tmp_path / "my_model"
    weights.write_bytes(b"x")
    calls = {}

    def fake(vol, pretrained_model, **kw):
        calls.update(kw, model=pretrained_model, max=float(vol.max()))
        return inst

    monkeypatch.setattr(common.segmentation, "cellpose_segment", fake)
    man = mod.from_cellpose(str(tmp_path / "stacks"), str(weights), str(tmp_path / "gt"), channel=2, min_area=0,
                            smooth_sigma=0)
    assert calls["model"] == str(weights) and calls["max"] == 400.0 and calls["stitch_threshold"] == 0.25
    sem = read_image(tmp_path / "gt" / "a_semantic.ome.tif")[0][0]
    np.testing.assert_array_equal(sem, F.semantic_from_instances(inst))
    assert os.path.isfile(man)
    with pytest.raises(FileNotFoundError, match="Cellpose weights not found"):
        mod.from_cellpose(str(tmp_path / "stacks"), str(tmp_path / "missing"), str(tmp_path / "gt2"))
    with pytest.raises(ValueError, match="--channel 5 does not exist"):
        mod.from_cellpose(str(tmp_path / "stacks"), str(weights), str(tmp_path / "gt3"), channel=5)


def test_phase_analysis_script_tables_and_plot(tmp_path):
    """scripts/fucci_phase_analysis.py on two synthetic spheroids with their true masks."""
    import pandas as pd

    from common.io import write_ome_tiff
    from common.synthetic import make_fucci_spheroid

    from scripts import fucci_phase_analysis as mod
    truth = {}
    for seed in (1, 2):
        d = make_fucci_spheroid(shape=(12, 64, 64), n_nuclei=16, spacing_um=(5.0, 1.0, 1.0), seed=seed)
        write_ome_tiff(tmp_path / "img" / f"s{seed}.ome.tif", d["image"], "CZYX", d["spacing_um"])
        write_ome_tiff(tmp_path / "lab" / f"s{seed}_instances.ome.tif", d["labels"].astype(np.uint16), "ZYX",
                       d["spacing_um"])
        truth[f"s{seed}"] = d["phases"]
    mod.analyse(str(tmp_path / "img"), str(tmp_path / "lab"), str(tmp_path / "out"))
    nuc = pd.read_csv(tmp_path / "out" / "nuclei.csv")
    for col in ("spheroid", "id", "centroid_z_um", "volume_um3", "mean_Cy3", "mean_GFP", "mean_Hoechst", "phase"):
        assert col in nuc.columns
    called = [truth[s][int(i)] == p for s, i, p in zip(nuc["spheroid"], nuc["id"], nuc["phase"])]
    assert len(called) == sum(len(t) for t in truth.values()) and np.mean(called) >= 0.9
    dist = pd.read_csv(tmp_path / "out" / "phase_distribution.csv")
    assert list(dist["spheroid"]) == ["s1", "s2"]
    np.testing.assert_allclose(dist[[c for c in dist.columns if c.startswith("% ")]].sum(1), 100.0)
    for s in ("s1", "s2"):  # the table's percentages are those of nuclei.csv
        ph = nuc.loc[nuc["spheroid"] == s, "phase"]
        assert dist.loc[dist["spheroid"] == s, "% G1"].item() == pytest.approx(100 * (ph == "G1").mean())
    assert (tmp_path / "out" / "phase_distribution.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="no instance labels for 's1'"):
        mod.analyse(str(tmp_path / "img"), str(tmp_path / "out"), str(tmp_path / "out2"))
    with pytest.raises(ValueError, match="s1.ome.tif: not an instance-label image"):
        mod.analyse(str(tmp_path / "img"), str(tmp_path / "img"), str(tmp_path / "out2"))


def test_median_levels_resist_segmentation_spill_over():
    """A G1 nucleus whose mask spills 30% into a green neighbour: the mean calls it G1/S, the median G1."""
    lab = np.zeros((1, 1, 10), np.int32)
    lab[0, 0, :] = 1
    img = np.zeros((3, 1, 1, 10))
    img[0, 0, 0, :7] = 100.0  # its own red voxels
    img[1, 0, 0, 7:] = 100.0  # the neighbour's green voxels inside the mask
    img[2] = 50.0
    th = {"Cy3": 25.0, "GFP": 25.0}
    by_mean, _ = F.nucleus_table(lab, img, background=None, statistic="mean", thresholds=th)
    by_median, _ = F.nucleus_table(lab, img, background=None, thresholds=th)
    assert by_mean["mean_GFP"].item() == pytest.approx(30.0) and by_mean["phase"].item() == "G1/S"
    assert by_median["median_GFP"].item() == 0.0 and by_median["phase"].item() == "G1"


def test_phase_analysis_script_merges_an_oversplit_nucleus(tmp_path):
    """``--merge_max_um3``: a true nucleus cut in two is one nucleus again; other nuclei stay apart."""
    import pandas as pd

    from common.io import read_image, write_ome_tiff
    from common.synthetic import make_fucci_spheroid

    from scripts import fucci_phase_analysis as mod
    d = make_fucci_spheroid(shape=(12, 64, 64), n_nuclei=12, spacing_um=(5.0, 1.0, 1.0), seed=3)
    lab = d["labels"].astype(np.int64)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    big = int(ids[np.argmax(counts)])
    zz, yy, xx = np.nonzero(lab == big)
    cut = (xx >= np.median(xx))
    lab[zz[cut], yy[cut], xx[cut]] = lab.max() + 1  # over-split the largest nucleus along x
    write_ome_tiff(tmp_path / "img" / "s.ome.tif", d["image"], "CZYX", d["spacing_um"])
    write_ome_tiff(tmp_path / "lab" / "s_instances.ome.tif", lab.astype(np.uint16), "ZYX", d["spacing_um"])
    mod.analyse(str(tmp_path / "img"), str(tmp_path / "lab"), str(tmp_path / "plain"))
    assert len(pd.read_csv(tmp_path / "plain" / "nuclei.csv")) == len(ids) + 1
    vol_um3 = counts.max() * float(np.prod(d["spacing_um"]))
    mod.analyse(str(tmp_path / "img"), str(tmp_path / "lab"), str(tmp_path / "merged"), merge_max_um3=1.01 * vol_um3)
    assert len(pd.read_csv(tmp_path / "merged" / "nuclei.csv")) == len(ids)
    refined = read_image(str(tmp_path / "merged" / "s_refined_instances.ome.tif"), spatial_dims=3)[0][0]
    assert len(np.unique(refined[lab == big])) == 1 and len(np.unique(refined[lab == lab.max()])) == 1
    assert refined[lab == big][0] == refined[lab == lab.max()][0]  # the two halves are one instance again


def test_edge_voxels_are_given_back_to_the_adjacent_instance():
    """Hand-built: two nuclei of radius 8 px; the prediction's nucleus class is radius 7 and its edge
    ring 7..9 straddles the true boundary. The nucleus class alone shrinks both masks; giving back
    the edge within 1 um restores them; the whole ring over-grows them; touching rings split by distance."""
    z, y, x = 3, 30, 50
    yy, xx = np.mgrid[:y, :x]
    gt = np.zeros((z, y, x), np.int32)
    sem = np.zeros((z, y, x), np.uint8)
    for i, (cy, cx) in enumerate([(15, 12), (15, 31)]):  # rings of the two nuclei touch between them
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        gt[:, r <= 8] = i + 1
        sem[:, r <= 7] = F.NUCLEUS
        sem[:, (r > 7) & (r <= 9) & (sem[0] != F.NUCLEUS)] = F.EDGE

    def dice(out, i, at):
        g, m = gt == i, out == out[1][at]
        return 2 * (g & m).sum() / (g.sum() + m.sum())

    alone = F.instances_from_prediction(sem, "cc", edge_um=0)
    inner = F.instances_from_prediction(sem, "cc", edge_um=1.0)
    whole = F.instances_from_prediction(sem, "cc", edge_um=None)
    for lab in (alone, inner, whole):
        assert len(np.unique(lab)) == 3  # background + the same two instances
    for i, at in ((1, (15, 12)), (2, (15, 31))):
        assert dice(alone, i, at) < 0.9 < dice(inner, i, at)
        assert dice(whole, i, at) < dice(inner, i, at)
    # every voxel given back is an edge voxel within 1 um of its instance, nothing else changed
    changed = inner != alone
    assert np.all(sem[changed] == F.EDGE) and np.all(alone[changed] == 0)
    # the two instances stay apart: no voxel of one touches the other across the split
    assert (inner == 1).sum() == (inner == 2).sum()


def test_preprocessing_preview_shows_each_enabled_step(tmp_path):
    """scripts/fucci_prepare_gt.py preview: one max-projection panel per enabled step of the bundle's
    ``intensity`` list (input, scaling, then the switched-on FUCCI steps); switching one more on adds a panel."""
    from PIL import Image

    from common.io import write_ome_tiff
    from scripts.fucci_prepare_gt import preview

    stack = np.random.default_rng(0).random((3, 6, 32, 40)).astype(np.float32) * 100
    path = write_ome_tiff(tmp_path / "stack.ome.tif", stack, "CZYX", (2.0, 0.5, 0.5))
    default = preview(path, out=str(tmp_path / "default.png"), input_channels=[2])
    more = preview(path, out=str(tmp_path / "tophat.png"), input_channels=[2], preproc__tophat_enabled=True)
    assert default == str(tmp_path / "default.png") and sorted(os.listdir(tmp_path)) == ["default.png", "stack.ome.tif",
                                                                                       "tophat.png"]
    w_default, h_default = Image.open(default).size
    w_more, h_more = Image.open(more).size
    assert w_more > w_default and h_more == h_default  # panels side by side: one more for the top-hat step

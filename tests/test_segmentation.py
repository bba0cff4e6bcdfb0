"""Tests for common.segmentation on phantoms with known answers."""

import importlib.util

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.measure import label

from common import segmentation as S


def _balls(shape, centres, radii, spacing=(1.0, 1.0, 1.0)):
    """Binary union of balls; centres and radii in micrometres."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    out = np.zeros(shape, bool)
    for c, r in zip(centres, radii):
        out |= sum((g - ci) ** 2 for g, ci in zip(grids, c)) <= r**2
    return out


def _noisy(binary, seed=0, sigma=1.0, noise=0.05):
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(binary.astype(float), sigma) + noise * rng.standard_normal(binary.shape)


# two touching balls (centres 16 um apart, radii 9 and 8) + one cut by the lateral border
CENTRES = [(12, 32, 22), (12, 32, 38), (12, 4, 50)]
RADII = [9, 8, 7]


def test_otsu_watershed_splits_touching_and_clears_border():
    truth = _balls((24, 64, 64), CENTRES, RADII)
    img = _noisy(truth)
    lab = S.otsu_watershed(img, min_distance_um=4.0)
    assert lab.dtype == np.int32 and lab.max() == 2
    # each object sits on one ball centre; the border ball (y=4, radius 7) is gone
    assert lab[12, 32, 22] != lab[12, 32, 38] and lab[12, 32, 22] > 0 and lab[12, 32, 38] > 0
    assert lab[12, 4, 50] == 0
    # volumes close to the true balls
    for c, r in zip(CENTRES[:2], RADII[:2]):
        v = (lab == lab[c]).sum()
        assert v == pytest.approx(4 / 3 * np.pi * r**3, rel=0.15)
    # without border removal the third object stays; deterministic
    kept = S.otsu_watershed(img, min_distance_um=4.0, remove_border=False)
    assert kept.max() == 3
    np.testing.assert_array_equal(S.otsu_watershed(img, min_distance_um=4.0), lab)
    # size filter (in voxels without spacing): the two balls are ~3000 and ~2100 voxels
    assert S.otsu_watershed(img, min_distance_um=4.0, min_size=2500).max() == 1
    assert S.otsu_watershed(img, min_distance_um=4.0, max_size=2500).max() == 1


def test_otsu_watershed_z_border_only_on_request():
    truth = _balls((16, 48, 48), [(2, 24, 24)], [6])  # cut by the first z-plane
    img = _noisy(truth, seed=1)
    assert S.otsu_watershed(img, min_distance_um=4.0).max() == 1
    assert S.otsu_watershed(img, min_distance_um=4.0, border_z=True).max() == 0


def test_otsu_watershed_anisotropic_spacing_and_2d():
    sp = (2.0, 1.0, 1.0)  # same physical scene with 2-um z steps
    truth = _balls((12, 64, 64), [(12, 32, 22), (12, 32, 38)], [9, 8], spacing=sp)
    lab = S.otsu_watershed(_noisy(truth, sigma=(0.5, 1, 1)), spacing=sp, min_distance_um=4.0, min_size=100.0)
    assert lab.max() == 2
    yy, xx = np.mgrid[:64, :64]
    discs = ((yy - 32) ** 2 + (xx - 22) ** 2 <= 81) | ((yy - 32) ** 2 + (xx - 38) ** 2 <= 64)
    lab2 = S.otsu_watershed(_noisy(discs, seed=3), min_distance_um=4.0, clahe=False)
    assert lab2.max() == 2
    assert S.otsu_watershed(np.ones((32, 32))).max() == 0  # constant image: no object


def _two_discs(r1, r2, overlap=3):
    yy, xx = np.mgrid[:60, :90]
    c2 = 30 + r1 + r2 - overlap
    mask = ((yy - 30) ** 2 + (xx - 30) ** 2 <= r1**2) | ((yy - 30) ** 2 + (xx - c2) ** 2 <= r2**2)
    d = ndi.distance_transform_edt(mask)
    return mask, d / d.max(), (30, 30), (30, c2)


def _dynamic_of_lower_peak(d, mask, p1, p2):
    """Height of the lower peak above the highest level still joining the two peaks."""
    lo, hi = 0.0, min(d[p1], d[p2])
    for _ in range(40):  # bisection on connectivity of {d >= t}
        t = 0.5 * (lo + hi)
        lab = label((d >= t) & mask, connectivity=1)
        lo, hi = (t, hi) if lab[p1] == lab[p2] else (lo, t)
    return min(d[p1], d[p2]) - lo


@pytest.mark.parametrize("reconstruct", [False, True])
def test_hmaxima_watershed_unequal_discs(reconstruct):
    mask, d, p1, p2 = _two_discs(12, 10)
    dyn = _dynamic_of_lower_peak(d, mask, p1, p2)
    assert 0.1 < dyn < 0.9
    two = S.hmaxima_watershed(d, mask, h=dyn - 0.02, reconstruct=reconstruct)
    assert two.max() == 2 and two[p1] != two[p2]
    np.testing.assert_array_equal(two > 0, mask)  # the instances tile the mask
    one = S.hmaxima_watershed(d, mask, h=dyn + 0.02, reconstruct=reconstruct)
    assert one.max() == 1
    np.testing.assert_array_equal(one > 0, mask)


def test_hmaxima_watershed_equal_discs_reconstruct_merges():
    mask, d, p1, p2 = _two_discs(11, 11)
    dyn = _dynamic_of_lower_peak(d, mask, p1, p2)
    assert S.hmaxima_watershed(d, mask, h=dyn - 0.02, reconstruct=True).max() == 2
    assert S.hmaxima_watershed(d, mask, h=dyn + 0.02, reconstruct=True).max() == 1
    # documented difference: plain h_maxima keeps both equally high tops as markers
    assert S.hmaxima_watershed(d, mask, h=dyn + 0.02, reconstruct=False).max() == 2


def test_hmaxima_watershed_separate_components_and_empty():
    mask = np.zeros((20, 40), bool)
    mask[5:15, 2:12] = True
    mask[5:15, 25:30] = True  # a small, separate object keeps its own marker
    d = ndi.distance_transform_edt(mask)
    d /= d.max()
    lab = S.hmaxima_watershed(d, mask, h=0.9)
    assert lab.max() == 2 and lab[10, 6] != lab[10, 27]
    assert S.hmaxima_watershed(np.zeros((8, 8)), np.zeros((8, 8), bool)).max() == 0


def test_connected_components():
    b = np.zeros((6, 6), bool)
    b[0, 0] = b[1, 1] = True  # diagonal neighbours
    b[3:6, 3:6] = True
    lab1 = S.connected_components(b, connectivity=1)
    assert lab1.max() == 3 and lab1[0, 0] != lab1[1, 1]
    assert S.connected_components(b, connectivity=2).max() == 2
    kept = S.connected_components(b, connectivity=1, min_size=2)
    assert kept.max() == 1 and kept[4, 4] == 1 and kept[0, 0] == 0


def test_cellpose_segment_requires_weights(tmp_path):
    with pytest.raises(ValueError, match="pretrained_model"):
        S.cellpose_segment(np.zeros((32, 32)), pretrained_model=None)
    with pytest.raises(ValueError, match="not found"):
        S.cellpose_segment(np.zeros((32, 32)), pretrained_model=str(tmp_path / "missing.pth"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("cellpose") is None, reason="cellpose not installed")
def test_cellpose_segment_wiring_with_untrained_weights(tmp_path):
    from cellpose import models

    path = tmp_path / "untrained.pth"
    models.CellposeModel(gpu=False, pretrained_model=False).net.save_model(str(path))
    img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    lab = S.cellpose_segment(img, str(path), diameter=30)
    assert lab.shape == (64, 64) and lab.dtype == np.int32


@pytest.mark.parametrize("reconstruct", [False, True])
def test_hmaxima_watershed_mask_covering_the_whole_image(reconstruct):
    """A mask that touches every border still gets a marker per component (no background below it)."""
    flat = np.full((6, 7), 0.3)
    lab = S.hmaxima_watershed(flat, np.ones_like(flat, bool), h=0.5, reconstruct=reconstruct)
    assert lab.min() == 1 and lab.max() == 1
    ramp = np.tile(np.linspace(0.0, 0.2, 7), (6, 1))  # dynamic 0.2 < h: one object
    lab = S.hmaxima_watershed(ramp, np.ones_like(ramp, bool), h=0.5, reconstruct=reconstruct)
    assert (lab == 1).all()
    z = np.zeros((2, 5, 5))
    z[0], z[1] = 0.1, 0.4  # 3D, whole volume: one object
    assert (S.hmaxima_watershed(z, np.ones(z.shape, bool), h=0.5, reconstruct=reconstruct) == 1).all()

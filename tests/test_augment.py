"""common.augment: each switch changes the crop as documented and keeps image and label aligned."""

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from monai.utils import set_determinism

from common.augment import SWITCHES, AugmentationError, augmentations
from common.errors import ZooError


def _phantom(seed=0, size=48):
    """A labelled phantom: three discs; image = 1 + 2 * label (so image > 2 is the label) plus a ramp."""
    yy, xx = np.mgrid[0:size, 0:size]
    lab = np.zeros((1, size, size), np.float32)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(4, 8)
        lab[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    lab[0, 2:6, 3:12] = 1  # an asymmetric bar: every flip / rotation is visible
    img = 1 + 2 * lab + 0.01 * xx[None] / size
    return {"image": torch.as_tensor(img, dtype=torch.float32), "label": torch.as_tensor(lab)}


def _apply(ts, d, seed=0):
    set_determinism(seed)
    c = Compose(ts)
    c.set_random_state(seed)
    out = c({k: v.clone() for k, v in d.items()})
    set_determinism(None)
    return {k: torch.as_tensor(np.asarray(v)) for k, v in out.items()}


def _switch(name, p=1.0):
    kw = {s: (False if s in ("flip", "rot90") else 0.0) for s in SWITCHES}
    kw[name] = True if name in ("flip", "rot90") else p
    return augmentations("image", "label", **kw)


def test_all_switches_off_is_identity_and_defaults():
    assert augmentations("image", "label", flip=False, rot90=False) == []
    names = [type(t).__name__ for t in augmentations("image", "label")]  # defaults: flips and rot90 only
    assert names == ["RandFlipd", "RandFlipd", "RandRotate90d"]
    with pytest.raises(AugmentationError) as e:
        augmentations(noise=1.5)
    assert isinstance(e.value, ZooError)
    with pytest.raises(AugmentationError):
        augmentations(zoom=0.5, zoom_range=(1.2, 0.8))


@pytest.mark.parametrize("name", ["flip", "rot90"])
def test_geometry_switches_move_image_and_label_together_exactly(name):
    d = _phantom()
    seen = set()
    for seed in range(12):
        o = _apply(_switch(name), d, seed)
        # round trip: the label is still exactly where the image is bright
        assert torch.equal(o["label"], (o["image"] > 2).float())
        # and it is one of the documented images of the original
        x = d["label"][0].numpy()
        cands = ([x, x[::-1], x[:, ::-1], x[::-1, ::-1]] if name == "flip" else [np.rot90(x, k) for k in range(4)])
        hit = [i for i, c in enumerate(cands) if np.array_equal(o["label"][0].numpy(), c)]
        assert hit, seed
        seen.add(hit[0])
    assert len(seen) >= 3  # several flips / rotations happen over 12 seeds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zoom_scales_and_keeps_alignment(seed):
    d = _phantom()
    o = _apply(_switch("zoom"), d, seed)
    assert o["image"].shape == d["image"].shape  # keep_size
    assert set(torch.unique(o["label"]).tolist()) <= {0.0, 1.0}  # nearest neighbour: still a mask
    area0, area1 = float(d["label"].sum()), float(o["label"].sum())
    assert 0.8 ** 2 * 0.7 < area1 / area0 < 1.25 ** 2 * 1.3
    # image (bilinear) and label (nearest-exact) agree up to the discs' boundary pixels, with no shift:
    # the centroids of the label and of the thresholded image coincide within a third of a pixel
    # (plain "nearest" shifted the label by about one pixel when zooming in)
    m = (o["image"][0] > 2).double()
    lab = o["label"][0].double()
    assert float((lab == m).double().mean()) > 0.99
    yy, xx = torch.meshgrid(torch.arange(48.0, dtype=torch.float64), torch.arange(48.0, dtype=torch.float64),
                            indexing="ij")
    for g in (yy, xx):
        assert abs(float((lab * g).sum() / lab.sum() - (m * g).sum() / m.sum())) < 0.35


@pytest.mark.parametrize("name", ["contrast", "noise", "smooth", "bias_field"])
def test_intensity_switches_change_the_image_only(name):
    d = _phantom()
    o = _apply(_switch(name), d, 2)
    assert torch.equal(o["label"], d["label"])  # labels untouched, so alignment is kept
    x, y = d["image"].double(), o["image"].double()
    assert not torch.allclose(x, y)
    if name == "contrast":  # gamma on the min-max range: same min and max, same order of values
        assert torch.isclose(y.min(), x.min(), atol=1e-5) and torch.isclose(y.max(), x.max(), atol=1e-5)
        assert torch.equal(torch.argsort(x.flatten(), stable=True), torch.argsort(y.flatten(), stable=True)) or \
            bool((torch.diff(y.flatten()[torch.argsort(x.flatten())]) >= -1e-6).all())
    elif name == "noise":  # additive, zero-mean, std <= 0.1
        r = y - x
        assert abs(float(r.mean())) < 0.02 and 0.0 < float(r.std()) <= 0.11
    elif name == "smooth":  # a blur: less gradient energy (sum of squared differences), same mean
        assert float((torch.diff(y, dim=-1) ** 2).sum()) < 0.9 * float((torch.diff(x, dim=-1) ** 2).sum())
        # same mean away from the border (MONAI's Gaussian smoothing pads with zeros: the crop's outer
        # pixels darken, by about half at the very edge)
        assert abs(float(y[..., 5:-5, 5:-5].mean() - x[..., 5:-5, 5:-5].mean())) < 0.02
    else:  # a positive multiplicative field whose log is a polynomial of degree <= 3 in each coordinate
        ratio = (y / x)[0].numpy()
        assert ratio.min() > 0
        yy, xx = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 48), indexing="ij")
        design = np.stack([yy ** i * xx ** j for i in range(4) for j in range(4)], -1).reshape(-1, 16)
        coef, *_ = np.linalg.lstsq(design, np.log(ratio).ravel(), rcond=None)
        assert np.abs(design @ coef - np.log(ratio).ravel()).max() < 1e-3 and np.abs(coef).max() > 0.01


def test_probability_zero_is_off_and_same_seed_same_crop():
    d = _phantom()
    assert len(_switch("noise", 0.0)) == 0
    all_on = augmentations("image", "label", zoom=1.0, contrast=1.0, noise=1.0, smooth=1.0, bias_field=1.0)
    a, b, c = _apply(all_on, d, 5), _apply(all_on, d, 5), _apply(all_on, d, 6)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])

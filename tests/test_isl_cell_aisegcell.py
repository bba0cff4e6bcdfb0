"""experiments.isl_cell_aisegcell: the test frame never reaches training, few-shot sets are nested and
seeded, and the reference numbers are right by hand (a small fig2a-like folder of real PNG files)."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from skimage.io import imsave

from experiments import isl_cell_aisegcell as exp

SIZE = 128


def _disks(centres, r, size=SIZE):
    yy, xx = np.mgrid[:size, :size]
    m = np.zeros((size, size), bool)
    for cy, cx in centres:
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return m


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """fig2a_timelapse with the real layout: 3-channel uint8 PNGs (equal channels), masks 0/255."""
    root = tmp_path_factory.mktemp("aisegcell")
    d = root / "fig2a_timelapse"
    d.mkdir()
    rng = np.random.default_rng(0)
    centres = [(20, 20), (20, 90), (70, 40), (100, 100)]
    for t in exp.FRAMES:
        rgb = lambda a: np.repeat(a[..., None], 3, axis=2).astype(np.uint8)  # noqa: E731
        imsave(d / f"{t}_w00.png", rgb(rng.integers(40, 200, (SIZE, SIZE))), check_contrast=False)
        imsave(d / f"{t}_w01.png", rgb(rng.integers(0, 100, (SIZE, SIZE))), check_contrast=False)
        imsave(d / f"{t}_w00_m00_mask.png", rgb(_disks(centres, 6) * 255), check_contrast=False)
        # the "stain" masks: the same disks shifted by 2 px in x
        imsave(d / f"{t}_w02_m00_mask.png", rgb(_disks([(y, x + 2) for y, x in centres], 6) * 255),
               check_contrast=False)
    return str(root)


def _rows(path):
    return list(csv.reader(open(path)))[1:]


def test_prepare_keeps_the_test_frame_out_of_training(src, tmp_path):
    out = tmp_path / "data"
    data = exp.prepare(str(out), downsample=2, tile=32, min_tile_object=10, shots=(1, 2, 3), seed=0, src=src)
    training = [data["pretrain_train"], data["pretrain_val"], data["val"]] + [data[f"train_n{n}"] for n in (1, 2, 3)]
    for m in training:
        assert not any(exp.TEST in p for row in _rows(m) for p in row), m
    assert all(exp.TEST in p for row in _rows(data["test"]) for p in row)
    # few-shot tiles come from the pretraining frames only, nested, in the seed's order
    rows = {n: _rows(data[f"train_n{n}"]) for n in (1, 2, 3)}
    assert rows[1] == rows[2][:1] and rows[2] == rows[3][:2]
    assert all(any(t in row[0] for t in exp.PRETRAIN) for row in rows[3])
    from common.io import read_image

    for row in rows[3]:  # every tile holds at least min_tile_object object pixels, at 2x (64 x 64 -> 32-px tiles)
        mask = read_image(os.path.join(out, row[1]), spatial_dims=2)[0][0]
        assert mask.shape == (32, 32) and (mask > 0).sum() >= 10
    other = exp.prepare(str(tmp_path / "data_s1"), downsample=2, tile=32, min_tile_object=10, shots=(3,), seed=1,
                        src=src)
    assert {tuple(r) for r in _rows(other["train_n3"])} != {tuple(r) for r in rows[3]} or data["pool_size"] <= 3
    # the inference folder holds the test signal only, named as the test manifest's signal (score() pairs them)
    assert os.listdir(data["test_images"]) == [os.path.basename(_rows(data["test"])[0][0])]


def test_mask_facts_and_agreement_by_hand(src, tmp_path):
    facts = exp.mask_facts(src)
    disk = _disks([(64, 64)], 6)
    shifted = _disks([(64, 66)], 6)
    iou = (disk & shifted).sum() / (disk | shifted).sum()  # 4 equal disks, each shifted by 2 px
    for t in exp.FRAMES:
        assert facts[t]["objects"] == 4
        assert facts[t]["median_area_px"] == disk.sum()
        assert facts[t]["iou_with_stain_nucleus_mask"] == pytest.approx(iou)
    data = exp.prepare(str(tmp_path / "data"), downsample=1, tile=32, min_tile_object=10, shots=(1,), seed=0, src=src)
    agr = exp.agreement(data, min_object_size=0)
    assert agr["n_true"] == agr["n_pred"] == 4
    assert agr["AP50"] == 1.0  # IoU of each pair ~0.8: matched at 0.5, not at 0.95
    assert agr["ap_per_threshold"][-1] == 0.0

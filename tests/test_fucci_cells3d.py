"""The cells3d experiment's instance diagnostics and the 3-class -> instance step, on hand-built volumes;
unet3d_fucci's intensity augmentation switches on a labelled phantom."""

import os

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common import fucci as F
from experiments.fucci_cells3d import _seed_list, instance_diagnostics
from zoo_testing import BUNDLES


def test_diagnostics_count_splits_merges_misses_and_false_objects_by_hand():
    gt = np.zeros((1, 10, 40), np.int32)
    gt[0, 0:4, 0:10] = 1  # 40 voxels, predicted in three pieces (12, 12, 16 voxels): a split
    gt[0, 0:4, 12:22] = 2  # 40 voxels, predicted with 8 extra voxels: IoU 40 / 48
    gt[0, 6:10, 0:5] = 3  # 20 voxels } one prediction covers both: a merge
    gt[0, 6:10, 6:11] = 4  # 20 voxels }
    pr = np.zeros_like(gt)
    pr[0, 0:4, 0:3], pr[0, 0:4, 3:6], pr[0, 0:4, 6:10] = 1, 2, 6
    pr[0, 0:4, 12:22] = 3
    pr[0, 4:6, 12:16] = 3
    pr[0, 6:10, 0:11] = 4  # 44 voxels: IoU 20 / 44 with either
    pr[0, 8:10, 30:33] = 5  # 6 voxels over background
    d = instance_diagnostics(gt, pr)
    assert d["matched_iou"] == [round(40 / 48, 3)]
    assert d["iou_histogram"] == [0, 0, 0, 0, 1, 0]  # 0.833 in [0.8, 0.9)
    assert d["volume_ratio_median"] == pytest.approx(48 / 40, abs=1e-3)
    assert (d["splits"], d["merges"], d["missed"], d["false"]) == (1, 1, 3, 5)
    assert sorted(d["false_sizes"]) == [6, 12, 12, 16, 44]


def test_edge_voxels_of_the_three_class_map_join_the_instance_by_hand():
    """A 1-slice map, values by hand: nucleus core (2) with an edge ring (1) around it. The nucleus class
    alone gives the 3x3 core; the whole ring (edge_um=None) gives all 5x5 = 25 voxels; 0.52 um (one
    in-plane voxel at 0.52 um, diagonals 0.735 um) adds the 4-connected ring voxels, not the corners."""
    sem = np.zeros((1, 7, 7), np.uint8)
    sem[0, 1:6, 1:6] = F.EDGE
    sem[0, 2:5, 2:5] = F.NUCLEUS
    sp = (2.0, 0.52, 0.52)
    core = F.instances_from_prediction(sem, "cc", sp, edge_um=0)
    assert core.sum() == 9 and set(np.unique(core)) == {0, 1}
    whole = F.instances_from_prediction(sem, "cc", sp, edge_um=None)
    assert np.array_equal(whole[0] > 0, sem[0] > 0)  # every edge voxel is in the instance
    near = F.instances_from_prediction(sem, "cc", sp, edge_um=0.52)
    expect = np.zeros((7, 7), bool)
    expect[2:5, 1:6] = expect[1:6, 2:5] = True  # the core + the 12 ring voxels that share a face with it
    assert np.array_equal(near[0] > 0, expect)
    # through the bundle's post-processing transform (probabilities -> instances), the same voxels
    prob = np.stack([(sem == c).astype(np.float32) for c in range(3)])
    t = F.SemanticToInstancesd("pred", method="cc", edge_um=None, spacing=sp)
    out = t({"pred": torch.as_tensor(prob)})
    assert np.array_equal(out["instances"][0].numpy(), whole)
    assert np.array_equal(out["pred"][0].numpy(), sem)


def test_seed_list():
    assert _seed_list(3) == [0, 1, 2]
    assert _seed_list([4, 7]) == [4, 7]


@pytest.mark.parametrize("switch", ["intensity_prob", "contrast_prob"])
def test_intensity_augmentation_switches_change_the_image_not_the_labels(switch):
    """train.json's ``augment#*_prob`` = 1 changes every patch's intensities as documented (a scale
    by a factor in [0.7, 1.3]; a gamma in [0.7, 1.5] keeps the order of values), = 0 leaves them
    alone; labels and geometry stay aligned with the image (the phantom's label is its image > 0.5)."""
    rng = np.random.default_rng(0)
    img = np.zeros((1, 8, 32, 32), np.float32)
    img[0, 2:6, 5:20, 8:25] = 0.8
    img += rng.uniform(0, 0.2, img.shape).astype(np.float32)
    lab = (img > 0.5).astype(np.int64)
    for prob in (0.0, 1.0):
        p = ConfigParser()
        p.read_config(os.path.join(BUNDLES, "unet3d_fucci", "configs", "train.json"))
        p.update({"bundle_root": os.path.join(BUNDLES, "unet3d_fucci"), "patch_size": [8, 32, 32],
                  "augment#intensity_prob": 0.0, "augment#contrast_prob": 0.0, f"augment#{switch}": prob})
        patching = p.get_parsed_content("train#patching")
        patching.set_random_state(seed=1)
        for _ in range(3):
            out = patching({"image": torch.as_tensor(img), "label": torch.as_tensor(lab)})
            x, y = np.asarray(out["image"]), np.asarray(out["label"])
            # undo the geometry (flip / rot90 of the input) by matching the label: image > 0.5 only inside
            if prob == 0.0:
                assert np.array_equal(y, (x > 0.5).astype(y.dtype))
                continue
            assert not np.allclose(np.sort(x.ravel()), np.sort(img.ravel()))
            fg, bg = x[y == 1], x[y == 0]
            assert fg.min() > bg.max()  # monotone: the labelled region is still the bright one
            if switch == "intensity_prob":
                ratio = np.sort(x.ravel()) / np.maximum(np.sort(img.ravel()), 1e-6)
                r = np.median(ratio[np.sort(img.ravel()) > 0.1])
                assert 0.7 <= r <= 1.3 and np.allclose(ratio[np.sort(img.ravel()) > 0.1], r, rtol=1e-4)

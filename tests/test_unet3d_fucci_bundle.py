"""unet3d_fucci end to end through the real MONAI bundle runner (tiny network, a few iterations),
DDP with two CPU processes, MONAI Label's BundleInferTask, named errors on bad input."""

import csv
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

from common import fucci as F
from common.handlers import latest_checkpoint
from common.io import read_image, write_ome_tiff
from common.synthetic import write_fucci_dataset
from zoo_testing import BUNDLES, TINY, TINY_TRAIN, run_bundle, run_bundle_here

B = "unet3d_fucci"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 small synthetic FUCCI spheroids -> 3-class ground truth -> train (2) / val (1) manifests."""
    d = tmp_path_factory.mktemp("fucci_data")
    manifest = write_fucci_dataset(str(d), n_spheroids=3, shape=(8, 48, 48), n_nuclei=10, seed=2)
    rows = list(csv.DictReader(open(manifest)))
    out = []
    for i, r in enumerate(rows):
        inst, sp, _ = read_image(os.path.join(d, r["path_label"]))
        sem, clean = F.prepare_ground_truth(inst[0].astype(np.int64), min_area=4)
        s, l = F.write_ground_truth(str(d), f"gt_{i:02d}", sem, clean, sp)
        out.append((r["path_image"], os.path.basename(s), os.path.basename(l)))
    paths = {}
    for name, part in (("train", out[:2]), ("val", out[2:])):
        paths[name] = str(d / f"{name}.csv")
        with open(paths[name], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path_image", "path_label", "path_instances"])
            w.writerows(part)
    paths["image"] = str(d / out[2][0])
    return paths


def _train_overrides(data, out):
    return dict(TINY[B], **TINY_TRAIN[B], train_manifest=data["train"], val_manifest=data["val"], input_channels=[2],
                ckpt_dir=str(out / "models"), output_dir=str(out / "runs"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fucci_run")
    ov = _train_overrides(data, out)
    p = run_bundle_here(B, "train.json", ov)
    return out, ov, p


def test_train_writes_plain_state_dict_and_metrics(trained):
    out, ov, p = trained
    assert "val_mean_dice" in p.output and "train_loss" in p.output
    sd = torch.load(out / "models" / "model.pt", weights_only=True)
    assert sd["head.weight"].shape == (3, 4, 1, 1, 1)  # 3 classes from features[0] = 4 channels
    assert latest_checkpoint(str(out / "runs" / "checkpoints")) is not None
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "runs"))


@pytest.fixture(scope="module")
def predicted(trained, data, tmp_path_factory):
    """One inference run (connected-component instances) on a thin odd-sized stack and a spheroid."""
    out, _, _ = trained
    d = tmp_path_factory.mktemp("fucci_pred")
    # 3 slices (thinner than the 8-slice patch), odd lateral size, 3 channels, 5 um z-steps
    vol = np.random.default_rng(0).random((3, 3, 37, 45)).astype(np.float32) * 200
    write_ome_tiff(d / "in" / "thin.ome.tif", vol, "CZYX", (5.0, 0.5, 0.5))
    shutil.copy(data["image"], d / "in" / "spheroid.ome.tif")
    run_bundle_here(B, "inference.json", dict(TINY[B], dataset_dir=str(d / "in"), output_dir=str(d / "pred"),
                                              ckpt_path=str(out / "models" / "model.pt"), input_channels=[2],
                                              instance_method="connected_components"))
    return d / "pred"


def test_inference_thin_anisotropic_stack_is_padded_not_rejected(predicted):
    assert sorted(os.listdir(predicted)) == ["spheroid_instances.ome.tif", "spheroid_semantic.ome.tif",
                                             "thin_instances.ome.tif", "thin_semantic.ome.tif"]
    sem, sp, known = read_image(predicted / "thin_semantic.ome.tif")
    inst, _, _ = read_image(predicted / "thin_instances.ome.tif")
    assert sem.shape == (1, 3, 37, 45) and inst.shape == (1, 3, 37, 45)
    assert known and np.allclose(sp, (5.0, 0.5, 0.5))
    assert set(np.unique(sem)) <= {0, 1, 2}
    assert np.all(sem[inst > 0] == F.NUCLEUS)  # instances only where the nucleus class is


def test_inference_instances_are_the_components_of_its_semantic_map(predicted, data):
    """The bundle's post-processing writes what common.fucci computes from its own semantic map."""
    sem = read_image(predicted / "spheroid_semantic.ome.tif")[0][0].astype(np.int64)
    inst = read_image(predicted / "spheroid_instances.ome.tif")[0][0]
    assert sem.shape == read_image(data["image"])[0].shape[1:]
    np.testing.assert_array_equal(inst, F.instances_connected_components(sem))


def test_evaluate_config_reports_dice(trained, tmp_path):
    out, ov, _ = trained
    p = run_bundle_here(B, ["train.json", "evaluate.json"], dict(ov, bundle_root=str(tmp_path)))
    assert "val_mean_dice" in p.output
    assert os.path.isfile(tmp_path / "eval" / "val_mean_dice_raw.csv")


def test_ddp_two_cpu_processes(data, tmp_path):
    # validation on the 2 training spheroids: MONAI's DistributedSampler needs an item per rank
    ov = dict(_train_overrides(data, tmp_path), val_manifest=data["train"])
    p = run_bundle(B, ["train.json", "multi_gpu_train.json"], dict(ov, resume=False), torchrun=2)
    n_patches = ov["epoch_length"] * ov["batch_size"]
    per_rank = -(-n_patches // 2 // ov["batch_size"])
    assert f"Iter: {per_rank}/{per_rank}" in p.output
    assert os.path.isfile(tmp_path / "models" / "model.pt")


def test_bad_input_named_before_training(data, tmp_path):
    folder = os.path.dirname(data["train"])
    rows = list(csv.DictReader(open(data["train"])))
    bad = tmp_path / "bad.csv"
    # an instance map given as the label, and a missing file
    bad.write_text("path_image,path_label\n"
                   f"{os.path.join(folder, rows[0]['path_image'])},{os.path.join(folder, rows[0]['path_instances'])}\n"
                   f"{os.path.join(folder, rows[0]['path_image'])},{os.path.join(folder, 'nope.ome.tif')}\n")
    ov = dict(_train_overrides(data, tmp_path), train_manifest=str(bad))
    p = run_bundle_here(B, "train.json", ov, check=False)
    assert p.returncode != 0
    assert "ManifestError" in p.output and "an instance map?" in p.output and "nope.ome.tif: file not found" in p.output
    assert "line 2" in p.output and "line 3" in p.output
    assert "Epoch:" not in p.output and not os.path.exists(tmp_path / "models" / "model.pt")
    # inference: a 1-channel stack where channel 2 (Hoechst) is asked for; the bundle's datalist names it
    from monai.bundle import ConfigParser

    from common.data import ManifestError

    write_ome_tiff(tmp_path / "one" / "one.ome.tif", np.random.default_rng(0).random((4, 16, 16)).astype(np.float32),
                   "ZYX")
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLES, B, "configs", "inference.json"))
    parser.update({"dataset_dir": str(tmp_path / "one"), "input_channels": [2]})
    with pytest.raises(RuntimeError) as e:
        parser.get_parsed_content("datalist")
    assert isinstance(e.value.__cause__, ManifestError)
    assert "one.ome.tif: 1 channel(s), but input_channels=[2] needs 3" in str(e.value.__cause__)


@pytest.mark.skipif(importlib.util.find_spec("monailabel") is None, reason="monailabel not installed")
def test_monailabel_bundle_infer_task(trained, data, tmp_path):
    """MONAI Label's BundleInferTask loads the bundle folder and segments an image."""
    from monai.transforms import SaveImaged
    from monailabel.tasks.infer.bundle import BundleInferTask

    from common.io import SaveOmeTiffd

    out, _, _ = trained
    root = tmp_path / B
    shutil.copytree(os.path.join(BUNDLES, B), root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "runs"))
    for name in ("model.pt", "model.json"):  # the trained weights with their record (not the shipped model's)
        shutil.copy(out / "models" / name, root / "models" / name)
    cfg = json.load(open(root / "configs" / "inference.json"))
    cfg["network_def"]["features"] = TINY[B]["network_def#features"]
    cfg["patch_size"] = TINY[B]["patch_size"]
    cfg["input_channels"] = [2]
    json.dump(cfg, open(root / "configs" / "inference.json", "w"))
    task = BundleInferTask(str(root), {}, post_filter=[SaveImaged, SaveOmeTiffd])
    assert task.is_valid() and task.labels == {"edge": 1, "nucleus": 2}
    label_file, result = task({"image": data["image"], "device": "cpu"})
    img, _, _ = read_image(data["image"])
    lab = np.asarray(__import__("nibabel").load(label_file).dataobj) if label_file.endswith((".nii", ".nii.gz")) \
        else read_image(label_file)[0][0]
    assert lab.size == np.prod(img.shape[1:]) and set(np.unique(lab)) <= {0, 1, 2}
    assert not os.path.exists(root / "eval")  # the bundle's own file writers were filtered out

"""spotlight_dna end to end through the real MONAI bundle runner (tiny network, a few iterations)."""

import csv
import os

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common.io import read_image, write_ome_tiff
from common.spotlight import OtsuStandardize, SpotlightLoss
from common.synthetic import write_dataset_3d
from zoo_testing import (BUNDLES, TINY, TINY_TRAIN, ddp_two_cpu_processes, resume_after_kill, run_bundle_here,
                         split_manifest)

B = "spotlight_dna"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("spotlight_data")
    manifest = write_dataset_3d(str(d), n_volumes=3, shape=(16, 64, 64), seed=5, n_cells=5)
    return split_manifest(manifest, {"train": 2, "val": 1})


def _ov(data, out):
    return dict(TINY[B], **TINY_TRAIN[B], train_manifest=data["train"], val_manifest=data["val"],
                ckpt_dir=str(out / "models"), output_dir=str(out / "runs"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("spotlight_run")
    ov = _ov(data, out)
    return out, ov, run_bundle_here(B, "train.json", ov)


def test_train_writes_model_metrics_and_tensorboard(trained):
    out, ov, p = trained
    assert os.path.isfile(out / "models" / "model.pt")
    for m in ("val_fg_pearson", "val_pearson", "val_psnr"):
        assert m in p.output
    assert "Key metric: val_fg_pearson" in p.output
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "runs"))
    sd = torch.load(out / "models" / "model.pt", weights_only=True)
    assert "conv_out.weight" in sd


def test_config_has_paper_defaults_and_patches_carry_target_and_mask(data):
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLES, B, "configs", "train.json"))
    loss = parser.get_parsed_content("loss")
    assert isinstance(loss, SpotlightLoss) and (loss.lambda_mse, loss.k, loss.clamp) == (0.5, -0.95, "min")
    assert parser["min_fg_fraction"] == 0.001 and parser["fg_threshold"] == 0.0
    for k, v in dict(TINY[B], **TINY_TRAIN[B], train_manifest=data["train"], val_manifest=data["val"]).items():
        parser[k] = v
    cache = parser.get_parsed_content("train#cache")
    raw, _, _ = read_image(cache.data[0]["label"])
    # the cached target is Otsu-standardised on the whole (raw) image
    np.testing.assert_allclose(cache[0]["label"].numpy(), OtsuStandardize()(raw), rtol=1e-5, atol=1e-5)
    ds = parser.get_parsed_content("train#dataset")
    for i in range(6):
        item = ds[i]
        lab = item["label"].numpy()
        assert item["image"].shape == (1, 16, 32, 32) and lab.shape == (2, 16, 32, 32)
        np.testing.assert_array_equal(lab[1], (lab[0] >= 0).astype(np.float32))  # channel 1: foreground of 0
        assert lab[1].mean() >= 0.001
        assert "fg" not in item
    # the loss takes exactly that label
    pred = torch.zeros(1, 1, 16, 32, 32)
    assert torch.isfinite(loss(pred, torch.as_tensor(lab)[None]))


def test_inference_any_size_keeps_shape_and_voxel_size(trained, tmp_path):
    out, ov, _ = trained
    vol = np.random.default_rng(0).random((21, 70, 45)).astype(np.float32)
    write_ome_tiff(tmp_path / "in" / "odd.ome.tif", vol, spacing_um=(0.4, 0.3, 0.3))
    run_bundle_here(B, "inference.json", dict(TINY[B], dataset_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "pred"),
                                              ckpt_path=str(out / "models" / "model.pt")))
    pred, spacing, known = read_image(tmp_path / "pred" / "odd_pred.ome.tif")
    assert pred.shape == (1, 21, 70, 45)
    assert known and np.allclose(spacing, (0.4, 0.3, 0.3))
    assert np.isfinite(pred).all() and pred.std() > 0
    assert sorted(os.listdir(tmp_path / "pred")) == ["odd_pred.ome.tif"]


def test_evaluate_config_reports_metrics(trained, tmp_path):
    out, ov, _ = trained
    p = run_bundle_here(B, ["train.json", "evaluate.json"], dict(ov, bundle_root=str(tmp_path)))
    assert "val_fg_pearson" in p.output
    assert os.path.isfile(tmp_path / "eval" / "val_fg_pearson_raw.csv")


def test_resume_after_kill_continues_from_checkpoint(data, tmp_path):
    ov = dict(_ov(data, tmp_path), num_epochs=1000, val_interval=1000)
    resume_after_kill(B, ov, str(tmp_path / "runs" / "checkpoints"), min_epoch=2)


def test_ddp_two_cpu_processes(data, tmp_path):
    ov = dict(_ov(data, tmp_path), val_manifest=data["train"])  # DistributedSampler: >= 1 volume per rank
    p = ddp_two_cpu_processes(B, ov)
    assert "val_fg_pearson" in p.output


def test_bad_input_named_before_training(data, tmp_path):
    folder = os.path.dirname(data["train"])
    rows = list(csv.DictReader(open(data["train"])))
    const = write_ome_tiff(tmp_path / "flat.ome.tif", np.full((16, 64, 64), 7, np.float32))
    bad = tmp_path / "bad.csv"
    with open(bad, "w") as f:
        f.write("path_signal,path_target\n")
        f.write(f"{os.path.join(folder, rows[0]['path_signal'])},{os.path.join(folder, 'nope.ome.tif')}\n")
        f.write(f"{os.path.join(folder, rows[1]['path_signal'])},{const}\n")
    ov = dict(_ov(data, tmp_path), train_manifest=str(bad))
    p = run_bundle_here(B, "train.json", ov, check=False)
    assert p.returncode != 0 and "ManifestError" in p.output
    assert "nope.ome.tif: file not found" in p.output and "line 2" in p.output
    assert "flat.ome.tif: constant image" in p.output and "line 3" in p.output  # no foreground to learn
    assert "Epoch:" not in p.output and not os.path.exists(tmp_path / "models" / "model.pt")

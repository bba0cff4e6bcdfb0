"""fnet_baseline end to end through the real MONAI bundle runner (tiny network, a few iterations)."""

import csv
import os

import numpy as np
import pytest
import torch

from common.handlers import latest_checkpoint, latest_loadable_checkpoint
from common.io import read_image, write_ome_tiff
from common.synthetic import write_dataset_3d
from zoo_testing import TINY, TINY_TRAIN, ddp_two_cpu_processes, resume_after_kill, run_bundle_here, split_manifest

B = "fnet_baseline"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fnet_data")
    manifest = write_dataset_3d(str(d), n_volumes=4, shape=(16, 64, 64), seed=3)
    return split_manifest(manifest, {"train": 2, "val": 2})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fnet_run")
    ov = dict(TINY[B], **TINY_TRAIN[B], train_manifest=data["train"], val_manifest=data["val"],
              ckpt_dir=str(out / "models"), output_dir=str(out / "runs"))
    p = run_bundle_here(B, "train.json", ov)
    return out, ov, p


def test_train_writes_model_metrics_and_tensorboard(trained):
    out, ov, p = trained
    assert os.path.isfile(out / "models" / "model.pt")
    assert "val_pearson" in p.output and "val_psnr" in p.output
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "runs"))
    # plain state_dict, loadable with weights_only=True
    sd = torch.load(out / "models" / "model.pt", weights_only=True)
    assert "conv_out.weight" in sd


def test_inference_any_size_keeps_shape_and_voxel_size(trained, tmp_path):
    out, ov, _ = trained
    vol = np.random.default_rng(0).random((37, 150, 171)).astype(np.float32)
    write_ome_tiff(tmp_path / "in" / "odd.ome.tif", vol, spacing_um=(0.4, 0.3, 0.3))
    run_bundle_here(B, "inference.json", dict(TINY[B], dataset_dir=str(tmp_path / "in"),
                                              output_dir=str(tmp_path / "pred"),
                                              ckpt_path=str(out / "models" / "model.pt")))
    pred, spacing, known = read_image(tmp_path / "pred" / "odd_pred.ome.tif")
    assert pred.shape == (1, 37, 150, 171)
    assert known and np.allclose(spacing, (0.4, 0.3, 0.3))
    assert np.isfinite(pred).all() and pred.std() > 0
    assert sorted(os.listdir(tmp_path / "pred")) == ["odd_pred.ome.tif"]  # nothing half-written left


def test_evaluate_config_reports_metrics(trained, tmp_path):
    out, ov, _ = trained
    p = run_bundle_here(B, ["train.json", "evaluate.json"], dict(ov, bundle_root=str(tmp_path)))
    assert "val_pearson" in p.output
    assert os.path.isfile(tmp_path / "eval" / "val_pearson_raw.csv")


def test_resume_after_kill_continues_from_checkpoint(data, tmp_path):
    """Kill a real training run after its second checkpoint; the same command resumes at that epoch."""
    ov = dict(TINY[B], **TINY_TRAIN[B], train_manifest=data["train"], val_manifest=data["val"],
              ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))
    ov.update(num_epochs=1000, val_interval=1000)
    ckpt_dir = str(tmp_path / "runs" / "checkpoints")
    p, last, state, saved_epoch = resume_after_kill(B, ov, ckpt_dir, min_epoch=2)
    L = ov["epoch_length"]
    # ignite keeps iteration and epoch_length
    assert state["trainer"]["epoch_length"] == L and state["trainer"]["iteration"] % L == 0
    final = torch.load(latest_loadable_checkpoint(ckpt_dir), weights_only=True)["trainer"]
    assert final["iteration"] == (saved_epoch + 1) * L


def test_ddp_two_cpu_processes(data, tmp_path):
    ov = dict(TINY[B], **TINY_TRAIN[B], train_manifest=data["train"], val_manifest=data["val"],
              ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))
    ddp_two_cpu_processes(B, ov)  # each of the 2 ranks runs half of the epoch's patches
    assert latest_checkpoint(str(tmp_path / "runs" / "checkpoints")) is not None


def test_bad_input_named_before_training(data, tmp_path):
    folder = os.path.dirname(data["train"])
    rows = list(csv.DictReader(open(data["train"])))
    bad = tmp_path / "bad.csv"
    with open(bad, "w") as f:
        f.write("path_signal,path_target\n")
        f.write(f"{os.path.join(folder, rows[0]['path_signal'])},{os.path.join(folder, 'nope.ome.tif')}\n")
    ov = dict(TINY[B], **TINY_TRAIN[B], train_manifest=str(bad), val_manifest=data["val"],
              ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))
    p = run_bundle_here(B, "train.json", ov, check=False)
    assert p.returncode != 0
    assert "ManifestError" in p.output and "nope.ome.tif: file not found" in p.output and "line 2" in p.output
    assert "Epoch:" not in p.output and not os.path.exists(tmp_path / "models" / "model.pt")

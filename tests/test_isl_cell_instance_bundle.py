"""isl_cell_instance end to end through the real MONAI bundle runner and MONAI Label (tiny network,
a few iterations on synthetic DIC phantoms): ISL stage 0 -> stage 1, inference, evaluation, DDP,
named errors, MONAI Label's BundleInferTask."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common.io import read_image, write_ome_tiff
from common.metrics import aggregated_jaccard_index, dataset_average_precision
from common.synthetic import make_dic_membrane_2d, write_dataset_2d_dic
from common.transforms import ZScoreNormalize, as_instance_labels
from zoo_testing import BUNDLES, TINY, TINY_TRAIN, run_bundle, run_bundle_here, run_bundle_inprocess, split_manifest

B = "isl_cell_instance"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # columns path_signal (DIC), path_target (membrane: stage 0), path_label (cells: stage 1)
    d = tmp_path_factory.mktemp("isl_cell_data")
    manifest = write_dataset_2d_dic(str(d), n_images=4, shape=(64, 96), seed=5, pixel_size_um=0.8, n_cells=6)
    return split_manifest(manifest, {"train": 2, "val": 2})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("isl_cell_run")
    base = dict(TINY[B], **TINY_TRAIN[B], train_manifest=data["train"], val_manifest=data["val"])
    p0 = run_bundle_here(B, ["train.json", "pretrain.json"],
                         dict(base, ckpt_dir=str(out / "stage0" / "models"), output_dir=str(out / "stage0" / "runs")))
    stage0 = out / "stage0" / "models" / "model.pt"
    ov = dict(base, stage0_ckpt=str(stage0), ckpt_dir=str(out / "models"), output_dir=str(out / "runs"))
    p1 = run_bundle_here(B, "train.json", ov)
    return out, ov, p0, p1


def _crafted_checkpoint(src, dst, dic):
    """``src`` with the mask-logit bias shifted so that half of the pixels of ``dic`` (``CYX``) are cell.

    The tiny networks trained for a few iterations predict background everywhere; this gives the
    instance metrics and MONAI Label non-empty, non-trivial label images to work on.
    """
    net = _parser("inference.json", TINY[B]).get_parsed_content("network_def")
    sd = torch.load(src, weights_only=True)
    net.load_state_dict(sd)
    net.eval()
    with torch.no_grad():
        logit = net(torch.as_tensor(ZScoreNormalize()(np.asarray(dic, np.float32)))[None])[0, 1]
    sd["head.block2.0.bias"][1] -= logit.median()
    torch.save(sd, dst)
    return dst


def _parser(config, overrides):
    p = ConfigParser()
    p.read_config([os.path.join(BUNDLES, B, "configs", c) for c in ([config] if isinstance(config, str) else config)])
    for k, v in overrides.items():
        p[k] = v
    return p


def test_two_stage_training_writes_plain_state_dicts_and_metrics(trained):
    out, ov, p0, p1 = trained
    assert "val_pearson" in p0.output  # stage 0 validates the virtual membrane stain
    for name in ("val_mAP", "val_AP50", "val_F1_50", "val_AJI"):
        assert name in p1.output
    s0 = torch.load(out / "stage0" / "models" / "model.pt", weights_only=True)
    s1 = torch.load(out / "models" / "model.pt", weights_only=True)
    assert "encoder.conv0.weight" in s0 and "segmentation_head.0.weight" in s0
    assert {k[len("base."):] for k in s1 if k.startswith("base.")} == set(s0)  # the whole stage-0 network...
    assert {"head.block1.0.weight", "head.block2.0.weight", "head.block2.0.bias"} <= set(s1)  # ...plus two blocks
    assert s1["head.block2.0.weight"].shape[0] == 2
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "runs"))


def test_stage1_network_starts_from_stage0_weights(trained):
    out, ov, _, _ = trained
    stage0 = torch.load(ov["stage0_ckpt"], weights_only=True)
    net = _parser("train.json", ov).get_parsed_content("network_init")
    for k, v in net.base.state_dict().items():
        torch.testing.assert_close(v, stage0[k])
    scratch = _parser("train.json", dict(ov, stage0_ckpt=None)).get_parsed_content("network_init")
    assert not torch.equal(scratch.base.state_dict()["encoder.conv0.weight"], stage0["encoder.conv0.weight"])
    with pytest.raises(Exception) as err:  # 2 DIC planes vs a 1-plane stage 0
        _parser("train.json", dict(ov, in_channels=2)).get_parsed_content("network_init")
    assert "stage-0 checkpoint does not fit the network" in str(err.value.__cause__)


def test_inference_any_size_gives_int_labels_with_voxel_size(trained, tmp_path):
    out, _, _, _ = trained
    d = make_dic_membrane_2d((75, 113), n_cells=5, seed=11, pixel_size_um=0.8)
    write_ome_tiff(tmp_path / "in" / "odd.ome.tif", d["dic"], "CYX", d["spacing_um"])
    run_bundle_inprocess(B, "inference.json", dict(TINY[B], dataset_dir=str(tmp_path / "in"),
                                                   output_dir=str(tmp_path / "pred"),
                                                   ckpt_path=str(out / "models" / "model.pt")))
    lab, spacing, known = read_image(tmp_path / "pred" / "odd_instances.ome.tif", spatial_dims=2)
    assert lab.shape == (1, 75, 113) and lab.dtype == np.int32 and lab.min() >= 0
    assert known and np.allclose(spacing, (0.8, 0.8))
    assert sorted(os.listdir(tmp_path / "pred")) == ["odd_instances.ome.tif"]  # nothing half-written left


def test_evaluate_accumulates_over_the_whole_set(trained, data, tmp_path):
    """metrics.csv equals the dataset-level AP recomputed from the saved instance images."""
    out, ov, _, _ = trained
    os.makedirs(tmp_path / "models")
    first = next(csv.DictReader(open(data["val"])))["path_signal"]
    dic = read_image(os.path.join(os.path.dirname(data["val"]), first), 2)[0]
    _crafted_checkpoint(out / "models" / "model.pt", tmp_path / "models" / "model.pt", dic)
    run_bundle_inprocess(B, ["train.json", "evaluate.json"],
                         dict(ov, bundle_root=str(tmp_path), ckpt_dir=str(tmp_path / "models"), val_manifest=data["val"],
                              h=0.05))
    saved = dict(line.strip().split(",") for line in open(tmp_path / "eval" / "metrics.csv"))
    folder = os.path.dirname(data["val"])
    gts, preds = [], []
    for row in csv.DictReader(open(data["val"])):
        gts.append(as_instance_labels(read_image(os.path.join(folder, row["path_label"]), 2)[0]))
        stem = row["path_signal"].replace(".ome.tif", "")
        preds.append(read_image(tmp_path / "eval" / f"{stem}_instances.ome.tif", 2)[0][0].astype(np.int64))
    assert len(gts) == 2 and sum(g.max() for g in gts) > 2
    assert sum(p.max() for p in preds) > 2
    ref = dataset_average_precision(gts, preds)
    assert float(saved["val_mAP"]) == pytest.approx(ref["mAP"], abs=1e-6)
    assert float(saved["val_AP50"]) == pytest.approx(ref["ap"][0], abs=1e-6)
    assert float(saved["val_F1_50"]) == pytest.approx(ref["f1"][0], abs=1e-6)
    aji = np.mean([aggregated_jaccard_index(g, p) for g, p in zip(gts, preds)])
    assert aji > 0 and float(saved["val_AJI"]) == pytest.approx(aji, abs=1e-6)  # mean over both images


def test_ddp_two_cpu_processes(data, tmp_path):
    ov = dict(TINY[B], **TINY_TRAIN[B], train_manifest=data["train"], val_manifest=data["val"],
              ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))
    p = run_bundle(B, ["train.json", "multi_gpu_train.json"], dict(ov, resume=False), torchrun=2)
    n_patches = ov["epoch_length"] * ov["batch_size"]
    per_rank_iters = -(-n_patches // 2 // ov["batch_size"])
    assert f"Iter: {per_rank_iters}/{per_rank_iters}" in p.output
    assert "val_mAP" in p.output
    assert os.path.isfile(tmp_path / "models" / "model.pt")


def test_bad_inputs_are_named_before_training(data, tmp_path):
    folder = os.path.dirname(data["train"])
    rows = list(csv.DictReader(open(data["train"])))
    two_planes = make_dic_membrane_2d((64, 96), n_cells=4, seed=3, pixel_size_um=0.8, n_planes=2)
    write_ome_tiff(tmp_path / "two_planes.ome.tif", two_planes["dic"], "CYX")
    bad = tmp_path / "bad.csv"
    with open(bad, "w") as f:
        f.write("path_signal,path_label\n")
        f.write(f"{os.path.join(folder, rows[0]['path_signal'])},{os.path.join(folder, 'nope.ome.tif')}\n")
        f.write(f"{tmp_path / 'two_planes.ome.tif'},{os.path.join(folder, rows[0]['path_label'])}\n")
    ov = dict(TINY[B], **TINY_TRAIN[B], train_manifest=str(bad), val_manifest=data["val"],
              ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))

    def error_building_trainer(overrides):
        """The error raised while the trainer is built, i.e. before any training iteration."""
        with pytest.raises(Exception) as err:
            _parser("train.json", overrides).get_parsed_content("train#trainer")
        e, chain = err.value, []
        while e is not None:
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__
        return "\n".join(chain)

    msg = error_building_trainer(ov)
    assert "ManifestError" in msg and "2 problem(s) found before any work" in msg
    assert "line 2" in msg and "nope.ome.tif: file not found" in msg
    assert "line 3" in msg and "two_planes.ome.tif: 2 channel(s), expected 1" in msg
    # an intensity image given as the label (the membrane instead of the cells)
    intensity = tmp_path / "intensity_as_label.csv"
    with open(intensity, "w") as f:
        f.write("path_signal,path_label\n")
        f.write(f"{os.path.join(folder, rows[0]['path_signal'])},{os.path.join(folder, rows[0]['path_target'])}\n")
    msg = error_building_trainer(dict(ov, train_manifest=str(intensity)))
    assert "LabelFormatError" in msg and f"{rows[0]['path_target']}: label image has non-integer values" in msg
    assert not os.path.exists(tmp_path / "models") and not os.path.exists(tmp_path / "runs")


def test_monailabel_bundle_infer_task_returns_instance_labels(trained, tmp_path):
    """MONAI Label serves the bundle: its BundleInferTask writes the same instance labels as the bundle."""
    import itk
    from monailabel.tasks.infer.bundle import BundleInferTask

    out, _, _, _ = trained
    root = tmp_path / B
    shutil.copytree(os.path.join(BUNDLES, B, "configs"), root / "configs")
    # eager fp32 on both sides: exact equality (the fast default's tolerance: tests/test_fast_defaults.py)
    parser = _parser("inference.json", dict(TINY[B], fast=False))
    ConfigParser.export_config_file(parser.get(), str(root / "configs" / "inference.json"), indent=2)
    os.makedirs(root / "models")
    d = make_dic_membrane_2d((96, 128), n_cells=6, seed=21, pixel_size_um=0.8)
    img = write_ome_tiff(tmp_path / "cells.ome.tif", d["dic"], "CYX", d["spacing_um"])
    _crafted_checkpoint(out / "models" / "model.pt", root / "models" / "model.pt", d["dic"])
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))

    task = BundleInferTask(str(root), {})
    assert task.is_valid() and task.dimension == 2
    result, info = task({"image": str(img), "device": "cpu", "result_extension": ".nii.gz"})
    lab = itk.array_from_image(itk.imread(result)).T  # MONAI Label writes XY-ordered files

    # the bundle's own pipeline, in process: z-score, sliding window, post-processing
    net.eval()
    x = ZScoreNormalize()(d["dic"])
    with torch.no_grad():
        pred = parser.get_parsed_content("inferer")(torch.as_tensor(x)[None], net)[0]
    expected = parser.get_parsed_content("postprocessing")({"pred": pred})["pred"]
    assert lab.shape == (96, 128) and np.issubdtype(lab.dtype, np.integer)
    np.testing.assert_array_equal(lab, np.asarray(expected).reshape(96, 128))
    assert lab.max() >= 2 and set(np.unique(lab)) == set(range(lab.max() + 1))  # instances 1..n
    assert json.dumps(info, default=str)  # the result description is serialisable

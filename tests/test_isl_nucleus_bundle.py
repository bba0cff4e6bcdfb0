"""isl_nucleus_seg end to end: both stages through the bundle's train.json (in-process ConfigWorkflow, tiny
network, two iterations), inference, MONAI Label's BundleInferTask, DDP with two CPU processes, named
errors on bad input and the few-shot script."""

import csv
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import torch
from ignite.engine import Events
from monai.handlers import from_engine

from common.data import ManifestError
from common.io import read_image, write_ome_tiff
from common.synthetic import write_dataset_2d_isl
from zoo_testing import BUNDLES, TINY, TINY_TRAIN, run_bundle

B = "isl_nucleus_seg"
BUNDLE = os.path.join(BUNDLES, B)
pytestmark = pytest.mark.slow


def _workflow(overrides, config="train.json", workflow_type="train", bundle_root=BUNDLE):
    from monai.bundle import ConfigWorkflow

    files = [os.path.join(BUNDLE, "configs", c) for c in ([config] if isinstance(config, str) else config)]
    wf = ConfigWorkflow(config_file=files if len(files) > 1 else files[0], workflow_type=workflow_type,
                        **dict(overrides, bundle_root=str(bundle_root)))
    wf.initialize()
    return wf


def _cause(exc, kind):
    """``exc`` or the first exception of type ``kind`` in its chain of causes."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("isl_data")
    manifest = write_dataset_2d_isl(str(d), n_images=3, shape=(64, 64), n_cells=5, seed=4)
    header, *rows = list(csv.reader(open(manifest)))
    out = {"dir": str(d)}
    for name, part in {"train": rows[:2], "val": rows[2:]}.items():
        out[name] = _write_csv(d / f"{name}.csv", header, part)
    return out


def _overrides(data, out, **kw):
    ov = dict(TINY[B], **TINY_TRAIN[B], train_manifest=data["train"], val_manifest=data["val"],
              ckpt_dir=str(out / "models"), output_dir=str(out / "runs"))
    ov.update(kw)
    return ov


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Stage 0 then stage 1 (init = stage 0), two iterations each, through configs/train.json."""
    out = tmp_path_factory.mktemp("isl_run")
    res = {"out": out}
    wf0 = _workflow(_overrides(data, out, stage=0))
    wf0.run()
    res["stage0_metrics"] = dict(wf0.parser.get_parsed_content("validate#evaluator").state.metrics)
    res["stage0_iterations"] = wf0.parser.get_parsed_content("train#trainer").state.iteration
    res["stage0_loss_fn"] = type(wf0.parser.get_parsed_content("loss")).__name__
    wf0.finalize()
    wf1 = _workflow(_overrides(data, out, stage=1))
    net1 = wf1.parser.get_parsed_content("network")
    res["stage1_init_state"] = {k: v.detach().clone() for k, v in net1.state_dict().items()}
    trainer = wf1.parser.get_parsed_content("train#trainer")
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: losses.append(from_engine(["loss"], first=True)(e.state.output)))
    wf1.run()
    res["stage1_iterations"] = trainer.state.iteration
    res["stage1_losses"] = [float(v) for v in losses]
    res["stage1_metrics"] = dict(wf1.parser.get_parsed_content("validate#evaluator").state.metrics)
    res["stage1_head"] = type(net1.head).__name__
    wf1.finalize()
    return res


def test_two_iteration_training_of_each_stage(trained):
    out = trained["out"]
    assert trained["stage0_iterations"] == 2 and trained["stage1_iterations"] == 2
    assert trained["stage0_loss_fn"] == "L1Loss" and trained["stage1_head"] == "ShiftedSigmoid"
    assert -1.0 <= trained["stage0_metrics"]["val_pearson"] <= 1.0
    assert 0.0 <= trained["stage1_metrics"]["val_iou"] <= 1.0
    assert len(trained["stage1_losses"]) == 2
    assert all(0.0 <= v <= 1.0 for v in trained["stage1_losses"])  # a soft Jaccard loss of probabilities
    s0 = torch.load(out / "models" / "model_stage0.pt", weights_only=True)  # plain state dicts
    s1 = torch.load(out / "models" / "model.pt", weights_only=True)
    assert set(s0) == set(s1) and "base.encoder.conv0.weight" in s0
    # stage 1 started from the whole stage-0 network (every tensor), and training changed it
    init = trained["stage1_init_state"]
    assert all(torch.equal(init[k].cpu(), s0[k]) for k in s0)
    assert any(not torch.equal(s1[k], s0[k]) for k in s0 if s0[k].is_floating_point())


def test_stage1_scratch_differs_from_isl_init(data, trained, tmp_path):
    wf = _workflow(_overrides(data, tmp_path, stage=1, init="scratch"))
    net = wf.parser.get_parsed_content("network")
    s0 = torch.load(trained["out"] / "models" / "model_stage0.pt", weights_only=True)
    w = net.state_dict()["base.encoder.conv0.weight"].cpu()
    assert not torch.equal(w, s0["base.encoder.conv0.weight"])


def test_evaluate_config_reloads_the_saved_model(data, trained, tmp_path):
    """evaluate.json on the stage-0 model reproduces the Pearson r measured when it was saved."""
    ov = _overrides(data, trained["out"], stage=0)
    wf = _workflow(ov, ["train.json", "evaluate.json"], bundle_root=tmp_path)
    wf.run()
    r = wf.parser.get_parsed_content("validate#evaluator").state.metrics["val_pearson"]
    assert r == pytest.approx(trained["stage0_metrics"]["val_pearson"], abs=1e-5)
    rows = list(csv.reader(open(tmp_path / "eval" / "stage0" / "val_pearson_raw.csv")))
    assert len(rows) == 2 and rows[1][0].endswith("brightfield_02.ome.tif")  # header + the validation image
    assert float(rows[1][1]) == pytest.approx(r, abs=1e-5)


def test_inference_mask_and_stain_keep_input_size(trained, tmp_path):
    out = trained["out"]
    rng = np.random.default_rng(0)
    write_ome_tiff(tmp_path / "in" / "odd.ome.tif", rng.random((3, 70, 90)).astype(np.float32), "CYX",
                   spacing_um=(0.5, 0.5))
    ov = dict(TINY[B], dataset_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "pred"),
              ckpt_path=str(out / "models" / "model.pt"))
    wf = _workflow(ov, "inference.json", "infer")
    wf.run()
    mask, spacing, known = read_image(tmp_path / "pred" / "odd_nuclei.ome.tif", spatial_dims=2)
    assert mask.shape == (1, 70, 90) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1} and known and np.allclose(spacing, (0.5, 0.5))
    # stage 0: the predicted stain (float), same size
    wf0 = _workflow(dict(ov, stage=0, ckpt_path=str(out / "models" / "model_stage0.pt")), "inference.json", "infer")
    wf0.run()
    stain, _, _ = read_image(tmp_path / "pred" / "odd_stain.ome.tif", spatial_dims=2)
    assert stain.shape == (1, 70, 90) and stain.dtype == np.float32 and stain.std() > 0
    assert sorted(os.listdir(tmp_path / "pred")) == ["odd_nuclei.ome.tif", "odd_stain.ome.tif"]


def test_monailabel_bundle_infer_task_writes_mask_of_input_size(tmp_path):
    """The unmodified inference.json (DenseNet-121, 512 windows) served by MONAI Label's BundleInferTask."""
    pytest.importorskip("monailabel")
    import monai.transforms as mt
    from monai.inferers import SlidingWindowInferer
    from monailabel.tasks.infer.bundle import BundleInferTask

    from common.networks.densenet_unet import DenseNetUNet, ISLNet, ShiftedSigmoid

    root = tmp_path / B
    shutil.copytree(os.path.join(BUNDLE, "configs"), root / "configs")
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    cfg["fast"] = False  # eager fp32, compared exactly below (the fast default's tolerance: tests/test_fast_defaults.py)
    (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    (root / "models").mkdir()
    x = np.random.default_rng(1).random((3, 100, 130)).astype(np.float32)
    img = tmp_path / "field.ome.tif"
    write_ome_tiff(img, x, "CYX")
    torch.manual_seed(0)
    net = ISLNet(DenseNetUNet(in_channels=3), ShiftedSigmoid()).eval()
    xn = torch.as_tensor((x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True))[None]
    inferer = SlidingWindowInferer(roi_size=(512, 512), sw_batch_size=4, overlap=0.25, mode="gaussian")
    with torch.no_grad():  # shift the random network so that about half of the field is "nucleus"
        raw = inferer(xn, net.base)
        net.base.segmentation_head[0].bias += 0.5 - raw.median()
        expected = (inferer(xn, net)[0, 0] >= 0.5).numpy().astype(np.uint8)
    assert 0.2 < expected.mean() < 0.8
    torch.save(net.state_dict(), root / "models" / "model.pt")

    task = BundleInferTask(str(root), conf={})
    assert task.is_valid() and task.labels == {"nucleus": 1}
    result_file, _ = task({"image": str(img), "device": "cpu"})
    assert os.path.isfile(result_file)
    arr = np.squeeze(np.asarray(mt.LoadImage(image_only=True)(result_file)))
    # ITK writes YX as XY: the mask has the input's size (either axis order) and the network's values
    assert arr.shape in {(100, 130), (130, 100)}
    assert np.array_equal(arr if arr.shape == (100, 130) else arr.T, expected)


def test_ddp_two_cpu_processes(data, tmp_path):
    ov = _overrides(data, tmp_path, stage=0, epoch_length=2, batch_size=2)
    p = run_bundle(B, ["train.json", "multi_gpu_train.json"], dict(ov, resume=False), torchrun=2)
    # each of the 2 ranks runs half of the epoch's crops
    per_rank = -(-ov["epoch_length"] * ov["batch_size"] // 2 // ov["batch_size"])
    assert f"Iter: {per_rank}/{per_rank}" in p.output and f"Iter: {per_rank + 1}/" not in p.output
    assert os.path.isfile(tmp_path / "models" / "model_stage0.pt")
    sd = torch.load(tmp_path / "models" / "model_stage0.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in sd)


def test_bad_input_named_before_training(data, tmp_path):
    folder = data["dir"]
    rng = np.random.default_rng(0)
    write_ome_tiff(tmp_path / "two_channels.ome.tif", rng.random((2, 64, 64)).astype(np.float32), "CYX")
    write_ome_tiff(tmp_path / "small_mask.ome.tif", np.ones((48, 64), np.uint8), "YX")
    write_ome_tiff(tmp_path / "empty_mask.ome.tif", np.zeros((64, 64), np.uint8), "YX")
    sig, tgt, lab = (os.path.join(folder, f) for f in ("brightfield_00.ome.tif", "dapi_00.ome.tif", "nuclei_00.ome.tif"))
    bad = _write_csv(tmp_path / "bad.csv", ["path_signal", "path_target", "path_label"],
                     [[str(tmp_path / "two_channels.ome.tif"), tgt, lab],
                      [sig, tgt, str(tmp_path / "small_mask.ome.tif")],
                      [sig, tgt, str(tmp_path / "empty_mask.ome.tif")]])
    with pytest.raises(Exception) as e:  # the preflight, in initialize, before any work
        _workflow(_overrides(data, tmp_path, stage=1, init="scratch", train_manifest=bad)).run()
    err = _cause(e.value, ManifestError)  # MONAI's config resolver wraps it in a RuntimeError
    assert err is not None, repr(e.value)
    msg = str(err)
    assert "two_channels.ome.tif: 2 channel(s), expected 3" in msg and "line 2" in msg
    assert "line 3: shape mismatch" in msg and "small_mask.ome.tif" in msg
    assert "empty_mask.ome.tif: mask is empty" in msg and "line 4" in msg
    assert not os.path.exists(tmp_path / "models" / "model.pt")
    # stage 1 from ISL without a stage-0 model: named before training
    with pytest.raises(Exception) as e:
        _workflow(_overrides(data, tmp_path, stage=1, stage0_ckpt=str(tmp_path / "none.pt"))).run()
    err = _cause(e.value, FileNotFoundError)
    assert err is not None and "train stage 0 first" in str(err) and "none.pt" in str(err)
    assert not os.path.exists(tmp_path / "runs" / "checkpoints_stage1")
    assert not os.path.exists(tmp_path / "models")  # found before any output folder was made


def _synthetic_aisegcell(data, d):
    """The layout of experiments.isl_data.prepare from the synthetic phantoms: fig3a fields p0001 (train,
    also the tile pool), p0011 and p0013 (test); done.txt marks it prepared."""
    shutil.copytree(data["dir"], d)
    header, *rows = list(csv.reader(open(d / "manifest.csv")))
    for name, row in zip(("p0001", "p0011", "p0013"), rows):
        _write_csv(d / f"fig3a_{name}.csv", header, [row])
    _write_csv(d / "fig3a.csv", header, rows)
    _write_csv(d / "pool_p0001.csv", header, rows[:3])
    (d / "done.txt").write_text("downsample=2 tile=128\n")
    return d


def test_fewshot_experiment_equal_budget_seeded_subsets(data, tmp_path):
    from experiments import isl_fewshot as fs

    d = _synthetic_aisegcell(data, tmp_path / "data")
    net = {k: v for k, v in TINY[B].items() if k.startswith("network_def")}
    res = fs.run(out_dir=str(tmp_path / "out"), data_dir=str(d), seeds=[0, 1], ns=[1, 2], inits=["isl", "scratch"],
                 stage0_ckpt=None, stage0_iterations=2, iterations=3, batch_size=2, patch_size=64, eval_roi=64,
                 net_overrides=net)
    rows = res["runs"]
    assert [(r["seed"], r["n_images"], r["init"]) for r in rows] == [
        (s, n, i) for s in (0, 1) for n in (1, 2) for i in ("isl", "scratch")]
    assert all(r["iterations"] == 3 for r in rows)  # equal budget
    assert all(0.0 <= r["val_iou"] <= 1.0 for r in rows) and len(res["stage0"]) == 2
    pool = list(csv.reader(open(d / "pool_p0001.csv")))[1:]
    for s in (0, 1):  # N tiles = the first N of the seed's permutation of the pool
        order = np.random.default_rng(s).permutation(len(pool))
        for n in (1, 2):
            assert list(csv.reader(open(d / f"fewshot_p0001_n{n}_s{s}.csv")))[1:] == [pool[i] for i in order[:n]]
    test = list(csv.reader(open(d / "fewshot_test.csv")))[1:]
    assert [r[0] for r in test] == [list(csv.reader(open(d / f"fig3a_{f}.csv")))[1][0] for f in ("p0011", "p0013")]
    table = (tmp_path / "out" / "fewshot.md").read_text()
    assert "| 1 |" in table and "±" in table and "0 (stage 0 only)" in table


AUG_TRANSFORMS = {"aug_flip": ["RandFlipd", "RandFlipd"], "aug_rot90": ["RandRotate90d"], "aug_zoom": ["RandZoomd"],
                  "aug_contrast": ["RandAdjustContrastd"], "aug_noise": ["RandGaussianNoised"],
                  "aug_smooth": ["RandGaussianSmoothd"], "aug_bias_field": ["RandBiasFieldd"]}


def test_each_augmentation_switch_and_the_documented_defaults(data, tmp_path):
    """train.json: every switch adds its MONAI transform after the crop; the defaults are the README's."""
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(os.path.join(BUNDLE, "configs", "train.json"))
    defaults = {k: p[k] for k in AUG_TRANSFORMS}
    assert defaults == {"aug_flip": True, "aug_rot90": True, "aug_zoom": 0.3, "aug_contrast": 0.5, "aug_noise": 0.3,
                        "aug_smooth": 0.3, "aug_bias_field": 0.5}
    assert (p["normalise"], p["norm_percentiles"], p["flatfield_sigma"]) == ("percentile", [1, 99], 32)
    off = {k: (False if k in ("aug_flip", "aug_rot90") else 0.0) for k in AUG_TRANSFORMS}
    for key, names in AUG_TRANSFORMS.items():
        ov = dict(off, **{key: True if key in ("aug_flip", "aug_rot90") else 1.0})
        q = ConfigParser()
        q.read_config(os.path.join(BUNDLE, "configs", "train.json"))
        q.update(dict(_overrides(data, tmp_path, stage=1, init="scratch"), **ov))
        got = [type(t).__name__ for t in q.get_parsed_content("train#patching").transforms]
        assert got == ["SpatialPadd", "RandForegroundPatchd"] + names, key
        if key == "aug_zoom":  # the mask is zoomed with nearest-exact, the image bilinearly
            z = q.get_parsed_content("train#patching").transforms[-1]
            assert list(z.mode) == ["bilinear", "nearest-exact"]


def _det_train(data, out, seed):
    ov = _overrides(data, out, stage=1, init="scratch", seed=seed, num_epochs=1, epoch_length=3,
                    aug_zoom=1.0, aug_contrast=1.0, aug_noise=1.0, aug_smooth=1.0, aug_bias_field=1.0)
    torch.set_num_threads(1)
    wf = _workflow(ov)
    wf.run()
    iou = float(wf.parser.get_parsed_content("validate#evaluator").state.metrics["val_iou"])
    wf.finalize()
    return torch.load(out / "models" / "model.pt", weights_only=True), iou


def test_seeded_run_with_every_augmentation_is_deterministic(data, tmp_path):
    a, ia = _det_train(data, tmp_path / "a", 3)
    b, ib = _det_train(data, tmp_path / "b", 3)
    c, _ = _det_train(data, tmp_path / "c", 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert round(ia, 3) == round(ib, 3)
    assert any(not torch.allclose(a[k], c[k]) for k in a if a[k].dtype.is_floating_point)


def test_inference_normalisation_follows_the_model_record(trained):
    """A record with normalise 'percentile' (what training writes now) gets the robust percentiles and the
    flat-field division; a record without it (the shipped v0.2.0 model) keeps the z-score it was trained with."""
    from monai.bundle import ConfigParser

    from common.networks.record import read_record

    ckpt = str(trained["out"] / "models" / "model.pt")
    rec = read_record(ckpt)["settings"]
    assert rec["normalise"] == "percentile" and rec["flatfield_sigma"] == 32 and rec["norm_percentiles"] == [1, 99]

    def names(ckpt_path):
        p = ConfigParser()
        p.read_config(os.path.join(BUNDLE, "configs", "inference.json"))
        p.update(dict(TINY[B], ckpt_path=ckpt_path))
        return [type(t).__name__ for t in p.get_parsed_content("preprocessing").transforms]

    assert names(ckpt) == ["LoadMicroscopyd", "DivideBackgroundd", "RobustScaleIntensityd", "EnsureTyped"]
    shipped = os.path.join(BUNDLE, "models", "model.pt")
    assert "normalise" not in read_record(shipped)["settings"]
    assert names(shipped) == ["LoadMicroscopyd", "NormalizeIntensityd", "EnsureTyped"]


def test_crossacq_within_reference_holds_out_its_test_field(tmp_path):
    """experiments.isl_crossacq's within-acquisition reference and adaptation directions keep their test fields
    out of training."""
    from experiments import isl_crossacq as xa

    header = ("path_signal", "path_target", "path_label")
    data = {}
    for acq, fields in (("fig2a", ("t00011", "t00036", "t00068", "t00101")), ("fig3a", ("p0001", "p0011", "p0013"))):
        rows = [tuple(f"{acq}_{f}_{k}.ome.tif" for k in ("signal", "target", "mask")) for f in fields]
        data[acq] = _write_csv(tmp_path / f"{acq}.csv", header, rows)
        for f, row in zip(fields, rows):
            data[f"{acq}_{f}"] = _write_csv(tmp_path / f"{acq}_{f}.csv", header, [row])
    train, test, name = xa.manifests(data, "fig2a_within")
    data["fig2a_without_t00101"] = train  # as prepare() lists it on a rerun: combined manifests are not fields
    train, test, name = xa.manifests(data, "fig2a_within")
    rows = list(csv.reader(open(train)))[1:]
    assert [r[0] for r in rows] == [f"fig2a_{f}_signal.ome.tif" for f in ("t00011", "t00036", "t00068")]
    assert test == data["fig2a_t00101"] and name == "fig2a_t00101"
    train, test, name = xa.manifests(data, "fig3a_within")
    assert [r[0] for r in list(csv.reader(open(train)))[1:]] == ["fig3a_p0001_signal.ome.tif", "fig3a_p0011_signal.ome.tif"]
    assert xa.manifests(data, "fig3a_to_fig2a") == (data["fig3a"], data["fig2a"], "fig2a")
    # adaptation: fig3a plus one labelled fig2a frame, tested on the other fig2a frames only
    data["fig3a_without_p0013"] = xa.manifests(data, "fig3a_within")[0]
    train, test, name = xa.manifests(data, "fig3a_plus_t00011_to_fig2a")
    assert [r[0] for r in list(csv.reader(open(train)))[1:]] == [
        f"fig3a_{f}_signal.ome.tif" for f in ("p0001", "p0011", "p0013")] + ["fig2a_t00011_signal.ome.tif"]
    assert [r[0] for r in list(csv.reader(open(test)))[1:]] == [
        f"fig2a_{f}_signal.ome.tif" for f in ("t00036", "t00068", "t00101")]
    assert name == "fig2a_without_t00011"
    with pytest.raises(ValueError, match="choose from"):
        xa.run(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path), directions=["fig2a_sideways"])


def test_crossacq_scores_the_bright_field_annotation_and_reuses_finished_runs(tmp_path):
    """experiments.isl_crossacq on the real aiSEGcell data (8x downsampled, 60 iterations): every model tested on
    fig2a is also scored against fig2a's bright-field annotation (``_w00_m00_mask``, downsampled as the stain
    masks), the two annotations' agreement is the IoU by hand, and a second call reuses the finished run."""
    from experiments import isl_crossacq as xa
    from experiments import isl_data

    if not os.path.isdir(os.path.join(isl_data.SOURCE, "fig2a_timelapse")):
        pytest.skip("../shared/data/aisegcell_bf_nuc is not beside the project")
    data_dir = tmp_path / "data"
    kw = dict(out_dir=str(tmp_path / "out"), data_dir=str(data_dir), seeds=[0], directions=["fig3a_to_fig2a"],
              iterations=60, pretrain_iterations=0, downsample=8, patch_size=64, batch_size=2, eval_roi=128)
    first = xa.run(**kw)
    run = first["runs"][0]
    assert 0.0 <= run["bf_val_iou"] <= 1.0 and len(run["bf_per_image"]) == 4
    frames = ("t00011", "t00036", "t00068", "t00101")
    rows = isl_data.read_manifest_rows(str(data_dir / "fig2a_bf_annotation.csv"))
    assert [r[2] for r in rows] == [f"fig2a_{t}_bfmask.ome.tif" for t in frames]
    assert [r[:2] for r in rows] == [r[:2] for r in isl_data.read_manifest_rows(str(data_dir / "fig2a.csv"))]
    for t, agreement in zip(frames, first["bf_annotation"]["stain_vs_bf_iou"]):
        bf = read_image(str(data_dir / f"fig2a_{t}_bfmask.ome.tif"), 2)[0][0] > 0
        stain = read_image(str(data_dir / f"fig2a_{t}_mask.ome.tif"), 2)[0][0] > 0
        raw = np.asarray(Image.open(os.path.join(isl_data.SOURCE, "fig2a_timelapse", f"{t}_w00_m00_mask.png")))
        raw = (raw[..., 0] if raw.ndim == 3 else raw) > 0
        blocks = raw[: raw.shape[0] // 8 * 8, : raw.shape[1] // 8 * 8].reshape(raw.shape[0] // 8, 8, -1, 8)
        np.testing.assert_array_equal(bf, blocks.mean(axis=(1, 3)) >= 0.5)  # a pixel: at least half its block
        assert agreement == pytest.approx((bf & stain).sum() / (bf | stain).sum(), abs=1e-6)
    # evaluate.json on the run's own test manifest gives the run's own validation, image by image
    again = xa.evaluate_model(str(tmp_path / "out" / "fig3a_to_fig2a_default_s0"), str(data_dir / "fig2a.csv"), {}, 128)
    assert again["per_image"] == pytest.approx(run["per_image"], abs=1e-6)
    model = tmp_path / "out" / "fig3a_to_fig2a_default_s0" / "models" / "model.pt"
    stamp = os.path.getmtime(model)
    second = xa.run(**kw)
    assert second["reused_runs"] == 1 and os.path.getmtime(model) == stamp
    one = second["one_pixel"]["fig2a"]  # the boundary tolerance of the test masks, in the table's notes
    assert len(one["eroded"]) == 4 and all(0 <= e < d < 1 for e, d in zip(one["eroded"], one["dilated"]))
    assert "one pixel smaller all around scores IoU" in (tmp_path / "out" / "crossacq.md").read_text()
    assert second["runs"][0]["val_iou"] == run["val_iou"] and second["runs"][0]["bf_val_iou"] == run["bf_val_iou"]
    assert "IoU against the bright-field annotation" in open(tmp_path / "out" / "crossacq.md").read()


def test_one_pixel_iou_by_hand(tmp_path):
    """A 4x4 square: one pixel smaller is its 2x2 core (IoU 4/16), one pixel larger (4-connected) adds a row
    of 4 on each side (IoU 16/32)."""
    from experiments import isl_data

    m = np.zeros((10, 10), np.uint8)
    m[3:7, 3:7] = 1
    write_ome_tiff(tmp_path / "m.ome.tif", m, "YX")
    isl_data.write_manifest(str(tmp_path / "x.csv"), [["s.ome.tif", "t.ome.tif", "m.ome.tif"]])
    assert isl_data.one_pixel_iou(str(tmp_path / "x.csv")) == {"eroded": [pytest.approx(0.25)],
                                                               "dilated": [pytest.approx(0.5)]}


def test_shipped_model_takes_the_documented_in_channels_override(tmp_path):
    """The README's advice for one bright-field channel (``--in_channels 1``, also at inference) on the shipped
    model, as a user types it: the override agrees with the model record, so the recorded network (another size
    than inference.json's default) is built and the mask written; a contradicting value is a named error."""
    from experiments.runner import BundleRunError, run_subprocess

    sample = os.path.join(os.path.dirname(BUNDLE), os.pardir, "samples", "aisegcell_p0011_brightfield.png")
    p = run_subprocess("isl_nucleus_seg", "inference.json",
                       {"dataset_dir": os.path.abspath(sample), "output_dir": str(tmp_path / "out"), "in_channels": 1})
    assert os.path.isfile(tmp_path / "out" / "aisegcell_p0011_brightfield_nuclei.ome.tif"), p.output[-2000:]
    run_subprocess("isl_nucleus_seg", "inference.json",  # the same run without the override: the same mask
                   {"dataset_dir": os.path.abspath(sample), "output_dir": str(tmp_path / "plain")})
    with_override = read_image(str(tmp_path / "out" / "aisegcell_p0011_brightfield_nuclei.ome.tif"), 2)[0]
    np.testing.assert_array_equal(
        with_override, read_image(str(tmp_path / "plain" / "aisegcell_p0011_brightfield_nuclei.ome.tif"), 2)[0])
    assert with_override.max() == 1 and 0 < with_override.mean() < 0.5  # nuclei found, not all foreground
    three = tmp_path / "three_channels.ome.tif"  # 3 channels pass the input check; the network's 3 do not
    write_ome_tiff(str(three), np.repeat(np.asarray(Image.open(sample).convert("L"))[None], 3, axis=0), "CYX")
    with pytest.raises(BundleRunError, match=r"given on the command line \(in_channels\).*base#in_channels: 3 vs 1"):
        run_subprocess("isl_nucleus_seg", "inference.json",
                       {"dataset_dir": str(three), "output_dir": str(tmp_path / "out3"), "in_channels": 3})

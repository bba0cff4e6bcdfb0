"""The Spotlight experiments: hazy phantoms, the 2D ablation (tiny run, determinism) and the 3D report's checks."""

import json
import os

import numpy as np
import pytest


def test_hazy_phantom_parameters():
    """Defaults unchanged; out-of-stack haze brightens the stain's background only; debris_dn 0 hides debris."""
    from common.synthetic import make_cell_field_3d

    kw = dict(shape=(12, 48, 48), n_cells=3, seed=5, debris_per_1000um3=6.0)
    base = make_cell_field_3d(**kw)
    same = make_cell_field_3d(**kw, out_of_stack_haze=0.0, debris_dn=0.05)
    for k in ("signal", "target", "labels", "ri"):
        np.testing.assert_array_equal(base[k], same[k])
    hazy = make_cell_field_3d(**kw, out_of_stack_haze=0.5)
    np.testing.assert_array_equal(hazy["labels"], base["labels"])
    bg = base["labels"] == 0
    assert hazy["target"][bg].mean() > base["target"][bg].mean() + 5  # tens of photons of extra haze
    hidden = make_cell_field_3d(**kw, debris_dn=0.0)
    assert len(base["debris_zyx"]) > 0
    idx = tuple(base["debris_zyx"].T)
    np.testing.assert_allclose(base["ri"][idx] - hidden["ri"][idx], 0.05, atol=1e-6)


@pytest.mark.parametrize("name,want", [("mse", ("mse", None, 1.0, None)), ("min@0.5", ("spotlight", "min", 0.5, None)),
                                       ("rescaled@0.3+warm", ("spotlight", "rescaled", 0.3, "warm")),
                                       ("none@0.7+bias", ("spotlight", "none", 0.7, "bias"))])
def test_parse_variant(name, want):
    from experiments.spotlight_ablation import parse_variant

    v = parse_variant(name)
    assert (v["loss"], v["clamp"], v["lam"], v["init"]) == want
    assert parse_variant("min@0.5+soft")["k"] == -0.6 and v["k"] == -0.95


@pytest.mark.parametrize("bad", ["mse2", "max@0.5", "min@", "min@0.5+hot"])
def test_parse_variant_rejects(bad):
    from experiments.spotlight_ablation import parse_variant

    with pytest.raises(ValueError, match="variant"):
        parse_variant(bad)


def test_converged_is_the_trend_over_the_last_fifth():
    from experiments.spotlight_ablation import converged

    it = np.arange(100, 1100, 100)
    # a line rising 0.001 per 100 iterations: change over the last 200 iterations = 0.002
    ok, change = converged(it, 0.5 + 1e-5 * it)
    assert ok and change == pytest.approx(0.002)
    # noise around a plateau is not learning; a steady rise of 0.05 per 200 iterations is
    ok, change = converged(it, [0.5, 0.6, 0.55, 0.6, 0.58, 0.6, 0.59, 0.6, 0.61, 0.6])
    assert ok
    ok, change = converged(it, 2.5e-4 * it)
    assert not ok and change == pytest.approx(0.05)


def test_expectations_by_hand():
    from experiments.spotlight_vs_fnet import expectations

    per_seed = {"F-net (MSE)": {"bg_std": [10, 10, 10], "psnr_fg": [20, 20, 20], "ap50": [0.5, 0.5, 0.5]},
                "Spotlight": {"bg_std": [4, 6, 5], "psnr_fg": [19.5, 18.5, 19.3], "ap50": [0.6, 0.52, 0.58]}}
    c = {x["expectation"].split()[0]: x for x in expectations(per_seed)}
    assert c["background"]["holds"] and c["background"]["seeds"] == "2/3" and "0.50" in c["background"]["measured"]
    assert c["foreground"]["holds"] and c["foreground"]["seeds"] == "2/3"  # mean -0.9 dB
    assert c["AP@0.5"]["holds"] and c["AP@0.5"]["seeds"] == "2/3"  # mean +0.067


def test_bundle_overrides_identical_but_for_the_loss():
    from experiments.spotlight_vs_fnet import overrides

    f = overrides(1, 100, 5)
    s = overrides(1, 100, 5, {"lambda_mse": 0.3})
    assert {k: v for k, v in s.items() if k != "lambda_mse"} == f
    assert f["epoch_length"] * f["num_epochs"] == 100 and f["resume"] is False


@pytest.fixture(scope="module")
def tiny_ablation(tmp_path_factory):
    from experiments import spotlight_ablation

    out = tmp_path_factory.mktemp("abl")
    spotlight_ablation.main(out_dir=str(out), seeds=1, variants=["mse", "min@0.5+warm"], iterations=6, batch=2,
                            patch=32, jobs=1, n_volumes=(2, 1, 1))
    return out


def test_tiny_ablation_writes_table_curves_and_warm_start(tiny_ablation):
    res = json.loads((tiny_ablation / "results.json").read_text())
    assert set(res) == {"mse_s0", "min@0.5+warm_s0"}
    for r in res.values():
        assert r["history"]["iteration"][-1] == 6 and len(r["history"]["val_pearson"]) >= 2
        for k in ("pearson", "psnr_fg", "bg_std", "ap50", "ap75", "mAP", "bg_above"):
            assert np.isfinite(r["metrics"][k])
    table = (tiny_ablation / "ablation.md").read_text()
    assert "| min@0.5+warm |" in table and "bg std / F-net" in table
    assert (tiny_ablation / "curves.png").stat().st_size > 1000
    # the ratio to F-net of F-net itself is 1
    assert "| mse | " in table and "| 1.00 |" in table.split("| mse |")[1].split("\n")[0]


def test_seeded_training_is_deterministic(tiny_ablation):
    """Same seed, same data: the same loss history and validation values (CPU)."""
    from experiments.spotlight_ablation import train_one

    data = str(tiny_ablation / "data")
    a = train_one("min@0.5", 3, data, 4, 2, 32)["history"]
    b = train_one("min@0.5", 3, data, 4, 2, 32)["history"]
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["val_pearson"], b["val_pearson"], rtol=0, atol=1e-6)
    assert os.path.isfile(tiny_ablation / "runs" / "min@0.5_s3.pt")


def test_fnet_output_bias_init_and_record():
    """``output_bias`` sets the output convolution's initial bias only, and travels in the network record."""
    import torch

    from common.networks.fnet import FNet

    torch.manual_seed(0)
    a = FNet(spatial_dims=2, depth=2, mult_chan=4)
    torch.manual_seed(0)
    b = FNet(spatial_dims=2, depth=2, mult_chan=4, output_bias=-1.0)
    assert torch.all(b.conv_out.bias == -1.0) and not torch.all(a.conv_out.bias == -1.0)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if n != "conv_out.bias":
            assert torch.equal(p, q), n
    assert b._init_config["output_bias"] == -1.0
    x = torch.zeros(1, 1, 16, 16)
    b.eval()
    assert torch.allclose(b(x), torch.full_like(x, -1.0), atol=0.05)  # starts below the threshold 0


def test_background_above_counts_background_voxels_at_or_above_zero(tmp_path):
    """By hand: a target with a bright block (its Otsu foreground) and a prediction that is >= 0 on a known
    number of the background voxels."""
    from common.io import write_ome_tiff
    from experiments.spotlight_vs_fnet import background_above

    tgt = np.full((4, 8, 8), 10.0, np.float32)
    tgt[:, 2:6, 2:6] = 100.0  # foreground: 64 voxels; background: 192
    pred = np.full(tgt.shape, -1.0, np.float32)
    pred[:, 2:6, 2:6] = 2.0  # foreground predicted as such: not counted
    pred[0, 0, :] = 0.0  # 8 background voxels exactly at the threshold
    pred[1, 7, :4] = 0.5  # 4 more above it
    write_ome_tiff(tmp_path / "s.ome.tif", tgt, "ZYX")
    write_ome_tiff(tmp_path / "t.ome.tif", tgt, "ZYX")
    (tmp_path / "pred").mkdir()
    write_ome_tiff(tmp_path / "pred" / "s_pred.ome.tif", pred, "ZYX")
    (tmp_path / "m.csv").write_text("path_signal,path_target\ns.ome.tif,t.ome.tif\n")
    assert background_above(str(tmp_path / "pred"), str(tmp_path / "m.csv")) == pytest.approx(12 / 192)


def test_clipped_fg_psnr_by_hand(tmp_path):
    """One bright outlier voxel sets the protocol's min-max scale; clipped at the 1 % percentiles the same
    prediction is the target again (PSNR inf). Both values by hand."""
    from common.io import write_ome_tiff
    from experiments.spotlight_vs_fnet import clipped_fg_psnr

    tgt = np.full((4, 8, 8), 10.0, np.float32)
    tgt[:, 2:6, 2:6] = 100.0  # foreground (Otsu): the 64 bright voxels
    pred = tgt.copy()
    pred[0, 0, 0] = 1000.0  # one background voxel far above everything
    write_ome_tiff(tmp_path / "s.ome.tif", tgt, "ZYX")
    write_ome_tiff(tmp_path / "t.ome.tif", tgt, "ZYX")
    (tmp_path / "pred").mkdir()
    write_ome_tiff(tmp_path / "pred" / "s_pred.ome.tif", pred, "ZYX")
    (tmp_path / "m.csv").write_text("path_signal,path_target\ns.ome.tif,t.ome.tif\n")
    proto, clipped = clipped_fg_psnr(str(tmp_path / "pred"), str(tmp_path / "m.csv"), (10.0, 100.0), percent=1.0)
    fg_value = 10 + (100 - 10) * 90 / 990  # the rescale maps [10, 1000] onto [10, 100]
    assert proto == pytest.approx(10 * np.log10(90.0 ** 2 / (100 - fg_value) ** 2))
    assert clipped == np.inf


def test_ablation_rejects_an_unknown_lr_schedule_before_any_work(tmp_path):
    from common.optim import LrScheduleError
    from experiments.spotlight_ablation import main

    with pytest.raises(LrScheduleError, match="'linear'"):
        main(out_dir=str(tmp_path / "abl"), seeds=1, variants=["mse"], iterations=2, lr_schedule="linear")
    assert not (tmp_path / "abl").exists()


@pytest.mark.slow
def test_predict_last_uses_the_newest_checkpoint(tmp_path):
    """The last-iteration network is the one in the newest resumable checkpoint, and it predicts every test volume."""
    import torch

    from common.handlers import latest_loadable_checkpoint
    from common.synthetic import write_dataset_3d
    from experiments.spotlight_vs_fnet import predict_last
    from zoo_testing import TINY, TINY_TRAIN, run_bundle_here, split_manifest

    b = "spotlight_dna"
    data = split_manifest(write_dataset_3d(str(tmp_path / "data"), n_volumes=3, shape=(16, 48, 48), seed=4),
                          {"train": 1, "val": 1, "test": 1})
    work = tmp_path / "run"
    run_bundle_here(b, "train.json", dict(TINY[b], **TINY_TRAIN[b], train_manifest=data["train"],
                                          val_manifest=data["val"], ckpt_dir=str(work / "models"),
                                          output_dir=str(work / "runs")))
    out = predict_last(b, data, str(work))
    assert len(os.listdir(out)) == 1 and os.listdir(out)[0].endswith("_pred.ome.tif")
    last = torch.load(work / "last" / "model.pt", weights_only=True)
    ckpt = torch.load(latest_loadable_checkpoint(str(work / "runs" / "checkpoints")), weights_only=True)["network"]
    assert last.keys() == ckpt.keys() and all(torch.equal(last[k], ckpt[k]) for k in last)
    assert predict_last(b, data, str(work)) == out  # cached

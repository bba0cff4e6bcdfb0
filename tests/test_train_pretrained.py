"""scripts/train_pretrained.py: config overrides, release staging and packaging of trained weights."""

import json
import os
import zipfile

import pytest
import torch

from scripts import train_pretrained as tp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_set_config_value_follows_ids_and_leaves_missing_paths():
    cfg = {"network_def": {"base": {"growth_rate": 32}, "blocks": [1, 2, 3]}, "patch_size": [16, 64, 64]}
    assert tp.set_config_value(cfg, "network_def#base#growth_rate", 16)
    assert tp.set_config_value(cfg, "network_def#blocks#2", 7)
    assert tp.set_config_value(cfg, "patch_size", [8, 32, 32])
    assert not tp.set_config_value(cfg, "network_def#missing#x", 1)
    assert not tp.set_config_value(cfg, "network_def#blocks#9", 1)
    assert cfg == {"network_def": {"base": {"growth_rate": 16}, "blocks": [1, 2, 7]}, "patch_size": [8, 32, 32]}


def test_stage_release_refuses_an_override_that_lands_nowhere(tmp_path):
    w = tmp_path / "w.pt"
    torch.save({}, w)
    with pytest.raises(KeyError, match="no_such_key"):
        tp.stage_release(str(tmp_path), "unet3d_fucci", {"model.pt": str(w)}, {"no_such_key": 1}, {}, {})


@pytest.mark.timeout(600)
def test_staged_release_packages_with_its_overrides_and_record(tmp_path):
    """Weights of a smaller network than the config's default: the packaged configs must build that network."""
    from common.networks.unet3d import UNet3D

    features = [4, 8, 16]
    from common.networks.record import write_record

    net = UNet3D(in_channels=1, out_channels=3, features=features)
    w = tmp_path / "model.pt"
    torch.save(net.state_dict(), w)
    write_record(str(w), net, {"input_channels": [0]})  # what training writes beside the weights
    metrics = {"cells3d_test_f1_nucleus": 0.5}
    dst = tp.stage_release(str(tmp_path), "unet3d_fucci", {"model.pt": str(w)},
                           {"network_def#features": features}, metrics, {"trained_on": "test", "budget": "none"})
    with open(os.path.join(dst, "configs", "inference.json")) as f:
        assert json.load(f)["network_def"]["features"] == features
    with open(os.path.join(dst, "configs", "metadata.json")) as f:
        assert json.load(f)["eval_metrics"] == metrics
    with open(os.path.join(ROOT, "bundles", "unet3d_fucci", "configs", "inference.json")) as f:
        assert json.load(f)["network_def"]["features"] == [64, 128, 256]  # the repository is untouched

    summary_path = tp.package(out_dir=str(tmp_path), torchscript=True)  # ckpt_export loads the weights
    with open(summary_path) as f:
        summary = json.load(f)
    rec = summary["unet3d_fucci"]
    assert rec["config_overrides"] == {"network_def#features": features}
    staged = os.path.join(tmp_path, "release", "unet3d_fucci", "models", "model.pt")
    assert rec["weights"]["model.pt"]["sha256"] == tp._sha256(staged)
    same = torch.load(staged, weights_only=True)
    assert all(torch.equal(same[k], v) for k, v in net.state_dict().items()) and len(same) == len(net.state_dict())
    zpath = os.path.join(tmp_path, "dist", rec["package"]["name"])
    assert tp._sha256(zpath) == rec["package"]["checksum"]
    with zipfile.ZipFile(zpath) as z:
        names = set(z.namelist())
        assert {"unet3d_fucci/models/model.pt", "unet3d_fucci/models/model.json", "unet3d_fucci/models/model.ts",
                "unet3d_fucci/docs/pretrained.json"} <= names
        assert z.read("unet3d_fucci/models/model.json") == (tmp_path / "model.json").read_bytes()
        ts = torch.jit.load(z.open("unet3d_fucci/models/model.ts"))
    x = torch.rand(1, 1, 8, 32, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net(x), rtol=1e-4, atol=1e-5)


def test_ship_puts_weights_records_and_metrics_into_the_bundle(tmp_path):
    """``ship``: the staged weights and records replace the bundle's, the record and metrics follow, configs stay."""
    import shutil

    from common.networks.record import write_record
    from common.networks.unet3d import UNet3D

    bundles = tmp_path / "bundles"
    shutil.copytree(os.path.join(ROOT, "bundles", "unet3d_fucci"), bundles / "unet3d_fucci")
    (bundles / "unet3d_fucci" / "models" / "model.ts").write_bytes(b"an old export")
    meta_path = bundles / "unet3d_fucci" / "configs" / "metadata.json"
    meta = json.load(open(meta_path))
    meta["eval_metrics"] = {"pretrained_old_metric": 1.0, "paper_dice": 0.9}
    json.dump(meta, open(meta_path, "w"))
    inference_before = (bundles / "unet3d_fucci" / "configs" / "inference.json").read_bytes()
    net = UNet3D(in_channels=1, out_channels=3, features=[4, 8, 16])
    w = tmp_path / "run" / "model.pt"
    w.parent.mkdir()
    torch.save(net.state_dict(), w)
    write_record(str(w), net, {"input_channels": [0]})
    out = tmp_path / "staged"
    tp.stage_release(str(out), "unet3d_fucci", {"model.pt": str(w)}, {}, {"cells3d_test_f1_nucleus": 0.5},
                     {"trained_on": "test", "budget": "none"})
    tp.ship(out_dir=str(out), bundles="unet3d_fucci", bundles_dir=str(bundles))
    models = bundles / "unet3d_fucci" / "models"
    assert sorted(f for f in os.listdir(models) if not f.startswith(".")) == ["model.json", "model.pt"]
    assert (models / "model.pt").read_bytes() == (out / "release" / "unet3d_fucci" / "models" / "model.pt").read_bytes()
    assert (models / "model.json").read_bytes() == (tmp_path / "run" / "model.json").read_bytes()
    rec = json.load(open(bundles / "unet3d_fucci" / "docs" / "pretrained.json"))
    assert rec["weights"]["model.pt"]["sha256"] == tp._sha256(str(models / "model.pt")) and "this repository" in rec["released"]
    assert json.load(open(meta_path))["eval_metrics"] == {"paper_dice": 0.9, "pretrained_cells3d_test_f1_nucleus": 0.5}
    assert (bundles / "unet3d_fucci" / "configs" / "inference.json").read_bytes() == inference_before
    with pytest.raises(ValueError, match="no staged release for \\['isl_cell_instance'\\]"):
        tp.ship(out_dir=str(out), bundles="isl_cell_instance", bundles_dir=str(bundles))


def test_stable_copy_gives_the_same_bytes_for_the_same_tensors(tmp_path):
    """torch.save to a path names the archive after the (temporary) file; two saves of the same weights
    under different names differ byte-wise, their stable copies do not."""
    net = torch.nn.Conv2d(2, 3, 3)
    a, b = tmp_path / ".tmp_1_abc.pt", tmp_path / ".tmp_2_xyz.pt"
    torch.save(net.state_dict(), a)
    torch.save(net.state_dict(), b)
    assert a.read_bytes() != b.read_bytes()
    ca, cb = tp.stable_copy(str(a), str(tmp_path / "a.pt")), tp.stable_copy(str(b), str(tmp_path / "b.pt"))
    assert open(ca, "rb").read() == open(cb, "rb").read()
    torch.testing.assert_close(torch.load(ca, weights_only=True), net.state_dict())

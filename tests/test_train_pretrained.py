"""scripts/train_pretrained.py: config overrides, release staging and packaging of trained weights."""

import json
import os
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import train_pretrained as tp  # noqa: E402


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
    net = UNet3D(in_channels=1, out_channels=3, features=features)
    w = tmp_path / "model.pt"
    torch.save(net.state_dict(), w)
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
    assert rec["weights"]["model.pt"]["sha256"] == tp._sha256(str(w))
    zpath = os.path.join(tmp_path, "dist", rec["package"]["name"])
    assert tp._sha256(zpath) == rec["package"]["checksum"]
    with zipfile.ZipFile(zpath) as z:
        names = set(z.namelist())
        assert {"unet3d_fucci/models/model.pt", "unet3d_fucci/models/model.ts",
                "unet3d_fucci/docs/pretrained.json"} <= names
        ts = torch.jit.load(z.open("unet3d_fucci/models/model.ts"))
    x = torch.rand(1, 1, 8, 32, 32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net(x), rtol=1e-4, atol=1e-5)

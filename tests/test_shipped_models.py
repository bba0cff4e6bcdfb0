"""The shipped weights (bundles/*/models/model.pt + model.json) with the real MONAI bundle tools and no
overrides: verify_net_in_out, ckpt_export (TorchScript equals the eager network built from the record), and
inference run from the bundle's own folder on a real sample, the way a user types it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from zoo_testing import BUNDLES, env, run_script, shipped_sample_or_skip

SHIPPED = sorted(b for b in os.listdir(BUNDLES) if os.path.isfile(os.path.join(BUNDLES, b, "models", "model.pt")))


def _tool(bundle, *args, cwd=None):
    """``python -m monai.bundle <args>`` from the bundle's folder, as a separate process (what a user types)."""
    root = os.path.join(BUNDLES, bundle)
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd or root, env=env(),
                          capture_output=True, text=True, timeout=600)


def _tool_here(bundle, *args):
    """The same command through ``monai.bundle``'s ``__main__`` in this process (zoo_testing.run_script)."""
    return run_script("monai.bundle", *args, cwd=os.path.join(BUNDLES, bundle))


def test_the_segmentation_bundles_ship_weights_and_the_others_do_not():
    assert SHIPPED == ["isl_cell_instance", "isl_nucleus_seg", "unet3d_fucci"]
    for b in ("fnet_baseline", "spotlight_dna"):
        assert not [f for f in os.listdir(os.path.join(BUNDLES, b, "models")) if f.endswith((".pt", ".ts"))]
        rec = json.load(open(os.path.join(BUNDLES, b, "docs", "pretrained.json")))
        assert rec["weights"] == {} and "prepare_allen.py" in rec["released"]
        meta = json.load(open(os.path.join(BUNDLES, b, "configs", "metadata.json")))
        assert not [k for k in meta.get("eval_metrics", {}) if k.startswith("pretrained_")]


@pytest.mark.parametrize("bundle", SHIPPED)
def test_verify_net_in_out_on_shipped_weights(bundle):
    p = _tool_here(bundle, "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                   "--config_file", "configs/inference.json")
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "data shape of network is verified with no error" in out, out[-4000:]


@pytest.mark.parametrize("bundle", SHIPPED)
def test_ckpt_export_of_shipped_weights_equals_the_recorded_network(bundle, tmp_path):
    from common.networks.record import build_network, read_record

    root = os.path.join(BUNDLES, bundle)
    ts = tmp_path / "model.ts"
    p = _tool_here(bundle, "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", "models/model.pt",
                   "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json")
    assert p.returncode == 0 and ts.is_file(), (p.stdout + p.stderr)[-4000:]
    ckpt = os.path.join(root, "models", "model.pt")
    net = build_network(read_record(ckpt)["network_def"])
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    net.eval()
    inp = json.load(open(os.path.join(root, "configs", "metadata.json")))["network_data_format"]["inputs"]["image"]
    shape = [16, 64, 64] if len(inp["spatial_shape"]) == 3 else [64, 96]
    x = torch.randn(1, inp["num_channels"], *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bundle", SHIPPED)
def test_inference_from_the_bundle_folder_with_no_overrides(bundle, tmp_path):
    from common.io import read_image

    path = shipped_sample_or_skip(bundle, tmp_path / "in")
    dims = 3 if bundle == "unet3d_fucci" else 2
    p = _tool(bundle, "run", "--config_file", "configs/inference.json", "--dataset_dir", str(tmp_path / "in"),
              "--output_dir", str(tmp_path / "out"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "building the network recorded with the weights" in p.stdout + p.stderr  # not the config's default size
    outs = sorted(os.listdir(tmp_path / "out"))
    assert outs
    src = read_image(path, dims)[0]
    for o in outs:
        arr = read_image(str(tmp_path / "out" / o), dims)[0]
        assert arr.shape[1:] == src.shape[1:], o
        assert 0 < np.count_nonzero(arr) < arr.size, f"{o}: empty or full prediction on real cells"

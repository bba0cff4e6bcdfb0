"""The real MONAI bundle tools against every bundle: verify_metadata (offline schema), verify_net_in_out,
ckpt_export (TorchScript equals eager). ``python -m monai.bundle``'s own ``__main__`` runs in this process
(zoo_testing.run_script); the docs test runs the same commands as separate processes."""

import json
import os

import pytest
import torch
from monai.bundle import ConfigParser

from zoo_testing import BUNDLES, SCHEMA, TINY, run_bundle_here, run_script

NO_MODEL = "/nonexistent/model.pt"


def _tiny(bundle):
    """Tiny network overrides, without a shipped model's record, with the input channels of metadata.json."""
    root = os.path.join(BUNDLES, bundle)
    ov = dict(TINY.get(bundle, {}), ckpt_path=NO_MODEL)
    if "in_channels" in json.load(open(os.path.join(root, "configs", "inference.json"))):
        meta = json.load(open(os.path.join(root, "configs", "metadata.json")))
        ov["in_channels"] = meta["network_data_format"]["inputs"]["image"]["num_channels"]
    return ov

ALL = sorted(b for b in os.listdir(BUNDLES) if os.path.isfile(os.path.join(BUNDLES, b, "configs", "metadata.json")))


@pytest.mark.parametrize("bundle", ALL)
def test_bundle_layout(bundle):
    root = os.path.join(BUNDLES, bundle)
    for f in ["configs/metadata.json", "configs/train.json", "configs/inference.json", "configs/evaluate.json",
              "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "LICENSE"]:
        assert os.path.isfile(os.path.join(root, f)), f"{bundle}: {f} missing"
    meta = json.load(open(os.path.join(root, "configs", "metadata.json")))
    assert not ("optional_packages_version" in meta and "required_packages_version" in meta)
    for key in ["bundle_root", "device", "network_def", "network", "inferer", "preprocessing", "postprocessing", "run"]:
        assert key in json.load(open(os.path.join(root, "configs", "inference.json"))), f"{bundle} inference: {key}"


@pytest.mark.parametrize("bundle", ALL)
def test_verify_metadata_offline(bundle):
    if not os.path.isfile(SCHEMA):
        pytest.skip("offline schema not present (../shared/schemas)")
    root = os.path.join(BUNDLES, bundle)
    p = run_script("monai.bundle", "verify_metadata", "--meta_file", os.path.join(root, "configs", "metadata.json"),
                   "--filepath", SCHEMA)
    assert p.returncode == 0 and "metadata is verified with no error" in p.stdout + p.stderr, p.stderr[-3000:]


@pytest.mark.parametrize("bundle", ALL)
def test_verify_net_in_out(bundle):
    root = os.path.join(BUNDLES, bundle)
    # the tiny network, not the shipped model's record (bundles with weights carry one in models/)
    meta = os.path.join(root, "configs", "metadata.json")
    p = run_bundle_here(bundle, "inference.json", _tiny(bundle),
                        cmd=("verify_net_in_out", "network_def", "--meta_file", meta), check=False)
    assert p.returncode == 0 and "data shape of network is verified with no error" in p.output, p.output[-4000:]


@pytest.mark.parametrize("bundle", ALL)
def test_ckpt_export_torchscript_equals_eager(bundle, tmp_path):
    root = os.path.join(BUNDLES, bundle)
    tiny = _tiny(bundle)
    parser = ConfigParser()
    parser.read_config(os.path.join(root, "configs", "inference.json"))
    for k, v in tiny.items():
        parser[k] = v
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    # perturb BatchNorm statistics so that eval mode is really exercised
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    run_bundle_here(bundle, "inference.json", dict(tiny), cmd=("ckpt_export", "network_def", "--filepath", str(ts),
                                                               "--ckpt_file", str(ckpt), "--meta_file",
                                                               os.path.join(root, "configs", "metadata.json")))
    assert ts.is_file()
    meta = json.load(open(os.path.join(root, "configs", "metadata.json")))
    inp = meta["network_data_format"]["inputs"]["image"]
    dims = len(inp["spatial_shape"])
    mult = max(int(str(s).split("*")[0]) if "*" in str(s) else 1 for s in inp["spatial_shape"])
    x = torch.randn(1, inp["num_channels"], *([2 * mult] * dims))
    net.eval()
    scripted = torch.jit.load(str(ts))
    with torch.no_grad():
        a, b = net(x), scripted(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

"""Chunked (bigger-than-memory) inference on OME-Zarr: bounded buffers, exact block placement, metadata."""

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from common import omezarr
from common.chunked import ChunkedInputError, plan_blocks, predict_zarr, zarr_stats
from common.networks.fnet import FNet

SPACING = (0.29, 0.29, 0.29)


class Pointwise(torch.nn.Module):
    """A per-voxel network: every window gives every voxel the same value, so any tiling equals one pass."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        torch.nn.init.normal_(self.conv.weight, 0, 1.0)

    def forward(self, x):
        return torch.tanh(self.conv(x)) + x


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(np.arange(20), np.arange(150), np.arange(140), indexing="ij")
    a = (1000 + 40 * np.sin(x / 7.0) * np.cos(y / 11.0) + z + rng.normal(0, 5, z.shape)).astype(np.uint16)[None]
    path = omezarr.write_omezarr(root / "in.zarr", a, spacing_um=SPACING, chunks=(1, 8, 64, 64))
    return root, path, a


def test_plan_blocks_cover_the_volume_once():
    seen = np.zeros((10, 37, 23), int)
    for out_sl, in_sl, crop in plan_blocks((10, 37, 23), (4, 16, 16), (2, 8, 8)):
        seen[out_sl] += 1
        for o, i, c in zip(out_sl, in_sl, crop):
            assert i.start <= o.start and o.stop <= i.stop and c.start == o.start - i.start
    assert (seen == 1).all()


def test_streamed_statistics_equal_numpy(volume):
    _, path, a = volume
    arr, _, _ = omezarr.read_omezarr(path, lazy=True)
    mean, std = zarr_stats(arr)
    assert mean[0] == pytest.approx(a.astype(np.float64).mean(), rel=1e-12)
    assert std[0] == pytest.approx(a.astype(np.float64).std(), rel=1e-9)


def test_volume_over_the_memory_cap_is_predicted_block_by_block_exactly(volume):
    root, path, a = volume
    torch.manual_seed(0)
    net = Pointwise().eval()
    cap = 20 * 64 * 64  # voxels: a fifth of the 20x150x140 volume
    report = predict_zarr(net, path, str(root / "pointwise.zarr"), roi_size=(8, 32, 32), out_channels=2,
                          max_buffer_voxels=cap, target_spacing_um=SPACING)
    assert a.size > 4 * cap
    assert report["n_blocks"] > 4 and report["max_buffer_voxels"] <= cap
    out, axes, sizes = omezarr.read_omezarr(str(root / "pointwise.zarr"))
    x = torch.as_tensor((a - a.astype(np.float64).mean()) / a.astype(np.float64).std(), dtype=torch.float32)[None]
    with torch.no_grad():
        whole = net(x)[0].numpy()
    assert out.shape == (2, 20, 150, 140) and axes == "CZYX"
    np.testing.assert_allclose(out, whole, atol=1e-5)
    assert sizes == pytest.approx({"Z": 0.29, "Y": 0.29, "X": 0.29})
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(root / "pointwise.zarr"), fmt=omezarr.NGFF_FORMAT()))()))
    assert [tuple(d.shape) for d in node.data] == [(2, 20, 150, 140), (2, 20, 75, 70)]


def test_one_block_equals_the_in_memory_sliding_window(volume):
    root, path, a = volume
    torch.manual_seed(0)
    net = FNet(spatial_dims=3, in_channels=1, out_channels=1, depth=2, mult_chan=4).eval()
    report = predict_zarr(net, path, str(root / "fnet.zarr"), roi_size=(16, 64, 64), out_channels=1,
                          max_buffer_voxels=10**9)
    assert report["n_blocks"] == 1
    out, _, _ = omezarr.read_omezarr(str(root / "fnet.zarr"))
    x = torch.as_tensor((a - a.astype(np.float64).mean()) / a.astype(np.float64).std(), dtype=torch.float32)[None]
    with torch.no_grad():
        ref = SlidingWindowInferer((16, 64, 64), overlap=0.25, mode="gaussian")(x, net)[0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_refusals_before_any_work(volume, tmp_path):
    _, path, _ = volume
    net = Pointwise().eval()
    with pytest.raises(ChunkedInputError, match="below one window"):
        predict_zarr(net, path, str(tmp_path / "o.zarr"), roi_size=(8, 32, 32), out_channels=2, max_buffer_voxels=1000)
    with pytest.raises(ChunkedInputError, match="does not resample"):
        predict_zarr(net, path, str(tmp_path / "o.zarr"), roi_size=(8, 32, 32), out_channels=2,
                     target_spacing_um=(1.0, 0.29, 0.29))
    assert not (tmp_path / "o.zarr").exists()


def test_command_line_predicts_with_a_recorded_model(volume, tmp_path):
    import os

    from common.networks.record import write_record
    from zoo_testing import ROOT, run_script

    _, path, a = volume
    torch.manual_seed(0)
    net = FNet(spatial_dims=3, in_channels=1, out_channels=1, depth=2, mult_chan=4).eval()
    ckpt = str(tmp_path / "model.pt")
    torch.save(net.state_dict(), ckpt)
    write_record(ckpt, net, {"target_spacing_um": list(SPACING)})
    p = run_script("common.chunked", "predict", "--ckpt", ckpt, "--source", path, "--output", tmp_path / "pred.zarr",
                   "--roi_size", "16,64,64", "--max_buffer_voxels", 20 * 128 * 160, cwd=ROOT)  # its __main__, here
    assert p.returncode == 0, p.stderr[-3000:]
    report = __import__("json").loads(p.stdout.strip().splitlines()[-1])
    assert report["n_blocks"] > 1 and report["max_buffer_voxels"] <= 20 * 128 * 160
    out, _, sizes = omezarr.read_omezarr(str(tmp_path / "pred.zarr"))
    assert out.shape == a.shape and np.isfinite(out).all() and sizes == pytest.approx({"Z": 0.29, "Y": 0.29, "X": 0.29})
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp_")]

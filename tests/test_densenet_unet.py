"""DenseNet-121 U-Net, shifted sigmoid, soft Jaccard loss and the stage-0 -> stage-1 transfer (ISL)."""

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from common.isl import initialise_isl_network, load_isl_manifest
from common.networks.densenet_unet import (DenseNetEncoder, DenseNetUNet, ISLNet, ShiftedSigmoid,
                                           build_stage1_network, densenet_feature_channels, load_stage0_weights)

TINY = dict(init_features=8, growth_rate=4, block_config=(1, 1, 1, 1), decoder_channels=(16, 8, 8, 8, 8))


def _perturb_bn(net):
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


# ----------------------------------------------------------------------------- encoder / network


def test_densenet121_encoder_feature_shapes():
    torch.manual_seed(0)
    net = DenseNetUNet(in_channels=3).eval()
    with torch.no_grad():
        feats = net.encoder_features(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 32, 48), (1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6),
                                               (1, 1024, 2, 3)]
    assert densenet_feature_channels() == (64, 256, 512, 1024, 1024)
    # DenseNet-121 encoder: 6.95 M parameters (torchvision's densenet121 features: 6,953,856)
    assert sum(p.numel() for p in net.encoder.parameters()) == 6953856
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 96)).shape == (2, 1, 64, 96)


def test_tiny_encoder_feature_channels_follow_growth_rule():
    net = DenseNetUNet(in_channels=2, **TINY).eval()
    # 8 -> +4 = 12 (block 1) -> 6 +4 = 10 -> 5 +4 = 9 -> 4 +4 = 8
    assert densenet_feature_channels(8, 4, (1, 1, 1, 1)) == (8, 12, 10, 9, 8)
    feats = net.encoder_features(torch.randn(1, 2, 32, 32))
    assert [f.shape[1] for f in feats] == [8, 12, 10, 9, 8]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1]


def test_encoder_equals_torchvision_densenet121_with_same_weights(tmp_path):
    """Independent implementation: torchvision's densenet121 ``features`` (+ final ReLU) with the same weights."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None)
    _perturb_bn(tv)
    tv.eval()
    path = tmp_path / "densenet121.pth"
    torch.save(tv.state_dict(), path)
    enc = DenseNetEncoder(in_channels=3, pretrained=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = enc(x)[-1]
        ref = torch.relu(tv.features(x))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)

    # the original file's key spelling (features.denseblock1.denselayer1.norm.1.weight) loads the same
    old = {k.replace("norm1", "norm.1").replace("conv1", "conv.1").replace("norm2", "norm.2").replace("conv2", "conv.2")
           if "denselayer" in k else k: v for k, v in tv.state_dict().items()}
    assert any(".norm.1." in k for k in old)
    torch.save(old, tmp_path / "old.pth")
    enc_old = DenseNetEncoder(in_channels=3, pretrained=str(tmp_path / "old.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(enc_old(x)[-1], ref, rtol=1e-4, atol=1e-5)

    # 1 input channel: mean RGB kernel x 3, so a grey image gives the RGB network's features of grey-as-RGB
    enc1 = DenseNetEncoder(in_channels=1, pretrained=str(path)).eval()
    w = tv.state_dict()["features.conv0.weight"]
    torch.testing.assert_close(enc1.conv0.weight, w.mean(1, keepdim=True) * 3)
    g = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc1(g)[-1], enc(g.repeat(1, 3, 1, 1))[-1], rtol=1e-4, atol=1e-5)
    # through the U-Net's argument
    unet = DenseNetUNet(in_channels=1, pretrained_path=str(path))
    torch.testing.assert_close(unet.encoder.conv0.weight, enc1.conv0.weight)


def test_pretrained_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        DenseNetUNet(pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="download"):
        DenseNetEncoder(pretrained=True)
    torch.save({"features.conv0.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not a DenseNet state dict"):
        DenseNetUNet(pretrained_path=str(tmp_path / "partial.pth"))


def test_registered_for_flexible_unet_same_state_dict_same_output():
    from monai.networks.nets import FlexibleUNet

    torch.manual_seed(0)
    ours = _perturb_bn(DenseNetUNet(in_channels=3)).eval()
    flex = FlexibleUNet(in_channels=3, out_channels=1, backbone="densenet121").eval()
    flex.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(flex(x), ours(x))


def test_torchscript_equals_eager():
    torch.manual_seed(0)
    net = _perturb_bn(ISLNet(DenseNetUNet(in_channels=3, **TINY), ShiftedSigmoid(2.0))).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))


# ----------------------------------------------------------------------------- shifted sigmoid


def test_shifted_sigmoid_values_by_hand():
    f = ShiftedSigmoid()  # a = 1, shift = 0.5
    x = torch.tensor([0.5, 0.0, 1.0, -2.0, 3.0])
    expected = [0.5, 1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(2.5)),
                1 / (1 + math.exp(-2.5))]
    torch.testing.assert_close(f(x), torch.tensor(expected))
    # the narrow range for a = 1: the stain range [0, 1] maps to [0.378, 0.622]
    assert abs(float(f(torch.tensor(0.0))) - 0.3775) < 1e-4 and abs(float(f(torch.tensor(1.0))) - 0.6225) < 1e-4
    g = ShiftedSigmoid(a=4.0, shift=0.5)
    torch.testing.assert_close(g(torch.tensor([1.0])), torch.tensor([1 / (1 + math.exp(-2.0))]))
    # the threshold 0.5 <=> x = shift, for any a
    for a in (0.5, 1.0, 10.0):
        assert float(ShiftedSigmoid(a)(torch.tensor(0.5))) == 0.5
    with pytest.raises(ValueError):
        ShiftedSigmoid(a=0.0)


# ----------------------------------------------------------------------------- soft Jaccard


def _jaccard(s: float = 1.0, **kw) -> DiceLoss:
    """The bundle's stage-1 loss: MONAI's Jaccard with smoothing ``2 s`` on both sides, ``1 - (I + s) / (U + s)``."""
    return DiceLoss(jaccard=True, smooth_nr=2.0 * s, smooth_dr=2.0 * s, **kw)


def test_soft_jaccard_by_hand():
    p = torch.tensor([[[[0.5, 1.0], [0.0, 0.25]]]])
    t = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # intersection 1.5, sum p 1.75, sum t 2 -> union 2.25; smooth 1: 1 - 2.5 / 3.25
    assert float(_jaccard(1.0)(p, t)) == pytest.approx(1 - 2.5 / 3.25)
    assert float(_jaccard(1e-8)(p, t)) == pytest.approx(1 - 1.5 / 2.25, abs=1e-6)
    # perfect prediction -> 0; complete miss -> 1 - s / (union + s)
    assert float(_jaccard()(t, t)) == pytest.approx(0.0)
    assert float(_jaccard(1.0)(1 - t, t)) == pytest.approx(1 - 1 / 5)


def test_soft_jaccard_empty_masks_and_reductions():
    z = torch.zeros(1, 1, 4, 4)
    assert float(_jaccard()(z, z)) == 0.0  # empty target, empty prediction
    p = torch.full((1, 1, 4, 4), 0.25)  # sum 4
    assert float(_jaccard(1.0)(p, z)) == pytest.approx(1 - 1 / 5)
    # per sample vs whole batch
    p2 = torch.cat([torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)])
    t2 = torch.cat([torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)])
    per = _jaccard(1.0, reduction="none")(p2, t2)
    torch.testing.assert_close(per.flatten(), torch.tensor([0.0, 1 - 1 / 5]))
    assert float(_jaccard(1.0)(p2, t2)) == pytest.approx(0.4)
    assert float(_jaccard(1.0, batch=True)(p2, t2)) == pytest.approx(1 - 5 / 9)
    with pytest.raises(AssertionError, match="different shape"):
        _jaccard()(p2, t2[:, :, :1])


def test_soft_jaccard_matches_the_formula_and_has_finite_gradient():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 1, 8, 8, generator=g, requires_grad=True)
    t = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    loss = _jaccard(1.0)(p, t)
    inter = (p * t).sum((1, 2, 3))
    union = p.sum((1, 2, 3)) + t.sum((1, 2, 3)) - inter
    assert float(loss) == pytest.approx(float((1 - (inter + 1) / (union + 1)).mean()), abs=1e-6)  # by the formula
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- stage 0 -> stage 1


def test_stage1_transfer_loads_whole_stage0_network(tmp_path):
    torch.manual_seed(0)
    stage0 = _perturb_bn(ISLNet(DenseNetUNet(in_channels=3, **TINY))).eval()
    ckpt = tmp_path / "model_stage0.pt"
    torch.save(stage0.state_dict(), ckpt)
    torch.manual_seed(123)  # a different random initialisation
    stage1 = build_stage1_network(str(ckpt), in_channels=3, **TINY).eval()
    torch.manual_seed(123)
    scratch = build_stage1_network(None, in_channels=3, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw0 = stage0(x)
        # equals the stage-0 network before the activation, and the activation is applied after it
        torch.testing.assert_close(stage1.base(x), raw0)
        torch.testing.assert_close(stage1(x), torch.sigmoid(raw0 - 0.5))
        # differs from the random initialisation it would otherwise have
        assert (scratch(x) - stage1(x)).abs().max() > 1e-3
    assert isinstance(stage1.head, ShiftedSigmoid)


def test_transfer_accepts_plain_ddp_and_ignite_checkpoints_and_rejects_mismatch(tmp_path):
    torch.manual_seed(0)
    plain = DenseNetUNet(in_channels=3, **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = plain(x)
    for name, sd in {"plain": plain.state_dict(),
                     "ddp": {"module.base." + k: v for k, v in plain.state_dict().items()},
                     "ignite": {"network": {"base." + k: v for k, v in plain.state_dict().items()}}}.items():
        torch.save(sd, tmp_path / f"{name}.pt")
        net = load_stage0_weights(ISLNet(DenseNetUNet(in_channels=3, **TINY)), str(tmp_path / f"{name}.pt")).eval()
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref, msg=name)
    with pytest.raises(ValueError, match="in_channels"):
        load_stage0_weights(ISLNet(DenseNetUNet(in_channels=2, **TINY)), str(tmp_path / "plain.pt"))
    with pytest.raises(FileNotFoundError, match="train stage 0 first"):
        load_stage0_weights(ISLNet(DenseNetUNet(in_channels=3, **TINY)), str(tmp_path / "nope.pt"))


def test_initialise_isl_network_checks_choices(tmp_path):
    net = ISLNet(DenseNetUNet(in_channels=3, **TINY))
    with pytest.raises(ValueError, match="not available in stage 0"):
        initialise_isl_network(net, 0, "isl")
    with pytest.raises(ValueError, match="imagenet_weights"):
        initialise_isl_network(net, 1, "imagenet")
    with pytest.raises(ValueError, match="stage must be 0"):
        initialise_isl_network(net, 2, "scratch")
    with pytest.raises(FileNotFoundError):
        initialise_isl_network(net, 1, "isl", str(tmp_path / "missing.pt"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert initialise_isl_network(net, 1, "scratch") is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ----------------------------------------------------------------------------- manifests: named errors


def _write(path, arr, axes):
    from common.io import write_ome_tiff

    return write_ome_tiff(path, arr, axes)


def test_isl_manifest_names_bad_inputs(tmp_path):
    from common.data import ManifestError

    rng = np.random.default_rng(0)
    _write(tmp_path / "sig3.ome.tif", rng.random((3, 40, 40)).astype(np.float32), "CYX")
    _write(tmp_path / "sig2.ome.tif", rng.random((2, 40, 40)).astype(np.float32), "CYX")
    _write(tmp_path / "dapi.ome.tif", rng.random((40, 40)).astype(np.float32), "YX")
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 1
    _write(tmp_path / "mask.ome.tif", mask, "YX")
    _write(tmp_path / "mask_small.ome.tif", mask[:32, :32], "YX")
    _write(tmp_path / "mask_empty.ome.tif", np.zeros((40, 40), np.uint8), "YX")
    csv = tmp_path / "m.csv"
    csv.write_text("path_signal,path_target,path_label\n"
                   "sig3.ome.tif,dapi.ome.tif,mask.ome.tif\n"
                   "sig2.ome.tif,dapi.ome.tif,mask.ome.tif\n"
                   "sig3.ome.tif,dapi.ome.tif,mask_small.ome.tif\n"
                   "sig3.ome.tif,dapi.ome.tif,mask_empty.ome.tif\n")
    with pytest.raises(ManifestError) as e:
        load_isl_manifest(csv, stage=1, in_channels=3)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "line 3" in msg and "sig2.ome.tif: 2 channel(s), expected 3" in msg
    assert "line 4" in msg and "shape mismatch" in msg and "mask_small.ome.tif" in msg
    assert "line 5" in msg and "mask_empty.ome.tif: mask is empty" in msg
    # stage 0 reads the stain column: masks are not opened, the channel count still is
    with pytest.raises(ManifestError) as e0:
        load_isl_manifest(csv, stage=0, in_channels=3)
    assert "1 problem(s)" in str(e0.value) and "sig2.ome.tif" in str(e0.value)
    recs = load_isl_manifest(csv, stage=0, in_channels=None)
    assert [r["label"].endswith("dapi.ome.tif") for r in recs] == [True] * 4

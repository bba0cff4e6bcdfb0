import pytest
import torch

from common.networks.fnet import FNet


def _n_down(net):
    return sum(isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)) and m.stride[0] == 2 for m in net.modules())


def test_fnet_paper_architecture():
    net = FNet()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert _n_down(net) == 4 and len(ups) == 4
    # channels 32 -> 64 -> 128 -> 256 -> 512 at the bottom
    assert max(m.out_channels for m in convs) == 512
    assert convs[0].in_channels == 1 and convs[0].out_channels == 32 and convs[0].kernel_size == (3, 3, 3)
    assert all(m.kernel_size == (2, 2, 2) for m in convs if m.stride == (2, 2, 2))
    assert net.conv_out.kernel_size == (3, 3, 3) and net.conv_out.out_channels == 1
    # 2 convs per level down and 2 per level up (+ 4 strided downs + output conv)
    assert len(convs) == 2 * 5 + 2 * 4 + 4 + 1
    # no activation after the output conv: outputs can be negative
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(float(w.mean())) < 1e-3 and abs(float(w.std()) - 0.02) < 1e-3
    assert abs(float(torch.cat([b.weight for b in bns]).mean()) - 1.0) < 0.01
    assert all(float(b.bias.abs().max()) == 0 for b in bns)


@pytest.mark.parametrize("dims,shape", [(3, (2, 1, 16, 32, 48)), (2, (2, 3, 32, 64))])
def test_fnet_shapes_and_gradient(dims, shape):
    torch.manual_seed(0)
    net = FNet(spatial_dims=dims, in_channels=shape[1], out_channels=2, depth=3, mult_chan=4)
    x = torch.randn(shape)
    y = net(x)
    assert y.shape == (shape[0], 2) + shape[2:]
    assert float(y.min()) < 0 < float(y.max())
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.size_multiple == 8


def test_fnet_rejects_non_multiple():
    net = FNet(depth=2, mult_chan=2)
    with pytest.raises(RuntimeError):
        net(torch.randn(1, 1, 6, 8, 8))

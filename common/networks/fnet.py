"""F-net: the U-Net of Ounkomol et al. 2018 (label-free prediction of fluorescence), 2D or 3D.

Architecture as described for pytorch_fnet's ``fnet_nn_3d``:

* level 0: two 3x3x3 conv + BatchNorm + ReLU blocks, ``in_channels -> mult_chan`` (32);
* each deeper level doubles the channels: 2x2x2 stride-2 conv (+BN+ReLU) down, two conv blocks,
  and on the way back a 2x2x2 stride-2 transposed conv (+BN+ReLU) up, concatenation with the
  skip, and two conv blocks;
* ``depth`` (4) down-samplings, so spatial sizes must be multiples of ``2**depth`` (16);
* a 3x3x3 output conv without activation (regression of intensities);
* weights initialised N(0, 0.02) (conv), BatchNorm weight N(1, 0.02) and bias 0.

Input ``(B, C, Z, Y, X)`` (3D) or ``(B, C, Y, X)`` (2D); output the same spatial size with
``out_channels`` channels.
"""

from __future__ import annotations

import torch
from torch import nn

from common.fastpath import dense_gradient, transposed_conv
from common.networks.record import recordable

__all__ = ["FNet", "init_fnet_weights"]


def _layers(spatial_dims: int):
    if spatial_dims == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class _DoubleConv(nn.Sequential):
    def __init__(self, spatial_dims: int, c_in: int, c_out: int):
        conv, _, bn = _layers(spatial_dims)
        super().__init__(
            conv(c_in, c_out, 3, padding=1), bn(c_out), nn.ReLU(inplace=True),
            conv(c_out, c_out, 3, padding=1), bn(c_out), nn.ReLU(inplace=True),
        )


class _Level(nn.Module):
    """One U-Net level with ``depth >= 1``: two convs, down, the next level, up, concat, two convs.

    The bottom of the U (``depth == 0``) is a plain :class:`_DoubleConv` (see :func:`_make_level`),
    so that every module has a branch-free ``forward`` (TorchScript-friendly)."""

    def __init__(self, spatial_dims: int, c_in: int, c_out: int, depth: int):
        super().__init__()
        conv, convt, bn = _layers(spatial_dims)
        self.convs_in = _DoubleConv(spatial_dims, c_in, c_out)
        self.down = nn.Sequential(conv(c_out, c_out, 2, stride=2), bn(c_out), nn.ReLU(inplace=True))
        self.sub = _make_level(spatial_dims, c_out, 2 * c_out, depth - 1)
        self.up = nn.Sequential(convt(2 * c_out, c_out, 2, stride=2), bn(c_out), nn.ReLU(inplace=True))
        self.convs_out = _DoubleConv(spatial_dims, 2 * c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.convs_in(x)
        z = self.sub(self.down(skip))
        if torch.jit.is_scripting():
            y = self.up(z)
        else:  # speed only: the bias of `up`'s transposed conv outside oneDNN under CPU autocast, and
            # a dense gradient for its ReLU (common.fastpath.transposed_conv, dense_gradient)
            y = dense_gradient(self.up[2](self.up[1](transposed_conv(self.up[0], z))))
        return self.convs_out(torch.cat((skip, y), dim=1))


def _make_level(spatial_dims: int, c_in: int, c_out: int, depth: int) -> nn.Module:
    if depth == 0:
        return _DoubleConv(spatial_dims, c_in, c_out)
    return _Level(spatial_dims, c_in, c_out, depth)


def init_fnet_weights(module: nn.Module, std: float = 0.02) -> None:
    """pytorch_fnet's initialisation: conv weights N(0, std), BatchNorm weights N(1, std), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


@recordable
class FNet(nn.Module):
    """F-net (Ounkomol et al. 2018).

    Args:
        spatial_dims: 3 (``BCZYX``) or 2 (``BCYX``).
        in_channels: input channels (1 transmitted-light channel in the paper).
        out_channels: output channels (1 fluorescence structure).
        depth: number of down-samplings (4); inputs must be multiples of ``2**depth``.
        mult_chan: channels of the first level (32), doubled at each deeper level.
        output_bias: initial bias of the output convolution (``None``: PyTorch's default, as pytorch_fnet).
            Spotlight's loss trains faster from ``-1``: the prediction then starts below its foreground
            threshold, where background voxels stay (see ``bundles/spotlight_dna/docs/README.md``).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1, depth: int = 4,
                 mult_chan: int = 32, output_bias: float | None = None):
        super().__init__()
        conv, _, _ = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.levels = _make_level(spatial_dims, in_channels, mult_chan, depth)
        self.conv_out = conv(mult_chan, out_channels, 3, padding=1)
        init_fnet_weights(self)
        if output_bias is not None:
            nn.init.constant_(self.conv_out.bias, float(output_bias))

    @property
    def size_multiple(self) -> int:
        """Every spatial size of the input must be a multiple of this (``2**depth``)."""
        return 1 << self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.levels(x))

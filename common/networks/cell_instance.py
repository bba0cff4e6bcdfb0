"""Stage-1 head of isl_cell_instance (Bonte et al.): stage-0 output -> [distance map, mask logit].

The stage-1 network is ``ISLNet(DenseNetUNet(...), DistanceMaskHead(...))``, built from a stage-0
checkpoint by :func:`common.networks.densenet_unet.build_stage1_network`: the whole stage-0 network
(DIC -> membrane stain, one output channel) is kept and two extra convolution blocks map its one
channel to two.

Final activation. The paper's extra blocks end in a ReLU, which also clamps the *mask logits* to
``>= 0``: ``sigmoid >= 0.5`` everywhere, so a background pixel can at best reach probability 0.5
(BCE ``log 2``), its gradient vanishes once its logit hits 0, and the usual threshold 0.5 turns into
a test for exact zeros. The default here is therefore no final activation (raw distance and raw
mask logits, trained with :class:`common.isl.DistanceMaskLoss`); negative distances are clipped
to 0 in post-processing (:class:`common.isl.DistanceMaskToInstances`).
``final_activation="relu"`` reproduces the paper's head.
"""

from __future__ import annotations

from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_norm_layer
from torch import nn

from common.networks.record import recordable

__all__ = ["DistanceMaskHead"]


@recordable
class DistanceMaskHead(nn.Module):
    """Two convolution blocks: ``in_channels -> hidden_channels -> out_channels``.

    Block 1: ``conv k x k -> norm -> ReLU``; block 2: ``conv k x k`` followed by ``final_activation``
    (``None``: identity, the default; ``"relu"``: the paper's, see the module docstring).

    Args:
        spatial_dims: 2 (``BCYX``) or 3.
        in_channels: channels of the stage-0 output (1: the membrane stain).
        out_channels: 2 (``[distance, mask logit]``).
        hidden_channels: channels between the two blocks.
        kernel_size: odd kernel size of both convolutions (padding keeps the size).
        norm: normalisation of block 1 (MONAI name, e.g. ``"batch"``, ``"instance"``), or ``None``.
        final_activation: ``None`` or ``"relu"``.

    Input ``(B, in_channels, *S)`` -> output ``(B, out_channels, *S)``.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, hidden_channels: int = 16,
                 kernel_size: int = 3, norm: str | tuple | None = "batch", final_activation: str | None = None):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if final_activation not in (None, "relu"):
            raise ValueError(f"final_activation must be None or 'relu', got {final_activation!r}")
        conv = Conv[Conv.CONV, spatial_dims]
        pad = kernel_size // 2
        self.block1 = nn.Sequential(
            conv(in_channels, hidden_channels, kernel_size=kernel_size, padding=pad, bias=norm is None),
            get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=hidden_channels) if norm else nn.Identity(),
            nn.ReLU(inplace=True),
        )
        self.block2 = nn.Sequential(
            conv(hidden_channels, out_channels, kernel_size=kernel_size, padding=pad, bias=True),
            nn.ReLU() if final_activation == "relu" else nn.Identity(),
        )

    def forward(self, x):
        return self.block2(self.block1(x))

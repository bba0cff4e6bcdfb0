"""3D U-Net for background / edge / nucleus segmentation (Tiling 2024, after Cicek et al. 2016).

Architecture (one level per entry of ``features``, default ``[64, 128, 256]``):

* encoder level ``i``: two 3x3x3 conv + ReLU (``features[i]`` channels), then max-pooling by
  ``pool_size`` before the next level; the last entry is the bottom of the U (no pooling);
* decoder level ``i``: transposed conv (kernel = stride = ``pool_size``) from ``features[i+1]`` to
  ``features[i]`` channels, concatenation with the encoder's skip, two 3x3x3 conv + ReLU;
* a 1x1x1 conv head to ``out_channels`` logits (3: background 0, edge 1, nucleus 2).

Optional normalisation after each conv (``norm="batch"`` / ``"instance"``, default none as in the
thesis). MONAI's ``BasicUNet`` has a fixed depth of 4 and always normalises, ``UNet`` uses strided
residual units instead of max-pooling, so neither can be configured to this network.

Input ``(B, C, Z, Y, X)``; every spatial size must be a multiple of
:attr:`UNet3D.size_multiple` (``pool_size ** (len(features) - 1)`` per axis). Output
``(B, out_channels, Z, Y, X)`` logits. TorchScript-exportable (``torch.jit.script``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.networks.record import recordable

__all__ = ["UNet3D"]


def _norm(norm: str | None, channels: int) -> nn.Module:
    if norm is None or str(norm).lower() in ("", "none"):
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be None, 'batch' or 'instance', got {norm!r}")


class _DoubleConv(nn.Sequential):
    """Two 3x3x3 conv (+ optional norm) + ReLU."""

    def __init__(self, c_in: int, c_out: int, norm: str | None):
        super().__init__(
            nn.Conv3d(c_in, c_out, 3, padding=1), _norm(norm, c_out), nn.ReLU(inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1), _norm(norm, c_out), nn.ReLU(inplace=True),
        )


class _Level(nn.Module):
    """Encoder convs, max-pool, the deeper levels, transposed-conv up, concat skip, decoder convs.

    The bottom of the U is a plain :class:`_DoubleConv`, so every ``forward`` is branch-free
    (TorchScript-friendly), as in :mod:`common.networks.fnet`."""

    def __init__(self, c_in: int, features: Sequence[int], pool: tuple, norm: str | None):
        super().__init__()
        f, f_next = int(features[0]), int(features[1])
        self.encode = _DoubleConv(c_in, f, norm)
        self.pool = nn.MaxPool3d(pool, stride=pool)
        self.sub = _make_level(f, features[1:], pool, norm)
        self.up = nn.ConvTranspose3d(f_next, f, pool, stride=pool)
        self.decode = _DoubleConv(2 * f, f, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.encode(x)
        y = self.up(self.sub(self.pool(skip)))
        return self.decode(torch.cat((skip, y), dim=1))


def _make_level(c_in: int, features: Sequence[int], pool: tuple, norm: str | None) -> nn.Module:
    if len(features) == 1:
        return _DoubleConv(c_in, int(features[0]), norm)
    return _Level(c_in, features, pool, norm)


@recordable
class UNet3D(nn.Module):
    """3D U-Net with max-pool down, transposed-conv up and skip connections.

    Args:
        in_channels: input channels (1 reporter, or several FUCCI channels).
        out_channels: classes (3: background, edge, nucleus).
        features: channels per level, top to bottom (``[64, 128, 256]``: two poolings).
        pool_size: pooling factor per axis ``(z, y, x)`` or one int; ``(1, 2, 2)`` keeps the z
            resolution of strongly anisotropic stacks.
        norm: ``None`` (thesis), ``"batch"`` or ``"instance"``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 3, features: Sequence[int] = (64, 128, 256),
                 pool_size: int | Sequence[int] = 2, norm: str | None = None):
        super().__init__()
        features = [int(f) for f in features]
        if not features or min(features) < 1:
            raise ValueError(f"features must be a non-empty list of positive ints, got {features}")
        pool = (int(pool_size),) * 3 if isinstance(pool_size, int) else tuple(int(p) for p in pool_size)
        if len(pool) != 3 or min(pool) < 1:
            raise ValueError(f"pool_size must be an int or 3 positive ints (z, y, x), got {pool_size}")
        self.features = features
        self.pool_size = pool
        #: per axis ``(z, y, x)``: every input size must be a multiple of this
        self.size_multiple = tuple(p ** (len(features) - 1) for p in pool)
        self.body = _make_level(int(in_channels), features, pool, norm)
        self.head = nn.Conv3d(features[0], int(out_channels), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

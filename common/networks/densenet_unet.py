"""2D U-Net with a DenseNet-121 encoder (Bonte et al., in-silico labeling as pretraining).

Built from MONAI parts: the encoder is made of MONAI's DenseNet blocks (``_DenseBlock``,
``_Transition``) and registered for :class:`monai.networks.nets.FlexibleUNet` under the name
``"densenet121"``; the decoder and the head are FlexibleUNet's own ``UNetDecoder`` and
``SegmentationHead``, so ``DenseNetUNet`` state dicts load into
``FlexibleUNet(backbone="densenet121")`` and back.

Encoder features (as ``segmentation_models_pytorch``'s DenseNet encoder, the usual U-Net
backbone): for an input ``(B, C, Y, X)`` with ``Y, X`` multiples of 32 and the DenseNet-121
sizes (``init_features=64, growth_rate=32, block_config=(6, 12, 24, 16)``)

======  =============================================  ========  ========
level   module output                                  channels  stride
======  =============================================  ========  ========
1       conv0 -> norm0 -> relu0                        64        2
2       pool0 -> denseblock1 -> transition1.norm/relu  256       4
3       transition1.conv/pool -> denseblock2 -> ...    512       8
4       ... denseblock3 -> transition3.norm/relu       1024      16
5       transition3.conv/pool -> denseblock4 -> norm5  1024      32
======  =============================================  ========  ========

The ISL pieces: :class:`ShiftedSigmoid` (stage-1 activation ``1 / (1 + exp(-a (x - 0.5)))``),
:class:`ISLNet` (a base network followed by a head) and :func:`load_stage0_weights` /
:func:`build_stage1_network` (whole-network transfer from a stage-0 checkpoint).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from monai.networks.nets.densenet import _DenseBlock, _Transition
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE, SegmentationHead, UNetDecoder
from torch import nn

from common.errors import CheckpointNotFoundError
from common.networks.record import recordable

__all__ = [
    "DENSENET121",
    "densenet_feature_channels",
    "load_imagenet_densenet",
    "DenseNetEncoder",
    "DenseNetUNet",
    "ShiftedSigmoid",
    "ISLNet",
    "load_stage0_weights",
    "build_stage1_network",
]

#: DenseNet-121 hyper-parameters (Huang et al. 2017).
DENSENET121 = {"init_features": 64, "growth_rate": 32, "block_config": (6, 12, 24, 16), "bn_size": 4}


def densenet_feature_channels(init_features: int = 64, growth_rate: int = 32,
                              block_config: Sequence[int] = (6, 12, 24, 16)) -> tuple[int, ...]:
    """Channels of the encoder's feature maps, shallow to deep ((64, 256, 512, 1024, 1024) for 121)."""
    if len(block_config) != 4:
        raise ValueError(f"block_config needs 4 dense blocks (5 feature levels), got {tuple(block_config)}")
    chans = [int(init_features)]
    c = int(init_features)
    for i, n in enumerate(block_config):
        c += int(n) * int(growth_rate)
        chans.append(c)
        if i < len(block_config) - 1:
            c //= 2
    return tuple(chans)


# torchvision (old "norm.1" and new "norm1" spellings) and MONAI DenseNet keys -> encoder keys
_LAYER_KEY = re.compile(r"^(.*denselayer\d+)\.(?:layers\.)?(norm|relu|conv)\.?([12])\.(.+)$")


def _encoder_key(key: str) -> str | None:
    if key.startswith("module."):
        key = key[len("module."):]
    if not key.startswith("features."):
        return None  # classifier / class_layers
    key = key[len("features."):]
    m = _LAYER_KEY.match(key)
    if m:
        key = f"{m.group(1)}.layers.{m.group(2)}{m.group(3)}.{m.group(4)}"
    return key


def load_imagenet_densenet(encoder: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load ImageNet DenseNet weights from a user-supplied file into a :class:`DenseNetEncoder`.

    Accepts a torchvision ``densenet121`` state dict (``densenet121-a639ec97.pth``, old
    ``norm.1`` or new ``norm1`` key spelling) or a MONAI ``DenseNet121`` state dict; the
    classifier is dropped. With ``in_channels != 3`` the RGB kernel of ``conv0`` is adapted:
    its mean over RGB is repeated over the input channels and scaled by ``3 / in_channels``
    (the response to a grey image equals the RGB network's response to the same grey image).

    Raises:
        FileNotFoundError: no file at ``path`` (nothing can be downloaded here).
        ValueError: the file is not a DenseNet of the encoder's size (names the keys/shapes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet DenseNet weights not found: {path!r}. Download torchvision's densenet121-a639ec97.pth "
            "on a machine with internet access and pass its path (pretrained_path).")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    own = encoder.state_dict()
    new = {}
    for k, v in sd.items():
        ek = _encoder_key(k)
        if ek is not None:
            new[ek] = v
    missing = sorted(set(own) - set(new))
    if missing:
        raise ValueError(f"{path}: not a DenseNet state dict for this encoder; missing e.g. {missing[:3]}")
    w = new["conv0.weight"]
    c_in = own["conv0.weight"].shape[1]
    if w.shape[1] != c_in:
        if w.shape[1] != 3:
            raise ValueError(f"{path}: conv0 has {w.shape[1]} input channels, expected 3 (RGB)")
        new["conv0.weight"] = w.mean(1, keepdim=True).repeat(1, c_in, *([1] * (w.dim() - 2))) * (3.0 / c_in)
    bad = [(k, tuple(new[k].shape), tuple(own[k].shape)) for k in own if new[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch (key, file, network), e.g. {bad[:3]}; "
                         "the encoder must have the DenseNet-121 sizes to take ImageNet weights")
    encoder.load_state_dict({k: new[k] for k in own}, strict=True)
    return encoder


class DenseNetEncoder(nn.Module, BaseEncoder):
    """DenseNet encoder with 5 feature levels (strides 2, 4, 8, 16, 32), made of MONAI DenseNet blocks.

    Args:
        spatial_dims: 2 (``BCYX``) or 3 (``BCZYX``; no ImageNet weights).
        in_channels: input channels.
        pretrained: ``False``, or the path of ImageNet DenseNet weights (see
            :func:`load_imagenet_densenet`); ``True`` is refused because nothing is downloaded.
        init_features, growth_rate, block_config, bn_size: DenseNet sizes (DenseNet-121 default).
        act, norm: activation and normalisation (ReLU, batch norm as in DenseNet).
        dropout_prob: dropout after each dense layer.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, pretrained: bool | str = False,
                 init_features: int = 64, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 bn_size: int = 4, act: str | tuple = ("relu", {"inplace": True}), norm: str | tuple = "batch",
                 dropout_prob: float = 0.0):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv_type = Conv[Conv.CONV, spatial_dims]
        chans = densenet_feature_channels(init_features, growth_rate, block_config)
        self.out_channels = chans
        self.conv0 = conv_type(in_channels, init_features, kernel_size=7, stride=2, padding=3, bias=False)
        self.norm0 = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=init_features)
        self.relu0 = get_act_layer(name=act)
        self.pool0 = Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1)
        c = init_features
        blocks, trans = [], []
        for i, n in enumerate(block_config):
            blocks.append(_DenseBlock(spatial_dims, int(n), c, bn_size, growth_rate, dropout_prob, act=act, norm=norm))
            c += int(n) * growth_rate
            if i < len(block_config) - 1:
                trans.append(_Transition(spatial_dims, c, c // 2, act=act, norm=norm))
                c //= 2
        self.denseblock1, self.denseblock2, self.denseblock3, self.denseblock4 = blocks
        self.transition1, self.transition2, self.transition3 = trans
        self.norm5 = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=c)
        self.relu5 = get_act_layer(name=act)
        for m in self.modules():  # MONAI / torchvision DenseNet initialisation
            if isinstance(m, conv_type):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if pretrained is True:
            raise ValueError("pretrained=True would download weights, which is not possible here: "
                             "pass the path of torchvision's densenet121 weights instead")
        if pretrained:
            if spatial_dims != 2:
                raise ValueError("ImageNet weights exist for spatial_dims=2 only")
            load_imagenet_densenet(self, pretrained)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, *S)`` -> 5 feature maps ``(B, c_k, *S / 2**k)``, ``k = 1..5``."""
        f1 = self.relu0(self.norm0(self.conv0(x)))
        x = self.denseblock1(self.pool0(f1))
        f2 = self.transition1.relu(self.transition1.norm(x))
        x = self.denseblock2(self.transition1.pool(self.transition1.conv(f2)))
        f3 = self.transition2.relu(self.transition2.norm(x))
        x = self.denseblock3(self.transition2.pool(self.transition2.conv(f3)))
        f4 = self.transition3.relu(self.transition3.norm(x))
        x = self.denseblock4(self.transition3.pool(self.transition3.conv(f4)))
        f5 = self.relu5(self.norm5(x))
        return [f1, f2, f3, f4, f5]

    # --- BaseEncoder interface (registration for FlexibleUNet) ---
    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"spatial_dims": 2, "in_channels": 3, "pretrained": False, **DENSENET121}]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [densenet_feature_channels(64, 32, (6, 12, 24, 16))]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return ["densenet121"]


if "densenet121" not in FLEXUNET_BACKBONE.register_dict:
    FLEXUNET_BACKBONE.register_class(DenseNetEncoder)


@recordable
class DenseNetUNet(nn.Module):
    """U-Net with a DenseNet encoder (DenseNet-121 by default) and FlexibleUNet's decoder.

    Input ``(B, in_channels, Y, X)`` with ``Y, X`` multiples of 32 (:attr:`size_multiple`); output
    ``(B, out_channels, Y, X)`` raw values (no activation). The state dict has FlexibleUNet's
    layout (``encoder.*``, ``decoder.*``, ``segmentation_head.*``).

    Args:
        spatial_dims: 2 (the method) or 3.
        in_channels: label-free input channels (paper: 2 bright-field planes + phase contrast = 3).
        out_channels: output channels (1: nuclear stain in stage 0, mask logit in stage 1).
        pretrained_path: optional file with ImageNet DenseNet-121 weights for the encoder
            (torchvision layout; see :func:`load_imagenet_densenet`).
        decoder_channels: channels of the 5 decoder levels, deep to shallow.
        init_features, growth_rate, block_config, bn_size: DenseNet sizes (tiny values for tests).
        norm, act, dropout, decoder_bias, upsample, interp_mode, is_pad: decoder options as in
            :class:`monai.networks.nets.FlexibleUNet` (its defaults).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 1,
                 pretrained_path: str | None = None, decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                 init_features: int = 64, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 bn_size: int = 4, norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
                 act: str | tuple = ("relu", {"inplace": True}), dropout: float = 0.0, decoder_bias: bool = False,
                 upsample: str = "nontrainable", interp_mode: str = "nearest", is_pad: bool = True):
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 values (one per level), got {tuple(decoder_channels)}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.skip_connect = 4
        self.encoder = DenseNetEncoder(spatial_dims, in_channels, pretrained_path or False, init_features,
                                       growth_rate, block_config, bn_size)
        enc_channels = (in_channels, *self.encoder.out_channels)
        self.decoder = UNetDecoder(spatial_dims=spatial_dims, encoder_channels=enc_channels,
                                   decoder_channels=tuple(decoder_channels), act=act, norm=norm, dropout=dropout,
                                   bias=decoder_bias, upsample=upsample, pre_conv="default", interp_mode=interp_mode,
                                   align_corners=None, is_pad=is_pad)
        self.segmentation_head = SegmentationHead(spatial_dims=spatial_dims, in_channels=decoder_channels[-1],
                                                  out_channels=out_channels, kernel_size=3, act=None)

    @property
    def size_multiple(self) -> int:
        """Every spatial size of the input must be a multiple of this (32: five stride-2 levels)."""
        return 32

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's 5 feature maps (strides 2, 4, 8, 16, 32), shallow to deep."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x), self.skip_connect))


@recordable
class ShiftedSigmoid(nn.Module):
    """``f(x) = 1 / (1 + exp(-a (x - shift)))``: Bonte et al.'s stage-1 output activation.

    The stage-0 network predicts a nuclear stain scaled to ``[0, 1]``; the shift puts the
    decision threshold ``f = 0.5`` at a predicted stain of ``shift`` (0.5) whatever ``a`` is.
    With the paper's ``a = 1`` the output is narrow: ``f(0) = 0.378``, ``f(1) = 0.622``, and
    ``f`` reaches 0.05 / 0.95 only at ``x = -2.44`` / ``3.44``, so a soft Jaccard loss stays far
    from 0 until the raw outputs grow well outside ``[0, 1]``; binarise at ``f >= 0.5``.
    """

    def __init__(self, a: float = 1.0, shift: float = 0.5):
        super().__init__()
        if not a > 0:
            raise ValueError(f"ShiftedSigmoid needs a > 0, got {a}")
        self.a = float(a)
        self.shift = float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.a * (x - self.shift))

    def extra_repr(self) -> str:
        return f"a={self.a}, shift={self.shift}"


@recordable
class ISLNet(nn.Module):
    """A base network followed by a head: ``head(base(x))``.

    Stage 0 uses ``head=None`` (identity: raw stain prediction), stage 1 of isl_nucleus_seg a
    :class:`ShiftedSigmoid`, isl_cell_instance extra conv blocks. Because the identity and the
    sigmoid have no parameters, stage-0 and stage-1 checkpoints of isl_nucleus_seg have the same
    keys (``base.*``).
    """

    def __init__(self, base: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.base = base
        self.head = head if head is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


def _state_dict_of(checkpoint) -> dict:
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"stage-0 checkpoint not found: {path!r}; train stage 0 first "
                                    "(--stage 0) or point stage0_ckpt at its model file")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a state dict or a path, got {type(checkpoint).__name__}")
    for key in ("network", "model", "state_dict"):  # ignite Checkpoint with several objects
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    return dict(checkpoint)


def load_stage0_weights(net: nn.Module, checkpoint, strict: bool = True) -> nn.Module:
    """Whole-network transfer: load a stage-0 checkpoint into ``net`` (``net.base`` for an :class:`ISLNet`).

    ``checkpoint`` is a path or a state dict of the stage-0 network, saved either as a plain
    :class:`DenseNetUNet` (``encoder.*``) or as an :class:`ISLNet` (``base.*``; the stage-0 head
    has no parameters), possibly wrapped by DDP (``module.*``) or in an ignite dict
    (``{"network": ...}``). Returns ``net`` (for use in configs).

    Raises:
        FileNotFoundError: the checkpoint file does not exist.
        ValueError: the checkpoint does not fit the base network (names keys / shapes).
    """
    sd = _state_dict_of(checkpoint)
    target = net.base if isinstance(net, ISLNet) else net
    out = {}
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("base."):
            k = k[len("base."):]
        elif k.startswith("head."):
            continue
        out[k] = v
    own = target.state_dict()
    if strict:
        missing, unexpected = sorted(set(own) - set(out)), sorted(set(out) - set(own))
        shapes = [k for k in own if k in out and out[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"stage-0 checkpoint does not fit the network: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, shape mismatch {shapes[:3]} "
                             "(same in_channels / sizes as in stage 0?)")
    target.load_state_dict(out, strict=strict)
    return net


def build_stage1_network(stage0_checkpoint=None, head: nn.Module | None = None, **unet_kwargs) -> ISLNet:
    """Stage-1 network: ``ISLNet(DenseNetUNet(**unet_kwargs), head)`` initialised from stage 0.

    Args:
        stage0_checkpoint: path or state dict of the stage-0 network (``None``: random init,
            the from-scratch baseline; combine with ``pretrained_path`` for the ImageNet one).
        head: the stage-1 head (default :class:`ShiftedSigmoid` with ``a = 1``).
        unet_kwargs: :class:`DenseNetUNet` arguments (must match the stage-0 network).
    """
    net = ISLNet(DenseNetUNet(**unet_kwargs), head if head is not None else ShiftedSigmoid())
    if stage0_checkpoint is not None:
        load_stage0_weights(net, stage0_checkpoint)
    return net

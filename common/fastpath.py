"""Fast paths for training and inference, as MONAI inferers that a bundle config switches on.

The paths: bf16 autocast on CPU, channels-last memory format, BatchNorm folding, ``torch.compile``.

Each optimisation is measured against the plain eager fp32 path by ``scripts/benchmark.py`` (see
``docs/performance.md``). One switch, ``fast``, turns on every path whose output is shown equal to
eager fp32 within a stated tolerance (``tests/test_fast_defaults.py``): BatchNorm folding,
channels-last and bf16 autocast where the hardware computes bf16 natively (:func:`native_bf16_cpu`
on CPU; AMP on CUDA). The bundles' inference configs set ``fast: true``; ``--fast false`` gives
the eager fp32 path exactly. Each switch below can also be set on its own (an explicit value wins
over ``fast``):

* ``bf16_cpu``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward pass on CPU
  (AVX-512 BF16 / AMX CPUs); outputs are returned as float32, so losses and metrics stay fp32.
  ``"auto"``: on where :func:`native_bf16_cpu` says the CPU has bf16 instructions (on a CPU without
  them oneDNN emulates bf16, which is slower than fp32: see ``docs/performance.md``).
* ``bf16_cuda``: autocast (AMP) when the input is on CUDA.
* ``channels_last``: ``channels_last_3d`` (5D) / ``channels_last`` (4D) for inputs (and, with
  :func:`set_memory_format`, the network's weights); oneDNN's convolutions prefer it.
* ``fuse_bn``: inference only; each eval-mode BatchNorm that directly follows a convolution or a
  transposed convolution is folded into it (:func:`fuse_conv_bn`, exact up to float rounding).
* ``reuse_memory`` (a config key, applied once per process by :func:`reuse_freed_memory` in the
  bundles' ``initialize``): glibc's ``malloc`` keeps freed memory for the next allocation instead of
  handing every large tensor back to the kernel and faulting fresh zeroed pages in again on the
  next call. Same arithmetic; on the 2-core build machine it made an eager fp32 F-net forward pass
  about 1.8x faster (``docs/performance.md``).
* ``compile``: inference only; ``torch.compile`` (inductor, weights frozen as constants) of the
  prepared copy. The first call compiles (tens of seconds on a laptop CPU); later calls with the
  same window shape reuse it. Sliding-window batches are padded to one batch size, so the last,
  smaller batch of a volume does not trigger a second compilation.

The network given to an inferer is never modified: inference uses a prepared copy, cached
until the network's weights change (optimizer step, checkpoint load).

Typical use (what ``bundles/fnet_baseline/configs/inference.json`` does)::

    inferer = FastSlidingWindowInferer(roi_size=(32, 64, 64), sw_batch_size=4, overlap=0.25,
                                       mode="gaussian", fast=True)   # fuse_bn, channels_last, bf16 "auto"
    pred = inferer(image_bczyx, network)     # float32, same spatial size as the input
    FastSlidingWindowInferer(roi_size=(32, 64, 64), fast=False)       # SlidingWindowInferer itself
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import resource
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from common.cli import as_bool

__all__ = [
    "native_bf16_cpu",
    "memory_format_for",
    "to_memory_format",
    "unit_channel_strides",
    "dense_gradient",
    "transposed_conv",
    "set_memory_format",
    "fuse_conv_bn",
    "autocast_context",
    "weights_version",
    "FastPathNet",
    "prepare_inference_network",
    "FastSimpleInferer",
    "FastSlidingWindowInferer",
    "margin_weight_map",
    "peak_rss_mib",
    "reuse_freed_memory",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively, so bf16 autocast is faster than fp32.

    Rule: the ``flags`` line of ``/proc/cpuinfo`` holds ``avx512_bf16`` (AVX-512 BF16 dot products)
    or ``amx_bf16`` (AMX tiles); on aarch64 the ``Features`` line holds ``bf16``. Without them
    oneDNN emulates bf16 with fp32 arithmetic and conversions (slower than plain fp32). An
    ``ONEDNN_MAX_CPU_ISA`` below ``AVX512_CORE_BF16`` (oneDNN's own cap) also counts as no native
    bf16. Other systems (macOS, Windows): False.
    """
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa != "ALL" and "BF16" not in isa and "AMX" not in isa:
        return False
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "flags":
                    return any(flag in value.split() for flag in _NATIVE_BF16_FLAGS)
                if key == "features":  # aarch64
                    return "bf16" in value.split()
    except OSError:
        pass
    return False


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>


def reuse_freed_memory(enable: bool = True, keep_mib: int = 1024) -> bool:
    """Let this process reuse the memory of freed tensors instead of returning it to the kernel.

    glibc's ``malloc`` serves every allocation above its mmap threshold (at most 32 MiB, and
    activations of a 3D network are larger) with a fresh ``mmap`` and unmaps it on ``free``: each
    forward pass then pays one page fault and one page zeroing per 4 KiB of activations. Here
    ``mallopt(M_MMAP_MAX, 0)`` puts every allocation on the heap and ``mallopt(M_TRIM_THRESHOLD,
    keep_mib MiB)`` keeps up to ``keep_mib`` MiB of free heap top for reuse. Values are untouched;
    only where memory comes from changes. PyTorch has no CPU caching allocator to do this (its
    tuning guide preloads jemalloc or tcmalloc instead, which pip cannot install).

    Process-wide and one-way: ``enable=False`` changes nothing (a process started without the call
    keeps glibc's defaults). Returns whether the setting was applied: ``False`` off glibc (macOS,
    Windows, musl) or when ``enable`` is false.
    """
    if not as_bool(enable, "reuse_memory") or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, min(int(keep_mib) << 20, 2**31 - 1)) == 1 and ok)


def memory_format_for(ndim: int) -> torch.memory_format:
    """The channels-last memory format of a tensor with ``ndim`` dimensions (5: ``BCZYX``, 4: ``BCYX``);
    ``torch.contiguous_format`` for any other rank."""
    return {5: torch.channels_last_3d, 4: torch.channels_last}.get(int(ndim), torch.contiguous_format)


def to_memory_format(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """``x`` (``BCZYX`` or ``BCYX``) in channels-last layout (``channels_last=True``) or contiguous.
    Values and shape are unchanged; only the strides differ."""
    fmt = memory_format_for(x.ndim) if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def unit_channel_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``BCZYX`` or ``BCYX``, contiguous) with channels-last strides where ``C == 1``; else ``x``.

    A one-channel tensor is contiguous and channels-last at once, and PyTorch then takes it as
    contiguous: the first convolution of a network runs contiguous and so does the first level after
    it. Same memory, no copy; only the strides say "channels last". The fast paths use it under bf16
    autocast only, where it made an F-net training step 6 % faster; in fp32 it changes the first
    level's rounding enough to widen channels-last's gap to float64 (``docs/performance.md``)."""
    if x.ndim not in (4, 5) or x.shape[1] != 1 or x.stride(1) == 1 or not x.is_contiguous():
        return x
    spatial = torch.empty(x.shape[2:], device="meta").stride()
    return x.as_strided(x.shape, (x[0].numel(), 1, *spatial))


def transposed_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a ``ConvTranspose2d``/``3d``; under CPU autocast with gradients on, its bias is
    added after the convolution rather than inside it.

    oneDNN computes a bf16 transposed convolution's bias gradient with a reference kernel (3 % of a
    bf16 F-net training step in ``perf``); PyTorch's own sum is much faster. The output differs from
    the fused bias by bf16 rounding only. Anywhere else (fp32, inference, CUDA) it is ``conv(x)``."""
    bias = conv.bias
    if bias is None or not (torch.is_grad_enabled() and bias.requires_grad and x.device.type == "cpu"
                            and torch.is_autocast_enabled("cpu")):
        return conv(x)
    fn = torch.nn.functional.conv_transpose3d if x.ndim == 5 else torch.nn.functional.conv_transpose2d
    y = fn(x, conv.weight, None, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)
    return y + bias.view(1, -1, *([1] * (y.ndim - 2))).to(y.dtype)


def dense_gradient(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself; in training, its gradient is made dense in ``t``'s own layout before it flows on.

    For the second input of a channel concatenation (a U-Net's upsampled branch): the gradient that
    ``torch.cat`` hands back is a strided slice of the concatenated gradient, and the element-wise
    backward of the ReLU before it runs 25x slower on such a slice than on a dense channels-last
    tensor. The copy costs a fraction of that; the values are unchanged."""
    if t.requires_grad:
        fmt = memory_format_for(t.ndim)
        fmt = fmt if t.is_contiguous(memory_format=fmt) else torch.contiguous_format
        t.register_hook(functools.partial(_contiguous_in, memory_format=fmt))
    return t


def _contiguous_in(grad: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return grad.contiguous(memory_format=memory_format)


def set_memory_format(module: nn.Module, channels_last: bool = True) -> nn.Module:
    """Convert ``module``'s 4D/5D parameters and buffers (conv weights) to channels-last, in place
    (``Parameter`` objects are kept, so an optimizer built on them stays valid). Returns ``module``.
    ``channels_last=False`` (or ``'false'``, ``0``) leaves the module as it is (the config switch's off state)."""
    if not as_bool(channels_last, "channels_last"):
        return module
    return module._apply(lambda t: t.contiguous(memory_format=memory_format_for(t.ndim)) if t.ndim in (4, 5) else t)


def _foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None


def _first_norm_of_adn(m: nn.Module) -> nn.Module | None:
    """MONAI's ``ADN`` block (``Convolution``'s ``adn`` child) with BatchNorm first ("NDA" order)."""
    if type(m).__name__ == "ADN" and isinstance(m, nn.Sequential):
        names = list(m._modules)
        if names and names[0] == "N" and _foldable_bn(m.N):
            return m.N
    return None


def fuse_conv_bn(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a (transposed) convolution into it.

    Patterns: consecutive children ``conv, bn`` of any ``nn.Sequential`` (F-net, the 3D U-Net with
    ``norm="batch"``), and MONAI's ``Convolution`` block (``conv`` then an ``ADN`` whose first layer
    is the norm, as in FlexibleUNet's decoder). The BatchNorm is replaced by ``nn.Identity``, so
    the module tree, state-dict keys of the convolutions and TorchScript export keep working.
    A BatchNorm after a ReLU (DenseNet's norm-relu-conv) cannot be folded and is kept.

    ``torch.fx.experimental.optimization.fuse`` does the same for plain convolutions but skips
    transposed ones and needs a traceable network, hence this walk over the module tree; the
    arithmetic is PyTorch's ``fuse_conv_bn_eval``.

    Args:
        module: the network; it must be in eval mode (running statistics are used).
        inplace: modify ``module`` itself; by default a deep copy is fused and returned.

    Returns:
        the fused network (same outputs up to float rounding, fewer layers).
    """
    if module.training:
        raise ValueError("fuse_conv_bn needs a network in eval mode (call .eval() first): "
                         "training-mode BatchNorm uses batch statistics and cannot be folded")
    net = module if inplace else copy.deepcopy(module)
    for parent in net.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in zip(names[:-1], names[1:]):
            conv, nxt = parent._modules[a], parent._modules[b]
            if not isinstance(conv, _CONVS + _CONV_TRANSPOSES):
                continue
            transpose = isinstance(conv, _CONV_TRANSPOSES)
            if _foldable_bn(nxt) and nxt.num_features == conv.out_channels:
                parent._modules[a] = fuse_conv_bn_eval(conv, nxt, transpose=transpose)
                parent._modules[b] = nn.Identity()
                continue
            bn = _first_norm_of_adn(nxt)
            if bn is not None and bn.num_features == conv.out_channels:
                parent._modules[a] = fuse_conv_bn_eval(conv, bn, transpose=transpose)
                nxt._modules["N"] = nn.Identity()
    return net


def autocast_context(device_type: str, enabled: bool, dtype: torch.dtype | None = None):
    """``torch.autocast`` for ``device_type`` or a no-op context when not ``enabled``.

    ``dtype`` defaults to bfloat16 on CPU; on CUDA to bfloat16 where the card supports it, else
    float16 (float16 training additionally needs a gradient scaler: use MONAI's ``amp`` there)."""
    if not enabled:
        return contextlib.nullcontext()
    if dtype is None:
        dtype = torch.bfloat16
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
    return torch.autocast(device_type, dtype=dtype)


def weights_version(module: nn.Module) -> tuple:
    """A key that changes whenever any parameter or buffer of ``module`` is replaced or modified
    in place (optimizer step, ``load_state_dict``, ``.to()``): storage address and version counter."""
    return tuple((t.data_ptr(), t._version) for t in list(module.parameters()) + list(module.buffers()))


class FastPathNet(nn.Module):
    """Run ``net`` with a memory format and autocast; return float32.

    Input ``(B, C, *spatial)``; output ``net``'s output, cast to float32 and contiguous.

    Args:
        net: the network (already prepared: fused, converted, compiled).
        channels_last: convert inputs to channels-last before the forward pass.
        autocast: run the forward pass under :func:`autocast_context`.
        autocast_dtype: autocast dtype (default: bfloat16, see :func:`autocast_context`).
        fixed_batch: pad every batch with zeros to this size and crop the output back (a compiled
            network then sees one input shape); ``None`` keeps batches as they come.
    """

    def __init__(self, net: Callable, channels_last: bool = False, autocast: bool = False,
                 autocast_dtype: torch.dtype | None = None, fixed_batch: int | None = None):
        super().__init__()
        self.net = net
        self.channels_last = bool(channels_last)
        self.autocast = bool(autocast)
        self.autocast_dtype = autocast_dtype
        self.fixed_batch = fixed_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.fixed_batch is not None and n < self.fixed_batch:
            x = torch.cat([x, x.new_zeros((self.fixed_batch - n, *x.shape[1:]))])
        if self.channels_last:
            x = to_memory_format(x, True)
            if self.autocast:  # bf16 only: see unit_channel_strides
                x = unit_channel_strides(x)
        with autocast_context(x.device.type, self.autocast, self.autocast_dtype):
            y = self.net(x)
        if isinstance(y, torch.Tensor):
            y = y[:n] if y.shape[0] != n else y
            y = y.float().contiguous()
        return y


def prepare_inference_network(network: nn.Module, fuse_bn: bool = True, channels_last: bool = False,
                              bf16: bool = False, compile: bool = False, fixed_batch: int | None = None) -> FastPathNet:
    """An inference-ready copy of ``network`` (which is left untouched).

    Steps: unwrap DDP, deep copy, ``eval()``, :func:`fuse_conv_bn` (``fuse_bn``),
    :func:`set_memory_format` (``channels_last``), ``torch.compile`` with frozen weights
    (``compile``), wrapped in :class:`FastPathNet` (autocast when ``bf16``; on CUDA this is AMP with
    bfloat16 or float16). ``fixed_batch`` (with ``compile``): see :class:`FastPathNet`.
    """
    base = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    net = copy.deepcopy(base).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if fuse_bn:
        net = fuse_conv_bn(net, inplace=True)
    set_memory_format(net, channels_last)
    if compile:
        net = torch.compile(net, dynamic=False, options={"freezing": True})
    return FastPathNet(net, channels_last=channels_last, autocast=bf16, fixed_batch=fixed_batch if compile else None)


def margin_weight_map(roi_size: Sequence[int], margin: float | Sequence[float]) -> torch.Tensor:
    """Overlap-tile blending weights for one window: 1 inside, falling to ~0 over ``margin`` at each edge.

    Args:
        roi_size: the window's spatial size.
        margin: per axis (or one for all), a fraction of the window (``<= 0.5``) or, when > 1, voxels;
            0 leaves that axis flat (e.g. windows that span the whole z extent).

    Returns:
        float32 tensor of shape ``roi_size``; the weight ``((d + 1) / m) ** 4`` at distance ``d`` from
        the nearest edge within the margin ``m`` (never exactly 0, so a voxel that only window edges
        cover, at the volume's border, still gets their prediction).
    """
    roi = [int(r) for r in roi_size]
    margins = list(margin) if isinstance(margin, Sequence) else [margin] * len(roi)
    if len(margins) != len(roi):
        raise ValueError(f"margin {margin!r} needs one value per axis of the window {roi}")
    w = torch.ones(roi, dtype=torch.float32)
    for axis, (n, m) in enumerate(zip(roi, margins)):
        m = float(m) * n if float(m) <= 1 else float(m)
        if m <= 0:
            continue
        if m > n / 2:
            raise ValueError(f"margin {margin!r} leaves nothing of the window {roi} along axis {axis}")
        idx = torch.arange(n, dtype=torch.float32)
        edge = torch.minimum(idx, n - 1 - idx)
        shape = [1] * len(roi)
        shape[axis] = n
        w = w * torch.clamp((edge + 1) / m, max=1.0).pow(4).reshape(shape)
    return w


class _FastPath:
    """Shared switches of the fast inferers (see the module docstring)."""

    def _init_fast(self, bf16_cpu, channels_last, fuse_bn, compile, bf16_cuda=None, fast=False) -> None:
        fast = as_bool(fast, "fast")  # also the strings a command line gives ('false')

        def pick(value, name, default):  # None: follow ``fast``
            return default if value is None else as_bool(value, name)

        if bf16_cpu is None:
            bf16_cpu = "auto" if fast else False
        self.bf16_cpu = native_bf16_cpu() if str(bf16_cpu).lower() == "auto" else as_bool(bf16_cpu, "bf16_cpu")
        self.bf16_cuda = pick(bf16_cuda, "bf16_cuda", fast)
        self.channels_last = pick(channels_last, "channels_last", fast)
        self.fuse_bn = pick(fuse_bn, "fuse_bn", fast)
        self.compile = pick(compile, "compile", False)  # never by default: compilation takes tens of seconds
        self.fast = fast
        self._cache: tuple | None = None  # (id(network), weights_version, device type, prepared)

    def _autocast_on(self, device_type: str) -> bool:
        return (self.bf16_cpu and device_type == "cpu") or (self.bf16_cuda and device_type == "cuda")

    def fast_network(self, network: Callable, inputs: torch.Tensor, batch: int | None = None) -> Callable:
        """The callable that runs ``network`` the fast way for ``inputs`` (``network`` itself when
        every switch is off). Training-mode networks get autocast and memory format only."""
        dev = inputs.device.type
        autocast = self._autocast_on(dev)
        if not isinstance(network, nn.Module) or not (autocast or self.channels_last or self.fuse_bn or self.compile):
            return network
        if network.training:
            if not (autocast or self.channels_last):
                return network
            return FastPathNet(network, channels_last=self.channels_last, autocast=autocast)
        key = (id(network), weights_version(network), dev, autocast)
        if self._cache is not None and self._cache[:4] == key:
            return self._cache[4]
        prepared = prepare_inference_network(network, fuse_bn=self.fuse_bn, channels_last=self.channels_last,
                                             bf16=autocast, compile=self.compile, fixed_batch=batch)
        self._cache = (*key, prepared)
        return prepared


class FastSimpleInferer(SimpleInferer, _FastPath):
    """:class:`monai.inferers.SimpleInferer` with the fast-path switches (training and whole-image
    inference). Input ``(B, C, *spatial)``; output float32 of the network's output shape.

    Every switch is a bool (or the strings ``'true'``/``'false'`` a command line gives) or ``None``:
    follow ``fast``.

    Args:
        bf16_cpu: bfloat16 autocast when the input is on CPU; ``"auto"``: where :func:`native_bf16_cpu`
            (``fast`` means ``"auto"``).
        channels_last: channels-last inputs (convert the network itself with :func:`set_memory_format`).
        fuse_bn: fold BatchNorm into convolutions (eval-mode networks only).
        compile: ``torch.compile`` the prepared copy (eval-mode networks only); ``fast`` leaves it off.
        bf16_cuda: autocast (AMP, bfloat16 or float16) when the input is on CUDA; for training on
            GPUs prefer MONAI's ``amp`` switch of the trainer (it adds the gradient scaler).
        fast: the default of every switch left at ``None`` (off when ``False``: eager fp32 exactly).
    """

    def __init__(self, bf16_cpu: bool | str | None = None, channels_last: bool | None = None,
                 fuse_bn: bool | None = None, compile: bool | None = None, bf16_cuda: bool | None = None,
                 fast: bool = False) -> None:
        SimpleInferer.__init__(self)
        self._init_fast(bf16_cpu, channels_last, fuse_bn, compile, bf16_cuda, fast)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        return SimpleInferer.__call__(self, inputs, self.fast_network(network, inputs, inputs.shape[0]), *args,
                                      **kwargs)


class FastSlidingWindowInferer(SlidingWindowInferer, _FastPath):
    """:class:`monai.inferers.SlidingWindowInferer` with the fast-path switches; every other argument
    is ``SlidingWindowInferer``'s. Input ``(B, C, *spatial)`` of any size; output float32
    ``(B, C_out, *spatial)``.

    Seams: a deep network's output near a window's edge depends on the zero padding there, so
    windows blended as they are show their tiling (visible block edges in max-projections). With
    ``margin`` (overlap-tile blending, as in the U-Net paper) each window's outer ``margin`` (a
    fraction of the window per axis, or voxels when > 1) gets almost no weight: every voxel comes
    from a window interior, except at the volume's own border, where the window's edge is the
    volume's edge as in a whole-volume pass. Use ``overlap >= 2 * margin`` so interiors cover
    everything. Measured with a trained F-net (depth 4, 16 channels) on a 32x192x192 volume
    against one whole-volume pass: Pearson r 0.99978 with 32x128x128 windows, overlap 0.5 and margin
    0.25 (Gaussian blending, same windows: 0.99657; the old 32x64x64 Gaussian windows: 0.975).

    Args:
        bf16_cpu, channels_last, fuse_bn, compile, bf16_cuda, fast: see :class:`FastSimpleInferer`.
        margin: see above; ``None`` keeps ``mode``'s blending.
        args, kwargs: ``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``, ... of
            :class:`monai.inferers.SlidingWindowInferer`.
    """

    def __init__(self, *args: Any, bf16_cpu: bool | str | None = None, channels_last: bool | None = None,
                 fuse_bn: bool | None = None, compile: bool | None = None, bf16_cuda: bool | None = None,
                 fast: bool = False, margin: float | Sequence[float] | None = None, **kwargs: Any) -> None:
        SlidingWindowInferer.__init__(self, *args, **kwargs)
        self._init_fast(bf16_cpu, channels_last, fuse_bn, compile, bf16_cuda, fast)
        self.margin = margin
        if margin is not None:
            self.roi_weight_map = margin_weight_map(self.roi_size, margin)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        net = self.fast_network(network, inputs, int(self.sw_batch_size))
        return SlidingWindowInferer.__call__(self, inputs, net, *args, **kwargs)


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident set size in MiB of this process (or, ``children=True``, of the largest
    waited-for child).

    On Linux the process's own peak is ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` is
    inherited through ``fork``/``exec``, so a child started by a big parent would report the
    parent's peak instead of its own.
    """
    if not children:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0  # kB
        except (OSError, ValueError, IndexError):
            pass
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0  # bytes on macOS, KiB on Linux

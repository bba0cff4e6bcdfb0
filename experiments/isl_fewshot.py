"""Few-shot nucleus segmentation with and without in-silico-labeling pretraining (Bonte et al., Fig. 7b).

    python -m experiments.isl_fewshot --seeds "[0,1,2]"        # real aiSEGcell data, CPU budget
    python -m experiments.isl_fewshot --seeds "[0]" --ns "[1]" --iterations 10 --stage0_ckpt None

All training and testing go through the isl_nucleus_seg bundle's own ``configs/train.json``
(in-process via :mod:`experiments.runner`, the pipeline ``python -m monai.bundle run`` runs):

* **Data** (:func:`experiments.isl_data.prepare`, 2x block mean): aiSEGcell fig3a. A training
  "image" is one ``tile`` x ``tile`` tile (128 x 128 after downsampling = 256 x 256 raw pixels)
  of field ``p0001`` with at least one nucleus pixel (13 such tiles). Test: the whole fields
  ``p0011`` and ``p0013`` (IoU of the binary mask per field, averaged), never used in training.
* **Stage 0** (bright field -> nuclear stain): by default the shipped ``models/model_stage0.pt``
  (trained on the whole field p0001 only, 600 iterations, z-score input; its record gives the
  normalisation every stage-1 run here then uses); ``--stage0_ckpt None`` trains one per seed
  on p0001 with ``stage0_iterations``.
* **Stage 1**, for every seed, ``N`` in ``ns`` and init in ``inits`` (``isl``: the whole stage-0
  network; ``scratch``: random): the first ``N`` tiles of the pool in the seed's random order,
  the same budget (``iterations`` x ``batch_size`` crops, lr, seed) for every run, the final
  network evaluated (no model selection). ``N = 0``: the stage-0 network + shifted sigmoid.

Outputs in ``out_dir``: ``results.json``, ``fewshot.md`` (mean +- sd over seeds), ``fewshot.csv``.
"""

from __future__ import annotations

import csv
import os
import time

import numpy as np

from common.report import mean_sd
from experiments import isl_data
from experiments.isl_crossacq import CPU_NET, train_and_test
from experiments.runner import workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, "bundles", "isl_nucleus_seg")
SHIPPED_STAGE0 = os.path.join(BUNDLE, "models", "model_stage0.pt")

#: network presets: "paper" is the bundle's DenseNet-121 U-Net; "cpu" the same architecture with
#: fewer and thinner dense layers (1.0 M instead of 12.8 M parameters, about 6x faster on a CPU)
NETWORKS = {"paper": {}, "cpu": dict(CPU_NET)}


def _log(msg: str) -> None:
    print(f"[isl_fewshot {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def draw_tiles(pool_csv: str, n: int, seed: int, out_csv: str) -> str:
    """The first ``n`` tiles of ``pool_csv`` in the order of ``numpy.random.default_rng(seed).permutation``,
    as a manifest beside the pool (relative paths hold)."""
    rows = isl_data.read_manifest_rows(pool_csv)
    if n > len(rows):
        raise ValueError(f"{pool_csv}: {len(rows)} tiles in the pool, cannot take N={n}")
    order = np.random.default_rng(int(seed)).permutation(len(rows))
    return isl_data.write_manifest(out_csv, [rows[i] for i in order[:n]], isl_data.read_header(pool_csv))


def _evaluate_only(overrides: dict) -> list[float]:
    wf = workflow(BUNDLE, "train.json", overrides, workflow_type="train")
    ev = wf.parser.get_parsed_content("validate#evaluator")
    ev.run()
    det = ev.state.metric_details["val_iou"]
    return [float(v) for v in np.asarray(det.detach().cpu()).reshape(len(det), -1).mean(1)]


def _seed(seed: int, shared_stage0: bool, stage0_ckpt, stage0_iterations: int, data: dict, train_field: str,
          test_csv: str, pool_csv: str, ns: list, inits: list, base: dict, budget: dict, out_dir: str, threads: int,
          zero_shot: bool) -> dict:
    """Everything of one seed: stage 0 (unless shared), N = 0, then every N x init."""
    import torch

    torch.set_num_threads(int(threads))
    s = int(seed)
    res = {"stage0": [], "zero_shot": [], "runs": []}
    batch_size, patch_size, eval_roi = budget["batch_size"], budget["patch_size"], budget["eval_roi"]
    data_dir = os.path.dirname(data["fig3a"])
    if shared_stage0:
        ckpt = stage0_ckpt
    else:
        run_dir = os.path.join(out_dir, f"stage0_s{s}")
        r = train_and_test(data[f"fig3a_{train_field}"], test_csv, run_dir, s, base, stage0_iterations, batch_size,
                           patch_size, budget["learning_rate"], eval_roi, stage=0)
        res["stage0"].append(dict(r, seed=s))
        ckpt = os.path.join(run_dir, "models", "model_stage0.pt")
        _log(f"seed {s} stage 0: Pearson r {r['val_pearson']:.3f} ({r['seconds']} s)")
    if zero_shot:  # N = 0 does not depend on the seed when stage 0 is shared
        zdir = os.path.join(out_dir, f"zero_shot_s{s}")
        per = _evaluate_only(dict(base, in_channels=isl_data.in_channels(pool_csv), stage=1, init="isl",
                                  stage0_ckpt=ckpt, seed=s,
                                  train_manifest=pool_csv, val_manifest=test_csv, num_workers=0, resume=False,
                                  patch_size=[patch_size, patch_size], ckpt_dir=os.path.join(zdir, "models"),
                                  output_dir=os.path.join(zdir, "runs"),
                                  **{"validate#inferer#roi_size": [eval_roi, eval_roi],
                                     "validate#inferer#overlap": 0.0}))
        res["zero_shot"].append({"seed": s, "val_iou": float(np.mean(per)), "per_image": per})
        _log(f"seed {s} N = 0: IoU {np.mean(per):.3f}")
    for n in ns:
        train_csv = draw_tiles(pool_csv, n, s, os.path.join(data_dir, f"fewshot_{train_field}_n{n}_s{s}.csv"))
        for init in inits:
            run_dir = os.path.join(out_dir, f"n{n}_{init}_s{s}")
            r = train_and_test(train_csv, test_csv, run_dir, s, base, stage=1, init=init,
                               stage0_ckpt=ckpt if init == "isl" else None, **budget)
            res["runs"].append(dict(r, seed=s, n_images=n, init=init))
            _log(f"seed {s} N = {n} {init}: IoU {r['val_iou']:.3f} {np.round(r['per_image'], 3).tolist()} "
                 f"({r['seconds']} s)")
    return res


def run(out_dir: str = os.path.join(BUNDLE, "runs", "fewshot"), data_dir: str | None = None, seeds=(0, 1, 2),
        ns=(1, 2, 5), inits=("isl", "scratch"), stage0_ckpt: str | None = SHIPPED_STAGE0, stage0_iterations: int = 600,
        iterations: int = 100, batch_size: int = 4, patch_size: int = 128, learning_rate: float = 1e-3,
        eval_roi: int = 256, sigmoid_a: float = 5.0, network: str = "cpu", train_field: str = "p0001",
        test_fields=("p0011", "p0013"), tile: int = 128, downsample: int = 2, threads: int = 1,
        net_overrides: dict | None = None, overrides: dict | None = None, jobs: int = 1) -> dict:
    """Run the experiment (module docstring); returns the results (also ``<out_dir>/results.json``).

    Args:
        out_dir: runs, table, results (default git-ignored under the bundle's ``runs/``).
        data_dir: prepared data, default ``<out_dir>/../data_x<downsample>``.
        seeds: one tile draw, initialisation and crop sequence per seed.
        ns: training tiles per run; inits: ``isl`` and/or ``scratch``.
        stage0_ckpt: a stage-0 model (default the shipped one); ``None`` trains one per seed.
        stage0_iterations: stage-0 budget when it is trained here.
        iterations, batch_size, patch_size, learning_rate: the budget of every stage-1 run.
        eval_roi: sliding-window size on the test fields (no overlap).
        sigmoid_a: the stage-1 shifted-sigmoid steepness (the shipped model's 5).
        network: ``"cpu"`` (:data:`NETWORKS`) or ``"paper"``; net_overrides: more overrides (tests: a tiny net).
        overrides: more train.json overrides for every run (e.g. ``{"aug_contrast": 0}``).
        train_field, test_fields, tile, downsample: the split and the data preparation.
        threads: ``torch.set_num_threads`` of every run.
        jobs: seeds at a time (spawned processes; the numbers do not depend on it, the wall time does).
    """
    import torch

    from common.networks.record import trained_setting
    from common.report import markdown_table, write_json

    torch.set_num_threads(int(threads))
    listify = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731
    seeds, ns, inits = [int(s) for s in listify(seeds)], [int(n) for n in listify(ns)], [str(i) for i in listify(inits)]
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {network!r}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data = isl_data.prepare(data_dir or os.path.join(os.path.dirname(out_dir), f"data_x{downsample}"), downsample, tile)
    data_dir = os.path.dirname(data["fig3a"])
    test_csv = isl_data.write_manifest(os.path.join(data_dir, "fewshot_test.csv"),
                                       [isl_data.read_manifest_rows(data[f"fig3a_{f}"])[0] for f in test_fields])
    pool_csv = data[f"pool_{train_field}"]
    n_pool = len(isl_data.read_manifest_rows(pool_csv))
    ns = [n for n in ns if n <= n_pool]
    net = dict(NETWORKS[network], **(net_overrides or {}))
    base = dict(net, sigmoid_a=float(sigmoid_a), **(overrides or {}))
    shared_stage0 = stage0_ckpt not in (None, "None", "")
    if shared_stage0:  # stage 1 reads the input the way the stage-0 network was trained
        base.update(normalise=trained_setting(stage0_ckpt, "normalise", "zscore"),
                    norm_percentiles=trained_setting(stage0_ckpt, "norm_percentiles", [1, 99]),
                    flatfield_sigma=trained_setting(stage0_ckpt, "flatfield_sigma", 0))
    budget = dict(iterations=iterations, batch_size=batch_size, patch_size=patch_size, learning_rate=learning_rate,
                  eval_roi=eval_roi)
    t_start = time.time()
    results = {"config": dict(budget, seeds=seeds, ns=ns, inits=inits,
                              stage0_ckpt=stage0_ckpt if shared_stage0 else None,
                              stage0_iterations=None if shared_stage0 else stage0_iterations, sigmoid_a=sigmoid_a,
                              network=network, train_field=train_field, test_fields=list(test_fields), tile=tile,
                              n_pool=n_pool, downsample=downsample, threads=threads, overrides=base),
               "stage0": [], "zero_shot": [], "runs": []}
    tasks = [dict(seed=s, shared_stage0=shared_stage0, stage0_ckpt=stage0_ckpt, stage0_iterations=stage0_iterations,
                  data=data, train_field=train_field, test_csv=test_csv, pool_csv=pool_csv, ns=ns, inits=inits,
                  base=base, budget=budget, out_dir=out_dir, threads=threads,
                  zero_shot=(s == seeds[0] or not shared_stage0))
             for s in seeds]
    for part in isl_data.in_parallel(_seed, tasks, jobs):
        for k in ("stage0", "zero_shot", "runs"):
            results[k] += part[k]
    results["jobs"] = int(jobs)
    results["wall_seconds"] = round(time.time() - t_start, 1)

    table = [{"N tiles": "0 (stage 0 only)", "ISL-pretrained": mean_sd([z["val_iou"] for z in results["zero_shot"]]),
              "from scratch": "-"}]
    for n in ns:
        row = {"N tiles": n}
        for init, name in (("isl", "ISL-pretrained"), ("scratch", "from scratch")):
            vals = [r["val_iou"] for r in results["runs"] if r["n_images"] == n and r["init"] == init]
            row[name] = mean_sd(vals) if vals else "-"
        table.append(row)
    s0 = ("shipped models/model_stage0.pt" if shared_stage0 else
          f"stage 0 per seed ({stage0_iterations} iterations), Pearson r "
          f"{mean_sd([r['val_pearson'] for r in results['stage0']])}")
    md = [f"Held-out IoU on fig3a {', '.join(test_fields)} (mean ± sd over seeds {seeds}); {s0}; stage 1: "
          f"{iterations} iterations x {batch_size} crops of {patch_size}^2, lr {learning_rate}, sigmoid a {sigmoid_a}; "
          f"wall {results['wall_seconds']:.0f} s, {threads} thread(s) x {jobs} job(s).", "", markdown_table(table)]
    with open(os.path.join(out_dir, "fewshot.md.tmp"), "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(os.path.join(out_dir, "fewshot.md.tmp"), os.path.join(out_dir, "fewshot.md"))
    with open(os.path.join(out_dir, "fewshot.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["seed", "n_images", "init", "val_iou", "seconds"])
        w.writeheader()
        for z in results["zero_shot"]:
            w.writerow({"seed": z["seed"], "n_images": 0, "init": "isl", "val_iou": z["val_iou"], "seconds": 0})
        for r in results["runs"]:
            w.writerow({k: r[k] for k in ("seed", "n_images", "init", "val_iou", "seconds")})
    os.replace(os.path.join(out_dir, "fewshot.csv.tmp"), os.path.join(out_dir, "fewshot.csv"))
    write_json(os.path.join(out_dir, "results.json"), results)
    _log(f"done in {results['wall_seconds']:.0f} s: {os.path.join(out_dir, 'fewshot.md')}")
    print("\n".join(md))
    return results


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(run, serialize=lambda results: None)

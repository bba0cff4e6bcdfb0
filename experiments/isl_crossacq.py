"""isl_nucleus_seg across acquisitions: train on one aiSEGcell acquisition, test on the other (label-free input).

    python -m experiments.isl_crossacq --seeds "[0,1,2]" --jobs 2
    python -m experiments.isl_crossacq --seeds "[0]" --directions "[fig3a_to_fig2a]" --variants "[zscore,default]"
    python -m experiments.isl_crossacq --seeds "[0]" --directions "[fig2a_within,fig3a_within]" --pretrain_iterations 0

Both directions, every seed, through the bundle's own ``configs/train.json`` (in-process via
:mod:`experiments.runner`, as ``python -m monai.bundle run`` does), the bundle's two stages:

* ``fig3a_to_fig2a``: stage 0 (ISL: bright field -> nuclear stain) and then stage 1 (nucleus masks,
  initialised from stage 0) on the 3 fig3a fields, tested on the 4 fig2a frames;
* ``fig2a_to_fig3a``: the same on the 4 fig2a frames, tested on the 3 fig3a fields;
* ``fig2a_within`` / ``fig3a_within`` (:data:`WITHIN`, a reference, not a cross-acquisition result):
  trained on the other fields of one acquisition, tested on its last field;
* ``fig3a_plus_t00011_to_fig2a`` / ``fig2a_plus_p0001_to_fig3a`` (:data:`ADAPT`, not label-free): one
  acquisition plus one labelled field of the other, tested on the other's remaining fields.

The network sees only the bright field. Every run has the same budget (``pretrain_iterations`` of
stage 0, then ``iterations`` of stage 1, ``batch_size`` crops of ``patch_size``; ``--pretrain_iterations
0``: stage 1 from scratch), no model selection: the final network is evaluated once (the bundle's
validation = the test images, IoU of the binary mask per image, MONAI's ``MeanIoUHandler``); stage 0's
single validation is on its own training images. Baseline: Otsu's threshold (scikit-image) on the *real
nuclear stain* of the test images, same IoU. ``variants`` name bundle-override sets (:data:`VARIANTS`)
for the ablation of the normalisation and augmentation switches; ``default`` is the bundle's train.json
as shipped. Every model tested on all of fig2a is also scored, through the bundle's ``evaluate.json``
(:func:`evaluate_model`), against fig2a's second nucleus annotation, drawn on the bright field. Outputs
in ``out_dir``: ``results.json``, ``crossacq.md`` (mean +- sd over seeds); the same command on the same
``out_dir`` reuses the finished runs (``--reuse false`` retrains them).
"""

from __future__ import annotations

import os
import time

import numpy as np

from common.report import mean_sd
from experiments import isl_data
from experiments.runner import workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, "bundles", "isl_nucleus_seg")

#: the reduced CPU DenseNet U-Net (1.0 M parameters) of the shipped model
CPU_NET = {"network_def#base#init_features": 32, "network_def#base#growth_rate": 16,
           "network_def#base#block_config": [2, 4, 8, 6], "network_def#base#decoder_channels": [128, 64, 32, 16, 16]}

#: ablation variants: overrides of train.json (``default``: none, the shipped defaults)
_NO_AUG = {"aug_zoom": 0.0, "aug_contrast": 0.0, "aug_noise": 0.0, "aug_smooth": 0.0, "aug_bias_field": 0.0}
_ALL_AUG = {"aug_zoom": 0.3, "aug_contrast": 0.5, "aug_noise": 0.3, "aug_smooth": 0.3, "aug_bias_field": 0.5}
VARIANTS = {
    "default": {},
    "zscore": dict(_NO_AUG, normalise="zscore", flatfield_sigma=0),
    "pct": dict(_NO_AUG, normalise="percentile", flatfield_sigma=0),
    "pct_ff": dict(_NO_AUG, normalise="percentile", flatfield_sigma=32),
    "pct_aug": dict(_ALL_AUG, normalise="percentile", flatfield_sigma=0),
    "pct_ff_aug": dict(_ALL_AUG, normalise="percentile", flatfield_sigma=32),
    "zscore_aug": dict(_ALL_AUG, normalise="zscore", flatfield_sigma=0),
    "pct_ff_aug_wide": dict(_ALL_AUG, normalise="percentile", flatfield_sigma=32, aug_zoom=0.5,
                            aug_zoom_range=[0.7, 1.6]),
}

DIRECTIONS = {"fig3a_to_fig2a": ("fig3a", "fig2a"), "fig2a_to_fig3a": ("fig2a", "fig3a")}

#: the within-acquisition reference (not a cross-acquisition result): the same budget, trained on the other
#: fields of one acquisition and tested on its last field (``<acq>_<field>`` manifest), to show how much of the
#: gap is the change of acquisition and how much the labels and the budget
WITHIN = {"fig2a_within": ("fig2a", "t00101"), "fig3a_within": ("fig3a", "p0013")}

#: adaptation (not label-free): one acquisition plus one labelled field of the other, tested on the other's
#: remaining fields -- what a user can do with one annotated image of a new plate
ADAPT = {"fig3a_plus_t00011_to_fig2a": ("fig3a", "fig2a", "t00011"),
         "fig2a_plus_p0001_to_fig3a": ("fig2a", "fig3a", "p0001")}


def _fields(data: dict, acq: str) -> list[str]:
    """The per-field manifest keys of an acquisition (``fig2a_t00011``, not the combined ``fig2a_without_...``)."""
    return sorted(k for k in data if k.startswith(acq + "_") and "_" not in k[len(acq) + 1:])


def manifests(data: dict, direction: str) -> tuple[str, str, str]:
    """``(train manifest, test manifest, test name)`` of a direction (:data:`DIRECTIONS`, :data:`WITHIN` or
    :data:`ADAPT`); the combined manifests of the last two are written beside ``data``'s."""
    if direction in DIRECTIONS:
        train_acq, test_acq = DIRECTIONS[direction]
        return data[train_acq], data[test_acq], test_acq
    if direction in ADAPT:
        train_acq, test_acq, labelled = ADAPT[direction]
        base = os.path.dirname(data[train_acq])
        rest = [k for k in _fields(data, test_acq) if k != f"{test_acq}_{labelled}"]
        train = os.path.join(base, f"{train_acq}_plus_{labelled}.csv")
        test = os.path.join(base, f"{test_acq}_without_{labelled}.csv")
        isl_data.write_manifest(train, isl_data.read_manifest_rows(data[train_acq])
                                + isl_data.read_manifest_rows(data[f"{test_acq}_{labelled}"]))
        isl_data.write_manifest(test, [row for k in rest for row in isl_data.read_manifest_rows(data[k])])
        return train, test, f"{test_acq}_without_{labelled}"
    acq, held_out = WITHIN[direction]
    fields = [k for k in _fields(data, acq) if k != f"{acq}_{held_out}"]
    train = os.path.join(os.path.dirname(data[acq]), f"{acq}_without_{held_out}.csv")
    isl_data.write_manifest(train, [row for k in fields for row in isl_data.read_manifest_rows(data[k])])
    return train, data[f"{acq}_{held_out}"], f"{acq}_{held_out}"


def _log(msg: str) -> None:
    print(f"[isl_crossacq {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _common_overrides(train_csv: str, test_csv: str, run_dir: str, eval_roi: int) -> dict:
    """The bundle overrides every run and every evaluation of this experiment shares: the CPU network, its
    activation, the manifests, the run's folders and the test windows (whole tiles, no overlap)."""
    ov = dict(CPU_NET, sigmoid_a=5.0, in_channels=isl_data.in_channels(train_csv), train_manifest=train_csv,
              val_manifest=test_csv, ckpt_dir=os.path.join(run_dir, "models"), output_dir=os.path.join(run_dir, "runs"),
              num_workers=0)
    ov["validate#inferer#roi_size"] = [eval_roi, eval_roi]
    ov["validate#inferer#overlap"] = 0.0
    return ov


def _metric_per_image(wf, metric: str) -> tuple[float, list[float]]:
    """The validation evaluator's ``metric`` after a run, and its value per image."""
    ev = wf.parser.get_parsed_content("validate#evaluator")
    det = ev.state.metric_details.get(metric)
    per = [float(v) for v in np.asarray(det.detach().cpu()).reshape(len(det), -1).mean(1)] if det is not None else []
    return float(ev.state.metrics[metric]), per


def train_and_test(train_csv: str, test_csv: str, run_dir: str, seed: int, overrides: dict, iterations: int,
                   batch_size: int, patch_size: int, learning_rate: float, eval_roi: int, stage: int = 1,
                   init: str = "scratch", stage0_ckpt: str | None = None) -> dict:
    """One bundle training run (``train.json``) and the final network's metric on ``test_csv`` (per image)."""
    ov = dict(_common_overrides(train_csv, test_csv, run_dir, eval_roi), patch_size=[patch_size, patch_size],
              batch_size=batch_size, learning_rate=learning_rate, num_epochs=1, epoch_length=int(iterations),
              val_interval=1, resume=False, seed=int(seed), stage=stage, init=init)
    if stage0_ckpt:
        ov["stage0_ckpt"] = stage0_ckpt
    ov.update(overrides)
    metric = "val_pearson" if stage == 0 else "val_iou"
    t0 = time.time()
    wf = workflow(BUNDLE, "train.json", ov, workflow_type="train")
    wf.run()
    value, per = _metric_per_image(wf, metric)
    its = int(wf.parser.get_parsed_content("train#trainer").state.iteration)
    wf.finalize()
    return {metric: value, "per_image": per, "iterations": its, "seconds": round(time.time() - t0, 1)}


def evaluate_model(run_dir: str, manifest: str, overrides: dict, eval_roi: int) -> dict:
    """A run's final stage-1 network (``run_dir/models/model.pt``) scored on ``manifest`` by the bundle's
    ``evaluate.json`` (as a user evaluates a model; outputs in ``run_dir/eval``): the mean IoU and per image."""
    ov = dict(_common_overrides(manifest, manifest, run_dir, eval_roi), stage=1, init="scratch", bundle_root=run_dir)
    ov.update(overrides)
    wf = workflow(BUNDLE, ["train.json", "evaluate.json"], ov)
    wf.run()
    value, per = _metric_per_image(wf, "val_iou")
    wf.finalize()
    return {"val_iou": value, "per_image": per}


#: what a finished run's numbers depend on: a run in ``results.json`` with the same values is reused
SETUP_KEYS = ("iterations", "batch_size", "patch_size", "learning_rate", "eval_roi", "downsample", "threads",
              "pretrain_iterations")


def _one(direction: str, variant: str, seed: int, train_csv: str, test_csv: str, run_dir: str, threads: int,
         budget: dict, pretrain_iterations: int = 0) -> dict:
    import torch

    torch.set_num_threads(int(threads))
    pre = {}
    if pretrain_iterations:
        # stage 0 (ISL: bright field -> the nuclear stain) on the training acquisition only; its one validation
        # is on the same images (the test acquisition is not touched), the final network is kept
        pre = train_and_test(train_csv, train_csv, os.path.join(run_dir, "stage0"), seed, VARIANTS[variant],
                             **dict(budget, iterations=pretrain_iterations), stage=0)
        _log(f"{direction} {variant} seed {seed}: stage 0 Pearson r on its training images {pre['val_pearson']:.3f} "
             f"({pre['seconds']} s)")
        budget = dict(budget, init="isl", stage0_ckpt=os.path.join(run_dir, "stage0", "models", "model_stage0.pt"))
    r = train_and_test(train_csv, test_csv, run_dir, seed, VARIANTS[variant], **budget)
    r.update(direction=direction, variant=variant, seed=seed)
    if pre:
        r.update(stage0_pearson=pre["val_pearson"], stage0_seconds=pre["seconds"])
    _log(f"{direction} {variant} seed {seed}: IoU {r['val_iou']:.3f} per image {np.round(r['per_image'], 3).tolist()} "
         f"({r['seconds']} s)")
    return r


def run(out_dir: str = os.path.join(BUNDLE, "runs", "crossacq"), data_dir: str | None = None, seeds=(0, 1, 2),
        directions=tuple(DIRECTIONS), variants=("default",), iterations: int = 2000, batch_size: int = 4,
        patch_size: int = 128, learning_rate: float = 1e-3, eval_roi: int = 256, downsample: int = 2,
        threads: int = 1, jobs: int = 1, pretrain_iterations: int = 2000, reuse: bool = True) -> dict:
    """Run every direction x variant x seed; returns the results (also ``<out_dir>/results.json``).

    Args:
        out_dir: runs, table and results (default git-ignored under the bundle's ``runs/``).
        data_dir: prepared data (:func:`experiments.isl_data.prepare`), default ``<out_dir>/../data_x<downsample>``.
        seeds: training seeds (crops, augmentation, initialisation).
        directions: keys of :data:`DIRECTIONS` (or :data:`WITHIN`, the within-acquisition reference).
        variants: keys of :data:`VARIANTS` (``default`` = train.json's defaults).
        iterations, batch_size, patch_size, learning_rate: the budget of every run (crops of ``patch_size``).
        eval_roi: sliding-window size on the test images (no overlap).
        downsample: block-mean factor of the prepared data.
        threads: ``torch.set_num_threads`` of every run.
        jobs: runs at a time (spawned processes; the numbers do not depend on it, the wall time does).
        pretrain_iterations: 0: stage 1 from scratch; > 0: first stage 0 (ISL, bright field -> nuclear stain) on
            the training acquisition for that many iterations, then stage 1 from it (the bundle's two stages).
        reuse: a run that ``<out_dir>/results.json`` already holds, with the same :data:`SETUP_KEYS` and its
            model on disk, is not trained again (its numbers are kept; a fresh ``out_dir`` retrains everything).

    Every model tested on all of fig2a is also scored against fig2a's second nucleus annotation, drawn on the
    bright field (:func:`experiments.isl_data.fig2a_bf_annotation`), beside that annotation's agreement with
    the stain's masks and Otsu on the stain against it. The notes also give the boundary tolerance of each
    test acquisition's masks (:func:`experiments.isl_data.one_pixel_iou`).
    """
    import json

    import torch

    from common.report import markdown_table, write_json

    torch.set_num_threads(int(threads))
    seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else [seeds])]
    directions = [directions] if isinstance(directions, str) else list(directions)
    variants = [variants] if isinstance(variants, str) else list(variants)
    for d in directions:
        if d not in DIRECTIONS and d not in WITHIN and d not in ADAPT:
            raise ValueError(f"direction {d!r}: choose from {sorted(DIRECTIONS) + sorted(WITHIN) + sorted(ADAPT)}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant {v!r}: choose from {sorted(VARIANTS)}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data_dir = data_dir or os.path.join(os.path.dirname(out_dir), f"data_x{downsample}")
    data = isl_data.prepare(data_dir, downsample)
    t_start = time.time()
    results = {"config": {"seeds": seeds, "directions": directions, "variants": variants, "iterations": iterations,
                          "batch_size": batch_size, "patch_size": patch_size, "learning_rate": learning_rate,
                          "eval_roi": eval_roi, "downsample": downsample, "threads": threads,
                          "pretrain_iterations": int(pretrain_iterations),
                          "network": "cpu DenseNet U-Net (1.0 M), sigmoid_a 5, stage 1 " + (
                              "from stage 0 on the training acquisition" if pretrain_iterations else "from scratch")},
               "otsu": {}, "runs": []}
    previous, prev_wall = {}, 0.0
    if reuse and os.path.isfile(os.path.join(out_dir, "results.json")):
        with open(os.path.join(out_dir, "results.json")) as f:
            prev = json.load(f)
        if all(prev.get("config", {}).get(k) == results["config"][k] for k in SETUP_KEYS):
            previous = {(r["direction"], r["variant"], r["seed"]): r for r in prev.get("runs", [])}
            prev_wall = float(prev.get("wall_seconds", 0.0))
    tasks, kept = [], []
    for d in directions:
        train_csv, test_csv, test_acq = manifests(data, d)
        results["otsu"][test_acq] = isl_data.otsu_iou(test_csv)
        results.setdefault("one_pixel", {})[test_acq] = isl_data.one_pixel_iou(test_csv)
        _log(f"Otsu on the real stain of {test_acq}: IoU {np.mean(results['otsu'][test_acq]):.3f}")
        for v in variants:
            for s in seeds:
                run_dir = os.path.join(out_dir, f"{d}_{v}_s{s}")
                if (d, v, s) in previous and os.path.isfile(os.path.join(run_dir, "models", "model.pt")):
                    _log(f"{d} {v} seed {s}: reused from {out_dir}/results.json (IoU {previous[d, v, s]['val_iou']:.3f})")
                    kept.append(previous[d, v, s])
                    continue
                tasks.append(dict(direction=d, variant=v, seed=s, train_csv=train_csv, test_csv=test_csv,
                                  run_dir=run_dir, threads=threads,
                                  budget=dict(iterations=iterations, batch_size=batch_size, patch_size=patch_size,
                                              learning_rate=learning_rate, eval_roi=eval_roi),
                                  pretrain_iterations=int(pretrain_iterations)))
    new_runs = isl_data.in_parallel(_one, tasks, jobs) if tasks else []
    order = {(t["direction"], t["variant"], t["seed"]): i for i, t in enumerate(
        dict(direction=d, variant=v, seed=s) for d in directions for v in variants for s in seeds)}
    results["runs"] = sorted(kept + new_runs, key=lambda r: order[r["direction"], r["variant"], r["seed"]])
    results["jobs"] = int(jobs)
    # the second annotation of fig2a (drawn on the bright field): how much of the gap is nuclei that the
    # bright field does not show
    if any(d in DIRECTIONS and DIRECTIONS[d][1] == "fig2a" for d in directions):
        bf_csv = isl_data.fig2a_bf_annotation(data_dir, downsample)
        results["bf_annotation"] = {"stain_vs_bf_iou": isl_data.label_iou(data["fig2a"], bf_csv),
                                    "otsu_vs_bf_iou": isl_data.otsu_iou(bf_csv)}
        for r in results["runs"]:
            if r["direction"] in DIRECTIONS and DIRECTIONS[r["direction"]][1] == "fig2a" and "bf_val_iou" not in r:
                b = evaluate_model(os.path.join(out_dir, f"{r['direction']}_{r['variant']}_s{r['seed']}"), bf_csv,
                                   VARIANTS[r["variant"]], eval_roi)
                r.update(bf_val_iou=b["val_iou"], bf_per_image=b["per_image"])
                _log(f"{r['direction']} {r['variant']} seed {r['seed']}: IoU against the bright-field annotation "
                     f"{b['val_iou']:.3f} per image {np.round(b['per_image'], 3).tolist()}")
    # wall time of the runs' own calls: a call that reuses runs adds its time to theirs
    results["wall_seconds"] = round(time.time() - t_start + (prev_wall if kept else 0.0), 1)
    results["reused_runs"] = len(kept)
    table = []
    for d in directions:
        train_csv, _, test_acq = manifests(data, d)
        for v in variants:
            rs = [r for r in results["runs"] if r["direction"] == d and r["variant"] == v]
            table.append({"trained on": os.path.basename(train_csv)[:-4], "tested on": test_acq, "variant": v, "seeds": len(rs),
                          "IoU (mean ± sd)": mean_sd([r["val_iou"] for r in rs]),
                          "Otsu on real stain": f"{np.mean(results['otsu'][test_acq]):.3f}",
                          "IoU against the bright-field annotation": mean_sd([r["bf_val_iou"] for r in rs])
                          if all("bf_val_iou" in r for r in rs) else "-",
                          "per test image (mean over seeds)": ", ".join(
                              f"{v:.2f}" for v in np.mean([r["per_image"] for r in rs], axis=0)),
                          "s / run": f"{np.mean([r['seconds'] for r in rs]):.0f}"})
    md = [(f"Stage 0 (bright field -> nuclear stain) {pretrain_iterations} iterations, then stage 1"
           if pretrain_iterations else "Stage 1 from scratch") + f", {iterations} iterations x {batch_size} crops of {patch_size}^2, lr {learning_rate}, "
          f"{downsample}x block-mean data, {threads} thread(s) x {jobs} job(s); "
          f"wall {results['wall_seconds']:.0f} s.", "",
          markdown_table(table)]
    if "bf_annotation" in results:
        agree, otsu_bf = results["bf_annotation"]["stain_vs_bf_iou"], results["bf_annotation"]["otsu_vs_bf_iou"]
        md += ["fig2a's two nucleus annotations (the stain's masks, the ground truth above, and the masks drawn on "
               f"the bright field) agree at IoU {np.mean(agree):.3f} (per frame {', '.join(f'{v:.2f}' for v in agree)}); "
               f"Otsu on the stain against the bright-field annotation: {np.mean(otsu_bf):.3f}.", ""]
    for acq, v in results.get("one_pixel", {}).items():
        md += [f"On {acq}'s masks a perfect segmentation one pixel smaller all around scores IoU "
               f"{np.mean(v['eroded']):.3f}, one pixel larger {np.mean(v['dilated']):.3f} (per image "
               f"{', '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(v['eroded'], v['dilated']))}).", ""]
    with open(os.path.join(out_dir, "crossacq.md.tmp"), "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(os.path.join(out_dir, "crossacq.md.tmp"), os.path.join(out_dir, "crossacq.md"))
    write_json(os.path.join(out_dir, "results.json"), results)
    print("\n".join(md))
    return results


if __name__ == "__main__":
    from common.cli import strict_fire

    strict_fire(run, serialize=lambda results: None)

"""F-net (MSE) vs Spotlight in 3D, through the bundles, at a budget where F-net has converged; 3 seeds.

    python -m experiments.spotlight_vs_fnet --seeds 3 --out_dir spotlight_vs_fnet      # ~100 min on 2 cores
    python -m experiments.spotlight_vs_fnet --seeds 1 --iterations 20 --out_dir smoke  # a smoke run

Steps:
1. :func:`write_phantoms`: hazy 3D phantoms (:data:`PHANTOM`: the axial halo of a widefield PSF,
   out-of-focus and out-of-stack haze, debris and uneven background that the transmitted light does
   not show), split into train / val / held-out test manifests;
2. for every seed, ``fnet_baseline`` and ``spotlight_dna``'s ``configs/train.json``
   (:func:`experiments.runner.run_inprocess`) with identical overrides (network, patch, batch,
   iterations, lr and its cosine decay, seed; bf16 autocast + channels-last on CPUs with native bf16, for
   both), ``n_val`` validations (each bundle keeps its best model by its key metric); the convergence check reads F-net's validation Pearson r history
   (:func:`experiments.spotlight_ablation.converged`: change < 0.01 over the last 20 %);
3. each bundle's ``configs/inference.json`` on the held-out signals, and Spotlight's last-iteration
   network (:func:`predict_last`) beside its kept one;
4. :func:`common.spotlight.report.evaluate_dataset` per seed (the Spotlight protocol, figures like the
   paper's Fig. 2a, 3a, 3b), then ``<out_dir>/summary.md``: mean +- sd over seeds of every metric,
   the paper's three expectations checked, and how much the predictions' extreme voxels decide the
   foreground PSNR (:func:`clipped_fg_psnr`).

A second run of the command on the same ``out_dir`` reuses the finished trainings, predictions and reports.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np

#: Phantom parameters (:func:`common.synthetic.cell_field_params`) with the background that MSE
#: cannot get right: a widefield-like axial PSF (sigma 1.2 um: the axial halo above and below each
#: nucleus), strong out-of-focus haze (30 % of the signal, 4 um), out-of-stack haze (light of nuclei
#: outside the stack: broad blobs), debris invisible in bright field (dn 0) and a +-50 % uneven
#: background. Voxels of 0.5 um keep whole nuclei (6-10 um) inside a CPU-sized patch.
PHANTOM = dict(psf_sigma_um=(1.2, 0.25), haze_fraction=0.3, haze_sigma_um=4.0, out_of_stack_haze=0.3,
               debris_per_1000um3=1.0, debris_dn=0.0, background_variation=0.5)
SPACING_UM = (0.5, 0.5, 0.5)
SHAPE = (24, 96, 96)
N_CELLS = 10
#: the CPU budget (network, patch, batch) shared by both bundles and by the 2D ablation's network
NET = dict(depth=3, mult_chan=16)
PATCH = (16, 48, 48)
BATCH = 4
#: Adam's rate decays along a cosine to 0 over the budget, so that both models settle (the issue's
#: convergence criterion) instead of jittering at a constant rate; identical for both bundles
LR_SCHEDULE = "cosine"
#: watershed grid tuned on the training targets (nuclei of 12-20 voxels here; CLAHE off: it lifts the haze)
WATERSHED_GRID = {"sigma": (0.5, 1.0), "min_distance_um": (2.5, 3.5, 4.5), "clahe": (False,)}
BUNDLES = {"F-net (MSE)": "fnet_baseline", "Spotlight": "spotlight_dna"}
#: each bundle's key validation metric: the model it keeps (``models/model.pt``) is the best by this one
KEY_METRIC = {"fnet_baseline": "val_pearson", "spotlight_dna": "val_fg_pearson"}
#: the row of Spotlight's last-iteration network (not the kept one) in the summary
LAST = "Spotlight, last iteration"


def write_phantoms(out_dir: str, n_train: int = 6, n_val: int = 1, n_test: int = 3, seed: int = 1000) -> dict:
    """Write the :data:`PHANTOM` volumes and ``train.csv``, ``val.csv``, ``test.csv`` in ``out_dir``.

    Reuses a complete earlier copy (same files, same parameters) instead of rewriting it.
    Returns ``{split: manifest path}``.
    """
    from common.data import split_manifest
    from common.report import write_json
    from common.synthetic import write_dataset_3d

    stamp = os.path.join(out_dir, "phantom.json")
    want = dict(PHANTOM, n=[n_train, n_val, n_test], seed=seed, shape=list(SHAPE), spacing=list(SPACING_UM),
                n_cells=N_CELLS)
    splits = {k: os.path.join(out_dir, f"{k}.csv") for k in ("train", "val", "test")}
    if os.path.isfile(stamp) and all(os.path.isfile(p) for p in splits.values()):
        with open(stamp) as f:
            if json.load(f) == json.loads(json.dumps(want)):
                return splits
    manifest = write_dataset_3d(out_dir, n_volumes=n_train + n_val + n_test, shape=SHAPE, seed=seed,
                                spacing_um=SPACING_UM, n_cells=N_CELLS, **PHANTOM)
    out = split_manifest(manifest, {"train": n_train, "val": n_val, "test": n_test}, seed=None)
    write_json(stamp, want)
    return out


def _log(msg: str) -> None:
    print(f"[spotlight_vs_fnet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def val_history(runs_dir: str, tag: str) -> tuple[list[int], list[float]]:
    """``(epochs, values)`` of the validation scalar ``tag`` in the TensorBoard files under ``runs_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = [], []
    for ev in sorted(glob.glob(os.path.join(runs_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(ev, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                steps.append(int(e.step))
                values.append(float(e.value))
    order = np.argsort(steps, kind="stable")
    return [steps[i] for i in order], [values[i] for i in order]


def overrides(seed: int, iterations: int, n_val: int, spotlight: dict | None = None) -> dict:
    """Identical training overrides of both bundles (``spotlight``: extra ones for spotlight_dna)."""
    from common.fastpath import native_bf16_cpu

    epochs = int(n_val)
    ov = {"network_def#depth": NET["depth"], "network_def#mult_chan": NET["mult_chan"], "patch_size": list(PATCH),
          "batch_size": BATCH, "epoch_length": max(1, int(iterations) // epochs), "num_epochs": epochs,
          "val_interval": 1, "ckpt_interval": 1, "learning_rate": 0.001, "lr_schedule": LR_SCHEDULE, "num_workers": 0,
          "seed": int(seed),
          "resume": False, "bf16_cpu": bool(native_bf16_cpu()), "channels_last": True,
          "target_spacing_um": list(SPACING_UM)}
    return dict(ov, **(spotlight or {}))


def train_and_predict(bundle: str, data: dict, work: str, seed: int, iterations: int, n_val: int,
                      extra: dict | None = None) -> dict:
    """Train ``bundle`` (skipped when ``work/models/model.pt`` and ``work/done.json`` exist) and predict the test set."""
    from common.report import write_json
    from experiments.runner import bundle_dir, run_inprocess

    logging_file = os.path.join(bundle_dir(bundle), "configs", "logging.conf")
    done = os.path.join(work, "done.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    ov = overrides(seed, iterations, n_val, extra)
    t = run_inprocess(bundle, "train.json", dict(ov, train_manifest=data["train"], val_manifest=data["val"],
                                                 ckpt_dir=os.path.join(work, "models"),
                                                 output_dir=os.path.join(work, "runs")), logging_file=logging_file)
    run_inprocess(bundle, "inference.json", {"dataset_dir": data["test"], "output_dir": os.path.join(work, "pred"),
                                             "ckpt_path": os.path.join(work, "models", "model.pt")},
                  logging_file=logging_file)
    tag = "val_pearson"
    steps, vals = val_history(os.path.join(work, "runs"), tag)
    info = {"bundle": bundle, "seed": seed, "train_seconds": round(t, 1), "iterations": ov["epoch_length"] * ov["num_epochs"],
            "val_epochs": steps, "val_pearson": vals, "overrides": ov}
    write_json(done, info)
    return info


def _seed_job(bundle, data, work, seed, iterations, n_val, extra, threads):
    import torch

    torch.set_num_threads(int(threads))
    return train_and_predict(bundle, data, work, seed, iterations, n_val, extra)


#: (key in the summary, where in evaluate_dataset's metrics.json, header)
METRICS = (("psnr", ("pixel", "psnr"), "PSNR (dB)"), ("psnr_fg", ("pixel", "psnr_fg"), "PSNR fg (dB)"),
           ("ssim", ("pixel", "ssim"), "SSIM"), ("ssim_fg", ("pixel", "ssim_fg"), "SSIM fg"),
           ("pearson", ("pixel", "pearson"), "Pearson r"), ("pearson_fg", ("pixel", "pearson_fg"), "r fg"),
           ("bg_std", ("pixel", "bg_std"), "bg std"), ("ap50", ("segmentation", 0), "AP@0.5"),
           ("ap75", ("segmentation", 5), "AP@0.75"), ("mAP", ("segmentation", "mAP"), "mAP"),
           ("cosine", ("features", "cosine_distance"), "morphology cosine dist."))


def _metric(result: dict, name: str, where) -> float:
    part, key = where
    d = result[part].get(name)
    if d is None:
        return float("nan")
    return float(d["ap"][key]) if isinstance(key, int) else float(d[key])


def predict_last(bundle: str, data: dict, work: str) -> str:
    """Predict the test set with the network of the run's *last* iteration (its newest resumable checkpoint).

    The bundles keep the best validation model; this tests whether that choice explains a result.
    Returns the prediction folder ``work/pred_last`` (skipped when it exists).
    """
    import shutil

    import torch

    from common.handlers import latest_loadable_checkpoint
    from common.outputs import atomic_write
    from experiments.runner import bundle_dir, run_inprocess

    out = os.path.join(work, "pred_last")
    if os.path.isdir(out):
        return out
    last = os.path.join(work, "last")
    os.makedirs(last, exist_ok=True)
    ckpt = torch.load(latest_loadable_checkpoint(os.path.join(work, "runs", "checkpoints")), map_location="cpu",
                      weights_only=True)
    with atomic_write(os.path.join(last, "model.pt")) as tmp:
        torch.save(ckpt["network"], tmp)
    shutil.copy(os.path.join(work, "models", "model.json"), os.path.join(last, "model.json"))  # the config record
    run_inprocess(bundle, "inference.json", {"dataset_dir": data["test"], "output_dir": out,
                                             "ckpt_path": os.path.join(last, "model.pt")},
                  logging_file=os.path.join(bundle_dir(bundle), "configs", "logging.conf"))
    return out


def background_above(pred_dir: str, manifest: str) -> float:
    """Fraction of the targets' background voxels (outside the Otsu foreground) that a Spotlight
    prediction puts at or above its foreground threshold (0 in Otsu-standardised units), over a manifest."""
    from common.data import read_manifest
    from common.io import SaveOmeTiff, read_image
    from common.spotlight.evaluation import foreground_of

    above = total = 0
    for r in read_manifest(manifest):
        tgt = read_image(r["label"], 3)[0][0]
        pred = read_image(glob.glob(os.path.join(pred_dir, SaveOmeTiff.stem(r["image"]) + "_pred.*"))[0], 3)[0][0]
        bg = ~foreground_of(tgt)
        above += int((pred[bg] >= 0).sum())
        total += int(bg.sum())
    return above / max(total, 1)


#: the share (%) of a prediction's voxels clipped at each end by :func:`clipped_fg_psnr` (0.01 %: about 22 voxels of
#: a 24x96x96 test volume)
CLIP_PERCENT = 0.01


def clipped_fg_psnr(pred_dir: str, manifest: str, target_range, percent: float = CLIP_PERCENT) -> tuple[float, float]:
    """How much a few extreme voxels decide the protocol's foreground PSNR, over a manifest's predictions.

    The protocol maps a prediction's lowest and highest voxel onto ``target_range`` (min-max rescale), so those
    two voxels set the scale of every other. Returns the mean foreground PSNR (dB) as the protocol computes it
    and the mean after first clipping each prediction at its ``percent`` and ``100 - percent`` percentiles.
    """
    from common.data import read_manifest
    from common.io import SaveOmeTiff, read_image
    from common.metrics.image import psnr, rescale_to_range
    from common.spotlight.evaluation import foreground_of

    lo, hi = (float(v) for v in target_range)
    proto, clipped = [], []
    for r in read_manifest(manifest):
        tgt = np.asarray(read_image(r["label"], 3)[0][0], np.float64)
        pred = np.asarray(read_image(glob.glob(os.path.join(pred_dir, SaveOmeTiff.stem(r["image"]) + "_pred.*"))[0], 3)[0][0],
                          np.float64)
        fg = foreground_of(tgt)
        a, b = np.percentile(pred, [percent, 100 - percent])
        proto.append(psnr(rescale_to_range(pred, lo, hi), tgt, data_range=hi - lo, mask=fg))
        clipped.append(psnr(rescale_to_range(np.clip(pred, a, b), lo, hi), tgt, data_range=hi - lo, mask=fg))
    return float(np.mean(proto)), float(np.mean(clipped))


def expectations(per_seed: dict) -> list[dict]:
    """The paper's three expectations, Spotlight vs F-net, each on the means over seeds (and per seed)."""
    f, s = per_seed["F-net (MSE)"], per_seed["Spotlight"]
    checks = [("background std <= 0.5 x F-net's", "bg_std", lambda a, b: a <= 0.5 * b,
               lambda a, b: f"ratio {a / b:.2f} (target <= 0.50)"),
              ("foreground PSNR within 1 dB of F-net's", "psnr_fg", lambda a, b: a >= b - 1.0,
               lambda a, b: f"difference {a - b:+.2f} dB (target >= -1)"),
              ("AP@0.5 at least 0.05 above F-net's", "ap50", lambda a, b: a >= b + 0.05,
               lambda a, b: f"difference {a - b:+.3f} (target >= +0.05)")]
    out = []
    for text, key, ok, how in checks:
        a, b = float(np.mean(s[key])), float(np.mean(f[key]))
        seeds_ok = sum(bool(ok(x, y)) for x, y in zip(s[key], f[key]))
        out.append({"expectation": text, "holds": bool(ok(a, b)), "measured": how(a, b),
                    "seeds": f"{seeds_ok}/{len(s[key])}"})
    return out


def main(out_dir: str = "spotlight_vs_fnet", seeds: int | str = 3, iterations: int = 5000, n_val: int = 20,
         jobs: int = 2, threads: int = 1, spotlight: dict | None = None):
    """Train both bundles per seed, evaluate each seed with the Spotlight protocol, write ``summary.md``.

    Args:
        seeds: how many seeds (0, 1, ...) or a list of them.
        iterations: training iterations of both bundles (batch :data:`BATCH`, patch :data:`PATCH`).
        n_val: validations over the run (the convergence check uses F-net's).
        jobs: bundles trained at once (processes), each with ``threads`` torch threads.
        spotlight: extra spotlight_dna overrides, e.g. ``{"clamp_sigmoid": "both", "lambda_mse": 0.3}``
            (default: the bundle's own defaults).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from common.report import mean_sd, write_json, write_text
    from common.spotlight.report import evaluate_dataset
    from experiments.spotlight_ablation import converged, watershed_params

    t0 = time.time()
    seeds = list(range(int(seeds))) if str(seeds).isdigit() else [int(s) for s in seeds]
    out_dir = os.path.abspath(out_dir)
    _log(f"phantoms -> {out_dir}/data")
    data = write_phantoms(os.path.join(out_dir, "data"))
    extra = dict(spotlight or {})
    jobs_list = [(b, data, os.path.join(out_dir, f"seed{s}", b), s, iterations, n_val, extra if b == "spotlight_dna" else None,
                  threads) for s in seeds for b in BUNDLES.values()]
    _log(f"training {len(jobs_list)} runs ({iterations} iterations each, {jobs} at once)")
    if int(jobs) > 1:
        with ProcessPoolExecutor(int(jobs), mp_context=mp.get_context("spawn")) as ex:
            infos = [f.result() for f in [ex.submit(_seed_job, *j) for j in jobs_list]]
    else:
        infos = [_seed_job(*j) for j in jobs_list]
    runs = {(i["bundle"], i["seed"]): i for i in infos}
    per_seed = {n: {k: [] for k, _, _ in METRICS} for n in ["target", *BUNDLES, LAST]}
    bg_above = []
    extremes = {n: {"protocol": [], "clipped": []} for n in BUNDLES}
    for s in seeds:
        rep = os.path.join(out_dir, f"seed{s}", "report")
        mj = os.path.join(rep, "metrics.json")
        if not os.path.isfile(mj):
            _log(f"seed {s}: evaluation")
            evaluate_dataset(data["test"], {n: os.path.join(out_dir, f"seed{s}", b, "pred") for n, b in BUNDLES.items()},
                             rep, train_manifest=data["train"], microssim=False, tune=False,
                             watershed_params=watershed_params(os.path.dirname(data["train"])),
                             title=f"F-net vs Spotlight, seed {s}")
        with open(mj) as f:
            res = json.load(f)
        for n in BUNDLES:
            for k, where, _ in METRICS:
                per_seed[n][k].append(_metric(res, n, where))
        for k, where, _ in METRICS:
            per_seed["target"][k].append(_metric(res, "target", where) if where[0] == "segmentation" else float("nan"))
        bg_above.append(background_above(os.path.join(out_dir, f"seed{s}", "spotlight_dna", "pred"), data["test"]))
        for n, b in BUNDLES.items():  # how much the prediction's extreme voxels decide its foreground PSNR
            pr, cl = clipped_fg_psnr(os.path.join(out_dir, f"seed{s}", b, "pred"), data["test"], res["target_range"])
            extremes[n]["protocol"].append(pr)
            extremes[n]["clipped"].append(cl)
        # Spotlight's last-iteration network beside the kept one: does the model selection explain the result?
        rep_last = os.path.join(out_dir, f"seed{s}", "report_last")
        if not os.path.isfile(os.path.join(rep_last, "metrics.json")):
            _log(f"seed {s}: Spotlight's last-iteration model")
            pred_last = predict_last("spotlight_dna", data, os.path.join(out_dir, f"seed{s}", "spotlight_dna"))
            evaluate_dataset(data["test"], {LAST: pred_last}, rep_last, train_manifest=data["train"], microssim=False,
                             tune=False, watershed_params=watershed_params(os.path.dirname(data["train"])),
                             title=f"Spotlight, last iteration, seed {s}")
        with open(os.path.join(rep_last, "metrics.json")) as f:
            res = json.load(f)
        for k, where, _ in METRICS:
            per_seed[LAST][k].append(_metric(res, LAST, where))
    checks = expectations(per_seed)
    kept = {}
    for (b, s), info in runs.items():  # which validation the kept model came from
        steps, vals = val_history(os.path.join(out_dir, f"seed{s}", b, "runs"), KEY_METRIC[b])
        if vals:
            i = int(np.argmax(vals))
            kept[f"{b} seed {s}"] = (int(steps[i]) * int(info["overrides"]["epoch_length"]), float(vals[i]))
    conv = {f"{b} seed {s}": converged(runs[(b, s)]["val_epochs"], runs[(b, s)]["val_pearson"])
            for s in seeds for b in BUNDLES.values()}
    cmd = "python -m experiments.spotlight_vs_fnet " + " ".join(sys.argv[1:])
    lines = [f"# F-net (MSE) vs Spotlight, 3D phantoms, {len(seeds)} seeds", "",
             f"Command: `{cmd.strip()}`. Same budget for both bundles: {iterations} iterations, batch {BATCH}, patch "
             f"{list(PATCH)}, F-net depth {NET['depth']} / {NET['mult_chan']} channels, Adam lr 1e-3 ({LR_SCHEDULE} "
             f"schedule); {n_val} validations, each bundle keeps its best model by its key metric; phantoms "
             f"{SHAPE} at {SPACING_UM[0]} um (`experiments.spotlight_vs_fnet.PHANTOM`), held-out test volumes; "
             f"spotlight_dna overrides: {extra or 'none (bundle defaults)'}. Wall time {time.time() - t0:.0f} s.", "",
             "| model | " + " | ".join(h for _, _, h in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for n in [*BUNDLES, LAST]:
        lines.append(f"| {n} | " + " | ".join(mean_sd(per_seed[n][k], ".3f" if k not in ("psnr", "psnr_fg", "bg_std")
                                                        else ".2f") for k, _, _ in METRICS) + " |")
    lines.append("| real stain (segmentation only) | " + " | ".join(
        mean_sd(per_seed["target"][k]) if k in ("ap50", "ap75", "mAP") else "-" for k, _, _ in METRICS) + " |")
    lines += ["", "## The paper's three expectations", "", "| expectation | holds (means) | measured | seeds where it holds |",
              "|---|---|---|---|"]
    lines += [f"| {c['expectation']} | {'yes' if c['holds'] else 'no'} | {c['measured']} | {c['seeds']} |" for c in checks]
    lines += ["", f"Spotlight puts {mean_sd([100 * v for v in bg_above], '.0f')} % of the held-out background voxels "
              "(outside the target's Otsu foreground) at or above its foreground threshold (0)."]
    lines += ["", f"Foreground PSNR with each prediction's {CLIP_PERCENT} % lowest and highest voxels clipped before the "
              "min-max rescale (how much a few voxels decide it): " + "; ".join(
                  f"{n} {mean_sd(e['clipped'], '.2f')} dB against {mean_sd(e['protocol'], '.2f')} by the protocol "
                  f"(per seed {', '.join(f'{c - p:+.2f}' for p, c in zip(e['protocol'], e['clipped']))} dB)"
                  for n, e in extremes.items()) + "."]
    lines += ["", "## Convergence (validation Pearson r change over the last 20 % of iterations; < 0.01 = converged)", ""]
    lines += [f"- {k}: {'converged' if v[0] else 'NOT converged'} (change {v[1]:.4f}; "
              f"history {[round(x, 3) for x in runs[(k.split(' seed ')[0], int(k.split(' seed ')[1]))]['val_pearson']]})"
              + (f"; model kept from iteration {kept[k][0]} (best {KEY_METRIC[k.split(' seed ')[0]]} {kept[k][1]:.3f})"
                 if k in kept else "") for k, v in conv.items()]
    lines += ["", f"Figures of seed {seeds[0]} (report.md there has everything per seed): "
              f"[orthogonal max-projections with outlines](seed{seeds[0]}/report/mips_0.png) (paper Fig. 2a), "
              f"[intensity histograms](seed{seeds[0]}/report/histograms.png) (Fig. 3a), "
              f"[threshold sweep](seed{seeds[0]}/report/sweep.png) (Fig. 3b)."]
    text = "\n".join(lines) + "\n"
    write_json(os.path.join(out_dir, "summary.json"), {"per_seed": per_seed, "expectations": checks, "bg_above": bg_above,
                                                        "fg_psnr_extremes_clipped": extremes,
                                                        "convergence": conv, "kept": kept, "runs": infos})
    write_text(os.path.join(out_dir, "summary.md"), text)
    print(text, flush=True)


if __name__ == "__main__":
    from common.cli import strict_fire

    strict_fire(main)

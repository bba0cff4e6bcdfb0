"""Few-shot nucleus segmentation with and without in-silico-labeling pretraining (Bonte et al., Fig. 7b).

    python scripts/isl_fewshot.py                 # real aiSEGcell data, CPU budget (about 15 min, 1 thread)
    python scripts/isl_fewshot.py --out_dir /tmp/x --ns "[1,2]" --iterations 10 --network paper

One command, all through the isl_nucleus_seg bundle's own ``configs/train.json`` (in-process
``monai.bundle.ConfigWorkflow`` with overrides, exactly the pipeline a user trains with):

1. data: ``<data_dir>/{stage0_train,test,pool}.csv`` (written by ``scripts/prepare_isl_data.py
   aisegcell`` when absent: fields, few-shot tiles, held-out fields);
2. stage 0 (ISL): train on ``stage0_train.csv`` for ``stage0_iterations`` iterations, Pearson r of
   the predicted nuclear stain on every held-out field (``test.csv``);
3. "N = 0": the stage-0 network with the shifted sigmoid, not fine-tuned, IoU on ``test.csv``;
4. for every ``N`` in ``ns`` and every initialisation in ``inits`` (``isl``: the whole stage-0
   network; ``scratch``: random; ``imagenet``: needs ``imagenet_weights``): stage 1 on the first
   ``N`` images of ``pool.csv`` with the **same budget** (``iterations`` x ``batch_size`` crops,
   same learning rate and seed), then IoU of the final network on ``test.csv``;
5. ``results.json``, ``fewshot.csv``, ``fewshot.md`` (the table), ``fewshot.png`` (IoU vs N) and
   ``preview.png`` (a held-out crop: input, stain, prediction, masks), written atomically.
"""

from __future__ import annotations

import csv
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

BUNDLE = os.path.join(ROOT, "bundles", "isl_nucleus_seg")

#: network presets: "paper" is the bundle's DenseNet-121 U-Net; "cpu" the same architecture with
#: fewer and thinner dense layers (1.0 M instead of 12.8 M parameters, about 6x faster on a CPU)
NETWORKS = {
    "paper": {},
    "cpu": {"network_def#base#init_features": 32, "network_def#base#growth_rate": 16,
            "network_def#base#block_config": [2, 4, 8, 6], "network_def#base#decoder_channels": [128, 64, 32, 16, 16]},
}


def _log(msg: str) -> None:
    print(f"[isl_fewshot {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _rows(csv_path: str) -> tuple[list, list]:
    with open(csv_path, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        return header, [row for row in r if row]


def _subset_manifest(pool_csv: str, n: int, out_csv: str) -> str:
    """The first ``n`` rows of the pool (in its seeded order), next to it so relative paths hold."""
    header, rows = _rows(pool_csv)
    if n > len(rows):
        raise ValueError(f"{pool_csv}: {len(rows)} images in the pool, cannot take N={n}")
    tmp = out_csv + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows[:n])
    os.replace(tmp, out_csv)
    return out_csv


def _in_channels(manifest: str) -> int:
    from common.io import read_image

    header, rows = _rows(manifest)
    path = rows[0][header.index("path_signal")]
    path = path if os.path.isabs(path) else os.path.join(os.path.dirname(manifest), path)
    return int(read_image(path, spatial_dims=2)[0].shape[0])


def _workflow(bundle: str, overrides: dict):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=os.path.join(bundle, "configs", "train.json"), workflow_type="train",
                        **dict(overrides, bundle_root=bundle))
    wf.initialize()
    return wf


def _metric(evaluator, name: str) -> tuple[float, list]:
    value = float(evaluator.state.metrics[name])
    details = evaluator.state.metric_details.get(name)
    per_image = [float(v) for v in np.asarray(details.detach().cpu()).reshape(len(details), -1).mean(1)] \
        if details is not None else []
    return value, per_image


def _train(bundle: str, overrides: dict, metric: str) -> dict:
    t0 = time.time()
    wf = _workflow(bundle, overrides)
    wf.run()
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    value, per_image = _metric(evaluator, metric)
    iterations = int(wf.parser.get_parsed_content("train#trainer").state.iteration)
    wf.finalize()
    return {metric: value, f"{metric}_per_image": per_image, "iterations": iterations,
            "seconds": round(time.time() - t0, 1)}


def _evaluate_only(bundle: str, overrides: dict, metric: str) -> dict:
    t0 = time.time()
    wf = _workflow(bundle, overrides)
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    value, per_image = _metric(evaluator, metric)
    return {metric: value, f"{metric}_per_image": per_image, "seconds": round(time.time() - t0, 1)}


def _plot(rows: list, zero_shot: float | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.report import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for init in sorted({r["init"] for r in rows}):
        pts = sorted((r["n_images"], r["test_iou"]) for r in rows if r["init"] == init)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label={"isl": "ISL-pretrained", "scratch": "from scratch",
                                                                       "imagenet": "ImageNet"}.get(init, init))
    if zero_shot is not None:
        ax.axhline(zero_shot, color="grey", ls="--", lw=1, label="stage 0 only (N = 0)")
    ax.set_xscale("log")
    ax.set_xlabel("training images N")
    ax.set_ylabel("IoU on held-out fields")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("few-shot nucleus segmentation", fontsize=9)
    save_figure(fig, path)


def _preview(bundle: str, net_overrides: dict, in_channels: int, test_csv: str, stage0_ckpt: str, models: dict,
             path: str, size: int = 256) -> None:
    """Input, true stain, predicted stain, ground truth and the N-image masks on a held-out crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from monai.bundle import ConfigParser

    from common.isl import load_isl_manifest
    from common.report import save_figure

    rec = load_isl_manifest(test_csv, 1, validate=False)[0]
    target = load_isl_manifest(test_csv, 0, validate=False)[0]["label"]
    from common.io import read_image

    img = read_image(rec["image"], 2)[0].astype(np.float32)
    gt = read_image(rec["label"], 2)[0][0] > 0
    stain = read_image(target, 2)[0][0]
    ys, xs = np.nonzero(gt)
    cy, cx = (int(np.median(ys)), int(np.median(xs))) if ys.size else (img.shape[1] // 2, img.shape[2] // 2)
    s = min(size, img.shape[1], img.shape[2]) // 32 * 32
    y0 = int(np.clip(cy - s // 2, 0, img.shape[1] - s))
    x0 = int(np.clip(cx - s // 2, 0, img.shape[2] - s))
    crop = (slice(y0, y0 + s), slice(x0, x0 + s))
    x = (img - img.mean((1, 2), keepdims=True)) / np.maximum(img.std((1, 2), keepdims=True), 1e-8)
    x = torch.as_tensor(x[(slice(None),) + crop][None])

    def predict(stage, ckpt):
        p = ConfigParser()
        p.read_config(os.path.join(bundle, "configs", "inference.json"))
        p.update(dict(net_overrides, in_channels=in_channels, stage=stage))
        net = p.get_parsed_content("network_def")
        net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        net.eval()
        with torch.no_grad():
            return net(x)[0, 0].numpy()

    panels = [("input (ch 0)", x[0, 0].numpy(), "gray"), ("nuclear stain", stain[crop], "magma"),
              ("stage 0: predicted stain", predict(0, stage0_ckpt), "magma"), ("ground truth", gt[crop], "gray")]
    for name, ckpt in models.items():
        panels.append((name, predict(1, ckpt) >= 0.5, "gray"))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5))
    for ax, (title, im, cmap) in zip(axes, panels):
        ax.imshow(im, cmap=cmap)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    save_figure(fig, path)


def run(out_dir: str = os.path.join(BUNDLE, "runs", "fewshot"), data_dir: str | None = None, downsample: int = 2, tile: int = 128,
        timelapse: bool = False, network: str = "cpu",
        ns=(1, 2, 5, 10), inits=("isl", "scratch"), stage0_iterations: int = 600, iterations: int = 100,
        batch_size: int = 4, patch_size: int = 128, learning_rate: float = 1e-3, eval_roi: int = 256,
        threads: int = 1, stage0_ckpt: str | None = None, imagenet_weights: str | None = None,
        net_overrides: dict | None = None, preview: bool = True) -> dict:
    """Run the experiment; returns the results dictionary (also written to ``<out_dir>/results.json``).

    Args:
        out_dir: everything goes here (data when prepared, runs, models, table, figures); the
            default ``bundles/isl_nucleus_seg/runs/fewshot`` is git-ignored.
        data_dir: folder with ``stage0_train.csv``, ``test.csv``, ``pool.csv``; default
            ``<out_dir>/data``, prepared from ../shared/data/aisegcell_bf_nuc when missing.
        downsample, tile, timelapse: passed to ``prepare_isl_data.aisegcell`` when the data are
            prepared (default: 2x smaller fields, 128 x 128 tiles, stage 0 on fig3a only).
        network: ``"cpu"`` (reduced DenseNet U-Net, see :data:`NETWORKS`) or ``"paper"`` (DenseNet-121).
        ns: numbers of training images; inits: stage-1 initialisations compared.
        stage0_iterations, iterations: training iterations of stage 0 and of every stage-1 run.
        batch_size, patch_size, learning_rate: for both stages (crops ``patch_size`` square).
        eval_roi: sliding-window size on the held-out fields (no overlap).
        threads: ``torch.set_num_threads``.
        stage0_ckpt: reuse a stage-0 model instead of training one.
        imagenet_weights: torchvision densenet121 weights, needed for ``init="imagenet"``.
        net_overrides: extra config overrides for every run, applied after ``network`` (e.g. a tiny
            network in tests).
        preview: write ``preview.png``.
    """
    import torch

    from common.report import markdown_table, write_json

    torch.set_num_threads(int(threads))
    ns = [int(n) for n in (ns if isinstance(ns, (list, tuple)) else [ns])]
    inits = [str(i) for i in (inits if isinstance(inits, (list, tuple)) else [inits])]
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {network!r}")
    net_overrides = dict(NETWORKS[network], **(net_overrides or {}))
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()

    data_dir = os.path.abspath(data_dir or os.path.join(out_dir, "data"))
    manifests = {k: os.path.join(data_dir, f"{k}.csv") for k in ("stage0_train", "test", "pool")}
    if not all(os.path.isfile(p) for p in manifests.values()):
        import importlib.util

        spec = importlib.util.spec_from_file_location("prepare_isl_data", os.path.join(ROOT, "scripts", "prepare_isl_data.py"))
        prep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prep)
        _log(f"preparing aiSEGcell data in {data_dir} (downsample {downsample}, tiles {tile})")
        prep.aisegcell(out=data_dir, downsample=downsample, tile=tile, timelapse=timelapse)
    in_channels = _in_channels(manifests["stage0_train"])
    n_pool = len(_rows(manifests["pool"])[1])
    ns_ok = [n for n in ns if n <= n_pool]
    if len(ns_ok) < len(ns):
        _log(f"pool has {n_pool} images: skipping N > {n_pool}")
    common_ov = dict(net_overrides, in_channels=in_channels, patch_size=[patch_size, patch_size], batch_size=batch_size,
                     learning_rate=learning_rate, num_epochs=1, val_interval=1, num_workers=0, resume=False,
                     val_manifest=manifests["test"], imagenet_weights=imagenet_weights)
    common_ov["validate#inferer#roi_size"] = [eval_roi, eval_roi]
    common_ov["validate#inferer#overlap"] = 0.0
    results = {"config": {"network": network, "downsample": downsample, "tile": tile, "timelapse": timelapse, "ns": ns_ok, "inits": inits,
                          "stage0_iterations": stage0_iterations, "iterations": iterations, "batch_size": batch_size,
                          "patch_size": patch_size, "learning_rate": learning_rate, "eval_roi": eval_roi,
                          "threads": threads, "in_channels": in_channels, "data_dir": data_dir,
                          "net_overrides": net_overrides}}

    # stage 0
    if stage0_ckpt is None:
        s0_dir = os.path.join(out_dir, "stage0")
        _log(f"stage 0: {stage0_iterations} iterations x {batch_size} crops of {patch_size}^2")
        ov = dict(common_ov, stage=0, init="imagenet" if imagenet_weights else "scratch",
                  train_manifest=manifests["stage0_train"], epoch_length=stage0_iterations,
                  ckpt_dir=os.path.join(s0_dir, "models"), output_dir=os.path.join(s0_dir, "runs"))
        results["stage0"] = _train(BUNDLE, ov, "val_pearson")
        stage0_ckpt = os.path.join(s0_dir, "models", "model_stage0.pt")
        _log(f"stage 0: Pearson r on held-out fields {results['stage0']['val_pearson']:.3f} "
             f"({results['stage0']['seconds']} s)")
    results["stage0_ckpt"] = stage0_ckpt

    # N = 0: the stage-0 network behind the shifted sigmoid, no fine-tuning
    ov = dict(common_ov, stage=1, init="isl", stage0_ckpt=stage0_ckpt, train_manifest=manifests["pool"],
              epoch_length=1, ckpt_dir=os.path.join(out_dir, "zero_shot", "models"),
              output_dir=os.path.join(out_dir, "zero_shot", "runs"))
    results["zero_shot"] = _evaluate_only(BUNDLE, ov, "val_iou")
    _log(f"N = 0 (stage 0 + shifted sigmoid): IoU {results['zero_shot']['val_iou']:.3f}")

    rows, models = [], {}
    for n in ns_ok:
        train_csv = _subset_manifest(manifests["pool"], n, os.path.join(data_dir, f"fewshot_{n}.csv"))
        for init in inits:
            run_dir = os.path.join(out_dir, f"n{n}_{init}")
            ov = dict(common_ov, stage=1, init=init, stage0_ckpt=stage0_ckpt, train_manifest=train_csv,
                      epoch_length=iterations, ckpt_dir=os.path.join(run_dir, "models"),
                      output_dir=os.path.join(run_dir, "runs"))
            _log(f"stage 1: N = {n}, init = {init}, {iterations} iterations")
            r = _train(BUNDLE, ov, "val_iou")
            row = {"n_images": n, "init": init, "test_iou": r["val_iou"], "test_iou_per_field": r["val_iou_per_image"],
                   "iterations": r["iterations"], "seconds": r["seconds"]}
            rows.append(row)
            if n == min(ns_ok):
                models[f"N={n} {init}"] = os.path.join(run_dir, "models", "model.pt")
            _log(f"  IoU {r['val_iou']:.3f} ({r['seconds']} s)")
    results["fewshot"] = rows
    results["wall_seconds"] = round(time.time() - t_start, 1)

    # outputs
    table = [{"N": "0 (stage 0 only)", "init": "isl", "IoU": results["zero_shot"]["val_iou"]}]
    table += [{"N": r["n_images"], "init": r["init"], "IoU": r["test_iou"]} for r in rows]
    md = [f"Held-out IoU, {len(results['zero_shot']['val_iou_per_image']) or '?'} fields; "
          f"stage-0 Pearson r {results.get('stage0', {}).get('val_pearson', float('nan')):.3f}; "
          f"stage 1: {iterations} iterations x {batch_size} crops of {patch_size}^2 per run; "
          f"wall {results['wall_seconds']:.0f} s, {threads} thread(s).", "", markdown_table(table)]
    tmp = os.path.join(out_dir, "fewshot.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(tmp, os.path.join(out_dir, "fewshot.md"))
    tmp = os.path.join(out_dir, "fewshot.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["n_images", "init", "test_iou", "seconds"])
        w.writeheader()
        w.writerow({"n_images": 0, "init": "isl", "test_iou": results["zero_shot"]["val_iou"], "seconds": 0})
        for r in rows:
            w.writerow({k: r[k] for k in ("n_images", "init", "test_iou", "seconds")})
    os.replace(tmp, os.path.join(out_dir, "fewshot.csv"))
    write_json(os.path.join(out_dir, "results.json"), results)
    if rows:
        _plot(rows, results["zero_shot"]["val_iou"], os.path.join(out_dir, "fewshot.png"))
    if preview and models:
        _preview(BUNDLE, net_overrides, in_channels, manifests["test"], stage0_ckpt, models,
                 os.path.join(out_dir, "preview.png"))
    _log(f"done in {results['wall_seconds']:.0f} s: {os.path.join(out_dir, 'fewshot.md')}")
    print("\n".join(md))
    return results


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(run, serialize=lambda results: None)  # the table is printed; everything is in results.json

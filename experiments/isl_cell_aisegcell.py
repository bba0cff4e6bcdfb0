"""isl_cell_instance with a real ISL pair: aiSEGcell fig2a bright field -> its ``_w01`` fluorescence, then instances.

    python -m experiments.isl_cell_aisegcell --seeds 3 --jobs 2 --out_dir runs/isl_cell_aisegcell

The paper's claim for cells (ISL pretraining helps few-shot instance segmentation) with real data:
``../shared/data/aisegcell_bf_nuc/fig2a_timelapse`` (Schirmacher et al., aiSEGcell, CC-BY 4.0), four
frames of one position, every image 2x block mean (1152 x 1152):

1. stage 0 (ISL pretraining, the bundle's ``train.json`` + ``pretrain.json``): bright field ``_w00`` ->
   fluorescence ``_w01`` on frames t00011 and t00036 (a single validation on t00068 at the end, no
   model selection);
2. stage 1 (``train.json``) for every ``N`` in ``shots``: ``N`` tiles of ``tile`` x ``tile`` pixels with
   at least ``min_tile_object`` object pixels, drawn (nested, seeded) from the tiles of t00011 and
   t00036; objects = connected components of ``_w00_m00_mask`` (the bundle's ``label_components``);
   (a) from scratch and (b) from the stage-0 network, same budget, last network kept;
3. ``inference.json`` on frame t00101, which no training or selection step sees, scored by
   :func:`experiments.isl_cell_bbbc030.score` (dataset AP at IoU 0.50:0.05:0.95, F1@0.5, AJI).

What the masks are (measured, :func:`mask_facts`): ``_w00_m00_mask`` objects are nucleus-sized (median
about a quarter of the bright-field cell around them) and match the nucleus masks from the stain
(``_w02_m00_mask``) at IoU 0.40-0.64 per frame: they are nuclei drawn on the bright field, not whole
cells. The ``annotation agreement`` row scores ``_w02_m00_mask``'s components against them on t00101:
how well a second annotation of the same nuclei does, a reference for the networks' numbers.

Outputs in ``out_dir``: ``results.json``, ``results.md`` (mean +- sd over seeds), ``ap_vs_shots.png``,
per seed ``seed_<n>/`` (runs, logs, predictions; finished steps are reused when rerun).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from common.report import mean_sd
from experiments import isl_cell_bbbc030 as bbbc030
from experiments import isl_data

FRAMES = ("t00011", "t00036", "t00068", "t00101")
PRETRAIN, VAL, TEST = ("t00011", "t00036"), "t00068", "t00101"


def _source_frames(src: str | None = None) -> dict:
    base = os.path.join(src or isl_data.SOURCE, "fig2a_timelapse")
    out = {}
    for t in FRAMES:
        paths = {k: os.path.join(base, f"{t}_{k}.png") for k in ("w00", "w01", "w00_m00_mask", "w02_m00_mask")}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: aiSEGcell fig2a_timelapse frame missing "
                                    "(../shared/data beside the project)")
        out[t] = paths
    return out


def mask_facts(src: str | None = None) -> dict:
    """Per frame (full resolution): object count and median area of ``_w00_m00_mask``, and its IoU with
    ``_w02_m00_mask`` (the nucleus masks from the stain)."""
    from skimage.measure import label, regionprops

    out = {}
    for t, p in _source_frames(src).items():
        a, b = isl_data._read(p["w00_m00_mask"]) > 0, isl_data._read(p["w02_m00_mask"]) > 0
        areas = [r.area for r in regionprops(label(a))]
        out[t] = {"objects": len(areas), "median_area_px": float(np.median(areas)),
                  "iou_with_stain_nucleus_mask": float((a & b).sum() / (a | b).sum())}
    return out


def prepare(out_dir: str, downsample: int = 2, tile: int = 256, min_tile_object: int = 50, shots=(1, 2, 4),
            seed: int = 0, src: str | None = None) -> dict:
    """Write the images (OME-TIFF, ``downsample`` block mean), tiles and manifests of one seed.

    Returns ``{name: path}``: ``pretrain_train``, ``pretrain_val``, ``val``, ``test``, ``test_agreement``
    (``_w02_m00_mask`` in place of the labels), ``train_n<N>`` manifests and ``test_images`` (a folder).
    """
    from common.io import write_ome_tiff

    out_dir = os.path.abspath(out_dir)
    k = int(downsample)
    frames = _source_frames(src)
    fdir, tdir = os.path.join(out_dir, "frames"), os.path.join(out_dir, "tiles")
    paths, pool = {}, []
    for t, p in frames.items():
        sig, tgt = isl_data._down(isl_data._read(p["w00"]), k), isl_data._down(isl_data._read(p["w01"]), k)
        msk = isl_data._down(isl_data._read(p["w00_m00_mask"]) > 0, k, mask=True)
        nuc = isl_data._down(isl_data._read(p["w02_m00_mask"]) > 0, k, mask=True)
        for kind, arr in (("signal", sig), ("target", tgt), ("mask", msk), ("stainmask", nuc)):
            paths[(t, kind)] = write_ome_tiff(os.path.join(fdir, f"{t}_{kind}.ome.tif"), arr, "YX")
        if t == TEST:
            paths["test_images"] = os.path.dirname(
                write_ome_tiff(os.path.join(out_dir, "test_images", f"{t}_signal.ome.tif"), sig, "YX"))
        if t in PRETRAIN:
            for y in range(0, sig.shape[0] - tile + 1, tile):
                for x in range(0, sig.shape[1] - tile + 1, tile):
                    sl = (slice(y, y + tile), slice(x, x + tile))
                    if msk[sl].sum() >= min_tile_object:
                        names = tuple(write_ome_tiff(os.path.join(tdir, f"{t}_y{y:04d}_x{x:04d}_{kind}.ome.tif"), a, "YX")
                                      for kind, a in (("signal", sig[sl]), ("mask", msk[sl])))
                        pool.append(names)
    if len(pool) < max(int(s) for s in shots):
        raise ValueError(f"only {len(pool)} tiles of {tile} px hold >= {min_tile_object} object pixels; "
                         f"lower --tile or --min_tile_object")
    rel = lambda q: os.path.relpath(q, out_dir)  # noqa: E731
    header = ("path_signal", "path_target")
    out = {"test_images": paths["test_images"], "pool_size": len(pool)}
    out["pretrain_train"] = isl_data.write_manifest(os.path.join(out_dir, "pretrain_train.csv"),
                                                    [(rel(paths[(t, "signal")]), rel(paths[(t, "target")])) for t in PRETRAIN],
                                                    header)
    out["pretrain_val"] = isl_data.write_manifest(os.path.join(out_dir, "pretrain_val.csv"),
                                                  [(rel(paths[(VAL, "signal")]), rel(paths[(VAL, "target")]))], header)
    header = ("path_signal", "path_label")
    for name, t, kind in (("val", VAL, "mask"), ("test", TEST, "mask"), ("test_agreement", TEST, "stainmask")):
        out[name] = isl_data.write_manifest(os.path.join(out_dir, f"{name}.csv"),
                                            [(rel(paths[(t, "signal")]), rel(paths[(t, kind)]))], header)
    order = np.random.default_rng(seed).permutation(len(pool))
    for n in shots:
        out[f"train_n{int(n)}"] = isl_data.write_manifest(
            os.path.join(out_dir, f"train_n{int(n)}.csv"), [tuple(rel(q) for q in pool[i]) for i in order[: int(n)]],
            header)
    return out


def agreement(data: dict, min_object_size: int) -> dict:
    """``_w02_m00_mask``'s components scored as a prediction of t00101's ``_w00_m00_mask`` objects."""
    import tempfile

    from common.io import read_image, write_ome_tiff
    from common.transforms import as_instance_labels

    base = os.path.dirname(data["test_agreement"])
    stain_mask = isl_data.read_manifest_rows(data["test_agreement"])[0][1]
    labels = as_instance_labels(read_image(os.path.join(base, stain_mask), spatial_dims=2)[0])
    with tempfile.TemporaryDirectory() as d:
        write_ome_tiff(os.path.join(d, f"{TEST}_signal_instances.ome.tif"), np.asarray(labels, np.int32), "YX")
        return bbbc030.score(d, data["test"], min_object_size=min_object_size)


def run_seed(out_dir: str, seed: int = 0, shots=(1, 2, 4), downsample: int = 2, tile: int = 256,
             min_tile_object: int = 50, iterations: int = 500, pretrain_iterations: int = 1000, batch_size: int = 4,
             patch: int = 128, learning_rate: float = 0.003, min_fg_fraction: float = 0.005, pos_weight: float = 10.0,
             threads: int = 1, min_object_size: int = 10, network: str = "cpu") -> dict:
    """One seed of the experiment (module docstring) in ``out_dir``; returns its results.

    ``pos_weight``: weight of object pixels in the mask term of stage 1's loss (``loss#pos_weight``): the
    objects cover about 2 % of a training crop, and without it (seed 0, 500 iterations) both arms predicted
    no object at all."""
    import torch

    from common.report import write_json

    torch.set_num_threads(int(threads))
    out_dir = os.path.abspath(out_dir)
    logs, run_root = os.path.join(out_dir, "logs"), os.path.join(out_dir, "runs")
    net = bbbc030.NETWORKS[network]
    t_start = time.time()
    data = prepare(os.path.join(out_dir, "data"), downsample, tile, min_tile_object, shots, seed)
    common_ov = dict(net, patch_size=[patch, patch], batch_size=batch_size, learning_rate=learning_rate,
                     num_workers=0, resume=False, seed=int(seed), min_fg_fraction=float(min_fg_fraction))
    stage0_dir = os.path.join(run_root, "stage0")
    stage0_ckpt = os.path.join(stage0_dir, "models", "model.pt")
    stage0_ov = dict(common_ov, train_manifest=data["pretrain_train"], val_manifest=data["pretrain_val"],
                     ckpt_dir=os.path.join(stage0_dir, "models"), output_dir=os.path.join(stage0_dir, "runs"),
                     epoch_length=int(pretrain_iterations), num_epochs=1, val_interval=1)
    stage0_ov.pop("min_fg_fraction")
    stage0_s = bbbc030._cached(os.path.join(stage0_dir, "run.json"), bbbc030._spec_key("train_s", stage0_ov),
                               [stage0_ckpt], lambda: bbbc030._bundle_run(["train.json", "pretrain.json"], stage0_ov,
                                                                           os.path.join(logs, "stage0.log"), threads))
    pearson = [float(line.split("val_pearson: ")[1].split()[0]) for line in open(os.path.join(logs, "stage0.log"))
               if "Metrics --" in line and "val_pearson: " in line]
    results = []
    for n in shots:
        for arm in ("scratch", "isl"):
            name = f"{arm}_n{n}"
            rdir = os.path.join(run_root, name)
            ov = dict(common_ov, train_manifest=data[f"train_n{n}"], val_manifest=data["val"], **{"loss#pos_weight": pos_weight},
                      ckpt_dir=os.path.join(rdir, "models"), output_dir=os.path.join(rdir, "runs"),
                      epoch_length=int(iterations), num_epochs=1, val_interval=1)
            if arm == "isl":
                ov["stage0_ckpt"] = stage0_ckpt
            ckpt = os.path.join(rdir, "models", "model.pt")
            key = bbbc030._spec_key("train_s", ov, stage0_ov if arm == "isl" else None)
            t_train = bbbc030._cached(os.path.join(rdir, "run.json"), key, [ckpt], lambda: bbbc030._bundle_run(
                ["train.json"], ov, os.path.join(logs, f"{name}_train.log"), threads))
            pred_dir = os.path.join(rdir, "test_pred")
            inf_ov = dict(net, dataset_dir=data["test_images"], output_dir=pred_dir, ckpt_path=ckpt,
                          patch_size=[512, 512], min_size=int(min_object_size))
            expected = [os.path.join(pred_dir, f"{TEST}_signal_instances.ome.tif")]
            bbbc030._cached(os.path.join(rdir, "run.json"), bbbc030._spec_key("inference_s", key, inf_ov), expected,
                            lambda: bbbc030._bundle_run(["inference.json"], inf_ov,
                                                        os.path.join(logs, f"{name}_inference.log"), threads))
            s = bbbc030.score(pred_dir, data["test"], min_object_size=int(min_object_size))
            s.update(arm=arm, n_train=int(n), train_s=round(t_train, 1))
            results.append(s)
            print(f"[isl_cell_aisegcell seed {seed}] {name}: mAP {s['mAP']:.3f} AP50 {s['AP50']:.3f} "
                  f"F1@0.5 {s['F1_50']:.3f} AJI {s['AJI']:.3f}", flush=True)
    out = {"seed": int(seed), "stage0_s": round(stage0_s, 1), "stage0_val_pearson": pearson[-1] if pearson else None,
           "pool_size": data["pool_size"], "results": results,
           "agreement": agreement(data, int(min_object_size)), "seconds": round(time.time() - t_start, 1)}
    write_json(os.path.join(out_dir, "results.json"), out)
    return out


def main(out_dir: str = "runs/isl_cell_aisegcell", seeds=3, jobs: int = 1, docs_dir: str | None = None,
         shots="1,2,4", downsample: int = 2, tile: int = 256, min_tile_object: int = 50, iterations: int = 500,
         pretrain_iterations: int = 1000, batch_size: int = 4, patch: int = 128, learning_rate: float = 0.003,
         min_fg_fraction: float = 0.005, pos_weight: float = 10.0, threads: int = 1, min_object_size: int = 10,
         network: str = "cpu") -> dict:
    """:func:`run_seed` for every seed (``seeds``: ``n`` = ``0 .. n-1``, or a list; ``jobs`` at a time), then
    the table of mean ± sd over seeds (``results.md``, ``results.json``, ``ap_vs_shots.png``; copied to
    ``docs_dir`` when given)."""
    from common.report import markdown_table, write_json

    if network not in bbbc030.NETWORKS:
        raise ValueError(f"network must be one of {sorted(bbbc030.NETWORKS)}, got {network!r}")
    shots = [int(s) for s in (str(shots).split(",") if isinstance(shots, (str, int)) else shots)]
    seeds = [int(s) for s in seeds] if isinstance(seeds, (list, tuple)) else list(range(int(seeds)))
    out_dir = os.path.abspath(out_dir)
    t0 = time.time()
    kw = dict(shots=shots, downsample=downsample, tile=tile, min_tile_object=min_tile_object, iterations=iterations,
              pretrain_iterations=pretrain_iterations, batch_size=batch_size, patch=patch,
              learning_rate=learning_rate, min_fg_fraction=min_fg_fraction, pos_weight=pos_weight, threads=threads,
              min_object_size=min_object_size, network=network)
    runs = isl_data.in_parallel(run_seed, [dict(kw, out_dir=os.path.join(out_dir, f"seed_{s}"), seed=s)
                                           for s in seeds], jobs)
    rows, means = [], []
    for n in shots:
        for arm in ("scratch", "isl"):
            rs = [next(r for r in run["results"] if (r["n_train"], r["arm"]) == (n, arm)) for run in runs]
            rows.append({"training tiles N": n, "initialisation": "ISL-pretrained" if arm == "isl" else "from scratch",
                         "seeds": len(rs), **{name: mean_sd([r[k] for r in rs]) for name, k in
                                              (("mAP", "mAP"), ("AP@0.5", "AP50"), ("AP@0.75", "AP75"),
                                               ("F1@0.5", "F1_50"), ("AJI", "AJI"))},
                         "predicted / true (mean)": f"{np.mean([r['n_pred'] for r in rs]):.0f} / {rs[0]['n_true']}"})
            means.append({"arm": arm, "n_train": n, "mAP": float(np.mean([r["mAP"] for r in rs])),
                          "AP50": float(np.mean([r["AP50"] for r in rs]))})
    agr = runs[0]["agreement"]
    rows.append({"training tiles N": "-", "initialisation": "annotation agreement (_w02_m00_mask)", "seeds": "-",
                 "mAP": f"{agr['mAP']:.3f}", "AP@0.5": f"{agr['AP50']:.3f}", "AP@0.75": f"{agr['AP75']:.3f}",
                 "F1@0.5": f"{agr['F1_50']:.3f}", "AJI": f"{agr['AJI']:.3f}",
                 "predicted / true (mean)": f"{agr['n_pred']} / {agr['n_true']}"})
    wall = round(time.time() - t0, 1)
    setup = dict(kw, seeds=seeds, jobs=int(jobs), pretrain=list(PRETRAIN), val=VAL, test=TEST,
                 command="python -m experiments.isl_cell_aisegcell " + " ".join(sys.argv[1:]))
    out = {"setup": setup, "wall_s": wall, "mask_facts": mask_facts(),
           "stage0_val_pearson": [r["stage0_val_pearson"] for r in runs],
           "stage0_s": [r["stage0_s"] for r in runs], "per_seed": {str(r["seed"]): r["results"] for r in runs}}
    pear = [p for p in out["stage0_val_pearson"] if p is not None]
    train_s = [run["stage0_s"] + sum(r["train_s"] for r in run["results"]) for run in runs]
    text = (markdown_table(rows) + f"\nmean ± sd over seeds {seeds}; test frame {TEST}; stage 0 ({pretrain_iterations} "
            f"iterations) validation Pearson r on {VAL}: {mean_sd(pear) if pear else 'n/a'}; "
            f"stage 1: {iterations} iterations x {batch_size} patches of {patch}^2; training time per seed "
            f"{np.mean(train_s):.0f} s (stage 0 + 6 stage-1 runs, as recorded when each ran; reused steps are not "
            f"rerun); this call's wall {wall:.0f} s ({threads} thread(s) x {jobs} job(s)).\n")
    write_json(os.path.join(out_dir, "results.json"), out)
    bbbc030._write_text(os.path.join(out_dir, "results.md"), text)
    title = (f"aiSEGcell fig2a {TEST} ({downsample}x); real ISL stage 0 ({'+'.join(PRETRAIN)} _w00 -> _w01); "
             f"mean over seeds {seeds}")
    fig = bbbc030._figure(means, os.path.join(out_dir, "ap_vs_shots.png"), title)
    if docs_dir:
        import shutil

        os.makedirs(docs_dir, exist_ok=True)
        shutil.copyfile(fig, os.path.join(docs_dir, "aisegcell_ap_vs_shots.png"))
        bbbc030._write_text(os.path.join(docs_dir, "aisegcell_results.md"), text)
        write_json(os.path.join(docs_dir, "aisegcell_results.json"), out)
    print(text)
    return out


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(main, serialize=lambda results: None)

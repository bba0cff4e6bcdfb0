"""The zoo's main job on an embedded default: synthetic data -> train fnet_baseline -> predict -> report.

    python scripts/demo.py                      # 6-12 minutes on a 2-core CPU (see README.md)
    python scripts/demo.py --out_dir demo_output --epochs 6     # half the training budget

Steps:
1. generate a small seeded dataset of 3D phantom cell fields (transmitted light -> DNA stain,
   with nucleus labels) as OME-TIFF + CSV manifests (``common.synthetic``);
2. train the fnet_baseline bundle on CPU with a reduced network and budget, through
   ``monai.bundle run`` exactly as a user would (``configs/train.json`` + overrides);
3. run ``configs/inference.json`` on a held-out volume;
4. write ``report/``: ``metrics.json`` (Pearson r, PSNR and SSIM of the prediction and of the trivial
   baseline, the normalised input used as the prediction; per-nucleus Pearson r), ``preview.png``
   (orthogonal max-projections and the mid z-slice of input, target and prediction, scale and colour
   bars, the outline of the segmented prediction over the target), ``metrics.png`` (bars with n) and
   ``report.md``.
"""

from __future__ import annotations

import csv
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUNDLE = os.path.join(ROOT, "bundles", "fnet_baseline")


def _split_manifest(manifest: str, n_train: int, n_val: int) -> dict:
    from common.data import split_manifest

    return split_manifest(manifest, {"train": n_train, "val": n_val, "test": None}, seed=None)


def quick_overrides(out_dir: str, data: dict, epochs: int, epoch_length: int) -> dict:
    """The CPU overrides of the demo (also shown in the bundle README)."""
    return {
        "bundle_root": BUNDLE,
        "train_manifest": data["train"],
        "val_manifest": data["val"],
        "ckpt_dir": os.path.join(out_dir, "models"),
        "output_dir": os.path.join(out_dir, "runs"),
        "network_def#mult_chan": 16,
        "patch_size": [16, 64, 64],
        "batch_size": 4,
        "epoch_length": epoch_length,
        "num_epochs": epochs,
        "val_interval": max(1, epochs // 4),
        "num_workers": 0,
    }


def main(out_dir: str = "demo_output", n_train: int = 6, shape=(32, 96, 96), epochs: int = 12,
         epoch_length: int = 20, seed: int = 0, threads: int | None = None):
    """Run the demo; prints where the report is.

    Args:
        out_dir: everything goes here (data/, models/, runs/, predictions/, report/).
        n_train: number of training volumes (plus 1 validation and 1 held-out test volume).
        shape: ZYX size of each synthetic volume.
        epochs, epoch_length: training budget (iterations = epochs x epoch_length, batch 4).
        seed: dataset seed.
    """
    out_dir = os.path.abspath(out_dir)
    t0 = time.time()
    shape = tuple(int(s) for s in (shape.split(",") if isinstance(shape, str) else shape))
    print(f"[1/4] synthetic data: {n_train} train + 1 val + 1 test volumes of {shape} -> {out_dir}/data", flush=True)
    import torch  # the heavy imports come after the first line
    from monai.bundle import run

    from common.io import read_image
    from common.metrics import pearson_r, psnr, ssim
    from common.report import markdown_table, save_bar_plot, save_mip_figure, write_json
    from common.synthetic import write_dataset_3d
    from common.transforms import ZScoreNormalize

    if threads:
        torch.set_num_threads(int(threads))
    manifest = write_dataset_3d(os.path.join(out_dir, "data"), n_volumes=n_train + 2, shape=shape, seed=seed)
    data = _split_manifest(manifest, n_train, 1)

    print(f"[2/4] training fnet_baseline: {epochs} epochs x {epoch_length} iterations (batch 4) on CPU", flush=True)
    cfg = os.path.join(BUNDLE, "configs")
    ov = quick_overrides(out_dir, data, epochs, epoch_length)
    run(config_file=os.path.join(cfg, "train.json"), logging_file=os.path.join(cfg, "logging.conf"), **ov)
    t_train = time.time() - t0

    print("[3/4] predicting the held-out volume", flush=True)
    with open(data["test"], newline="") as f:
        test = next(csv.DictReader(f))
    folder = os.path.dirname(data["test"])
    sig_path, tgt_path = (os.path.join(folder, test[c]) for c in ("path_signal", "path_target"))
    pred_dir = os.path.join(out_dir, "predictions")
    run(config_file=os.path.join(cfg, "inference.json"), logging_file=os.path.join(cfg, "logging.conf"),
        bundle_root=BUNDLE, dataset_dir=sig_path, ckpt_path=os.path.join(ov["ckpt_dir"], "model.pt"),
        output_dir=pred_dir)  # the network's settings travel with the trained model
    stem = os.path.basename(sig_path).replace(".ome.tif", "")
    pred, spacing, _ = read_image(os.path.join(pred_dir, f"{stem}_pred.ome.tif"))

    print("[4/4] report", flush=True)
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    sig, _, _ = read_image(sig_path)
    tgt, _, _ = read_image(tgt_path)
    lab, _, _ = read_image(os.path.join(folder, test["path_label"]))
    sig_n = ZScoreNormalize("whole")(sig)[0]
    tgt_n = ZScoreNormalize("center_slices", 32)(tgt)[0]
    pred, lab = pred[0], lab[0].astype(np.int64)
    rng = float(tgt_n.max() - tgt_n.min())

    def per_nucleus_r(img):
        """Pearson r inside each true nucleus (dilated by 2 voxels: its edge is part of its shape)."""
        out = []
        for i in np.unique(lab[lab > 0]):
            m = ndimage.binary_dilation(lab == i, iterations=2)
            if m.sum() > 10:
                out.append(pearson_r(img[m], tgt_n[m]))
        return out

    r_pred, r_base = per_nucleus_r(pred), per_nucleus_r(sig_n)
    metrics = {
        "prediction": {"pearson_r": pearson_r(pred, tgt_n), "psnr_db": psnr(pred, tgt_n, data_range=rng),
                       "ssim": ssim(pred, tgt_n, data_range=rng), "nucleus_pearson_r_mean": float(np.mean(r_pred))},
        "baseline_input_as_prediction": {"pearson_r": pearson_r(sig_n, tgt_n), "psnr_db": psnr(sig_n, tgt_n, data_range=rng),
                                          "ssim": ssim(sig_n, tgt_n, data_range=rng),
                                          "nucleus_pearson_r_mean": float(np.mean(r_base))},
        "per_nucleus_pearson_r": {"prediction": r_pred, "baseline_input_as_prediction": r_base},
        "setup": {"train_volumes": n_train, "shape_zyx": list(shape), "iterations": epochs * epoch_length,
                  "batch_size": 4, "patch_zyx": ov["patch_size"], "mult_chan": 16, "seed": seed,
                  "train_seconds": round(t_train, 1), "torch_threads": torch.get_num_threads()},
    }
    rep = os.path.join(out_dir, "report")
    os.makedirs(rep, exist_ok=True)
    write_json(os.path.join(rep, "metrics.json"), metrics)
    seg = pred > threshold_otsu(pred)  # the prediction segmented (Otsu), outlined over the target
    save_mip_figure(os.path.join(rep, "preview.png"),
                    {"input (transmitted light)": sig_n, "target (DNA stain)": tgt_n, "F-net prediction": pred},
                    spacing=spacing, units={"input (transmitted light)": "z-score of the input",
                                            "target (DNA stain)": "z-score of the stain",
                                            "F-net prediction": "predicted z-score of the stain"},
                    outlines={"target (DNA stain)": seg, "F-net prediction": seg},
                    outline_label="prediction segmented (Otsu threshold)",
                    title="held-out volume: max-projections (top) and mid z-slice (bottom)")
    save_bar_plot(os.path.join(rep, "metrics.png"),
                  {"whole volume": {"F-net prediction": metrics["prediction"]["pearson_r"],
                                               "input as prediction": metrics["baseline_input_as_prediction"]["pearson_r"]},
                   "per nucleus": {"F-net prediction": r_pred, "input as prediction": r_base}},
                  ylabel="Pearson r with the DNA stain", title="held-out volume (mean +- sd over n)")
    rows = [dict(model=k, **{m: v for m, v in metrics[k].items()}) for k in ("prediction", "baseline_input_as_prediction")]
    with open(os.path.join(rep, "report.md"), "w") as f:
        f.write("# fnet_baseline demo\n\n" + markdown_table(rows) + "\n![preview](preview.png)\n\n![metrics](metrics.png)\n\n"
                f"Total time {time.time() - t0:.0f} s.\n")
    p, b = metrics["prediction"]["pearson_r"], metrics["baseline_input_as_prediction"]["pearson_r"]
    print(f"Pearson r on the held-out volume: prediction {p:.3f} vs input-as-prediction baseline {b:.3f}")
    print(f"done in {time.time() - t0:.0f} s; report: {rep}/report.md (metrics.json, preview.png)")
    return rep


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(main)

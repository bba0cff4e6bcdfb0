#!/usr/bin/env python
"""Train fnet_baseline and spotlight_dna with the same budget on the same synthetic data, then compare.

    python -m experiments.compare_fnet_spotlight --out_dir compare_output           # 31 min on a busy 2-core CPU (7 min CPU time)
    python -m experiments.compare_fnet_spotlight --iterations 2000 --mult_chan 32 --out_dir long  # GPU

Steps:
1. ``common.synthetic.write_dataset_3d``: seeded 3D phantoms (transmitted light -> DNA stain, with
   ground-truth nucleus labels), split into train / val / held-out test manifests;
2. ``monai.bundle run`` (:func:`experiments.runner.run_inprocess`) of each bundle's ``configs/train.json`` with *identical* overrides
   (network width, patch size, batch size, iterations, learning rate, seed); validation runs once,
   at the end, so ``models/model.pt`` is the final network of both;
3. each bundle's ``configs/inference.json`` on the held-out signals;
4. ``common.spotlight.report.evaluate_dataset`` (the Spotlight protocol, as ``scripts/evaluate.py``):
   ``<out_dir>/report/report.md`` with tables and figures, ``metrics.json``.
"""

from __future__ import annotations

import os
import sys
import time

from experiments.runner import bundle_dir, run_inprocess

BUNDLES = {"F-net (MSE)": "fnet_baseline", "Spotlight": "spotlight_dna"}


def split_manifest(manifest: str, parts: dict) -> dict:
    """Write ``<name>.csv`` beside ``manifest`` with consecutive rows: ``parts = {name: n_rows}``."""
    from common.data import split_manifest as split

    return split(manifest, parts, seed=None)


def budget_overrides(mult_chan: int, patch_size, batch_size: int, iterations: int, epochs: int, lr: float) -> dict:
    """The overrides shared by both bundles (same network, data budget and optimiser)."""
    epoch_length = max(1, iterations // epochs)
    return {
        "network_def#mult_chan": mult_chan,
        "patch_size": list(patch_size),
        "batch_size": batch_size,
        "epoch_length": epoch_length,
        "num_epochs": epochs,
        "val_interval": epochs,
        "ckpt_interval": 1,
        "learning_rate": lr,
        "num_workers": 0,
    }


def main(out_dir: str = "compare_output", n_train: int = 4, n_val: int = 1, n_test: int = 2, shape=(32, 128, 128),
         n_cells: int = 12, seed: int = 0, mult_chan: int = 8, patch_size=(16, 64, 64), batch_size: int = 4,
         iterations: int = 240, epochs: int = 3, lr: float = 0.001, threads: int = 1, microssim: bool = True,
         sweep_levels=(0.0, 0.1, 0.2, 0.3)):
    """Run the comparison; prints where the report is.

    Args:
        out_dir: everything goes here (data/, <bundle>/models, <bundle>/runs, <bundle>/pred, report/).
        n_train, n_val, n_test: synthetic volumes per split (test volumes are held out from training).
        shape: ZYX size of each volume (voxel 0.29 um).
        n_cells: cells per volume.
        seed: dataset seed (volume i uses seed + i).
        mult_chan, patch_size, batch_size, iterations, epochs, lr: the training budget, identical for
            both bundles (iterations = epochs x epoch_length).
        threads: torch threads.
    """
    import torch

    from common.spotlight.report import evaluate_dataset
    from common.synthetic import write_dataset_3d

    torch.set_num_threads(int(threads))
    out_dir = os.path.abspath(out_dir)
    t0 = time.time()
    shape = tuple(int(s) for s in (shape.split(",") if isinstance(shape, str) else shape))
    patch_size = tuple(int(s) for s in (patch_size.split(",") if isinstance(patch_size, str) else patch_size))
    n = n_train + n_val + n_test
    print(f"[1/4] synthetic data: {n_train} train + {n_val} val + {n_test} test volumes of {shape}", flush=True)
    manifest = write_dataset_3d(os.path.join(out_dir, "data"), n_volumes=n, shape=shape, seed=seed, n_cells=n_cells)
    data = split_manifest(manifest, {"train": n_train, "val": n_val, "test": n_test})
    ov = budget_overrides(mult_chan, patch_size, batch_size, iterations, epochs, lr)
    timings = {}
    preds = {}
    for i, (name, bundle) in enumerate(BUNDLES.items()):
        logging_file = os.path.join(bundle_dir(bundle), "configs", "logging.conf")
        work = os.path.join(out_dir, bundle)
        print(f"[2/4] training {bundle}: {ov['num_epochs']} x {ov['epoch_length']} iterations, batch {batch_size}, "
              f"patch {patch_size}, mult_chan {mult_chan}", flush=True)
        t = time.time()
        run_inprocess(bundle, "train.json", dict(ov, train_manifest=data["train"], val_manifest=data["val"],
                                                 ckpt_dir=os.path.join(work, "models"),
                                                 output_dir=os.path.join(work, "runs")), logging_file=logging_file)
        timings[f"train {bundle} (s)"] = round(time.time() - t, 1)
        print(f"[3/4] {bundle}: predicting the held-out volumes", flush=True)
        preds[name] = os.path.join(work, "pred")
        run_inprocess(bundle, "inference.json", {"dataset_dir": data["test"], "output_dir": preds[name],
                                                 "ckpt_path": os.path.join(work, "models", "model.pt"),
                                                 "network_def#mult_chan": mult_chan, "patch_size": list(patch_size)},
                      logging_file=logging_file)
    print("[4/4] evaluation (Spotlight protocol)", flush=True)
    cmd = "python -m experiments.compare_fnet_spotlight " + " ".join(sys.argv[1:])
    notes = (f"Command: `{cmd.strip()}`. Same budget for both bundles: {n_train} training volumes of {shape} "
             f"(seed {seed}), mult_chan {mult_chan}, patch {list(patch_size)}, batch {batch_size}, "
             f"{ov['num_epochs'] * ov['epoch_length']} iterations, Adam lr {lr}; torch threads {threads}. "
             f"Training time: " + ", ".join(f"{k} {v}" for k, v in timings.items()) + ".")
    report = os.path.join(out_dir, "report")
    evaluate_dataset(data["test"], preds, report, train_manifest=data["train"], microssim=microssim,
                     sweep_levels=tuple(sweep_levels or ()), title="fnet_baseline vs spotlight_dna", notes=notes)
    print(f"done in {time.time() - t0:.0f} s; report: {report}/report.md", flush=True)
    return os.path.join(report, "report.md")


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(main)

#!/usr/bin/env python
"""Evaluate virtual-staining predictions with the Spotlight protocol and write a report.

    python scripts/evaluate.py --manifest data/test.csv \
        --predictions "{'F-net': 'pred_fnet', 'Spotlight': 'pred_spotlight'}" \
        --train_manifest data/train.csv --out_dir report

``--manifest`` is a CSV ``path_signal,path_target[,path_label]`` (paths relative to the CSV);
each prediction folder holds ``<signal stem>_pred.ome.tif`` per volume, as the bundles'
``configs/inference.json`` writes them. ``--predictions`` also accepts ``name=folder,name=folder``.

Metrics (see ``common/evaluation.py``): PSNR, 3D SSIM, MicroMS3IM, FSC resolution and Pearson r
on the whole image and on the target's Otsu foreground (predictions rescaled onto the training
target range), background variability; Otsu + watershed segmentation tuned on the training
targets (or Cellpose with ``--backend cellpose --cellpose_model PATH``) and instance AP at IoU
0.50:0.05:0.95 against the labels; per-object morphology (cosine distance of median profiles,
per-feature correlation of matched objects); a threshold sweep. Output: ``report.md``,
``metrics.json`` and PNG figures in ``--out_dir``.
"""

from __future__ import annotations

import os
import sys

try:
    import common.evaluation  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # running from a checkout that is not installed: use the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire


def _parse_predictions(predictions) -> dict:
    if isinstance(predictions, dict):
        return {str(k): str(v) for k, v in predictions.items()}
    if isinstance(predictions, str):
        out = {}
        for part in predictions.split(","):
            if "=" not in part:
                raise ValueError(f"--predictions: '{part}' is not name=folder")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        return out
    raise ValueError("--predictions must be a dict or 'name=folder,name=folder'")


def main(manifest: str, predictions, out_dir: str = "report", train_manifest: str | None = None,
         target_range=None, backend: str = "watershed", cellpose_model: str | None = None, tune: bool = True,
         sweep_levels=(0.0, 0.1, 0.2, 0.3), microssim: bool = True, postfix: str = "_pred",
         threads: int | None = 1):
    """Evaluate the predictions of one or more models; prints where the report is.

    Args:
        manifest: CSV of the evaluated volumes (signal, target, optional labels).
        predictions: ``{name: folder}`` or ``"name=folder,name=folder"``.
        out_dir: report folder.
        train_manifest: training manifest (target range for rescaling, watershed tuning).
        target_range: ``lo,hi`` instead of the training targets' range.
        backend: ``watershed`` or ``cellpose`` (with ``--cellpose_model``, a weights file).
        tune: tune the watershed on the training targets (needs their labels).
        sweep_levels: threshold-sweep levels as fractions of the range; ``"()"`` for none.
        microssim: compute MicroMS3IM (slower).
        postfix: prediction file name postfix.
        threads: torch threads (MicroMS3IM and Cellpose use torch).
    """
    import torch

    from common.evaluation import evaluate_dataset

    if threads:
        torch.set_num_threads(int(threads))
    preds = _parse_predictions(predictions)
    for name, folder in preds.items():
        if not os.path.isdir(folder):
            raise SystemExit(f"--predictions: folder '{folder}' of '{name}' not found")
    rng = None
    if target_range is not None:
        rng = [float(v) for v in (target_range.split(",") if isinstance(target_range, str) else target_range)]
    evaluate_dataset(manifest, preds, out_dir, train_manifest=train_manifest, target_range=rng, backend=backend,
                     tune=tune, cellpose_model=cellpose_model, sweep_levels=tuple(sweep_levels or ()),
                     postfix=postfix, microssim=microssim)
    return os.path.join(out_dir, "report.md")


if __name__ == "__main__":
    fire.Fire(main)

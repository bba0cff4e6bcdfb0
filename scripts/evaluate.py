#!/usr/bin/env python
"""Evaluate virtual-staining predictions with the Spotlight protocol and write a report.

    python scripts/evaluate.py --manifest data/test.csv \
        --predictions "{'F-net': 'pred_fnet', 'Spotlight': 'pred_spotlight'}" \
        --train_manifest data/train.csv --out_dir report

``--manifest`` is a CSV ``path_signal,path_target[,path_label]`` (paths relative to the CSV);
each prediction folder holds ``<signal stem>_pred.ome.tif`` per volume, as the bundles'
``configs/inference.json`` writes them. ``--predictions`` also accepts ``name=folder,name=folder``.

Metrics (see ``common/spotlight/evaluation.py``): PSNR, 3D SSIM, MicroMS3IM, FSC resolution and Pearson r
on the whole image and on the target's Otsu foreground (predictions rescaled onto the training
target range), background variability; Otsu + watershed segmentation tuned on the training
targets (or Cellpose with ``--backend cellpose --cellpose_model PATH``) and instance AP at IoU
0.50:0.05:0.95 against the labels; per-object morphology (cosine distance of median profiles,
per-feature correlation of matched objects); a threshold sweep. Output: ``report.md``,
``metrics.json`` and PNG figures in ``--out_dir``.

Sizes are in micrometres, so every target needs its voxel size: from the file (OME-TIFF, ImageJ
TIFF, NIfTI) or ``--voxel_size z,y,x`` (um) for files that carry none (plain TIFF); without either
the script stops before any work and names the file. Bad input (an unknown option, a missing file
or prediction, a constant target) ends with one ``evaluate: error: ...`` line and exit code 1,
and no report folder is left behind.
"""

from __future__ import annotations

import os
import sys

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


class CliError(ValueError):
    """A command-line argument is unusable; the message says which and what to do."""


def _numbers(value, name: str, n: int, example: str) -> list[float]:
    """``"a,b,c"`` (or the tuple fire makes of it) -> ``n`` floats, else :class:`CliError`."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        out = [float(v) for v in parts]
    except (TypeError, ValueError):
        out = []
    if len(out) != n:
        raise CliError(f"--{name} {value!r}: expected {n} comma-separated numbers, e.g. --{name} {example}")
    return out


def main(manifest: str, predictions, out_dir: str = "report", train_manifest: str | None = None,
         target_range=None, backend: str = "watershed", cellpose_model: str | None = None, tune: bool = True,
         sweep_levels=(0.0, 0.1, 0.2, 0.3), microssim: bool = True, postfix: str = "_pred",
         threads: int | None = 1, voxel_size=None):
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
        voxel_size: ``z,y,x`` in um for every target (needed when the files carry none; overrides
            the files' own).
    """
    import torch

    from common.spotlight.report import evaluate_dataset

    if threads:
        torch.set_num_threads(int(threads))
    preds = _parse_predictions(predictions)
    for name, folder in preds.items():
        if not os.path.isdir(folder):
            raise CliError(f"--predictions: folder '{folder}' of '{name}' not found; run the bundle's inference "
                           "into it first, or fix the path")
    rng = None
    if target_range is not None:
        rng = _numbers(target_range, "target_range", 2, "0,1000")
    vs = None if voxel_size is None else _numbers(voxel_size, "voxel_size", 3, "0.29,0.108,0.108")
    evaluate_dataset(manifest, preds, out_dir, train_manifest=train_manifest, target_range=rng, backend=backend,
                     tune=tune, cellpose_model=cellpose_model, sweep_levels=tuple(sweep_levels or ()),
                     postfix=postfix, microssim=microssim, voxel_size=vs)
    return os.path.join(out_dir, "report.md")


def cli(argv=None) -> None:
    """Run :func:`main` from the command line: an unknown flag exits with 2 before any work
    (:func:`common.cli.strict_fire`); a named error ends as one ``evaluate: error:`` line, exit 1."""
    from common.cli import strict_fire
    from common.data import ManifestError
    from common.spotlight.evaluation import EvaluationInputError
    from common.io import ImageReadError
    from common.metrics import DegenerateInputError

    try:
        strict_fire(main, argv, name="evaluate.py")
    except (CliError, ManifestError, ImageReadError, EvaluationInputError, DegenerateInputError,
            FileNotFoundError) as e:
        sys.exit(f"evaluate: error: {e}")


if __name__ == "__main__":
    cli()

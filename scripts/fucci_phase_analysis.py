#!/usr/bin/env python
"""Cell-cycle phase of every nucleus in FUCCI spheroids, and the phase distribution per spheroid.

    # after `monai.bundle run --config_file bundles/unet3d_fucci/configs/inference.json ...`
    python scripts/fucci_phase_analysis.py --images stacks/ --instances predictions/ --out_dir phases/

    # user thresholds (reporter levels, see nuclei.csv) instead of Otsu; per-spheroid Otsu
    python scripts/fucci_phase_analysis.py --images stacks/ --instances predictions/ --out_dir phases/ \\
        --threshold_red 40 --threshold_green 55
    python scripts/fucci_phase_analysis.py ... --pool_thresholds False

Inputs: ``images`` = a ``CZYX`` stack, a folder of them or a CSV manifest (column ``path_image``),
channels named by ``channel_names`` (default ``Cy3,GFP,Hoechst``); ``instances`` = the matching
instance labels: a file, or a folder holding ``<stem>_instances.ome.tif`` (the bundle's inference
output) or ``<stem>.ome.tif`` for every image ``<stem>``.

Rules (:func:`common.fucci.phase_from_reporters`): Cy3 (mKO2-hCdt1) only = G1, GFP (mAG-hGeminin)
only = S/G2/M, both = G1/S transition, neither = early G1 / M exit. A reporter is on when its
per-nucleus median (minus the background, optionally divided by the DNA channel) exceeds a
threshold: Otsu of the log levels over the nuclei of *all* spheroids (``--pool_thresholds``,
default, so that a treatment that shifts every cell to one phase is not split in two) or of each
spheroid, or your value.

Outputs in ``out_dir``: ``nuclei.csv`` (spheroid, id, centroid in um, volume in um^3, mean and
median intensity per channel, reporter levels, on/off, phase), ``phase_distribution.csv`` and ``.md`` (percent of
nuclei per phase, per spheroid), ``phase_distribution.png`` (stacked bars) and ``thresholds.json``.
"""

from __future__ import annotations

import os

import numpy as np


def _names(value) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _find_instances(instances: str, stem: str) -> str:
    if os.path.isfile(instances):
        return instances
    for name in (f"{stem}_instances.ome.tif", f"{stem}_instances.tif", f"{stem}.ome.tif", f"{stem}.tif"):
        path = os.path.join(instances, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no instance labels for '{stem}' in {instances} (expected {stem}_instances.ome.tif)")


def _atomic_csv(df, path: str) -> str:
    tmp = path + ".tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def _refine(stem, img, lab, spacing, instances, out_dir, colour_split, colour_tol, merge_max_um3, fragment_um3):
    """Colour split and/or merge of one spheroid's instances; writes and returns the refined labels."""
    from common.fucci import merge_oversplit, split_by_reporter_change
    from common.io import read_image, write_ome_tiff

    n0 = len(np.unique(lab)) - 1
    if colour_split:
        lab = split_by_reporter_change(lab, img, tol=colour_tol)
    if merge_max_um3 or fragment_um3 > 0:
        sem_path = os.path.join(instances, f"{stem}_semantic.ome.tif") if os.path.isdir(instances) else ""
        sem = read_image(sem_path, spatial_dims=3)[0][0] if os.path.isfile(sem_path) else None
        lab = merge_oversplit(lab, img, semantic=sem, spacing=spacing, tol=colour_tol,
                              max_volume_um3=float(merge_max_um3) if merge_max_um3 else np.inf,
                              fragment_um3=float(fragment_um3))
    print(f"    {stem}: {n0} -> {len(np.unique(lab)) - 1} instances after refinement", flush=True)
    write_ome_tiff(os.path.join(out_dir, f"{stem}_refined_instances.ome.tif"), lab.astype(np.uint16), "ZYX", spacing)
    return lab.astype(np.int64)


def analyse(images: str, instances: str, out_dir: str = "fucci_phases", channel_names="Cy3,GFP,Hoechst",
            red: str = "Cy3", green: str = "GFP", normalise_by: str | None = None, threshold_red="otsu",
            threshold_green="otsu", pool_thresholds: bool = True, background="auto", statistic: str = "median",
            min_volume_um3: float = 0.0, colour_split: bool = False, colour_tol: float = 0.45,
            merge_max_um3: float | None = None, fragment_um3: float = 0.0):
    """Per-nucleus table, per-spheroid phase distribution and plot (see the module docstring).

    Args:
        images: ``CZYX`` stack, folder or CSV manifest (``path_image``).
        instances: instance-label file or folder (``<stem>_instances.ome.tif``).
        out_dir: output folder.
        channel_names: names of the image channels, in order.
        red, green: the G1 (Cy3) and S/G2/M (GFP) reporter channels.
        normalise_by: DNA channel to divide reporter levels by (e.g. ``Hoechst``), or None.
        threshold_red, threshold_green: ``otsu`` or a number (reporter level units).
        pool_thresholds: one Otsu threshold over all spheroids (default) or one per spheroid.
        background: ``auto`` (median away from nuclei), ``None`` or one value per channel.
        statistic: per-nucleus ``median`` (default, robust to a segmentation that spills into a
            neighbour) or ``mean`` for the reporter levels.
        min_volume_um3: ignore instances smaller than this (fragments).
        colour_split: cut instances along z where the reporter colour changes
            (:func:`common.fucci.split_by_reporter_change` with ``colour_tol``): nuclei stacked along z
            in anisotropic stacks.
        merge_max_um3, fragment_um3: merge touching pieces of one colour whose union is at most
            ``merge_max_um3`` (e.g. a typical nucleus volume), and pieces smaller than ``fragment_um3``
            into their same-colour neighbour (:func:`common.fucci.merge_oversplit`); the bundle's
            ``<stem>_semantic.ome.tif`` beside the instances, when present, vetoes merges across a
            predicted edge. Off by default; the refined labels are written to
            ``<out_dir>/<stem>_refined_instances.ome.tif``.

    Returns:
        ``out_dir``.
    """
    import pandas as pd

    from common.data import list_images
    from common.fucci import PHASE_NAMES, assign_phases, nucleus_table, phase_distribution, save_phase_plot
    from common.io import SaveOmeTiff, read_image
    from common.report import markdown_table, write_json

    names = _names(channel_names)
    records = list_images(images, key="image", column="path_image", spatial_dims=3)
    pairs = []
    for rec in records:  # every file checked before any measurement
        stem = SaveOmeTiff.stem(rec["image"])
        lab_path = _find_instances(instances, stem)
        img, spacing, _ = read_image(rec["image"], spatial_dims=3)
        lab, _, _ = read_image(lab_path, spatial_dims=3)
        if lab.shape[0] != 1 or not np.all(np.mod(lab, 1) == 0) or lab.min() < 0:
            raise ValueError(f"{lab_path}: not an instance-label image (expected one ZYX channel of integer labels, "
                             f"got {lab.shape[0]} channel(s), values {lab.min():g}..{lab.max():g})")
        if img.shape[0] != len(names):
            raise ValueError(f"{rec['image']}: {img.shape[0]} channel(s) but channel_names {names}")
        if lab.shape[1:] != img.shape[1:]:
            raise ValueError(f"shape mismatch: {rec['image']} {img.shape[1:]} vs {lab_path} {lab.shape[1:]}")
        pairs.append((stem, img, lab[0].astype(np.int64), spacing))
    os.makedirs(out_dir, exist_ok=True)
    if colour_split or merge_max_um3 or fragment_um3 > 0:
        pairs = [(stem, img, _refine(stem, img, lab, spacing, instances, out_dir, colour_split, colour_tol,
                                     merge_max_um3, fragment_um3), spacing) for stem, img, lab, spacing in pairs]
    thresholds = {red: threshold_red, green: threshold_green}
    tables = []
    for i, (stem, img, lab, spacing) in enumerate(pairs):
        print(f"[{i + 1}/{len(pairs)}] {stem}: measuring {len(np.unique(lab)) - 1} nuclei", flush=True)
        t, _ = nucleus_table(lab, img, names, spacing, red=red, green=green, normalise_by=normalise_by,
                             thresholds=None, background=background, statistic=statistic, spheroid=stem)
        tables.append(t[t["volume_um3"] >= min_volume_um3])
    used = {}
    if pool_thresholds:
        pooled, used["all"] = assign_phases(pd.concat(tables, ignore_index=True), red, green, thresholds)
    else:
        parts = []
        for t in tables:
            t2, used[str(t["spheroid"].iloc[0]) if len(t) else "empty"] = assign_phases(t, red, green, thresholds)
            parts.append(t2)
        pooled = pd.concat(parts, ignore_index=True)
    _atomic_csv(pooled, os.path.join(out_dir, "nuclei.csv"))
    dist, rows = {}, []
    for stem, _, _, _ in pairs:
        ph = pooled.loc[pooled["spheroid"] == stem, "phase"]
        dist[stem] = phase_distribution(ph)
        rows.append({"spheroid": stem, "nuclei": int(len(ph)), **{f"% {p}": 100 * dist[stem][p] for p in PHASE_NAMES}})
    _atomic_csv(pd.DataFrame(rows), os.path.join(out_dir, "phase_distribution.csv"))
    with open(os.path.join(out_dir, "phase_distribution.md"), "w") as f:
        f.write(markdown_table(rows, floatfmt=".1f"))
    save_phase_plot(dist, os.path.join(out_dir, "phase_distribution.png"))
    write_json(os.path.join(out_dir, "thresholds.json"), {"normalise_by": normalise_by, "thresholds": used})
    print(markdown_table(rows, floatfmt=".1f"))
    print(f"wrote {out_dir}/nuclei.csv, phase_distribution.csv/.md/.png, thresholds.json")
    return out_dir


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(analyse)

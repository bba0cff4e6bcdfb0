"""Split a CSV manifest into train.csv, val.csv and test.csv (what the bundles' training reads).

Examples::

    python scripts/split_manifest.py data/manifest.csv                                  # 70 / 15 / 15 %, seed 0
    python scripts/split_manifest.py data/manifest.csv --train 0.8 --val 0.1 --test 0.1 --seed 3
    python scripts/split_manifest.py data/manifest.csv --val 2 --test 2                 # counts; train takes the rest
    python scripts/split_manifest.py data/manifest.csv --group_column plate --out_dir data/split --overwrite

Give fractions (summing to 1) or counts; a part left out takes the rest (``--test 0`` writes no test
split). Rows are shuffled with ``--seed`` (``--seed none`` keeps the file order); with
``--group_column`` all rows of one group (a field of view, a plate, a donor) land in the same part,
and the sizes count groups. Relative paths are rewritten when ``--out_dir`` is another folder.
Nothing is written when the split does not fit, or (without ``--overwrite``) when a part file exists.
"""

from __future__ import annotations

import sys

from common.cli import strict_fire


def split(manifest: str, train=None, val=None, test=None, seed=0, group_column: str | None = None,
          out_dir: str | None = None, overwrite: bool = False) -> dict:
    """Split ``manifest``; prints and returns ``{part: path}``.

    Args:
        manifest: the CSV manifest to split.
        train: fraction (0.7) or count (5) of rows (groups) for training; default: the rest.
        val: fraction or count for validation (default 0.15 when no size is given at all).
        test: fraction or count for the held-out test set (default 0.15 when no size is given at all).
        seed: shuffling seed; ``none`` keeps the file order.
        group_column: column whose rows stay together.
        out_dir: folder of the new CSVs (default: the manifest's folder).
        overwrite: replace existing part files.
    """
    from common.cli import as_bool
    from common.data import ManifestError, split_manifest

    if seed is None or str(seed).lower() == "none":
        seed = None
    sizes = {"train": train, "val": val, "test": test}
    if all(v is None for v in sizes.values()):
        sizes = {"train": 0.7, "val": 0.15, "test": 0.15}
    elif sum(v is None for v in sizes.values()) > 1:
        sizes = {k: (0 if v is None else v) for k, v in sizes.items()}
        sizes["train"] = None if train is None else train
    try:
        paths = split_manifest(manifest, sizes, seed=seed, group_column=group_column, out_dir=out_dir,
                               overwrite=as_bool(overwrite, "overwrite"))
    except ManifestError as e:
        sys.exit(f"split_manifest: error: {e}")
    import csv

    for name, path in paths.items():
        with open(path, newline="") as f:
            n = sum(1 for _ in csv.DictReader(f))
        print(f"{name}: {n} rows -> {path}")
    return paths


if __name__ == "__main__":
    strict_fire(split, serialize=lambda out: None)

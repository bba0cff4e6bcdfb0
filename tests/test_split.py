"""Manifest splits: common.data.split_rows / split_manifest, scripts/split_manifest.py, make_synthetic's split."""

import csv
import os

import pytest

from common.data import ManifestError, load_manifest, split_manifest, split_rows, write_manifest
from zoo_testing import ROOT, run_script


def _rows(n, groups=None):
    return [{"path_signal": f"s{i}.tif", "path_target": f"t{i}.tif", **({"plate": groups[i]} if groups else {})}
            for i in range(n)]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fractions_by_largest_remainder_disjoint_and_complete():
    rows = _rows(10)
    parts = split_rows(rows, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    assert [len(p) for p in parts.values()] == [7, 2, 1]  # 7, 1.5, 1.5: the first .5 gets the spare row
    ids = [r["path_signal"] for p in parts.values() for r in p]
    assert sorted(ids) == sorted(r["path_signal"] for r in rows)  # every row once
    assert split_rows(rows, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0) == parts  # seeded
    assert split_rows(rows, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1) != parts
    for p in parts.values():  # each part keeps the file order
        assert p == sorted(p, key=rows.index)


def test_small_fraction_still_gets_one_row_and_counts_take_the_rest():
    assert [len(p) for p in split_rows(_rows(5), {"train": 0.8, "val": 0.1, "test": 0.1}).values()] == [3, 1, 1]
    parts = split_rows(_rows(6), {"train": None, "val": 1, "test": 2}, seed=None)
    assert [r["path_signal"] for r in parts["train"]] == ["s0.tif", "s1.tif", "s2.tif"]  # consecutive without seed
    assert [r["path_signal"] for r in parts["test"]] == ["s4.tif", "s5.tif"]


def test_groups_stay_together():
    groups = ["A", "A", "B", "B", "B", "C", "D", "D", "E", "E"]
    parts = split_rows(_rows(10, groups), {"train": 3, "val": 1, "test": 1}, seed=4, group_column="plate")
    seen = {}
    for name, p in parts.items():
        for r in p:
            assert seen.setdefault(r["plate"], name) == name
    assert [len({r["plate"] for r in p}) for p in parts.values()] == [3, 1, 1]
    with pytest.raises(ManifestError, match="group column 'donor' missing"):
        split_rows(_rows(3, ["A", "B", "C"]), {"train": 2, "val": 1}, group_column="donor")


@pytest.mark.parametrize("parts,match", [
    ({"train": 3, "val": 2}, "needs 5 rows"),
    ({"train": 0.5, "val": 0.2}, "sum to 1"),
    ({"train": None, "val": None}, "only one part"),
    ({"train": None, "val": 4}, "'train' would be empty"),
    ({"train": -1, "val": 1}, ">= 0"),
])
def test_bad_splits_are_named(parts, match):
    with pytest.raises(ManifestError, match=match):
        split_rows(_rows(4), parts)


def test_split_manifest_elsewhere_points_at_the_same_files(tmp_path):
    data = tmp_path / "data"
    for i in range(4):
        (data / "img").mkdir(parents=True, exist_ok=True)
        (data / "img" / f"s{i}.tif").write_bytes(b"x")
    manifest = write_manifest(data / "manifest.csv", [{"path_signal": f"img/s{i}.tif", "n": i} for i in range(4)])
    out = split_manifest(manifest, {"train": 2, "val": 1, "test": 1}, seed=0, out_dir=tmp_path / "split")
    assert sorted(os.listdir(tmp_path / "split")) == ["test.csv", "train.csv", "val.csv"]  # no temporary files left
    for path in out.values():
        for r in _read(path):
            assert os.path.isfile(os.path.join(os.path.dirname(path), r["path_signal"]))
            assert r["path_signal"] == f"../data/img/s{r['n']}.tif"
    with pytest.raises(ManifestError, match="exist already"):
        split_manifest(manifest, {"train": 2, "val": 1, "test": 1}, out_dir=tmp_path / "split", overwrite=False)
    with pytest.raises(ManifestError, match="manifest not found"):
        split_manifest(tmp_path / "nope.csv")


def test_make_synthetic_writes_the_split_that_training_reads(tmp_path):
    out = tmp_path / "cells"
    p = run_script("scripts.make_synthetic", "cells3d", "--out_dir", out, "--n_volumes", "3", "--shape", "8,32,32",
                   "--n_cells", "3", cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert {"manifest.csv", "train.csv", "val.csv", "test.csv"} <= set(os.listdir(out))
    assert [len(_read(out / f"{n}.csv")) for n in ("train", "val", "test")] == [1, 1, 1]
    assert _read(out / "manifest.csv") == _read(out / "train.csv") + _read(out / "val.csv") + _read(out / "test.csv")
    assert len(load_manifest(out / "train.csv", spatial_dims=3)) == 1  # what train.json reads
    # a split that leaves no training volume is refused before anything is written
    p = run_script("scripts.make_synthetic", "cells3d", "--out_dir", tmp_path / "no", "--n_volumes", "2", cwd=ROOT)
    assert p.returncode != 0 and "at least one for training" in p.stderr and not (tmp_path / "no").exists()


def test_split_manifest_script(tmp_path):
    rows = [{"path_signal": f"s{i}.tif", "field": f"f{i // 2}"} for i in range(12)]
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    cmd = ["scripts.split_manifest", manifest, "--val", "1", "--test", "1", "--group_column", "field", "--seed", "2"]
    p = run_script(*cmd, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    sizes = {n: len(_read(tmp_path / f"{n}.csv")) for n in ("train", "val", "test")}
    assert sizes == {"train": 8, "val": 2, "test": 2}  # 6 fields of 2 rows: 4 / 1 / 1 fields
    p = run_script(*cmd, cwd=ROOT)  # exists: refused, named
    assert p.returncode != 0 and "--overwrite" in p.stderr

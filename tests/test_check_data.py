"""scripts/check_data.py on real files: every problem of a manifest or folder named once, one line each, with
the CSV line and the file; exit code 1, or 0 and one summary line; nothing written; strict flags."""

import csv
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from common.io import write_ome_tiff
from common.synthetic import write_dataset_3d
from zoo_testing import run_script


def _check(*args, cwd):
    """``python scripts/check_data.py <args>`` (its ``__main__`` block, in this process: zoo_testing.run_script)."""
    return run_script("scripts.check_data", *args, cwd=cwd)


def _snapshot(path):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def data3d(tmp_path_factory):
    """Two good synthetic volumes (OME-TIFF, 0.29 um) and one bad file of each kind beside them."""
    d = tmp_path_factory.mktemp("d3")
    write_dataset_3d(str(d), n_volumes=2, shape=(16, 48, 48), seed=3, n_cells=4)
    rng = np.random.default_rng(0)
    vol = rng.random((16, 48, 48)).astype(np.float32)
    nan = vol.copy()
    nan[3, 4, 5] = np.nan
    write_ome_tiff(d / "nan.ome.tif", nan)
    write_ome_tiff(d / "constant.ome.tif", np.full((16, 48, 48), 7, np.uint16))
    write_ome_tiff(d / "small.ome.tif", vol[:, :40])
    write_ome_tiff(d / "two_channels.ome.tif", np.stack([vol, vol]), axes="CZYX")
    rgb = (rng.random((48, 48, 3)) * 255).astype(np.uint8)  # a colour picture, channels differ
    Image.fromarray(rgb).save(d / "colour.png")
    Image.fromarray(rgb[..., 0]).save(d / "grey.png")
    speck = np.zeros((16, 48, 48), np.float32)
    speck[8, 24, 24] = 1000.0  # a target whose foreground is one voxel
    write_ome_tiff(d / "speck.ome.tif", speck)
    tifffile.imwrite(d / "plain.tif", vol)  # no voxel size: fine for inference
    return d


def test_good_manifest_passes_with_one_line_and_writes_nothing(data3d):
    before = _snapshot(data3d)
    p = _check(data3d / "manifest.csv", "--bundle", "fnet_baseline", cwd=data3d)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ok: 2 record(s)") and "fnet_baseline (3D, 1 input channel" in lines[0]
    assert _snapshot(data3d) == before


@pytest.mark.parametrize("bundle, extra", [("fnet_baseline", 0), ("spotlight_dna", 1)])
def test_every_problem_of_a_manifest_once_per_line(data3d, bundle, extra):
    rows = [("signal_00.ome.tif", "target_00.ome.tif"),  # 2: fine
            ("missing.ome.tif", "target_00.ome.tif"),  # 3: not found
            ("signal_00.ome.tif", "nan.ome.tif"),  # 4: NaN
            ("constant.ome.tif", "target_00.ome.tif"),  # 5: constant signal
            ("signal_00.ome.tif", "small.ome.tif"),  # 6: shapes differ
            ("two_channels.ome.tif", "target_01.ome.tif"),  # 7: 2 channels for a 1-channel network
            ("colour.png", "target_01.ome.tif"),  # 8: an RGB picture for a 3D bundle
            ("signal_01.ome.tif", "speck.ome.tif")]  # 9: one foreground voxel (Spotlight only)
    manifest = _write_csv(data3d / f"bad_{bundle}.csv", ["path_signal", "path_target"], rows)
    before = _snapshot(data3d)
    p = _check(manifest, "--bundle", bundle, cwd=data3d)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    expected = {3: "missing.ome.tif: file not found", 4: "nan.ome.tif: contains 1 NaN/inf values",
                5: "constant.ome.tif: constant image", 6: "shape mismatch",
                7: "two_channels.ome.tif: 2 channel(s), expected 1", 8: "colour.png: is a 2D colour image"}
    if extra:
        expected[9] = "speck.ome.tif: target foreground is 0.0027% of the image (1 voxels)"
    problems, summary = lines[:-1], lines[-1]
    assert len(problems) == len(expected), "\n".join(lines)
    for line_no, needle in expected.items():
        hits = [ln for ln in problems if f"{manifest} line {line_no}:" in ln and needle in ln]
        assert len(hits) == 1, (line_no, needle, lines)
    assert summary.startswith(f"{len(expected)} problem(s) in {manifest} for {bundle}")
    assert "Traceback" not in p.stderr and _snapshot(data3d) == before


def test_folder_for_a_3d_bundle_names_colour_flat_and_broken_images(data3d, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("signal_00.ome.tif", "plain.tif", "constant.ome.tif", "colour.png", "grey.png", "nan.ome.tif"):
        os.link(data3d / name, folder / name)
    p = _check(folder, "--bundle", "spotlight_dna", cwd=tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    expected = {"colour.png": "is a 2D colour image", "grey.png": "has 2 dimensions",
                "constant.ome.tif": "constant image", "nan.ome.tif": "NaN/inf"}
    assert len(lines) == len(expected) + 1, lines
    for name, needle in expected.items():
        assert len([ln for ln in lines if f"{folder / name}:" in ln and needle in ln]) == 1, (name, lines)
    assert lines[-1].startswith(f"4 problem(s) in {folder} for spotlight_dna (3D, 1 input channel(s))")


def test_2d_folder_and_an_override_for_the_second_stage(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "dic"
    folder.mkdir()
    grey = (rng.random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(folder / "grey_as_rgb.png")  # read as grey: fine
    Image.fromarray(grey).save(folder / "grey.png")
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(folder / "flat.png")
    write_ome_tiff(folder / "two.ome.tif", rng.random((2, 64, 64)).astype(np.float32), axes="CYX")
    p = _check(folder, "--bundle", "isl_cell_instance", cwd=tmp_path)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 3, p.stdout + p.stderr
    assert "flat.png: constant image" in lines[0] + lines[1] and "two.ome.tif: 2 channel(s), expected 1" in p.stdout
    # isl_nucleus_seg, stage 1 (nucleus masks), given as a config override: an empty mask is named
    d = tmp_path / "isl"
    d.mkdir()
    rows = []
    for i in range(2):
        write_ome_tiff(d / f"s{i}.ome.tif", rng.random((3, 64, 64)).astype(np.float32), axes="CYX")
        mask = np.zeros((64, 64), np.uint8)
        if i == 0:
            mask[20:30, 20:30] = 1
        write_ome_tiff(d / f"m{i}.ome.tif", mask, axes="YX")
        rows.append((f"s{i}.ome.tif", f"m{i}.ome.tif"))
    manifest = _write_csv(d / "stage1.csv", ["path_signal", "path_label"], rows)
    p = _check(manifest, "--bundle", "isl_nucleus_seg", "--overrides", "{'stage': 1}", cwd=tmp_path)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 2, p.stdout + p.stderr
    assert f"{manifest} line 3: {d / 'm1.ome.tif'}: mask is empty" in lines[0]
    assert lines[1].startswith("1 problem(s)") and "isl_nucleus_seg (2D, 3 input channel(s))" in lines[1]


def test_command_line_errors_are_named(data3d, tmp_path):
    p = _check(data3d / "manifest.csv", "--bundle", "fnet_baseline", "--bundel", "x", cwd=tmp_path)
    assert p.returncode == 2 and "unknown flag(s) --bundel" in p.stderr.strip().splitlines()[-1]
    p = _check(data3d / "manifest.csv", "--bundle", "no_such_bundle", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("check_data: error: --bundle")
    assert "fnet_baseline" in p.stderr
    p = _check(tmp_path / "nowhere.csv", "--bundle", "fnet_baseline", cwd=tmp_path)
    assert p.returncode == 1 and "nowhere.csv: not found" in p.stderr.strip().splitlines()[-1]
    manifest = _write_csv(tmp_path / "cols.csv", ["signal", "target"], [("a.tif", "b.tif")])
    p = _check(manifest, "--bundle", "fnet_baseline", cwd=tmp_path)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 2 and "missing column(s) ['path_signal', 'path_target']" in lines[0]
    assert os.listdir(tmp_path) == ["cols.csv"]

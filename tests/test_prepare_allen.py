"""scripts/prepare_allen.py: the Allen Institute label-free CSV -> resampled OME-TIFFs + zoo manifests."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from common.data import load_manifest
from common.io import read_image, write_ome_tiff
from scripts import prepare_allen as prep
from zoo_testing import ROOT, env

SRC = (0.29, 0.108, 0.108)


def _fov(path, seed, spacing=SRC, shape=(6, 54, 81)):
    """A 3-channel CZYX stack: 0 = noise (transmitted light), 1 = other, 2 = DNA = a ramp along x in um.
    ``spacing=None`` writes no voxel size (the Allen default 0.108 um in x still holds)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    ramp = (x * SRC[2]).astype(np.float32) + 5.0 * seed
    arr = np.stack([rng.random(shape).astype(np.float32) * 100 + 10, np.zeros(shape, np.float32) + 3, ramp])
    return write_ome_tiff(path, arr, axes="CZYX", spacing_um=spacing)


def test_czi_scaling_from_metadata_xml():
    xml = ("<ImageDocument><Metadata><Scaling><Items>"
           "<Distance Id=\"X\"><Value>1.0833333333333334E-07</Value></Distance>"
           "<Distance Id=\"Y\"><Value>1.0833333333333334E-07</Value></Distance>"
           "<Distance Id=\"Z\"><Value>2.9E-07</Value></Distance>"
           "</Items></Scaling></Metadata></ImageDocument>")
    got = prep.czi_scaling_um(xml)
    assert got == pytest.approx({"X": 0.10833333, "Y": 0.10833333, "Z": 0.29})


def test_split_keeps_a_validation_row_and_covers_every_row():
    for n in (3, 5, 40):
        parts = prep.split_rows(n, 0.1, 0.2, seed=0)
        assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(n))
        assert len(parts["val"]) >= 1 and len(parts["train"]) >= 1
    parts = prep.split_rows(40, 0.1, 0.2, seed=0)
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (28, 4, 8)


def test_prepare_resamples_to_isotropic_and_writes_manifests(tmp_path):
    raw = tmp_path / "raw"
    paths = [_fov(raw / f"fov{i}.ome.tif", i) for i in range(4)]
    _fov(raw / "nometa.ome.tif", 9, spacing=None)  # no voxel size in the file: --source_spacing_um is used
    with open(tmp_path / "dna.csv", "w", newline="") as f:  # pytorch_fnet's columns, paths relative to the CSV
        w = csv.writer(f)
        w.writerow(["path_czi", "channel_signal", "channel_target"])
        for p in paths + [str(raw / "nometa.ome.tif")]:
            w.writerow([os.path.relpath(p, tmp_path), 0, 2])
    out = tmp_path / "allen"
    m = prep.prepare(str(tmp_path / "dna.csv"), str(out), val_fraction=0.2, test_fraction=0.2, seed=1)
    rows = {k: load_manifest(v) for k, v in m.items()}  # the bundles' own reader accepts them
    assert sorted(len(r) for r in rows.values()) == [1, 1, 3]
    assert sorted(os.path.basename(r["image"]) for rs in rows.values() for r in rs) == sorted(
        [f"fov{i}_signal.ome.tif" for i in range(4)] + ["nometa_signal.ome.tif"])
    for rs in rows.values():
        for r in rs:
            sig, sp_s, known_s = read_image(r["image"])
            tgt, sp_t, known_t = read_image(r["label"])
            # MONAI Spacing (the bundles' resampler) keeps the span between the first and last voxel centres:
            # y 53 x 0.108 um = 5.72 um -> 1 + 5.72 / 0.29 = 20.7 -> 21 voxels; x 80 x 0.108 -> 30.8 -> 31; z as is
            assert sig.shape == tgt.shape == (1, 6, 21, 31)
            assert known_s and known_t and np.allclose(sp_s, 0.29) and np.allclose(sp_t, 0.29)
            # the DNA channel (a ramp of 1 per um along x) is now 0.29 per voxel: linear interpolation keeps a ramp
            steps = np.diff(tgt[0, :, :, 2:-2], axis=-1)
            np.testing.assert_allclose(steps, 0.29, atol=1e-3)
            assert np.ptp(tgt[0, :, :, 15]) < 1e-3  # constant across y and z
            assert sig.std() > 1  # the noise channel, not the constant channel 1
    # running again keeps the converted files (resume) and gives the same manifests
    before = {p: os.path.getmtime(p) for p in (out / "images").iterdir()}
    m2 = prep.prepare(str(tmp_path / "dna.csv"), str(out), val_fraction=0.2, test_fraction=0.2, seed=1)
    assert {p: os.path.getmtime(p) for p in (out / "images").iterdir()} == before
    assert all(open(m[k]).read() == open(m2[k]).read() for k in m)


def test_quilt_columns_and_named_errors(tmp_path):
    p = _fov(tmp_path / "a.ome.tif", 0)
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["SourceReadPath", "ChannelNumberBrightfield", "ChannelNumber405"])
        w.writerow([p, 0, 2])
        w.writerow(["missing.ome.tif", 0, 2])
        w.writerow([p, "x", 2])
    with pytest.raises(prep.PrepareError) as e:
        prep.prepare(str(tmp_path / "meta.csv"), str(tmp_path / "out"))
    msg = str(e.value)
    assert "2 problem(s)" in msg and "line 3" in msg and "missing.ome.tif: file not found" in msg
    assert "line 4: channel numbers 'x' / '2' are not integers" in msg
    assert not (tmp_path / "out").exists()
    with open(tmp_path / "bad_channel.csv", "w") as f:
        f.write(f"path_tiff,channel_signal,channel_target\n{p},0,5\n")
    with pytest.raises(prep.PrepareError, match=r"line 2: .*a\.ome\.tif: target channel 5 but the file has 3 channel"):
        prep.prepare(str(tmp_path / "bad_channel.csv"), str(tmp_path / "out2"))
    with open(tmp_path / "nocol.csv", "w") as f:
        f.write("file,signal\nx,0\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_allen.py"), "--csv",
                        str(tmp_path / "nocol.csv"), "--out_dir", str(tmp_path / "o3")], capture_output=True, text=True,
                       env=env(), timeout=120)
    assert r.returncode == 1 and "no path_column column: expected one of" in r.stderr and "['file', 'signal']" in r.stderr

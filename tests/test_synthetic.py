"""Tests of the synthetic phantoms (common.synthetic) and scripts/make_synthetic.py."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from common import synthetic as S
from common.io import read_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def field3d():
    return S.make_cell_field_3d(seed=0)


@pytest.fixture(scope="module")
def isl():
    return S.make_isl_2d(seed=0)


@pytest.fixture(scope="module")
def dic():
    return S.make_dic_membrane_2d(n_planes=3, seed=0)


@pytest.fixture(scope="module")
def fucci():
    return S.make_fucci_spheroid(seed=0)


# ----------------------------------------------------------------------------- determinism, shapes

SMALL = {
    "cells3d": lambda seed: S.make_cell_field_3d((12, 48, 48), n_cells=4, seed=seed),
    "isl": lambda seed: S.make_isl_2d((96, 96), n_cells=5, seed=seed),
    "dic": lambda seed: S.make_dic_membrane_2d((96, 96), n_cells=5, n_planes=2, seed=seed),
    "fucci": lambda seed: S.make_fucci_spheroid((8, 48, 48), n_nuclei=8, seed=seed),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_deterministic(name):
    a, b, c = SMALL[name](3), SMALL[name](3), SMALL[name](4)
    arrays = [k for k, v in a.items() if isinstance(v, np.ndarray) and v.size]
    assert arrays
    for k in arrays:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(a[k].shape != c[k].shape or not np.array_equal(a[k], c[k]) for k in arrays)
    img = {"cells3d": "target", "isl": "dapi", "dic": "dic", "fucci": "image"}[name]
    assert not np.array_equal(a[img], c[img])


def test_shapes_dtypes(field3d, isl, dic, fucci):
    for k in ("signal", "target", "ri"):
        assert field3d[k].shape == (32, 128, 128) and field3d[k].dtype == np.float32, k
    assert field3d["labels"].shape == (32, 128, 128) and field3d["labels"].dtype == np.int32
    assert field3d["spacing_um"] == (0.29, 0.29, 0.29)
    assert isl["brightfield"].shape == (2, 256, 256) and isl["brightfield"].dtype == np.float32
    for k in ("phase", "dapi"):
        assert isl[k].shape == (256, 256) and isl[k].dtype == np.float32
    for k in ("nuclei", "cells"):
        assert isl[k].shape == (256, 256) and isl[k].dtype == np.int32
    assert dic["dic"].shape == (3, 256, 256) and dic["dic"].dtype == np.float32
    assert dic["membrane"].shape == (256, 256) and dic["cells"].dtype == np.int32
    assert fucci["image"].shape == (3, 24, 128, 128) and fucci["image"].dtype == np.float32
    assert fucci["labels"].shape == (24, 128, 128) and fucci["labels"].dtype == np.int32
    assert fucci["phase_names"] == ["G1", "S/G2/M", "G1/S", "early_G1"]
    for d in (field3d, isl, dic, fucci):
        for v in d.values():
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                assert np.isfinite(v).all()


def test_unknown_parameter_rejected():
    with pytest.raises(TypeError, match="unknown parameter"):
        S.make_cell_field_3d((8, 32, 32), 2, psf_sigma=(1, 1))


# ----------------------------------------------------------------------------- 3D cell field


def test_labels_are_bright_nuclei(field3d):
    t, lab = field3d["target"], field3d["labels"]
    n = int(lab.max())
    assert n == 12 and set(np.unique(lab)) == set(range(n + 1))  # 1..N, consecutive
    bg = t[lab == 0]
    med = np.median(bg)
    sd = 1.4826 * np.median(np.abs(bg - med))
    means = np.asarray(ndi.mean(t, lab, np.arange(1, n + 1)))
    assert np.all(means > med + 5 * sd), (means, med, sd)
    # per-nucleus brightness varies and is what the target shows
    b = field3d["brightness"]
    assert b.max() / b.min() > 1.5
    assert pearson(b, means - med) > 0.8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_foreground_sparse(seed):
    lab = S.make_cell_field_3d(seed=seed)["labels"]
    frac = (lab > 0).mean()
    assert 0.07 < frac < 0.3, frac
    # touching nuclei are allowed but rare
    grown = ndi.grey_dilation(lab, size=3)
    touch = (grown != lab) & (lab > 0)
    assert touch.sum() / (lab > 0).sum() < 0.02


def _fwhm(profile, i, half):
    lo = i
    while lo > 0 and profile[lo - 1] > half:
        lo -= 1
    hi = i
    while hi < len(profile) - 1 and profile[hi + 1] > half:
        hi += 1
    return hi - lo + 1


def test_psf_anisotropy_at_debris(field3d):
    """Debris specks are sub-resolution: their image is the PSF, ~3x longer in z than in x."""
    t, lab = field3d["target"], field3d["labels"]
    assert len(field3d["debris_zyx"]) >= 1
    wz, wx = [], []
    for z, y, x in field3d["debris_zyx"]:
        assert lab[z, y, x] == 0  # debris is not labelled
        b = np.median(t[max(z - 8, 0):z + 9, max(y - 8, 0):y + 9, max(x - 8, 0):x + 9])
        half = (t[z, y, x] - b) / 2
        assert half > 50  # a clear speck
        wz.append(_fwhm(t[:, y, x] - b, z, half))
        wx.append(_fwhm(t[z, y, :] - b, x, half))
    assert np.median(wz) >= 2 * np.median(wx), (wz, wx)


def test_signal_follows_ri_defocus(field3d):
    """Bright field: phase objects flip contrast across focus (TIE), target is not a copy of it."""
    s, ri, t = field3d["signal"], field3d["ri"], field3d["target"]
    z0 = s.shape[0] // 2
    for dz in (3, 6):
        odd = s[z0 + dz] - s[z0 - dz]
        even = s[z0 + dz] + s[z0 - dz]
        lap = ndi.gaussian_laplace(ri[z0 - dz:z0 + dz + 1].mean(0), 2)
        assert pearson(odd, lap) < -0.4  # the defocus contrast is odd in z and follows lap(RI)
        assert abs(pearson(even, lap)) < 0.3

    def hp(a):
        return a - ndi.gaussian_filter(a, 8)

    assert abs(pearson(hp(s), hp(ri))) > 0.1  # scattering loss: dense objects a little darker
    assert abs(pearson(s, t)) < 0.6
    # physically sane ranges
    assert 0.7 < s.mean() < 1.3 and s.min() >= 0
    assert ri.min() >= 1.33 and ri.max() < 1.45
    # nuclei have a higher RI than the cytoplasm/medium around them
    lab = field3d["labels"]
    assert np.median(ri[lab > 0]) > np.median(ri[lab == 0]) + 0.01


# ----------------------------------------------------------------------------- 2D ISL


def test_isl_physics(isl):
    bf, ph, dapi, nuc, cells = isl["brightfield"], isl["phase"], isl["dapi"], isl["nuclei"], isl["cells"]
    assert nuc.max() >= 15 and cells.max() == 20
    # nucleus k lies in cell k
    for k in range(1, nuc.max() + 1):
        if (nuc == k).any():
            assert np.all(cells[nuc == k] == k)
    assert 0.05 < (cells > 0).mean() < 0.45  # sparse-ish

    def flat(a):
        return a / ndi.gaussian_filter(a, 30)

    # the two defocused planes have opposite contrast
    assert pearson(flat(bf[0])[cells > 0], flat(bf[1])[cells > 0]) < -0.5
    # phase contrast: dark nuclei, bright halo just outside the cells
    dist = ndi.distance_transform_edt(cells == 0)
    far = (dist > 15).astype(np.float32)
    bgest = ndi.gaussian_filter(ph * far, 20) / np.maximum(ndi.gaussian_filter(far, 20), 1e-6)
    rel = ph / bgest
    assert rel[nuc > 0].mean() < 0.95
    assert rel[(dist > 1) & (dist < 5)].mean() > 1.02
    # DAPI: every nucleus brighter than the background
    med = np.median(dapi[nuc == 0])
    means = np.asarray(ndi.mean(dapi, nuc, np.unique(nuc[nuc > 0])))
    assert np.all(means > med + 50)


# ----------------------------------------------------------------------------- 2D DIC / membrane


def test_dic_is_shear_derivative(dic):
    img, cells, opd = dic["dic"], dic["cells"], dic["opd_um"]
    bias = dic["dic_bias"]
    for p in range(img.shape[0]):
        assert abs(img[p].mean() - bias) < 0.05 * bias + 0.01  # a derivative averages out
    foc = img[1]  # in-focus plane
    hp = foc - ndi.gaussian_filter(foc, 20)
    d_y = ndi.gaussian_filter(opd, 1, order=(1, 0))
    d_x = ndi.gaussian_filter(opd, 1, order=(0, 1))
    along = (d_x + d_y) / np.sqrt(2)
    across = (d_x - d_y) / np.sqrt(2)
    assert pearson(hp, along) > 0.6
    assert abs(pearson(hp, across)) < 0.2
    # relief: cells deviate from bias in both directions
    dev = foc[cells > 0] - bias
    assert (dev > 0.02).mean() > 0.02 and (dev < -0.02).mean() > 0.02


def test_cells_touch_and_membrane_on_borders(dic):
    cells, mem = dic["cells"], dic["membrane"]
    assert cells.max() == 15
    pairs = set()
    for ax in (0, 1):
        a = np.take(cells, range(cells.shape[ax] - 1), axis=ax)
        b = np.take(cells, range(1, cells.shape[ax]), axis=ax)
        m = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[m].tolist(), b[m].tolist())}
    assert len(pairs) >= 5  # densely packed: several cells share borders
    border = find_boundaries(cells, mode="inner") & (cells > 0)
    interior = (ndi.distance_transform_edt(~border) > 4) & (cells > 0)
    assert mem[border].mean() > 1.5 * mem[interior].mean()
    assert mem[interior].mean() > np.median(mem[cells == 0])  # weak cytoplasm


# ----------------------------------------------------------------------------- FUCCI


def test_fucci_phases_separable(fucci):
    im, lab, phases = fucci["image"], fucci["labels"], fucci["phases"]
    ids = np.arange(1, lab.max() + 1)
    assert set(phases) == set(ids.tolist()) and len(ids) >= 35
    assert set(phases.values()) <= set(S.PHASE_NAMES)
    bg = [np.median(im[c][lab == 0]) for c in range(3)]
    m = np.array([np.asarray(ndi.mean(im[c], lab, ids)) - bg[c] for c in range(3)])
    ph = np.array([phases[i] for i in ids])
    cy3_on = np.isin(ph, ["G1", "G1/S"])
    gfp_on = np.isin(ph, ["S/G2/M", "G1/S"])
    assert cy3_on.any() and (~cy3_on).any() and gfp_on.any() and (~gfp_on).any()
    assert m[0][cy3_on].min() > 2 * m[0][~cy3_on].max()
    assert m[1][gfp_on].min() > 2 * m[1][~gfp_on].max()
    assert m[2].min() > 20  # Hoechst in every nucleus, early G1 included
    # anisotropic sampling: each nucleus spans only a few 5 um slices
    assert max(s[0].stop - s[0].start for s in ndi.find_objects(lab)) <= 4
    # dimmer with depth
    cz = np.array([c[0] for c in ndi.center_of_mass(lab > 0, lab, ids)])
    assert pearson(m[2], cz) < -0.2


# ----------------------------------------------------------------------------- writers and CLI


def _rows(manifest):
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def test_write_dataset_3d_roundtrip(tmp_path):
    sp = (0.5, 0.2, 0.25)
    man = S.write_dataset_3d(tmp_path / "d3", n_volumes=2, shape=(8, 32, 40), seed=5, spacing_um=sp, n_cells=3)
    assert os.path.basename(man) == "manifest.csv"
    with open(man) as f:
        assert f.readline().strip() == "path_signal,path_target,path_label"
    rows = _rows(man)
    assert len(rows) == 2
    for i, row in enumerate(rows):
        ref = S.make_cell_field_3d((8, 32, 40), n_cells=3, seed=5 + i, spacing_um=sp)
        for col, key in (("path_signal", "signal"), ("path_target", "target"), ("path_label", "labels")):
            assert not os.path.isabs(row[col])
            arr, spacing, known = read_image(os.path.join(os.path.dirname(man), row[col]), spatial_dims=3)
            assert known and np.allclose(spacing, sp)
            np.testing.assert_array_equal(arr[0], ref[key])


def test_write_2d_and_fucci(tmp_path):
    man = S.write_dataset_2d_isl(tmp_path / "isl", n_images=1, shape=(64, 64), seed=1, n_cells=3)
    row = _rows(man)[0]
    assert list(row)[:3] == ["path_signal", "path_target", "path_label"]
    sig, sp, known = read_image(tmp_path / "isl" / row["path_signal"], spatial_dims=2)
    assert sig.shape == (3, 64, 64) and known and np.allclose(sp, (0.65, 0.65))
    lab, _, _ = read_image(tmp_path / "isl" / row["path_label"], spatial_dims=2)
    assert lab.dtype == np.uint16

    man = S.write_dataset_2d_dic(tmp_path / "dic", n_images=1, shape=(64, 64), seed=1, n_cells=4)
    row = _rows(man)[0]
    sig, sp, _ = read_image(tmp_path / "dic" / row["path_signal"], spatial_dims=2)
    assert sig.shape == (1, 64, 64) and np.allclose(sp, (0.33, 0.33))

    man = S.write_fucci_dataset(tmp_path / "fu", n_spheroids=1, shape=(6, 40, 40), seed=2, n_nuclei=6)
    row = _rows(man)[0]
    assert list(row) == ["path_image", "path_label", "path_phases"]
    img, sp, _ = read_image(tmp_path / "fu" / row["path_image"], spatial_dims=3)
    assert img.shape == (3, 6, 40, 40) and np.allclose(sp, (5.0, 0.5, 0.5))
    lab, _, _ = read_image(tmp_path / "fu" / row["path_label"], spatial_dims=3)
    table = _rows(tmp_path / "fu" / row["path_phases"])
    assert {int(r["label"]) for r in table} == set(np.unique(lab[lab > 0]).tolist())
    assert {r["phase"] for r in table} <= set(S.PHASE_NAMES)


def test_cli_runs_from_other_directory(tmp_path):
    """The script imports `common` from any working directory (no PYTHONPATH needed)."""
    script = os.path.join(REPO, "scripts", "make_synthetic.py")
    env = dict(os.environ, PYTHONPATH="", PAGER="cat")
    res = subprocess.run([sys.executable, script, "fucci", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "n_spheroids" in res.stdout + res.stderr


def test_cli_commands(tmp_path):
    """Each fire command writes its data set and returns (prints) the manifest path."""
    from scripts import make_synthetic

    cli = vars(make_synthetic)
    # three items: make_synthetic also writes the train/val/test split, one item each
    man = cli["cells3d"](str(tmp_path / "c3"), n_volumes=3, shape=(8, 32, 32), seed=0, n_cells=2)
    assert os.path.samefile(man, tmp_path / "c3")  # the data folder: manifest.csv and its split
    for name in ("manifest", "train", "val", "test"):
        assert (tmp_path / "c3" / f"{name}.csv").is_file()
    assert (tmp_path / "c3" / "signal_00.ome.tif").is_file()
    _, sp, _ = read_image(tmp_path / "c3" / "target_00.ome.tif")
    assert np.allclose(sp, (0.29, 0.29, 0.29))
    assert cli["_shape"]("8x32x32", 3) == (8, 32, 32) and cli["_shape"]("64,64", 2) == (64, 64)
    for name, kw in (("isl2d", {"n_cells": 2}), ("dic2d", {"n_cells": 3, "n_planes": 2}),
                     ("fucci", {"n_nuclei": 4, "shape": "6,32,32"})):
        kw.setdefault("shape", (48, 48))
        key = "n_spheroids" if name == "fucci" else "n_images"
        man = cli[name](str(tmp_path / name), **{key: 3}, **kw)
        assert os.path.isfile(os.path.join(man, "manifest.csv")) and os.path.isfile(os.path.join(man, "train.csv"))

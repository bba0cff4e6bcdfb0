"""The Spotlight evaluation protocol (common.spotlight.evaluation / report, scripts/evaluate.py) on tiny synthetic data."""

import csv
import json
import os

import numpy as np
import pytest
from skimage.filters import threshold_otsu
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common.spotlight.evaluation import (
    foreground_of,
    pixel_metrics,
    remove_border_objects,
    threshold_sweep,
    tune_watershed,
)
from common.io import write_ome_tiff
from common.metrics import background_variability
from common.synthetic import make_cell_field_3d, write_dataset_3d

from zoo_testing import run_script


@pytest.fixture(scope="module")
def field():
    return make_cell_field_3d((16, 64, 64), n_cells=5, seed=7)


def test_pixel_metrics_perfect_affine_prediction(field):
    t = field["target"]
    rng = (float(t.min()), float(t.max()))
    m = pixel_metrics(3.0 * t - 40.0, t, rng, field["spacing_um"], microssim=False)
    # min-max rescaling onto the target's own range undoes any increasing affine map
    assert m["psnr"] > 100 and m["psnr_fg"] > 100  # exact up to float rounding
    assert m["ssim"] == pytest.approx(1.0) and m["pearson"] == pytest.approx(1.0)
    assert m["bg_std"] == pytest.approx(background_variability(t, foreground_of(t)), rel=1e-6)


def test_pixel_metrics_equal_scikit_image_on_the_rescaled_prediction(field):
    t = field["target"].astype(np.float64)
    pred = t + np.random.default_rng(0).normal(0, 30, t.shape)
    lo, hi = 50.0, float(t.max()) + 100  # a training-set range wider than this target's
    m = pixel_metrics(pred, t, (lo, hi), field["spacing_um"], microssim=True)
    p = lo + (pred - pred.min()) * (hi - lo) / (pred.max() - pred.min())
    fg = t >= threshold_otsu(t)
    assert m["psnr"] == pytest.approx(peak_signal_noise_ratio(t, p, data_range=hi - lo))
    assert m["psnr_fg"] == pytest.approx(peak_signal_noise_ratio(t[fg], p[fg], data_range=hi - lo))
    assert m["ssim"] == pytest.approx(structural_similarity(t, p, data_range=hi - lo, win_size=7))
    assert m["pearson_fg"] == pytest.approx(np.corrcoef(p[fg], t[fg])[0, 1])
    assert m["bg_std"] == pytest.approx(p[~fg].std())
    assert 0 < m["ms3im"] <= 1 and m["fsc_res_um"] > 0


def test_pixel_metrics_of_a_collapsed_model_and_a_blank_target(field):
    """A constant prediction is a (bad) model output: Pearson 0 and an FSC resolution of inf (nothing
    resolved), no NaN; a constant target has nothing to compare with: the named error."""
    from common.metrics import DegenerateInputError

    t = field["target"]
    rng = (float(t.min()), float(t.max()))
    m = pixel_metrics(np.full(t.shape, 5.0), t, rng, field["spacing_um"], microssim=True)
    assert m["pearson"] == 0.0 and m["pearson_fg"] == 0.0
    assert m["fsc_res_um"] == np.inf and m["fsc_res_um_fg"] == np.inf
    assert all(np.isfinite(v) for k, v in m.items() if not k.startswith("fsc")), m
    with pytest.raises(DegenerateInputError, match="target is constant"):
        pixel_metrics(t, np.full(t.shape, 5.0), rng, field["spacing_um"], microssim=False)


def test_remove_border_objects_by_hand():
    lab = np.zeros((3, 6, 6), int)
    lab[1, 0, 2] = 1  # touches y = 0
    lab[1, 2:4, 2:4] = 2  # inside
    lab[0, 2, 2] = 3  # touches z = 0 only
    lab[1, 3, 5] = 4  # touches x = end
    assert set(np.unique(remove_border_objects(lab))) == {0, 2, 3}
    assert set(np.unique(remove_border_objects(lab, border_z=True))) == {0, 2}


def test_tune_watershed_returns_the_best_grid_point(field):
    grid = {"sigma": (1.0, 2.0)}
    best, rows = tune_watershed([field["target"]], [field["labels"]], field["spacing_um"], grid=grid, verbose=False)
    assert len(rows) == 2
    top = max(rows, key=lambda r: (r["mAP"], r["ap50"]))
    assert best["sigma"] == top["sigma"] and "min_distance_um" in best
    assert top["ap50"] > 0.5  # the phantoms are segmentable


def test_threshold_sweep_level_zero_is_the_prediction_and_background_drops(field):
    t = field["target"]
    rng = np.random.default_rng(1)
    pred = t + rng.normal(0, 20, t.shape)  # noisy background
    r = (float(t.min()), float(t.max()))
    rows = threshold_sweep([pred], [t], r, field["spacing_um"], levels=(0.0, 0.1, 0.3))
    m = pixel_metrics(pred, t, r, field["spacing_um"], microssim=False)
    for k in ("psnr", "psnr_fg", "ssim", "pearson", "bg_std"):
        assert rows[0][k] == pytest.approx(m[k])
    # level 0.3 by hand: voxels below lo + 0.3 (hi - lo) of the rescaled prediction set to lo
    lo, hi = r
    p = lo + (pred - pred.min()) * (hi - lo) / (pred.max() - pred.min())
    q = np.where(p >= lo + 0.3 * (hi - lo), p, lo)
    fg = foreground_of(t)
    assert rows[2]["bg_std"] == pytest.approx(q[~fg].std())
    assert rows[2]["pearson"] == pytest.approx(np.corrcoef(q.ravel(), t.ravel())[0, 1])


def _tiny_dataset(tmp_path):
    manifest = write_dataset_3d(str(tmp_path / "data"), n_volumes=3, shape=(16, 64, 64), seed=11, n_cells=5)
    rows = list(csv.DictReader(open(manifest)))
    for name, part in (("train", rows[:1]), ("test", rows[1:])):
        with open(tmp_path / "data" / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(part)
    return tmp_path / "data", rows


def test_evaluate_script_end_to_end(tmp_path):
    """Target copies as a 'perfect' model and noisy copies as a worse one, through the real CLI."""
    data, rows = _tiny_dataset(tmp_path)
    from common.io import read_image

    rng = np.random.default_rng(0)
    for r in rows[1:]:
        tgt, sp, _ = read_image(data / r["path_target"])
        stem = r["path_signal"].replace(".ome.tif", "")
        write_ome_tiff(tmp_path / "perfect" / f"{stem}_pred.ome.tif", 0.5 * tgt[0] + 3, spacing_um=sp)
        noisy = tgt[0] + rng.normal(0, 3 * tgt[0].std(), tgt[0].shape)
        write_ome_tiff(tmp_path / "noisy" / f"{stem}_pred.ome.tif", noisy.astype(np.float32), spacing_um=sp)
    out = tmp_path / "report"
    p = _evaluate_cli("--manifest", data / "test.csv", "--predictions",
                      f"perfect={tmp_path / 'perfect'},noisy={tmp_path / 'noisy'}", "--out_dir", out,
                      "--target_range", "0,1000", "--tune", "False", "--microssim", "False",
                      "--sweep_levels", "[0.0,0.2]", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(out / "metrics.json"))
    # an increasing affine map of the target is rescaled back onto the target range: the same segmentation
    seg_t, seg_p = res["segmentation"]["target"], res["segmentation"]["perfect"]
    assert seg_p["ap"] == seg_t["ap"] and seg_p["tp"] == seg_t["tp"]
    assert res["segmentation_vs_target"]["perfect"]["ap"] == [1.0] * 10
    f = res["features"]["perfect"]
    assert f["n_matched"] == f["n_target"] == f["n_pred"] >= 2
    # the same objects: every shape feature correlates perfectly over the matched pairs
    for name in ("volume", "surface_area", "sphericity", "axis_major_length"):
        assert f["correlation"][name] == pytest.approx(1.0, abs=1e-9), name
    assert res["pixel"]["perfect"]["pearson"] > 0.999 > res["pixel"]["noisy"]["pearson"]
    assert res["segmentation"]["noisy"]["ap"][0] < seg_t["ap"][0]
    assert [r["level"] for r in res["sweep"]["noisy"]] == [0.0, 0.2]
    assert res["sweep"]["perfect"][0]["psnr"] == pytest.approx(res["pixel"]["perfect"]["psnr"])
    for name in ("report.md", "mips_0.png", "mips_1.png", "histograms.png", "metrics.png", "ap_iou.png", "sweep.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "| perfect |" in md and "## Threshold sweep" in md
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]  # atomic writes left nothing behind


def test_evaluate_names_a_missing_prediction(tmp_path):
    data, rows = _tiny_dataset(tmp_path)
    (tmp_path / "empty").mkdir()
    from common.spotlight.report import evaluate_dataset

    with pytest.raises(FileNotFoundError, match="signal_01_pred.ome.tif"):
        evaluate_dataset(str(data / "test.csv"), {"m": str(tmp_path / "empty")}, str(tmp_path / "r"), tune=False,
                         microssim=False, sweep_levels=())


def test_segment_cellpose_backend_wiring(monkeypatch):
    """The Cellpose backend gets the user's weights, runs in 3D with the voxel anisotropy, and its
    objects touching the lateral border are removed like the watershed's (cellpose itself is
    exercised in tests/test_segmentation.py)."""
    import common.spotlight.evaluation as E

    seen = {}

    def fake(image, pretrained_model, **kw):
        seen.update(kw, model=pretrained_model, dtype=image.dtype)
        lab = np.zeros(image.shape, np.int32)
        lab[2:4, 0:3, 2:5] = 1  # touches y = 0
        lab[2:4, 5:8, 5:8] = 2
        return lab

    monkeypatch.setattr(E, "cellpose_segment", fake)
    out = E.segment(np.zeros((6, 12, 12)), (0.9, 0.3, 0.3), backend="cellpose", cellpose_model="w.pth")
    assert seen["model"] == "w.pth" and seen["do_3D"] is True and seen["anisotropy"] == pytest.approx(3.0)
    assert seen["dtype"] == np.float32 and set(np.unique(out)) == {0, 2}
    with pytest.raises(ValueError, match="backend"):
        E.segment(np.zeros((6, 12, 12)), backend="stardist")


# ------------------------------------------------------------------------------------------ voxel sizes
def _evaluate_cli(*args, cwd):
    """``python scripts/evaluate.py <args>`` (its ``__main__`` block, in this process: zoo_testing.run_script)."""
    return run_script("scripts.evaluate", *args, cwd=cwd)


def _last_line(p):
    return (p.stderr.strip() or p.stdout.strip()).splitlines()[-1]


def _plain_copy(tmp_path, data, rows, preds_dir, dest, imagej=False):
    """The test manifest's files (and the predictions) re-written as TIFFs without a voxel size (or as ImageJ
    TIFFs that carry it); returns (manifest, predictions folder)."""
    import tifffile

    from common.io import read_image

    def save(src, dst):
        arr, sp, _ = read_image(src)
        if imagej:
            tifffile.imwrite(dst, arr[0], imagej=True, resolution=(1 / sp[2], 1 / sp[1]),
                             metadata={"spacing": sp[0], "unit": "um", "axes": "ZYX"})
        else:
            tifffile.imwrite(dst, arr[0])

    (dest / "pred").mkdir(parents=True)
    out_rows = []
    for r in rows:
        new = {k: v.replace(".ome.tif", ".tif") for k, v in r.items()}
        for k in r:
            save(data / r[k], dest / new[k])
        stem = r["path_signal"].replace(".ome.tif", "")
        save(preds_dir / f"{stem}_pred.ome.tif", dest / "pred" / f"{stem}_pred.tif")
        out_rows.append(new)
    with open(dest / "test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out_rows[0]))
        w.writeheader()
        w.writerows(out_rows)
    return dest / "test.csv", dest / "pred"


def test_evaluate_needs_a_voxel_size_from_the_file_or_the_option(tmp_path):
    """Plain TIFFs carry no voxel size: a named error before any work (no report folder); with --voxel_size
    the report equals the one of the same data as OME-TIFF with that voxel size, and another voxel size
    changes the segmentation (so the option is really used, not a silent 1 um)."""
    data, rows = _tiny_dataset(tmp_path)
    from common.io import read_image

    rng = np.random.default_rng(0)
    test_rows = rows[1:]
    for r in test_rows:
        tgt, sp, _ = read_image(data / r["path_target"])
        assert sp == pytest.approx((0.29, 0.29, 0.29))
        noisy = tgt[0] + rng.normal(0, tgt[0].std(), tgt[0].shape)
        write_ome_tiff(tmp_path / "pred" / f"{r['path_signal'].replace('.ome.tif', '')}_pred.ome.tif",
                       noisy.astype(np.float32), spacing_um=sp)
    plain_csv, plain_pred = _plain_copy(tmp_path, data, test_rows, tmp_path / "pred", tmp_path / "plain")
    common = ["--target_range", "0,1000", "--tune", "False", "--microssim", "False", "--sweep_levels", "()"]

    p = _evaluate_cli("--manifest", plain_csv, "--predictions", f"m={plain_pred}", "--out_dir", tmp_path / "r0",
                      *common, cwd=tmp_path)
    assert p.returncode == 1, p.stderr[-2000:]
    last = _last_line(p)
    assert last.startswith("evaluate: error: ") and "target_01.tif and 1 more: no voxel size" in last
    assert "--voxel_size z,y,x" in last and "Traceback" not in p.stderr
    assert not (tmp_path / "r0").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]

    p = _evaluate_cli("--manifest", plain_csv, "--predictions", f"m={plain_pred}", "--out_dir", tmp_path / "plain",
                      *common, "--voxel_size", "0.29,0.29,0.29", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = {"plain": json.load(open(tmp_path / "plain" / "metrics.json"))}
    from common.spotlight.report import evaluate_dataset

    kw = dict(target_range=(0, 1000), tune=False, microssim=False, sweep_levels=())
    runs["ome"] = evaluate_dataset(str(data / "test.csv"), {"m": str(tmp_path / "pred")}, str(tmp_path / "ome"), **kw)
    runs["plain_1um"] = evaluate_dataset(str(plain_csv), {"m": str(plain_pred)}, str(tmp_path / "1um"),
                                         voxel_size=(1, 1, 1), **kw)
    runs = {k: json.loads(json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
            for k, v in runs.items()}
    def rounded(x):  # 12 significant digits: the CLI process and this one may sum in another order (threads)
        if isinstance(x, float):
            return float(f"{x:.12g}")
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        return [rounded(v) for v in x] if isinstance(x, list) else x

    for key in ("pixel", "segmentation", "segmentation_vs_target", "features"):
        assert json.dumps(rounded(runs["plain"][key]), sort_keys=True) == json.dumps(rounded(runs["ome"][key]),
                                                                                      sort_keys=True), key
    # the FSC resolution is in um: 1 um voxels scale it by 1/0.29 (up to the float binning of the shells);
    # the watershed's sizes in um change the objects
    res = runs["ome"]["pixel"]["m"]["fsc_res_um"]
    assert runs["plain_1um"]["pixel"]["m"]["fsc_res_um"] == pytest.approx(res / 0.29, rel=0.01)
    assert runs["plain_1um"]["segmentation"] != runs["ome"]["segmentation"]


def test_voxel_sizes_from_imagej_and_ome_files_and_bad_options(tmp_path):
    from common.spotlight.evaluation import EvaluationInputError
    from common.spotlight.report import voxel_sizes

    data, rows = _tiny_dataset(tmp_path)
    (tmp_path / "p").mkdir()
    for r in rows:
        stem = r["path_signal"].replace(".ome.tif", "")
        os.link(data / r["path_target"], tmp_path / "p" / f"{stem}_pred.ome.tif")
    _plain_copy(tmp_path, data, rows, tmp_path / "p", tmp_path / "ij", imagej=True)
    ij_target = str(tmp_path / "ij" / rows[0]["path_target"].replace(".ome.tif", ".tif"))
    ome_target = str(data / rows[0]["path_target"])
    got = voxel_sizes([ij_target, ome_target])
    assert got[ij_target] == pytest.approx((0.29, 0.29, 0.29), rel=1e-4) and got[ome_target] == pytest.approx((0.29,) * 3)
    assert voxel_sizes([ome_target], (1, 0.5, 0.5)) == {ome_target: (1.0, 0.5, 0.5)}  # the option wins
    for bad in [(1, 2), (0, 1, 1), ("a", 1, 1), (float("nan"), 1, 1)]:
        with pytest.raises(EvaluationInputError, match="three positive numbers"):
            voxel_sizes([ome_target], bad)
    # the command line: a malformed --voxel_size and an unknown option are named before any work
    for args, needle, rc in [(["--voxel_size", "0.29,0.29"], "evaluate: error: --voxel_size", 1),
                             (["--voxel_sise", "0.29,0.29,0.29"], "error: evaluate.py: unknown flag(s) --voxel_sise", 2)]:
        p = _evaluate_cli("--manifest", data / "test.csv", "--predictions", f"m={tmp_path / 'p'}", "--out_dir",
                          tmp_path / "r", *args, cwd=tmp_path)
        assert p.returncode == rc and _last_line(p).startswith(needle), p.stderr
        assert not (tmp_path / "r").exists()

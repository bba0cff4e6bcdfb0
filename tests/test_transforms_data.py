import os

import numpy as np
import pytest
import torch
from monai.transforms import Compose, DivisiblePadd, Invertd

from common.data import ManifestError, RandomPatchDataset, list_images, load_manifest, read_manifest
from common.io import LoadMicroscopyd, spacing_of, write_ome_tiff
from common.transforms import ResampleToSpacingd, ZScoreNormalize, ZScoreNormalized, center_slices


def test_zscore_whole_and_center_slices_by_hand():
    x = np.zeros((1, 40, 2, 2), np.float32)
    x[0, :4] = 100.0  # bright top slices outside the central 32
    x[0, 4:] = np.arange(36)[:, None, None]
    whole = ZScoreNormalize("whole")(x)
    assert abs(whole.mean()) < 1e-5 and abs(whole.std() - 1) < 1e-4
    cs = ZScoreNormalize("center_slices", n_slices=32)(torch.as_tensor(x))
    ref = x[0, 4:36]
    expected = (x - ref.mean()) / ref.std()
    np.testing.assert_allclose(cs.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert center_slices(40, 32) == slice(4, 36) and center_slices(10, 32) == slice(0, 10)


def test_zscore_whole_is_monai_normalize_intensity_channel_wise():
    """mode="whole" is MONAI's NormalizeIntensity(channel_wise=True): same values as the by-hand
    per-channel (x - mean) / std (population std), numpy in -> numpy out, tensor in -> tensor out."""
    rng = np.random.default_rng(0)
    x = (rng.random((3, 6, 9, 7)) * 100 + 5).astype(np.float32)
    by_hand = np.stack([(c - c.astype(np.float64).mean()) / c.astype(np.float64).std() for c in x])
    out = ZScoreNormalize("whole")(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, by_hand, rtol=1e-5, atol=1e-5)
    out_t = ZScoreNormalize("whole")(torch.as_tensor(x))
    assert type(out_t) is torch.Tensor
    np.testing.assert_allclose(out_t.numpy(), by_hand, rtol=1e-5, atol=1e-5)


def test_zscore_constant_channel_gives_zeros_not_nan():
    out = ZScoreNormalized(keys="image")({"image": np.full((2, 4, 5, 5), 7.0, np.float32)})["image"]
    assert np.all(out == 0)


def test_resample_to_isotropic_and_invert(tmp_path):
    vol = np.random.default_rng(0).random((10, 20, 24)).astype(np.float32)
    p = write_ome_tiff(tmp_path / "a.ome.tif", vol, spacing_um=(0.87, 0.29, 0.29))
    pre = Compose([LoadMicroscopyd(keys="image"), ResampleToSpacingd(keys="image", pixdim=(0.29, 0.29, 0.29)),
                   DivisiblePadd(keys="image", k=16)])
    d = pre({"image": p})
    # 10 slices of 0.87 um span 8.7 um -> 30 slices of 0.29 um, then padded to 32
    assert tuple(d["image"].shape) == (1, 32, 32, 32)
    d["pred"] = d["image"].clone()
    inv = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)
    assert tuple(inv["pred"].shape) == (1, 10, 20, 24)
    assert np.allclose(spacing_of(inv["pred"]), (0.87, 0.29, 0.29))
    assert np.corrcoef(inv["pred"].numpy().ravel(), vol.ravel())[0, 1] > 0.95


def test_resample_skips_unknown_spacing(tmp_path, caplog):
    import logging

    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", np.ones((4, 8, 8), np.float32))
    d = LoadMicroscopyd(keys="image")({"image": str(tmp_path / "plain.tif")})
    t = ResampleToSpacingd(keys="image", pixdim=(0.29, 0.29, 0.29))
    with caplog.at_level(logging.WARNING, logger="common.transforms"):
        out = t(d)
        t(d)  # said once per run, not once per file
    said = [r for r in caplog.records if "no voxel size" in r.getMessage()]
    assert len(said) == 1 and "keeps the input's grid" in said[0].getMessage()
    assert tuple(out["image"].shape) == (1, 4, 8, 8)
    # nothing was recorded, so inverting is the identity (the Invertd crash on plain TIFFs)
    assert tuple(t.inverse(out)["image"].shape) == (1, 4, 8, 8)
    assert tuple(ResampleToSpacingd(keys="image", pixdim=None)(d)["image"].shape) == (1, 4, 8, 8)


def _write_pair(folder, name, shape=(8, 16, 16), seed=0, target=None):
    rng = np.random.default_rng(seed)
    s = write_ome_tiff(folder / f"{name}_signal.ome.tif", rng.random(shape).astype(np.float32))
    t = write_ome_tiff(folder / f"{name}_target.ome.tif",
                       rng.random(shape).astype(np.float32) if target is None else target)
    return os.path.basename(s), os.path.basename(t)


def test_manifest_relative_paths_and_extra_columns(tmp_path):
    s, t = _write_pair(tmp_path, "a")
    (tmp_path / "m.csv").write_text(f"path_signal,path_target,condition\n{s},{t},drugA\n")
    recs = load_manifest(tmp_path / "m.csv")
    assert recs[0]["image"] == str(tmp_path / s) and recs[0]["label"] == str(tmp_path / t)
    assert recs[0]["condition"] == "drugA"


def test_manifest_errors_name_file_and_problem(tmp_path):
    s, t = _write_pair(tmp_path, "ok")
    s2, _ = _write_pair(tmp_path, "mismatch")
    _, t2 = _write_pair(tmp_path, "other", shape=(8, 16, 12))
    (tmp_path / "broken.tif").write_bytes(b"II*\x00not a tiff")
    write_ome_tiff(tmp_path / "flat.ome.tif", np.ones((16, 16), np.float32), axes="YX")
    nan = np.random.default_rng(3).random((8, 16, 16)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    write_ome_tiff(tmp_path / "nan.ome.tif", nan)
    write_ome_tiff(tmp_path / "const.ome.tif", np.ones((8, 16, 16), np.float32))
    rows = [f"{s},{t}", f"missing.ome.tif,{t}", f"broken.tif,{t}", f"{s2},{t2}", f"flat.ome.tif,{t}",
            f"nan.ome.tif,{t}", f"{s},const.ome.tif"]
    (tmp_path / "m.csv").write_text("path_signal,path_target\n" + "\n".join(rows) + "\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path / "m.csv")
    msg = str(e.value)
    assert "7 problem" not in msg and "6 problem(s)" in msg
    assert "line 3" in msg and "missing.ome.tif: file not found" in msg
    assert "broken.tif: unreadable" in msg
    assert "line 5: shape mismatch" in msg and "(8, 16, 12)" in msg
    assert "flat.ome.tif: has 2 dimensions" in msg
    assert "nan.ome.tif: contains 1 NaN/inf" in msg
    assert "const.ome.tif: constant image" in msg
    (tmp_path / "bad_header.csv").write_text("signal,target\na,b\n")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(tmp_path / "bad_header.csv")


def test_list_images_folder_csv_and_errors(tmp_path):
    _write_pair(tmp_path, "a")
    _write_pair(tmp_path, "b")
    recs = list_images(tmp_path, pattern="signal")
    assert [os.path.basename(r["image"]) for r in recs] == ["a_signal.ome.tif", "b_signal.ome.tif"]
    with pytest.raises(ManifestError, match="no images"):
        list_images(tmp_path / "a_signal.ome.tif" if False else tmp_path, pattern="nothing")


def test_random_patch_dataset_uniform_over_images_and_positions():
    from monai.transforms import RandSpatialCropd, SpatialPadd

    imgs = [{"image": torch.full((1, 4, 8, 8), float(i)), "label": torch.arange(4 * 8 * 8).float().reshape(1, 4, 8, 8)}
            for i in range(3)]
    crop = Compose([SpatialPadd(keys=["image", "label"], spatial_size=(6, 4, 4)),
                    RandSpatialCropd(keys=["image", "label"], roi_size=(6, 4, 4), random_size=False)])
    crop.set_random_state(0)
    ds = RandomPatchDataset(imgs, crop, num_patches=300)
    assert len(ds) == 300
    items = [ds[i] for i in range(300)]
    assert all(tuple(it["image"].shape) == (1, 6, 4, 4) for it in items)  # thin stack padded, not rejected
    counts = np.bincount([int(it["image"][0, 2, 0, 0]) for it in items])
    assert counts.tolist() == [100, 100, 100]
    # corner positions in y/x: 5 possible offsets each, all used
    corners = {int(it["label"][0, 1, 0, 0]) for it in items}
    assert len(corners) >= 20


def test_range_psnr_metric_matches_skimage():
    from skimage.metrics import peak_signal_noise_ratio

    from common.metrics import RangePSNRMetric

    rng = np.random.default_rng(5)
    t = rng.random((3, 1, 4, 8, 8)).astype(np.float32)
    p = (t + 0.1 * rng.standard_normal(t.shape)).astype(np.float32)
    m = RangePSNRMetric()
    m(torch.as_tensor(p), torch.as_tensor(t))
    expected = [peak_signal_noise_ratio(t[i], p[i], data_range=float(t[i].max() - t[i].min())) for i in range(3)]
    assert abs(float(m.aggregate()) - np.mean(expected)) < 1e-3

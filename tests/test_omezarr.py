"""OME-Zarr images and HCS plates: read/write round trips, errors, and bundles run on them.

The reader checked against is ome-zarr-py's ``Reader``, the one napari's OME-Zarr plugin
(napari-ome-zarr) uses to open images and plates.
"""

import os

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common import omezarr
from common.data import list_images, load_manifest
from common.io import ImageDimensionError, ImageReadError, read_image, write_ome_tiff
from common.networks.record import write_record
from common.synthetic import make_cell_field_3d
from zoo_testing import BUNDLES, TINY, TINY_TRAIN, run_bundle, run_bundle_here, run_bundle_inprocess

SPACING = (0.5, 0.29, 0.29)


def _napari_reader_levels(path):
    """Open ``path`` as napari-ome-zarr does (ome-zarr Reader) -> ``[(specs, level shapes, scales)]``."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out = []
    for node in Reader(parse_url(str(path), fmt=omezarr.NGFF_FORMAT()))():
        cts = node.metadata.get("coordinateTransformations") or []
        scales = [next(t["scale"] for t in ct if t["type"] == "scale") for ct in cts]
        out.append(([type(s).__name__ for s in node.specs], [tuple(d.shape) for d in node.data], scales))
    return out


def test_image_round_trip_with_voxel_size_channels_and_pyramid(tmp_path):
    a = np.random.default_rng(0).random((2, 5, 260, 140)).astype(np.float32)
    p = omezarr.write_omezarr(tmp_path / "img.zarr", a, spacing_um=SPACING, channel_names=["BF", "DNA"])
    data, axes, sizes = omezarr.read_omezarr(p)
    assert axes == "CZYX" and np.array_equal(data, a)
    assert sizes == pytest.approx({"Z": 0.5, "Y": 0.29, "X": 0.29})
    one, _, _ = omezarr.read_omezarr(p + "#DNA")
    assert np.array_equal(one[0], a[1])
    assert np.array_equal(omezarr.read_omezarr(p + "#0")[0][0], a[0])
    # the zoo's reader: channel-first float, voxel size known
    arr, spacing, known = read_image(p + "#BF", spatial_dims=3)
    assert arr.shape == (1, 5, 260, 140) and known and spacing == pytest.approx(SPACING)
    # napari's reader: one multiscales node, levels halved in Y/X (Z kept) while >= 64 px, scales doubled
    [(specs, shapes, scales)] = _napari_reader_levels(p)
    assert "Multiscales" in specs
    assert shapes == [(2, 5, 260, 140), (2, 5, 130, 70)]
    assert scales[0] == pytest.approx([1.0, 0.5, 0.29, 0.29])
    assert scales[1] == pytest.approx([1.0, 0.5, 0.58, 0.58])
    # chunked on disk: one channel, 256x256 tiles
    import zarr

    assert zarr.open_array(os.path.join(p, "s0"), mode="r").chunks == (1, 5, 256, 140)


def test_2d_image_and_dimension_errors(tmp_path):
    a = (np.random.default_rng(1).random((70, 66)) * 4000).astype(np.uint16)
    p = omezarr.write_omezarr(tmp_path / "plane.zarr", a, axes="YX", spacing_um=(0.65, 0.65))
    arr, spacing, known = read_image(p, spatial_dims=2)
    assert arr.shape == (1, 70, 66) and arr.dtype == np.uint16 and spacing == pytest.approx((0.65, 0.65)) and known
    with pytest.raises(ImageDimensionError, match="2D image"):
        read_image(p, spatial_dims=3)
    stack = omezarr.write_omezarr(tmp_path / "stack.zarr", np.zeros((4, 8, 8), np.float32), axes="ZYX")
    with pytest.raises(ImageDimensionError, match="z-stack"):
        read_image(stack, spatial_dims=2)
    with pytest.raises(ImageReadError, match="no channel 'GFP'"):
        read_image(p + "#GFP", spatial_dims=2)
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.zarr", spatial_dims=2)


def _plate(path, shape=(8, 48, 40)):
    fields = {}
    for i, key in enumerate([("A", "1", "0"), ("B", "3", "0"), ("B", "3", "1")]):
        f = make_cell_field_3d(shape=shape, n_cells=3, seed=i, spacing_um=SPACING)
        fields[key] = np.stack([f["signal"], f["target"]])
    return omezarr.write_plate(path, fields, spacing_um=SPACING, channel_names=["BF", "DNA"]), fields


def test_plate_fields_listing_and_errors(tmp_path):
    plate, fields = _plate(tmp_path / "plate.zarr")
    listed = omezarr.plate_fields(plate)
    assert [(f["row"], f["column"], f["field"]) for f in listed] == list(fields)
    # a plate given as the inference input, or found in a folder, lists its fields with their position
    for source in (plate, str(tmp_path)):
        recs = list_images(source, spatial_dims=3)
        assert [r["image"] for r in recs] == [f["path"] for f in listed]
        assert [(r["row"], r["column"], r["field"]) for r in recs] == list(fields)
    for f, key in zip(listed, fields):
        arr, spacing, _ = read_image(f["path"] + "#DNA", spatial_dims=3)
        assert np.array_equal(arr[0], fields[key][1]) and spacing == pytest.approx(SPACING)
    with pytest.raises(ImageReadError, match="is an HCS plate, not one image"):
        read_image(plate, spatial_dims=3)
    [(specs, _, _)] = _napari_reader_levels(plate)[:1]
    assert specs == ["Plate"]


@pytest.fixture(scope="module")
def fnet_model(tmp_path_factory):
    """A tiny random F-net with its record (trained at 0.29 um isotropic)."""
    root = tmp_path_factory.mktemp("fnet_tiny")
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLES, "fnet_baseline", "configs", "inference.json"))
    parser["bundle_root"] = os.path.join(BUNDLES, "fnet_baseline")
    parser["ckpt_path"] = "/nonexistent/model.pt"
    for k, v in TINY["fnet_baseline"].items():
        parser[k] = v
    net = parser.get_parsed_content("network_def")
    ckpt = root / "model.pt"
    torch.save(net.state_dict(), ckpt)
    write_record(str(ckpt), net, {"target_spacing_um": [0.29, 0.29, 0.29]})
    return str(ckpt)


def test_bundle_inference_image_zarr_to_zarr(fnet_model, tmp_path):
    (tmp_path / "in").mkdir()
    a = np.random.default_rng(2).random((1, 6, 40, 44)).astype(np.float32)
    omezarr.write_omezarr(tmp_path / "in" / "img.zarr", a, spacing_um=SPACING)
    run_bundle_inprocess("fnet_baseline", "inference.json",
                         {"dataset_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"), "ckpt_path": fnet_model})
    assert sorted(os.listdir(tmp_path / "out")) == ["img_pred.zarr"]
    out = str(tmp_path / "out" / "img_pred.zarr")
    arr, spacing, known = read_image(out, spatial_dims=3)
    assert arr.shape == (1, 6, 40, 44) and known and np.isfinite(arr).all() and arr.std() > 0
    assert spacing == pytest.approx(SPACING)
    [(specs, shapes, scales)] = _napari_reader_levels(out)
    assert "Multiscales" in specs and shapes[0] == (6, 40, 44) and scales[0] == pytest.approx(SPACING)


def test_bundle_inference_on_request_writes_zarr_for_tiff(fnet_model, tmp_path):
    (tmp_path / "in").mkdir()
    write_ome_tiff(tmp_path / "in" / "img.ome.tif", np.random.default_rng(3).random((6, 40, 44)).astype(np.float32),
                   spacing_um=SPACING)
    run_bundle_inprocess("fnet_baseline", "inference.json",
                         {"dataset_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"), "ckpt_path": fnet_model,
                          "postprocessing#transforms#1#output_format": "ome-zarr"})
    arr, spacing, _ = read_image(tmp_path / "out" / "img_pred.zarr", spatial_dims=3)
    assert arr.shape == (1, 6, 40, 44) and spacing == pytest.approx(SPACING)


def test_bundle_inference_plate_to_plate(fnet_model, tmp_path):
    plate, fields = _plate(tmp_path / "in" / "plate.zarr")
    manifest = omezarr.plate_manifest(plate, tmp_path / "in" / "bf.csv", signal="BF")
    run_bundle_inprocess("fnet_baseline", "inference.json",
                         {"dataset_dir": manifest, "output_dir": str(tmp_path / "out"), "ckpt_path": fnet_model})
    out_plate = tmp_path / "out" / "plate_pred.zarr"
    assert sorted(os.listdir(tmp_path / "out")) == ["plate_pred.zarr"]
    listed = omezarr.plate_fields(out_plate)
    assert [(f["row"], f["column"], f["field"]) for f in listed] == list(fields)
    for f, key in zip(listed, fields):
        arr, spacing, known = read_image(f["path"], spatial_dims=3)
        assert arr.shape == (1,) + fields[key].shape[1:] and known and spacing == pytest.approx(SPACING)
    specs = [s for s, _, _ in _napari_reader_levels(out_plate)]
    assert specs[0] == ["Plate"]


def test_plate_manifest_trains_a_bundle(tmp_path):
    plate, _ = _plate(tmp_path / "plate.zarr", shape=(16, 64, 64))
    manifest = omezarr.plate_manifest(plate, tmp_path / "all.csv", signal="BF", target="DNA")
    recs = load_manifest(manifest, spatial_dims=3)
    assert [r["row"] for r in recs] == ["A", "B", "B"] and recs[0]["image"].endswith("A/1/0#BF")
    out = tmp_path / "run"
    ov = dict(TINY["fnet_baseline"], **TINY_TRAIN["fnet_baseline"], train_manifest=manifest, val_manifest=manifest,
              ckpt_dir=str(out / "models"), output_dir=str(out / "runs"))
    run_bundle_here("fnet_baseline", "train.json", ov)
    assert os.path.isfile(out / "models" / "model.pt")


def test_plate_fields_are_shared_between_ranks(tmp_path, monkeypatch):
    plate, fields = _plate(tmp_path / "plate.zarr", shape=(4, 32, 32))
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        shares.append([r["image"] for r in list_images(plate, spatial_dims=3)])
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    every = [r["image"] for r in list_images(plate, spatial_dims=3)]
    assert sorted(shares[0] + shares[1]) == sorted(every) and not set(shares[0]) & set(shares[1])
    assert len(shares[0]) == 2 and len(shares[1]) == 1


def test_torchrun_two_processes_predict_one_plate(fnet_model, tmp_path):
    """``torchrun --nproc_per_node=2``: each rank predicts its fields into the one output plate."""
    fields = {}
    for i, key in enumerate([("A", "1", "0"), ("A", "2", "0"), ("B", "1", "0"), ("B", "1", "1")]):
        f = make_cell_field_3d(shape=(6, 40, 36), n_cells=2, seed=10 + i, spacing_um=SPACING)
        fields[key] = f["signal"][None]
    plate = omezarr.write_plate(tmp_path / "in" / "plate.zarr", fields, spacing_um=SPACING)
    ov = {"dataset_dir": plate, "ckpt_path": fnet_model}
    run_bundle("fnet_baseline", "inference.json", dict(ov, output_dir=str(tmp_path / "two")), torchrun=2, timeout=300)
    run_bundle_inprocess("fnet_baseline", "inference.json", dict(ov, output_dir=str(tmp_path / "one")))
    two = omezarr.plate_fields(tmp_path / "two" / "plate_pred.zarr")
    one = omezarr.plate_fields(tmp_path / "one" / "plate_pred.zarr")
    assert [(f["row"], f["column"], f["field"]) for f in two] == list(fields)
    for a, b in zip(two, one):
        pa, sa, _ = read_image(a["path"], spatial_dims=3)
        pb, _, _ = read_image(b["path"], spatial_dims=3)
        np.testing.assert_allclose(pa, pb, atol=1e-5)
        assert sa == pytest.approx(SPACING)
    leftovers = [n for _, dirs, files in os.walk(tmp_path / "two") for n in dirs + files if n.startswith(".tmp_")]
    assert not leftovers

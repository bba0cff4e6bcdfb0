"""Bad-input catalogue: every bundle, inference and training.

Each case runs the bundle's real config with MONAI's bundle runner (in this process, so that the
catalogue stays fast; ``test_named_error_is_the_last_line`` checks the command line itself) and
asserts: the project's named error (its class, the file, the problem), raised before any work,
and nothing left in the output folder.
"""

import csv
import os
import shutil

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from common.cli import BooleanValueError
from common.data import ManifestError
from common.errors import CheckpointMismatchError, OutputDirError, named_error
from common.io import ImageDimensionError, ImageReadError, NonFiniteImageError, write_ome_tiff
from common.synthetic import write_dataset_2d_dic, write_dataset_2d_isl, write_dataset_3d, write_fucci_dataset
from common.spotlight import NoForegroundError
from zoo_testing import TINY, TINY_TRAIN, run_bundle_inprocess, tiny_model

pytestmark = pytest.mark.slow

ALL = ["fnet_baseline", "spotlight_dna", "isl_nucleus_seg", "isl_cell_instance", "unet3d_fucci"]
DIMS = {"fnet_baseline": 3, "spotlight_dna": 3, "isl_nucleus_seg": 2, "isl_cell_instance": 2, "unet3d_fucci": 3}
# what the image of a valid inference input looks like (channel-first), per bundle
GOOD = {"fnet_baseline": (1, 12, 40, 40), "spotlight_dna": (1, 12, 40, 40), "isl_nucleus_seg": (3, 64, 64),
        "isl_cell_instance": (1, 64, 64), "unet3d_fucci": (1, 10, 40, 40)}


def _write_good(path, bundle, seed=0):
    shape = GOOD[bundle]
    arr = np.random.default_rng(seed).random(shape).astype(np.float32)
    axes = "CZYX" if len(shape) == 4 else "CYX"
    write_ome_tiff(path, arr, axes=axes, spacing_um=(0.5, 0.3, 0.3) if len(shape) == 4 else (0.3, 0.3))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Valid inputs, tiny weights (with their record) and training data for every bundle."""
    root = tmp_path_factory.mktemp("bad_inputs")
    w = {}
    for b in ALL:
        d = root / b
        (d / "good").mkdir(parents=True)
        _write_good(str(d / "good" / "img.ome.tif"), b)
        ckpt = tiny_model(b, d / "models", {"input_channels": [0]} if b == "unet3d_fucci" else {})
        w[b] = {"dir": d, "good": d / "good", "ckpt": ckpt}
    # training data (one valid record per bundle; train and val use it)
    makers = {
        "fnet_baseline": lambda p: write_dataset_3d(p, n_volumes=1, shape=(16, 40, 40), seed=1, n_cells=3),
        "spotlight_dna": lambda p: write_dataset_3d(p, n_volumes=1, shape=(16, 40, 40), seed=2, n_cells=3),
        "isl_nucleus_seg": lambda p: write_dataset_2d_isl(p, n_images=1, shape=(64, 64), n_cells=4, seed=3),
        "isl_cell_instance": lambda p: write_dataset_2d_dic(p, n_images=1, shape=(64, 64), seed=4, pixel_size_um=0.8,
                                                            n_cells=4),
        "unet3d_fucci": _fucci_training_data,
    }
    for b, make in makers.items():
        manifest = make(str(root / b / "train_data"))
        with open(manifest) as f:
            rows = list(csv.DictReader(f))
        w[b]["train_dir"] = os.path.dirname(manifest)
        w[b]["rows"] = rows
    return w


def _fucci_training_data(folder):
    """One synthetic spheroid with its 3-class ground truth, as the bundle trains on it."""
    import common.fucci as F
    from common.io import read_image

    manifest = write_fucci_dataset(folder, n_spheroids=1, shape=(8, 48, 48), n_nuclei=8, seed=2)
    row = next(csv.DictReader(open(manifest)))
    inst, sp, _ = read_image(os.path.join(folder, row["path_label"]))
    sem, clean = F.prepare_ground_truth(inst[0].astype(np.int64), min_area=4)
    s, lab = F.write_ground_truth(folder, "gt_00", sem, clean, sp)
    path = os.path.join(folder, "fucci_train.csv")
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["path_image", "path_label", "path_instances"],
                                 [row["path_image"], os.path.basename(s), os.path.basename(lab)]])
    return path


def _axes(b, arr):
    return "C" + "ZYX"[-DIMS[b]:] if arr.ndim == DIMS[b] + 1 else "ZYX"[-DIMS[b]:]


def _manifest(folder, rows, name="train.csv", drop=None):
    cols = [c for c in rows[0] if c != drop]
    path = os.path.join(folder, name)
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    return path


def _expect(excinfo, cls, *fragments):
    named = named_error(excinfo.value)
    assert named is not None, f"no named error in {excinfo.value!r}"
    # file-level errors (ImageReadError and its kind) reach the user inside the one ManifestError that
    # lists every bad file of a folder or manifest
    ok = isinstance(named, cls) or (issubclass(cls, ImageReadError) and isinstance(named, ManifestError))
    assert ok, f"{type(named).__name__}: {named}"
    for frag in fragments:
        assert str(frag) in str(named), f"{frag!r} not in: {named}"


def _nothing_left(out):
    out = str(out)
    assert not os.path.exists(out) or os.listdir(out) == [], f"{out} holds {os.listdir(out)}"


# ---------------------------------------------------------------------------------------------
# inference: a case builds an input folder (or names a path) and overrides; returns
# (overrides, expected error class, fragments the message must contain)
# ---------------------------------------------------------------------------------------------
def _inp(tmp, name):
    d = tmp / "in"
    d.mkdir(exist_ok=True)
    return d / name


def case_missing_folder(b, w, tmp):
    p = tmp / "does_not_exist"
    return {"dataset_dir": str(p)}, ManifestError, (str(p), "not found")


def case_empty_folder(b, w, tmp):
    (tmp / "in").mkdir()
    return {"dataset_dir": str(tmp / "in")}, ManifestError, (str(tmp / "in"), "no images")


def case_corrupt_tiff(b, w, tmp):
    p = _inp(tmp, "broken.tif")
    p.write_bytes(b"II*\x00" + os.urandom(200))
    return {"dataset_dir": str(p.parent)}, ImageReadError, (str(p), "unreadable")


def case_truncated_tiff(b, w, tmp):
    good = _write_good(str(_inp(tmp, "full.ome.tif")), b)
    data = open(good, "rb").read()
    os.remove(good)
    p = _inp(tmp, "cut.ome.tif")
    p.write_bytes(data[: len(data) // 3])
    return {"dataset_dir": str(p.parent)}, ImageReadError, (str(p),)


def case_nan(b, w, tmp):
    arr = np.random.default_rng(1).random(GOOD[b]).astype(np.float32)
    arr.flat[5] = np.nan
    p = _inp(tmp, "nan.ome.tif")
    write_ome_tiff(str(p), arr, axes="CZYX"[-arr.ndim:])
    return {"dataset_dir": str(p.parent)}, NonFiniteImageError, (str(p), "NaN")


def case_wrong_dims(b, w, tmp):
    p = _inp(tmp, "wrong.tif")
    if DIMS[b] == 3:  # one plane where a stack is expected
        tifffile.imwrite(p, np.random.default_rng(2).random((40, 40)).astype(np.float32))
        return {"dataset_dir": str(p.parent)}, ImageDimensionError, (str(p), "dimensions")
    # a 5D array where a 2D image is expected
    tifffile.imwrite(p, np.zeros((2, 3, 4, 16, 16), np.uint8), metadata={"axes": "TCZYX"})
    return {"dataset_dir": str(p.parent)}, ImageReadError, (str(p),)


def case_wrong_channels(b, w, tmp):
    shape = list(GOOD[b])
    shape[0] = 2 if shape[0] == 1 else 1
    if b == "unet3d_fucci":  # it takes channel input_channels of any stack; ask for a channel it lacks
        p = _inp(tmp, "one_channel.ome.tif")
        write_ome_tiff(str(p), np.random.default_rng(3).random(GOOD[b]).astype(np.float32), axes="CZYX")
        return ({"dataset_dir": str(p.parent), "input_channels": [2], "ckpt_path": str(w["ckpt_norecord"])},
                ManifestError, (str(p), "channel"))
    p = _inp(tmp, "channels.ome.tif")
    arr = np.random.default_rng(3).random(shape).astype(np.float32)
    write_ome_tiff(str(p), arr, axes="CZYX"[-arr.ndim:])
    return {"dataset_dir": str(p.parent)}, ManifestError, (str(p), "channel")


def case_rgb_png(b, w, tmp):
    p = _inp(tmp, "colour.png")
    rgb = np.random.default_rng(4).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(p)
    if DIMS[b] == 3:
        return {"dataset_dir": str(p.parent)}, ImageDimensionError, (str(p), "colour image")
    # 2D bundles read equal-channel RGB as grey; real colour is 3 channels, which only isl_nucleus_seg takes
    if b == "isl_nucleus_seg":
        pytest.skip("a 3-channel colour PNG is a valid 3-channel input of isl_nucleus_seg")
    return {"dataset_dir": str(p.parent)}, ManifestError, (str(p), "3 channel(s), expected 1")


def case_unsupported_type(b, w, tmp):
    p = _inp(tmp, "image.jpg")
    p.write_bytes(b"\xff\xd8\xff" + os.urandom(64))
    return {"dataset_dir": str(p)}, ImageReadError, (str(p), "unsupported file type")


def case_missing_checkpoint(b, w, tmp):
    p = tmp / "no_model.pt"
    return {"dataset_dir": str(w["good"]), "ckpt_path": str(p)}, CheckpointMismatchError, (str(p), "no trained model")


def case_truncated_checkpoint(b, w, tmp):
    p = tmp / "half.pt"
    data = open(w["ckpt"], "rb").read()
    p.write_bytes(data[: len(data) // 2])
    return {"dataset_dir": str(w["good"]), "ckpt_path": str(p)}, CheckpointMismatchError, (str(p), "unreadable")


def case_other_network(b, w, tmp):
    p = tmp / "other.pt"  # weights of another network, no record: the shapes say so
    sd = torch.load(w["ckpt"], weights_only=True)
    sd = {k: torch.cat([v, v]) if v.ndim >= 1 else v for k, v in sd.items()}
    torch.save(sd, p)
    return {"dataset_dir": str(w["good"]), "ckpt_path": str(p)}, CheckpointMismatchError, (str(p), "another shape")


def case_output_is_file(b, w, tmp):
    f = tmp / "taken"
    f.write_text("not a folder")
    return {"dataset_dir": str(w["good"]), "output_dir": str(f)}, OutputDirError, (str(f), "existing file")


def case_output_under_file(b, w, tmp):
    f = tmp / "afile"
    f.write_text("x")
    out = f / "preds"
    return {"dataset_dir": str(w["good"]), "output_dir": str(out)}, OutputDirError, (str(out), "cannot create")


INFERENCE_CASES = [case_missing_folder, case_empty_folder, case_corrupt_tiff, case_truncated_tiff, case_nan,
                   case_wrong_dims, case_wrong_channels, case_rgb_png, case_unsupported_type,
                   case_missing_checkpoint, case_truncated_checkpoint, case_other_network, case_output_is_file,
                   case_output_under_file]


@pytest.mark.parametrize("case", INFERENCE_CASES, ids=lambda c: c.__name__[5:])
@pytest.mark.parametrize("bundle", ALL)
def test_inference_bad_input(bundle, case, world, tmp_path):
    w = dict(world[bundle])
    if bundle == "unet3d_fucci":  # weights without a record, so that an explicit input_channels is taken as given
        w["ckpt_norecord"] = tmp_path / "norecord.pt"
        shutil.copy(w["ckpt"], w["ckpt_norecord"])
    overrides, cls, fragments = case(bundle, w, tmp_path)
    out = overrides.get("output_dir", str(tmp_path / "pred"))
    ov = dict({"ckpt_path": str(w["ckpt"]), "output_dir": out}, **overrides)
    if bundle == "isl_nucleus_seg":
        ov["stage"] = 1
    with pytest.raises(Exception) as excinfo:
        run_bundle_inprocess(bundle, "inference.json", ov)
    _expect(excinfo, cls, *fragments)
    if cls is not OutputDirError:
        _nothing_left(out)


def test_inference_good_input_runs(world, tmp_path):
    """The control: the same set-up with a valid input writes exactly one output per bundle output."""
    for b in ALL:
        out = tmp_path / b
        ov = {"ckpt_path": str(world[b]["ckpt"]), "output_dir": str(out), "dataset_dir": str(world[b]["good"])}
        if b == "isl_nucleus_seg":
            ov["stage"] = 1
        run_bundle_inprocess(b, "inference.json", ov)
        names = sorted(os.listdir(out))
        assert names and all(n.startswith("img") and n.endswith(".ome.tif") for n in names), (b, names)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _train_overrides(b, w, tmp, rows=None, drop=None):
    rows = w["rows"] if rows is None else rows
    tr = _manifest(w["train_dir"], rows, f"train_{tmp.name}.csv", drop=drop)
    va = _manifest(w["train_dir"], w["rows"], f"val_{tmp.name}.csv")
    return dict(TINY[b], **TINY_TRAIN[b], train_manifest=tr, val_manifest=va, output_dir=str(tmp / "runs"),
                ckpt_dir=str(tmp / "models"))


def _signal_col(b):
    return "path_image" if b == "unet3d_fucci" else "path_signal"


def _target_col(b):
    return {"unet3d_fucci": "path_label", "isl_cell_instance": "path_label"}.get(b, "path_target")


def tcase_missing_manifest(b, w, tmp):
    ov = _train_overrides(b, w, tmp)
    ov["train_manifest"] = str(tmp / "nope.csv")
    return ov, ManifestError, (str(tmp / "nope.csv"), "not found")


def tcase_missing_column(b, w, tmp):
    ov = _train_overrides(b, w, tmp, drop=_target_col(b))
    return ov, ManifestError, (ov["train_manifest"], "missing column")


def tcase_missing_file(b, w, tmp):
    rows = [dict(w["rows"][0], **{_signal_col(b): "gone.ome.tif"})]
    ov = _train_overrides(b, w, tmp, rows)
    return ov, ManifestError, ("gone.ome.tif", "file not found", "line 2")


def tcase_shape_mismatch(b, w, tmp):
    src = os.path.join(w["train_dir"], w["rows"][0][_signal_col(b)])
    from common.io import read_image

    arr, spacing, _ = read_image(src, spatial_dims=DIMS[b])
    small = arr[(slice(None),) * (arr.ndim - 1) + (slice(0, arr.shape[-1] - 4),)]
    name = f"small_{tmp.name}.ome.tif"
    write_ome_tiff(os.path.join(w["train_dir"], name), small, axes=_axes(b, small), spacing_um=spacing)
    ov = _train_overrides(b, w, tmp, [dict(w["rows"][0], **{_signal_col(b): name})])
    return ov, ManifestError, (name, "shape mismatch")


def tcase_nan_target(b, w, tmp):
    src = os.path.join(w["train_dir"], w["rows"][0][_target_col(b)])
    from common.io import read_image

    arr, spacing, _ = read_image(src, spatial_dims=DIMS[b])
    arr = arr.astype(np.float32)
    arr.flat[3] = np.inf
    name = f"inf_{tmp.name}.ome.tif"
    write_ome_tiff(os.path.join(w["train_dir"], name), arr, axes=_axes(b, arr), spacing_um=spacing)
    ov = _train_overrides(b, w, tmp, [dict(w["rows"][0], **{_target_col(b): name})])
    return ov, ManifestError, (name, "NaN/inf")


def tcase_constant_signal(b, w, tmp):
    src = os.path.join(w["train_dir"], w["rows"][0][_signal_col(b)])
    from common.io import read_image

    arr, spacing, _ = read_image(src, spatial_dims=DIMS[b])
    name = f"flat_{tmp.name}.ome.tif"
    write_ome_tiff(os.path.join(w["train_dir"], name), np.full_like(arr, 7.0), axes=_axes(b, arr),
                   spacing_um=spacing)
    ov = _train_overrides(b, w, tmp, [dict(w["rows"][0], **{_signal_col(b): name})])
    return ov, ManifestError, (name, "constant image")


def tcase_output_is_file(b, w, tmp):
    ov = _train_overrides(b, w, tmp)
    f = tmp / "runs"
    f.write_text("a file")
    return ov, OutputDirError, (str(f), "existing file")


def tcase_bad_boolean(b, w, tmp):
    ov = _train_overrides(b, w, tmp)
    ov["resume"] = "maybe"
    return ov, BooleanValueError, ("resume", "maybe")


def tcase_resume_other_network(b, w, tmp):
    ov = _train_overrides(b, w, tmp)
    ck = tmp / "runs" / ("checkpoints_stage0" if b == "isl_nucleus_seg" else "checkpoints")
    ov["output_dir"] = str(tmp / "runs")
    ck.mkdir(parents=True)
    sd = torch.load(w["ckpt"], weights_only=True)
    sd = {k: torch.cat([v, v]) if v.ndim >= 1 else v for k, v in sd.items()}
    torch.save({"network": sd}, ck / "checkpoint_checkpoint_epoch=1.pt")
    return ov, CheckpointMismatchError, ("checkpoint_checkpoint_epoch=1.pt", "--resume false", "--output_dir")


TRAIN_CASES = [tcase_missing_manifest, tcase_missing_column, tcase_missing_file, tcase_shape_mismatch,
               tcase_nan_target, tcase_constant_signal, tcase_output_is_file, tcase_bad_boolean,
               tcase_resume_other_network]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: c.__name__[6:])
@pytest.mark.parametrize("bundle", ALL)
def test_training_bad_input(bundle, case, world, tmp_path):
    ov, cls, fragments = case(bundle, world[bundle], tmp_path)
    with pytest.raises(Exception) as excinfo:
        run_bundle_inprocess(bundle, "train.json", ov)
    _expect(excinfo, cls, *fragments)
    if case is tcase_resume_other_network:  # the old checkpoint stays, nothing new is written
        ck = [d for d in os.listdir(tmp_path / "runs") if d.startswith("checkpoints")]
        assert sorted(os.listdir(tmp_path / "runs" / ck[0])) == ["checkpoint_checkpoint_epoch=1.pt"]
        _nothing_left(tmp_path / "models")
    elif cls is not OutputDirError:
        _nothing_left(tmp_path / "runs")
        _nothing_left(tmp_path / "models")


def test_spotlight_refuses_a_target_without_foreground(world, tmp_path):
    """A target whose Otsu foreground is one voxel is named before training (it trained silently before)."""
    w = world["spotlight_dna"]
    from common.io import read_image

    src = os.path.join(w["train_dir"], w["rows"][0]["path_target"])
    arr, spacing, _ = read_image(src)
    speck = np.zeros_like(arr)
    speck[0, 3, 10, 10] = 1000.0
    write_ome_tiff(os.path.join(w["train_dir"], "speck.ome.tif"), speck[0], spacing_um=spacing)
    ov = _train_overrides("spotlight_dna", w, tmp_path, [dict(w["rows"][0], path_target="speck.ome.tif")])
    with pytest.raises(Exception) as excinfo:
        run_bundle_inprocess("spotlight_dna", "train.json", ov)
    _expect(excinfo, NoForegroundError, "speck.ome.tif", "min_image_fg_fraction")
    _nothing_left(tmp_path / "runs")


def test_named_error_is_the_last_line(world, tmp_path):
    """On the command line, the named error is the last line the user sees, below MONAI's wrappers."""
    from zoo_testing import run_bundle

    p = tmp_path / "in" / "broken.tif"
    p.parent.mkdir()
    p.write_bytes(b"II*\x00garbage")
    w = world["fnet_baseline"]
    proc = run_bundle("fnet_baseline", "inference.json", {"dataset_dir": str(p.parent), "ckpt_path": str(w["ckpt"]),
                                                          "output_dir": str(tmp_path / "out")}, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert str(p) in last and "unreadable" in last, last
    _nothing_left(tmp_path / "out")

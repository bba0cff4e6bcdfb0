"""The zoo's bundles as MONAI Label tasks: discovery, infer tasks that return images or labels in the
input's own format, train tasks fed from the MONAI Label datastore.

Only local bundle folders are used: nothing here (nor in ``main.py``) calls a model hub.

Bundle contract used here (the zoo's conventions, see DESIGN.md):

* ``configs/inference.json`` with ``network_def``, ``preprocessing`` (it loads the file named by the
  ``image`` key), ``inferer`` and ``postprocessing`` that maps ``pred`` back onto the input grid
  (``Invertd``); ``configs/metadata.json`` with ``network_data_format``;
* weights in ``models/model.pt`` (plain state_dict) or ``models/model.ts``;
* for training: ``configs/train.json`` with ``train#datalist`` and ``validate#datalist`` (lists of
  ``{"image": path, "label": path}``), or MONAI's ``train#dataset#data`` / ``validate#dataset#data``;
  the best model is saved to ``models/model.pt`` (``ckpt_dir``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import numpy as np
import torch
from monai.transforms import SaveImaged
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleConstants as TrainConstants
from monailabel.tasks.train.bundle import BundleTrainTask

from .safety import RequestRejected

logger = logging.getLogger(__name__)

IMAGE, SEGMENTATION = "image", "segmentation"
# What each bundle of the zoo returns; bundles not listed are classified from their metadata.
KNOWN_KINDS = {
    "fnet_baseline": IMAGE,
    "spotlight_dna": IMAGE,
    "isl_nucleus_seg": SEGMENTATION,
    "isl_cell_instance": SEGMENTATION,
    "unet3d_fucci": SEGMENTATION,
}
SEGMENTATION_FORMATS = {"segmentation", "labels", "label", "instance", "instances", "classes", "mask"}
# Config overrides every MONAI Label training of a bundle needs (before --conf train_overrides):
# isl_nucleus_seg's train.json defaults to its ISL pretraining stage (target = a stain image); annotators'
# labels are nucleus masks, i.e. stage 1, fine-tuned from the served models/model.pt (MONAI Label's
# "pretrained" loader) rather than re-initialised from the stage-0 weights.
TRAIN_DEFAULTS = {
    "isl_nucleus_seg": {"stage": 1, "init": "scratch"},
}
# What an annotator's label holds for each segmentation bundle of the zoo: "classes" (the class ids named by the
# output's channel_def, e.g. 0 background / 1 nucleus) or "instances" (0 background, any positive integer one
# object). Bundles not listed: the classes 0..num_classes-1 when train.json has num_classes, else instances.
KNOWN_LABELS = {
    "isl_nucleus_seg": "classes",
    "unet3d_fucci": "classes",
    "isl_cell_instance": "instances",
}
# Datastore file types, in the order MONAI Label's LocalDatastore needs: it takes the *last* pattern a
# file name ends with as the extension, so "x.ome.tif" must meet "*.ome.tif" after "*.tif" (id "x").
DATASTORE_EXTENSIONS = ["*.nii", "*.nii.gz", "*.tif", "*.tiff", "*.ome.tif", "*.ome.tiff", "*.png"]


# ------------------------------------------------------------------------------------------ discovery
def read_metadata(bundle_path: str) -> dict:
    with open(os.path.join(bundle_path, "configs", "metadata.json")) as f:
        return json.load(f)


def find_bundles(zoo_dir: str) -> dict[str, str]:
    """``{name: path}`` of the bundle folders (with ``configs/metadata.json``) in ``zoo_dir``."""
    if not os.path.isdir(zoo_dir):
        raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"zoo_dir {zoo_dir}: folder not found")
    return {n: os.path.join(zoo_dir, n) for n in sorted(os.listdir(zoo_dir))
            if os.path.isfile(os.path.join(zoo_dir, n, "configs", "metadata.json"))}


def bundle_kind(name: str, metadata: dict) -> str:
    """``"image"`` (virtual staining: returns an intensity image) or ``"segmentation"`` (returns labels)."""
    if name in KNOWN_KINDS:
        return KNOWN_KINDS[name]
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    fmt = str(next(iter(outputs.values()), {}).get("format", "")).lower()
    return SEGMENTATION if fmt in SEGMENTATION_FORMATS else IMAGE


def spatial_dims(metadata: dict) -> int:
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    return len(next(iter(inputs.values()), {}).get("spatial_shape", [0, 0, 0]))


def _first_input(metadata: dict) -> dict:
    return next(iter(metadata.get("network_data_format", {}).get("inputs", {}).values()), {})


def _first_output(metadata: dict) -> dict:
    return next(iter(metadata.get("network_data_format", {}).get("outputs", {}).values()), {})


def label_spec(name: str, bundle_path: str, kind: str, metadata: dict | None = None) -> dict:
    """What a label saved for training ``name`` must be: ``{"bundle", "dims", "kind", "classes", "channels"}``.

    ``classes`` is ``{id: name}`` for a bundle trained on class maps, None for one trained on instance labels
    (any non-negative integers); ``channels`` is the channel count of a virtual-staining target (``kind`` image).
    """
    metadata = metadata if metadata is not None else read_metadata(bundle_path)
    out = _first_output(metadata)
    spec = {"bundle": name, "dims": spatial_dims(metadata), "kind": kind, "classes": None,
            "channels": int(out.get("num_channels", 1))}
    if kind != SEGMENTATION:
        return spec
    defs = {int(k): str(v) for k, v in (out.get("channel_def") or {}).items() if str(k).isdigit()}
    mode = KNOWN_LABELS.get(name)
    n_classes = None
    train_json = os.path.join(bundle_path, "configs", "train.json")
    if os.path.isfile(train_json):
        with open(train_json) as f:
            n_classes = json.load(f).get("num_classes")
    if mode == "classes" or (mode is None and isinstance(n_classes, int)):
        ids = range(n_classes) if isinstance(n_classes, int) else sorted(defs)
        spec["classes"] = {i: defs.get(i, f"class {i}") for i in ids}
    return spec


def describe_label(spec: dict) -> str:
    """A label spec in words, for error messages and the docs."""
    grid = "ZYX" if spec["dims"] == 3 else "YX"
    if spec["kind"] != SEGMENTATION:
        return (f"{spec['bundle']} trains on the paired target image: {spec['channels']} channel(s), finite values, "
                f"on the image's {grid} grid")
    if spec["classes"] is None:
        what = "instance labels (0 background, one positive integer per object)"
    else:
        what = "class ids " + ", ".join(f"{i} {n}" for i, n in spec["classes"].items())
    return f"{spec['bundle']} trains on one channel of {what} on the image's {grid} grid"


def label_problem(label_path: str, image_path: str, spec: dict, label_name: str | None = None) -> str | None:
    """Why ``label_path`` cannot be a training label of ``image_path`` for the bundle of ``spec`` (None if it can):
    unreadable, non-finite, another grid than the image's (the spatial shape, ``ZYX`` for a 3D bundle, ``YX``
    for a 2D one), several channels, negative or non-integer values, or classes the bundle does not know."""
    from common.io import ImageReadError, read_image

    name = label_name or os.path.basename(label_path)
    dims = spec["dims"]
    try:
        lab, _, _ = read_image(label_path, spatial_dims=dims)
    except ImageReadError as e:
        return f"label {name}: {e.problem}" + (f" ({spec['bundle']} is a {dims}D bundle)" if "dimension" in e.problem
                                               else "")
    try:
        img, _, _ = read_image(image_path, spatial_dims=dims, check_finite=False)
    except ImageReadError as e:
        return f"image {os.path.basename(image_path)} is not a {dims}D image for {spec['bundle']}: {e.problem}"
    grid = "ZYX" if dims == 3 else "YX"
    if tuple(lab.shape[1:]) != tuple(img.shape[1:]):
        return (f"label {name}: spatial shape {tuple(lab.shape[1:])} != the image's {tuple(img.shape[1:])} ({grid}); "
                "a label must be on the image's grid")
    if spec["kind"] != SEGMENTATION:
        if lab.shape[0] != spec["channels"]:
            return f"label {name}: {lab.shape[0]} channel(s); {spec['bundle']} trains on {spec['channels']}"
        return None
    if lab.shape[0] != 1:
        return f"label {name}: {lab.shape[0]} channels; a label is one channel of integer ids"
    if lab.dtype.kind == "b":
        lab = lab.astype(np.uint8)
    if lab.dtype.kind == "f" and not np.array_equal(lab, np.round(lab)):
        return f"label {name}: non-integer values (e.g. {float(lab[lab != np.round(lab)].flat[0])}); labels are integer ids"
    values = np.unique(lab)
    if values.size and values[0] < 0:
        return f"label {name}: negative values (e.g. {values[0]:g}); labels are ids >= 0"
    if spec["classes"] is not None:
        unknown = [int(v) for v in values if int(v) not in spec["classes"]]
        if unknown:
            known = ", ".join(f"{i} {n}" for i, n in spec["classes"].items())
            return (f"label {name}: class(es) {unknown[:10]} unknown to {spec['bundle']} (it knows {known}); "
                    "for instance labels, save them for a bundle trained on instances")
    return None


def select(names: str | None, available: list[str], what: str) -> list[str]:
    """Names from a ``--conf`` value: ``all``, ``none`` or a comma-separated list (unknown names are an error)."""
    names = (names or "all").strip()
    if names.lower() == "all":
        return list(available)
    if names.lower() in ("none", ""):
        return []
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise MONAILabelException(MONAILabelError.APP_INIT_ERROR,
                                  f"--conf {what}: unknown bundle(s) {unknown}; available: {available}")
    return chosen


def choose_trainers(served: list[str], kinds: dict[str, str], available: list[str], selection: str | None) -> list[str]:
    """Bundles that get a train task: ``segmentation`` (default) = the served segmentation bundles;
    otherwise :func:`select` (``all``, ``none`` or a list), restricted to the served bundles."""
    if (selection or SEGMENTATION).strip().lower() == SEGMENTATION:
        return [n for n in served if kinds[n] == SEGMENTATION]
    return [n for n in select(selection, available, "train_models") if n in served]


def parse_overrides(text: str | None, bundles: list[str]) -> dict[str, dict]:
    """``--conf train_overrides '<json>'``: config overrides for every train run, either for all bundles
    (``{"epoch_length": 50}``) or per bundle (``{"isl_nucleus_seg": {"batch_size": 4}}``), or both."""
    try:
        raw = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"--conf train_overrides: not JSON ({e})") from e
    if not isinstance(raw, dict):
        raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, "--conf train_overrides: must be a JSON object")
    common = {k: v for k, v in raw.items() if k not in bundles}
    out = {}
    for b in bundles:
        per = raw.get(b, {})
        if not isinstance(per, dict):
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"--conf train_overrides: '{b}' must map to an object")
        out[b] = {**TRAIN_DEFAULTS.get(b, {}), **common, **per}
    return out


# ------------------------------------------------------------------------------------------ writing
def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _suffix(path: str) -> str:
    low = path.lower()
    for s in (".ome.tiff", ".ome.tif", ".nii.gz", ".nii", ".tiff", ".tif", ".png"):
        if low.endswith(s):
            return s
    return os.path.splitext(low)[1]


def write_result(pred, image_path: str, kind: str, dims: int, extension: str | None = None) -> str:
    """Write a ``CZYX``/``CYX`` prediction on the grid of ``image_path`` to a temporary file; returns its path.

    The file has the input's format where that format can hold the result: NIfTI in -> NIfTI out (with the
    input's affine), PNG in -> PNG out for labels, OME-TIFF (with the input's voxel size) otherwise, e.g. for
    the float images of the virtual-staining bundles. ``extension`` (``.nii.gz``, ``.ome.tif``, ``.png``)
    forces a format. A prediction whose spatial shape differs from the input's is an error (the bundle's
    postprocessing must map it back, e.g. with ``Invertd``).
    """
    from common.io import read_image, write_ome_tiff

    arr = _as_numpy(pred)
    if arr.ndim == dims:
        arr = arr[None]
    if arr.ndim != dims + 1:
        raise MONAILabelException(MONAILabelError.INFERENCE_ERROR,
                                  f"prediction has shape {arr.shape}; expected {dims} spatial dims plus channels")
    src, spacing, known = read_image(image_path, spatial_dims=dims, check_finite=False)
    if tuple(arr.shape[1:]) != tuple(src.shape[1:]):
        raise MONAILabelException(
            MONAILabelError.INFERENCE_ERROR,
            f"prediction spatial shape {arr.shape[1:]} != input {src.shape[1:]} ({image_path}); the bundle's "
            "postprocessing must map the prediction back onto the input grid (Invertd)")
    if kind == SEGMENTATION:
        if not np.allclose(arr, np.round(arr)):
            raise MONAILabelException(MONAILabelError.INFERENCE_ERROR,
                                      "segmentation bundle returned non-integer values; expected labels")
        arr = np.round(arr)
        arr = arr.astype(np.uint8 if arr.min() >= 0 and arr.max() < 256 else
                         np.uint16 if arr.min() >= 0 and arr.max() < 65536 else np.int32)
    else:
        arr = arr.astype(np.float32)
    in_ext = _suffix(image_path)
    ext = extension or (in_ext if in_ext in (".nii", ".nii.gz") else
                        ".png" if in_ext == ".png" and kind == SEGMENTATION and arr.shape[0] == 1
                        and arr.dtype in (np.uint8, np.uint16) else ".ome.tif")
    fd, out = tempfile.mkstemp(suffix=ext)
    os.close(fd)
    try:
        if ext in (".nii", ".nii.gz"):
            import nibabel as nib

            # common.io reads NIfTI (X, Y, Z[, C]) as (C,) Z, Y, X: write the full transpose back
            data = arr.transpose(*reversed(range(arr.ndim)))
            data = data[..., 0] if data.shape[-1] == 1 else data
            if in_ext in (".nii", ".nii.gz"):
                affine = nib.load(image_path).affine
            else:
                affine = np.diag(list(reversed(spacing)) + [1.0] * (4 - dims))
            nib.save(nib.Nifti1Image(data, affine), out)
        elif ext == ".png":
            from PIL import Image

            Image.fromarray(arr[0]).save(out, format="PNG")
        else:
            axes = "ZYX"[-dims:]
            data, axes = (arr[0], axes) if arr.shape[0] == 1 else (arr, "C" + axes)
            write_ome_tiff(out, data, axes=axes, spacing_um=spacing if known else None)
    except BaseException:
        os.remove(out)
        raise
    return out


# ------------------------------------------------------------------------------------------ infer
class ZooInferTask(BundleInferTask):
    """A zoo bundle as a MONAI Label infer task.

    Virtual-staining bundles (``kind="image"``) return a float32 image (type ``others``, no label names);
    segmentation bundles return integer labels (type ``segmentation``). The bundle's own savers (``Save*``
    transforms of its postprocessing) are skipped: MONAI Label returns the result to the client instead.
    Weights must match ``network_def`` exactly (strict loading).
    """

    def __init__(self, path: str, conf: dict, kind: str, **kwargs):
        self.kind = kind
        infer_type = InferType.SEGMENTATION if kind == SEGMENTATION else InferType.OTHERS
        super().__init__(path, conf, type=infer_type, post_filter=[SaveImaged], add_post_restore=False,
                         load_strict=True, **kwargs)
        if not self.valid:
            return
        self.name = os.path.basename(os.path.normpath(path))
        self.spatial_dims = self.dimension
        if kind == IMAGE:
            self.labels = {}  # an intensity image has no segment names
        self.in_channels = self._network_in_channels()

    def _network_in_channels(self) -> int:
        """The network's input channels: its config (``in_channels``, ``network_def#in_channels``, ...), else the
        metadata's ``num_channels``."""
        for key in ("in_channels", "network_def#in_channels", "network_def#base#in_channels", "base_def#in_channels"):
            try:
                value = self.bundle_config.get_parsed_content(key, instantiate=False)
            except Exception:  # not there, or not a plain value
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return int(_first_input(read_metadata(self.bundle_path)).get("num_channels", 1))

    def expected_input(self) -> str:
        """The input this model takes, in words (for error messages)."""
        inp = _first_input(read_metadata(self.bundle_path))
        grid = "ZYX" if self.dimension == 3 else "YX"
        names = ", ".join(str(v) for v in (inp.get("channel_def") or {}).values())
        return (f"a {self.dimension}D image ({grid}, or C{grid} with the channel first) that its preprocessing turns "
                f"into {self.in_channels} channel(s)" + (f": {names}" if names else ""))

    def run_pre_transforms(self, data, transforms):
        """The bundle's preprocessing, then a check that the result is what the network takes; an image it cannot
        take is a :class:`RequestRejected` (422) naming the problem and the expected input, before the network runs."""
        from common.io import ImageReadError

        name = os.path.basename(str(data.get("image_path") or data.get("image") or "the image"))
        try:
            data = super().run_pre_transforms(data, transforms)
        except Exception as e:
            cause, problem = e, None
            while cause is not None and problem is None:
                if isinstance(cause, ImageReadError):
                    problem = cause.problem
                cause = cause.__cause__ or cause.__context__
            if problem is None:
                root = e
                while root.__cause__ is not None or root.__context__ is not None:
                    root = root.__cause__ or root.__context__
                problem = f"its preprocessing failed ({type(root).__name__}: {str(root)[:300]})"
            raise RequestRejected(422, f"{self.name} cannot take {name}: {problem}; it expects "
                                       f"{self.expected_input()}") from e
        img = data.get(self.input_key)
        shape = tuple(getattr(img, "shape", ()))
        if len(shape) != self.dimension + 1 or shape[0] != self.in_channels:
            got = (f"{shape[0]} channel(s)" if len(shape) == self.dimension + 1
                   else f"{len(shape) - 1} spatial dimension(s) (shape {shape})")
            raise RequestRejected(422, f"{self.name} cannot take {name}: after preprocessing it has {got}; it expects "
                                       f"{self.expected_input()}")
        return data

    def _filter_transforms(self, transforms, filters):
        kept = super()._filter_transforms(transforms, filters)
        # a bundle's own writers (SaveImaged, common.io.SaveOmeTiffd, ...) would write into the bundle folder
        return [t for t in (kept or []) if not type(t).__name__.startswith("Save")]

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["output"] = self.kind
        return i

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        ext = extension or data.get("result_extension")
        out = write_result(data[self.output_label_key], data["image_path"], self.kind, self.dimension,
                           ext if isinstance(ext, str) and ext else None)
        result = dict(data.get(self.output_json_key) or {})
        result.update({"output": self.kind, "format": _suffix(out)})
        return out, result


# ------------------------------------------------------------------------------------------ train
class ZooTrainConstants(TrainConstants):
    """Where a zoo bundle's train.json takes its data lists."""

    def __init__(self, train_key: str, val_key: str):
        self._train_key, self._val_key = train_key, val_key

    def key_train_dataset_data(self) -> str:
        return self._train_key

    def key_validate_dataset_data(self) -> str:
        return self._val_key


def datalist_keys(train_config: dict) -> tuple[str, str] | None:
    """The config ids that take the training / validation data lists, or None."""
    train, val = train_config.get("train", {}), train_config.get("validate", {})
    if isinstance(train, dict) and "datalist" in train and isinstance(val, dict) and "datalist" in val:
        return "train#datalist", "validate#datalist"
    if isinstance(train.get("dataset"), dict) and "data" in train["dataset"]:
        return "train#dataset#data", "validate#dataset#data"
    return None


class ZooTrainTask(BundleTrainTask):
    """Fine-tune a zoo bundle on the datastore's images with ``final`` labels.

    Besides MONAI Label's bundle training it

    * feeds the datastore's images that have a label under ``label_tag`` (request option, default
      ``final``; one tag per bundle lets one studies folder hold e.g. nucleus and cell labels) into
      ``train#datalist`` / ``validate#datalist`` as ``[{"image", "label"}]``, and checks every pair first
      (readable, finite, same shape): bad input is named before training;
    * maps the client's ``max_epochs`` onto the bundle's ``num_epochs`` as well (the zoo's configs derive
      the validation interval from it), and starts a fresh run (``resume: false``) from ``models/model.pt``
      when it exists (``pretrained``) rather than resuming an older interrupted one;
    * validates on the training images when the split leaves no validation image (a warning), so that the
      best model is still saved to ``models/model.pt``;
    * applies the server's ``--conf train_overrides``.
    """

    def __init__(self, path: str, conf: dict, overrides: dict | None = None):
        with open(os.path.join(path, "configs", "train.json")) as f:
            raw = json.load(f)
        keys = datalist_keys(raw)
        self.usable = keys is not None
        self.extra_overrides = dict(overrides or {})
        self.top_keys = set(raw)
        if keys is None:
            logger.warning(f"{path}: train.json has neither train#datalist nor train#dataset#data; "
                           "it cannot take MONAI Label's datastore, no train task")
            keys = ("train#datalist", "validate#datalist")
        super().__init__(path, conf, const=ZooTrainConstants(*keys), load_strict=True)
        self.valid = self.valid and self.usable
        self.name = os.path.basename(os.path.normpath(path))
        metadata = read_metadata(path)
        self.spatial_dims = spatial_dims(metadata)
        self.label_spec = label_spec(self.name, path, bundle_kind(self.name, metadata), metadata)

    def config(self):
        c = super().config()
        c["max_epochs"] = 10
        c["label_tag"] = "final"  # train on the labels saved under this tag
        return c

    def _fetch_datalist(self, request, datastore):
        from common.data import ManifestError, validate_records

        tag = str(request.get("label_tag") or "final")
        records = []
        for image_id in sorted(datastore.list_images()):
            label_id = datastore.get_label_by_image_id(image_id, tag)
            if label_id:
                records.append({"image": datastore.get_image_uri(image_id),
                                "label": datastore.get_label_uri(label_id, tag)})
        logger.info(f"{self.name}: {len(records)} image(s) with a '{tag}' label")
        if not records:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT,
                                      f"{self.name}: no image has a '{tag}' label yet; save labels first")
        try:
            validate_records([dict(r, _manifest="MONAI Label datastore", _line=i) for i, r in enumerate(records, 1)],
                             image_keys=("image", "label"), spatial_dims=self.spatial_dims,
                             same_shape=("image", "label"), nonconstant=("image",))
        except ManifestError as e:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"{self.name}: {e}") from e
        for r in records:
            problem = label_problem(r["label"], r["image"], self.label_spec,
                                    label_name=os.path.relpath(r["label"], os.path.dirname(r["image"])))
            if problem:
                raise MONAILabelException(MONAILabelError.INVALID_INPUT,
                                          f"{self.name}: {problem} (expected: {describe_label(self.label_spec)})")
        return records

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, val = super()._partition_datalist(datalist, request, shuffle)
        if val is not None and not val:
            logger.warning(f"{self.name}: no validation image after the split; validating on the training images")
            val = list(train)
        return train, val

    def _update_overrides(self, overrides):
        overrides.update(self.extra_overrides)
        max_epochs = overrides.get(self.const.key_train_trainer_max_epochs())
        if "num_epochs" in self.top_keys and max_epochs is not None:
            overrides["num_epochs"] = max_epochs
        if "resume" in self.top_keys:
            overrides["resume"] = False
        return overrides

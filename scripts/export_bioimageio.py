"""Export a bundle's trained model as a bioimage.io model package (Fiji/deepImageJ, ilastik, QuPath, napari).

Usage::

    python scripts/export_bioimageio.py bundles/fnet_baseline --out bioimageio/fnet_baseline
    python scripts/export_bioimageio.py bundles/fnet_baseline --out pkg --ckpt runs/models/model.pt --sample my_stack.ome.tif
    bioimageio test pkg/rdf.yaml

The package (a folder, plus ``<out>.zip`` with ``--zip``) holds ``rdf.yaml`` at the current model
format (bioimageio.spec), TorchScript and state-dict weights (the state dict is rebuilt from the
model record with ``common.networks.record.build_network``), input/output axes whose sizes follow
the bundle's ``network_data_format`` (``"16*n"`` -> min 16, step 16), the preprocessing the spec
can express, test input/output tensors computed from the bundle's sample with the bundle's own
preprocessing, a cover image, documentation (with a validation section and what the spec cannot
express), citations and the licence.

The sample: ``--sample`` (an image file the bundle reads), else the bundle's synthetic phantom
(``common.synthetic``) at the network's voxel size, cropped or padded to one inference patch, so
the bundle's sliding-window inference and the package's whole-tensor prediction see the same
input and give the same output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np
import torch

SPEC = {
    # zmuv: zero_mean_unit_variance over these axes ("all" = the whole image, "space" = per channel)
    "fnet_baseline": {
        "spatial_dims": 3, "zmuv": "all", "post": None, "raw_input": True, "output_names": ["dna"],
        "input_names": ["transmitted_light"],
        "not_expressed": [
            "Resampling: the bundle resamples the input to the voxel size the model was trained at "
            "({spacing} um, ZYX) and the prediction back to the input grid. Give the package an image "
            "at that voxel size (the input axes carry it as `scale`).",
            "Any-size input: the bundle pads to a multiple of 16 and runs gaussian-blended sliding "
            "windows of {patch}; the package takes sizes that are multiples of 16 directly.",
        ],
    },
    "spotlight_dna": {
        "spatial_dims": 3, "zmuv": None, "post": None, "raw_input": False, "output_names": ["dna"],
        "input_names": ["transmitted_light_otsu"],
        "not_expressed": [
            "Otsu standardisation (Spotlight): the bundle standardises the input with the mean and "
            "standard deviation of its Otsu foreground; the spec has no such step, so the package "
            "input is the standardised image (`common.spotlight.OtsuStandardize`).",
            "Resampling to the training voxel size ({spacing} um, ZYX), as in fnet_baseline.",
            "Any-size input: padding to a multiple of 16 and sliding windows of {patch}.",
        ],
    },
    "isl_nucleus_seg": {
        "spatial_dims": 2, "zmuv": "space", "post": None, "raw_input": True, "output_names": ["nucleus_probability"],
        "input_names": None,
        "not_expressed": [
            "Thresholding: the bundle writes the binary mask `probability > {threshold}`; the package "
            "outputs the probability (threshold it in the consumer).",
            "Stage 0 (in-silico labelling, the predicted DAPI stain) is a separate model (`--stage 0`).",
        ],
    },
    "isl_cell_instance": {
        "spatial_dims": 2, "zmuv": "all", "post": None, "raw_input": True,
        "output_names": ["normalised_distance", "cell"], "input_names": ["dic"],
        "not_expressed": [
            "Instances: the bundle turns the distance map and the mask into cell instances with an "
            "h-maxima watershed (h = {h}, mask threshold {mask_threshold}, min size {min_size} px); the "
            "package outputs the two maps (`common.isl.DistanceMaskToInstances` does the rest).",
        ],
    },
    "unet3d_fucci": {
        "spatial_dims": 3, "zmuv": None, "post": "softmax", "raw_input": False,
        "output_names": ["background", "edge", "nucleus"], "input_names": None,
        "not_expressed": [
            "Preprocessing: the bundle selects the nuclear channel(s), scales each to its 0.5-99.8 "
            "percentiles, clips to [0, 1], then applies a background threshold, gamma, CLAHE and a "
            "median filter (settings in the model record); the spec cannot express CLAHE and the "
            "median filter, so the package input is the preprocessed image.",
            "Instances and FUCCI phases: the bundle splits nuclei with a watershed and assigns a "
            "cell-cycle phase per nucleus from the reporter channels (`scripts/fucci_phase_analysis.py`); "
            "the package outputs the background/edge/nucleus probabilities.",
        ],
    },
}

# bioimageio.core (0.11) computes (x - mean) / (std + 1e-6) whatever eps the package states; the bundles
# divide by std. Both agree for images in camera counts (std >> 1e-6); a sample in [0, 1] with std ~0.01
# would differ by 1e-4 relative, which a trained network amplifies past the reproduction tolerance
ZMUV_EPS = 1e-6
CAMERA_RANGE = (100.0, 60000.0)  # 16-bit camera counts: where raw samples are put (z-scoring ignores the affine map)
DOI = re.compile(r"(10\.\d{4,9}/[^\s,;)]+)")
URL = re.compile(r"(https?://[^\s,;)]+)")
# references the bundles cite, with identifiers checked by hand (text as in metadata.json)
KNOWN_IDS = {
    "Ounkomol": {"doi": "10.1038/s41592-018-0111-2"},
    "Christiansen": {"doi": "10.1016/j.cell.2018.03.040"},
    "Ljosa": {"doi": "10.1038/nmeth.2083"},
    "Koos": {"doi": "10.1038/srep30420"},
    "Sakaue-Sawano": {"doi": "10.1016/j.cell.2007.12.033"},
    "Huang G": {"url": "https://arxiv.org/abs/1608.06993"},
    "Cicek": {"url": "https://arxiv.org/abs/1606.06650"},
    "arXiv:2507.05383": {"url": "https://arxiv.org/abs/2507.05383"},
}


class ExportError(ValueError):
    """The bundle cannot be exported as given (no weights, unknown bundle, unreadable sample)."""


def _parser(bundle_dir: str, ckpt: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser["bundle_root"] = bundle_dir
    parser["ckpt_path"] = ckpt
    return parser


def _multiple(expr: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", str(expr))
    if not m:
        raise ExportError(f"spatial_shape '{expr}' is not of the form 'k*n'")
    return int(m.group(1))


def _synthetic_sample(bundle: str, shape, in_channels: int, spacing) -> np.ndarray:
    """The bundle's synthetic phantom (channel-first) with the spatial ``shape``."""
    from common import synthetic

    if bundle in ("fnet_baseline", "spotlight_dna"):
        f = synthetic.make_cell_field_3d(shape=tuple(shape), n_cells=6, seed=0, spacing_um=tuple(spacing))
        return f["signal"][None]
    if bundle == "isl_nucleus_seg":
        f = synthetic.make_isl_2d(shape=tuple(shape), n_cells=12, seed=0)
        bf = f["brightfield"] if f["brightfield"].ndim == 3 else f["brightfield"][None]
        chans = list(bf) + [f["phase"]]
        return np.stack([chans[i % len(chans)] for i in range(in_channels)]).astype(np.float32)
    if bundle == "isl_cell_instance":
        f = synthetic.make_dic_membrane_2d(shape=tuple(shape), n_cells=10, seed=0)
        dic = f["dic"] if f["dic"].ndim == 3 else f["dic"][None]
        return np.stack([dic[i % len(dic)] for i in range(in_channels)]).astype(np.float32)
    if bundle == "unet3d_fucci":
        f = synthetic.make_fucci_spheroid(shape=tuple(shape), n_nuclei=12, seed=0)
        return f["image"].astype(np.float32)
    raise ExportError(f"no sample for bundle '{bundle}'")


def _fit(arr: np.ndarray, shape) -> np.ndarray:
    """Centre-crop or zero-pad the spatial axes of a channel-first array to ``shape``."""
    out = np.zeros((arr.shape[0],) + tuple(shape), arr.dtype)
    src, dst = [slice(None)], [slice(None)]
    for n, m in zip(arr.shape[1:], shape):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(None))
        else:
            a = (m - n) // 2
            src.append(slice(None))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _cover(path: str, x: np.ndarray, y: np.ndarray) -> None:
    """Input | output side by side (middle plane, first channel of each), as a PNG."""
    from PIL import Image

    def plane(a):
        a = a[0]
        a = a[a.shape[0] // 2] if a.ndim == 3 else a
        lo, hi = np.percentile(a, [0.5, 99.5])
        return (np.clip((a - lo) / (hi - lo + 1e-12), 0, 1) * 255).astype(np.uint8)

    a, b = plane(x), plane(y)
    gap = np.full((a.shape[0], 8), 255, np.uint8)
    img = np.concatenate([a, gap, b], 1)
    scale = max(1, 256 // img.shape[0])
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)


def _cite(references, data_source: str):
    from bioimageio.spec.model.v0_5 import CiteEntry

    out = []
    for text in references:
        ids = next((v for k, v in KNOWN_IDS.items() if k in text), None)
        if ids is None:
            m = DOI.search(text) or URL.search(text)
            ids = {"doi": m.group(1)} if m and m.re is DOI else {"url": m.group(1)} if m else None
        if ids is None:
            ids = {"url": "https://scholar.google.com/scholar?q=" + re.sub(r"[^A-Za-z0-9]+", "+", text[:150]).strip("+")}
        out.append(CiteEntry(text=text, **ids))
    for url in URL.findall(data_source or ""):
        out.append(CiteEntry(text=f"Data: {data_source}"[:1000], url=url.rstrip(".")))
    return out


def _documentation(bundle: str, meta: dict, spec: dict, fmt: dict, checks: dict) -> str:
    lines = [f"# {meta.get('name', bundle)}", "", meta.get("description", ""), "",
             f"Exported from the MONAI bundle `{bundle}` (labelfree-zoo, version {meta.get('version')}) by "
             "`scripts/export_bioimageio.py`. Task: " + meta.get("task", ""), "",
             "## Input and output", "",
             f"- Input `{checks['input_id']}`: axes {checks['input_axes']}, spatial sizes a multiple of "
             f"{checks['multiple']} (at least {checks['multiple']}); {checks['input_desc']}.",
             f"- Preprocessing in the package: {checks['pre_desc']}.",
             f"- Output `{checks['output_id']}`: {', '.join(spec['output_names'])}; same spatial size as the input."
             + (" Softmax over the channels (class probabilities)." if spec["post"] == "softmax" else ""), "",
             "## What the bioimage.io format cannot express", "",
             "The bundle (`python -m monai.bundle run --config_file bundles/" + bundle + "/configs/inference.json`) "
             "does more than the package can describe; do these steps yourself or run the bundle:", ""]
    lines += [f"- {s.format(**checks['settings'])}" for s in spec["not_expressed"]]
    lines += ["", "## Validation", "",
              f"- The test tensors come from {checks['sample_desc']}, preprocessed by the bundle's own "
              "transforms; the test output is the network's output on one inference patch.",
              f"- TorchScript vs state-dict weights on the test input: max |difference| {checks['ts_diff']:.2e}.",
              "- `bioimageio test rdf.yaml` (bioimageio.core) reproduces the test output from the test input "
              "with both weight formats; the zoo's tests also check that the package's test output equals "
              "the bundle's own sliding-window inference on the same input.",
              ]
    metrics = meta.get("eval_metrics")
    if metrics:
        lines += [f"- Figures of the bundle's trained model (metadata.json `eval_metrics`): {metrics}."]
    lines += ["", "## Training data", "", meta.get("data_source", "see the bundle README"), "",
              "## Intended use", "", meta.get("intended_use", "Research only."), "",
              "## Citations", ""] + [f"- {r}" for r in meta.get("references", [])]
    lines += ["", "## Licence", "", "Apache-2.0 (code and weights), as the labelfree-zoo bundle.", ""]
    return "\n".join(lines)


def export(bundle_dir: str, out: str, ckpt: str | None = None, sample: str | None = None, zip: bool = False) -> str:
    """Write the bioimage.io package of ``bundle_dir`` into the folder ``out``; returns the ``rdf.yaml`` path.

    Args:
        bundle_dir: a bundle folder (``bundles/<name>``).
        out: the package folder to write (replaced when it exists).
        ckpt: the weights (default ``<bundle>/models/model.pt``, with its record ``model.json``).
        sample: an image the bundle reads, for the test tensors and the cover (default: the
            bundle's synthetic phantom).
        zip: also write ``<out>.zip`` (the form bioimage.io uploads take).
    """
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder
    from bioimageio.spec.model.v0_5 import (ArchitectureFromLibraryDescr, Author, AxisId, BatchAxis, ChannelAxis,
                                            FileDescr, Identifier, InputTensorDescr, IntervalOrRatioDataDescr,
                                            ModelDescr, OutputTensorDescr, ParameterizedSize,
                                            PytorchStateDictWeightsDescr, SizeReference, SoftmaxDescr,
                                            SoftmaxKwargs, SpaceInputAxis, SpaceOutputAxis, TensorId,
                                            TorchscriptWeightsDescr, Version, WeightsDescr,
                                            ZeroMeanUnitVarianceDescr, ZeroMeanUnitVarianceKwargs)

    from common.io import read_image, write_ome_tiff
    from common.networks.record import network_config, read_record

    bundle_dir = os.path.abspath(str(bundle_dir).rstrip("/"))
    bundle = os.path.basename(bundle_dir)
    if bundle not in SPEC:
        raise ExportError(f"{bundle_dir}: unknown bundle (known: {', '.join(SPEC)})")
    spec = SPEC[bundle]
    ckpt = os.path.abspath(ckpt or os.path.join(bundle_dir, "models", "model.pt"))
    if not os.path.isfile(ckpt):
        raise ExportError(f"{ckpt}: no weights to export; train the bundle (or give --ckpt <model.pt>)")
    if read_record(ckpt) is None:
        raise ExportError(f"{ckpt}: no model record ({os.path.splitext(ckpt)[0]}.json) beside the weights; "
                          "export models trained by the zoo (the record defines the network)")
    if sample is not None and not os.path.exists(sample):
        raise ExportError(f"{sample}: sample image not found")
    meta = json.load(open(os.path.join(bundle_dir, "configs", "metadata.json")))
    fmt = meta["network_data_format"]
    (in_id, in_fmt), = fmt["inputs"].items()
    (out_id, out_fmt), = fmt["outputs"].items()
    multiple = max(_multiple(s) for s in in_fmt["spatial_shape"])

    parser = _parser(bundle_dir, ckpt)
    net = parser.get_parsed_content("network_def").eval()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) and "model" in state else state
    net.load_state_dict(state)
    nd = spec["spatial_dims"]
    patch = [int(p) for p in parser["patch_size"]]
    patch = [max(multiple, p // multiple * multiple) for p in patch]
    settings = {"patch": "x".join(map(str, patch))}
    for k in ("threshold", "h", "mask_threshold", "min_size"):
        if k in parser.config:
            settings[k] = parser[k]
    spacing = None
    if "target_spacing_um" in parser.config:
        spacing = [float(s) for s in parser.get_parsed_content("target_spacing_um")]
        settings["spacing"] = "x".join(f"{s:g}" for s in spacing)
    in_channels = next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))).in_channels

    work = tempfile.mkdtemp(prefix="bioimageio_export_")
    try:
        # the sample, one patch big, at the network's voxel size, as a file the bundle reads
        if sample is not None:
            raw, _, _ = read_image(sample, spatial_dims=nd)
            raw = _fit(raw.astype(np.float32), patch)
            sample_desc = f"`{os.path.basename(sample)}` (centre {settings['patch']})"
        else:
            raw = _fit(_synthetic_sample(bundle, patch, in_channels, spacing or [1.0] * nd), patch)
            sample_desc = "the bundle's synthetic phantom (common.synthetic, seed 0)"
        if spec["zmuv"] is not None and spec["raw_input"]:
            lo = raw.reshape(len(raw), -1).min(1).reshape((-1,) + (1,) * nd)
            hi = raw.reshape(len(raw), -1).max(1).reshape((-1,) + (1,) * nd)
            raw = (CAMERA_RANGE[0] + (raw - lo) / np.maximum(hi - lo, 1e-12) * (CAMERA_RANGE[1] - CAMERA_RANGE[0]))
            raw = raw.astype(np.float32)
        sample_path = os.path.join(work, "sample.ome.tif")
        write_ome_tiff(sample_path, raw, axes="C" + "ZYX"[-nd:], spacing_um=spacing)
        pre = parser.get_parsed_content("preprocessing")
        x = pre({"image": sample_path})["image"]
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)[None]
        if tuple(x.shape[2:]) != tuple(patch):
            raise ExportError(f"the bundle's preprocessing changed the sample's size {patch} -> {list(x.shape[2:])}")
        with torch.no_grad():
            y = net(x)
            if spec["post"] == "softmax":
                y = torch.softmax(y, 1)
            try:  # scripting keeps size-dependent branches (as MONAI's ckpt_export); tracing would freeze them
                scripted = torch.jit.script(net)
            except Exception:
                scripted = torch.jit.trace(net, x, check_trace=False)
            y_ts = scripted(x)
            if spec["post"] == "softmax":
                y_ts = torch.softmax(y_ts, 1)
        ts_diff = float((y - y_ts).abs().max())
        test_in = (raw[None] if spec["raw_input"] else x.numpy()).astype(np.float32)
        test_out = y.numpy().astype(np.float32)
        files = {n: os.path.join(work, n) for n in ("test_input.npy", "test_output.npy", "cover.png", "weights.pt",
                                                    "weights_torchscript.pt", "README.md", "LICENSE")}
        np.save(files["test_input.npy"], test_in)
        np.save(files["test_output.npy"], test_out)
        _cover(files["cover.png"], test_in[0], test_out[0])
        torch.save(net.state_dict(), files["weights.pt"])
        scripted.save(files["weights_torchscript.pt"])
        shutil.copy(os.path.join(bundle_dir, "LICENSE"), files["LICENSE"])

        letters = "zyx"[-nd:]
        channel_names = spec["input_names"] or [re.sub(r"[^a-z0-9]+", "_", v.lower()).strip("_")[:30] or f"c{k}"
                                                 for k, v in in_fmt.get("channel_def", {}).items()]
        if len(channel_names) != in_channels:
            channel_names = [f"channel{i}" for i in range(in_channels)]
        unit = "micrometer" if spacing else None
        in_axes = [BatchAxis(), ChannelAxis(channel_names=[Identifier(c) for c in channel_names])]
        out_axes = [BatchAxis(), ChannelAxis(channel_names=[Identifier(c) for c in spec["output_names"]])]
        for i, a in enumerate(letters):
            kw = {"scale": spacing[i], "unit": unit} if spacing else {}
            in_axes.append(SpaceInputAxis(id=AxisId(a), size=ParameterizedSize(min=multiple, step=multiple), **kw))
            out_axes.append(SpaceOutputAxis(id=AxisId(a), size=SizeReference(tensor_id=TensorId(in_id), axis_id=AxisId(a)),
                                            **kw))
        preprocessing, pre_desc = [], "none (the input is expected as described)"
        if spec["zmuv"] == "all":
            preprocessing = [ZeroMeanUnitVarianceDescr(kwargs=ZeroMeanUnitVarianceKwargs(
                axes=[AxisId("channel")] + [AxisId(a) for a in letters], eps=ZMUV_EPS))]
            pre_desc = "`zero_mean_unit_variance` over the whole image (the bundle's z-score)"
        elif spec["zmuv"] == "space":
            preprocessing = [ZeroMeanUnitVarianceDescr(kwargs=ZeroMeanUnitVarianceKwargs(
                axes=[AxisId(a) for a in letters], eps=ZMUV_EPS))]
            pre_desc = "`zero_mean_unit_variance` per channel (the bundle's channel-wise standardisation)"
        postprocessing = [SoftmaxDescr(kwargs=SoftmaxKwargs(axis=AxisId("channel")))] if spec["post"] == "softmax" else []
        input_desc = in_fmt.get("modality", "") + ("" if spec["raw_input"] else ", preprocessed as below")
        inputs = [InputTensorDescr(id=TensorId(in_id), axes=in_axes, test_tensor=FileDescr(source=files["test_input.npy"]),
                                   data=IntervalOrRatioDataDescr(type="float32"), preprocessing=preprocessing,
                                   description=input_desc[:128])]
        outputs = [OutputTensorDescr(id=TensorId(out_id), axes=out_axes,
                                     test_tensor=FileDescr(source=files["test_output.npy"]),
                                     data=IntervalOrRatioDataDescr(type="float32"), postprocessing=postprocessing,
                                     description=", ".join(spec["output_names"]))]
        checks = {"input_id": in_id, "output_id": out_id, "multiple": multiple, "settings": settings,
                  "input_axes": "b,c," + ",".join(letters), "input_desc": input_desc, "pre_desc": pre_desc,
                  "sample_desc": sample_desc, "ts_diff": ts_diff}
        with open(files["README.md"], "w") as f:
            f.write(_documentation(bundle, meta, spec, fmt, checks))
        torch_version = Version(torch.__version__.split("+")[0])
        weights = WeightsDescr(
            pytorch_state_dict=PytorchStateDictWeightsDescr(
                source=files["weights.pt"], pytorch_version=torch_version,
                architecture=ArchitectureFromLibraryDescr(callable=Identifier("build_network"),
                                                          import_from="common.networks.record",
                                                          kwargs={"config": network_config(net)})),
            torchscript=TorchscriptWeightsDescr(source=files["weights_torchscript.pt"], pytorch_version=torch_version,
                                                parent="pytorch_state_dict"))
        descr = ModelDescr(
            name=re.sub(r"[^A-Za-z0-9 _\-().,]+", "", meta.get("name", bundle))[:128],
            description=meta.get("description", "")[:1024],
            authors=[Author(name=meta.get("authors", "labelfree-zoo contributors"))],
            cite=_cite(meta.get("references", []), meta.get("data_source", "")),
            license="Apache-2.0",
            documentation=FileDescr(source=files["README.md"]),
            covers=[FileDescr(source=files["cover.png"])],
            attachments=[FileDescr(source=files["LICENSE"])],
            tags=["monai", "labelfree-zoo", f"{nd}d", "pytorch", "label-free", bundle.replace("_", "-")]
                 + (["segmentation"] if "seg" in out_fmt.get("format", "") else ["virtual-staining"]),
            version=meta.get("version"),
            inputs=inputs, outputs=outputs, weights=weights,
        )
        out = os.path.abspath(out)
        if os.path.exists(out):
            shutil.rmtree(out)
        save_bioimageio_package_as_folder(descr, output_path=out)
        if zip:
            save_bioimageio_package(descr, output_path=out.rstrip("/") + ".zip")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return os.path.join(out, "rdf.yaml")


def main(bundle: str, out: str, ckpt: str | None = None, sample: str | None = None, zip: bool = False) -> None:
    """Export ``bundle`` (a folder such as ``bundles/fnet_baseline``) to the package folder ``out``."""
    rdf = export(bundle, out, ckpt=ckpt, sample=sample, zip=zip)
    print(f"wrote {rdf}; check it with: bioimageio test {rdf}", flush=True)


def cli(argv=None) -> None:
    """Command line (strict flags: an unknown one exits with 2 before any work)."""
    from common.cli import strict_fire

    strict_fire(main, argv, name="export_bioimageio.py", exit_on=(ExportError,))


if __name__ == "__main__":
    cli()

"""bioimage.io export: packages pass ``bioimageio test`` offline and reproduce the bundle's own inference.

Each case exports a bundle with ``python scripts/export_bioimageio.py``, checks the package's description
with bioimageio.spec, runs ``bioimageio test`` (bioimageio.core) with every HTTP(S) request pointed at a
closed local port (so the test proves nothing is downloaded), and runs the bundle's own inference
(``monai.bundle``) on the package's test input: its output must equal the package's test output. The
first case runs the two command lines as separate processes, as a user types them; the others run the
same ``__main__`` blocks in this process (no interpreter start-ups).

Bundles with shipped weights (``bundles/<name>/models/model.pt`` + record) are exported as they are;
the others with tiny random weights written with their record.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common.io import read_image, write_ome_tiff
from common.networks.record import read_record, write_record
from zoo_testing import BUNDLES, ROOT, TINY, env, environ, run_bundle_inprocess, run_script

pytestmark = pytest.mark.slow

bioimageio_core = pytest.importorskip("bioimageio.core", reason="bioimageio.core not installed (requirements.txt)")

SHIPPED = [b for b in sorted(os.listdir(BUNDLES))
           if os.path.isfile(os.path.join(BUNDLES, b, "models", "model.pt"))
           and read_record(os.path.join(BUNDLES, b, "models", "model.pt")) is not None]
# tiny random weights where no weights ship: a 3D virtual-staining, a 2D segmentation and the FUCCI bundle
# (each case takes about a minute on 2 busy cores: export, bioimageio test, bundle inference)
TINY_CASES = [b for b in ("fnet_baseline", "isl_cell_instance", "unet3d_fucci") if b not in SHIPPED]
CASES = [(b, "shipped") for b in SHIPPED] + [(b, "tiny") for b in TINY_CASES]


def _tiny_ckpt(bundle, folder):
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLES, bundle, "configs", "inference.json"))
    parser["bundle_root"] = os.path.join(BUNDLES, bundle)
    parser["ckpt_path"] = "/nonexistent/model.pt"
    for k, v in TINY[bundle].items():
        if k != "patch_size":
            parser[k] = v
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    ckpt = os.path.join(folder, "model.pt")
    torch.save(net.state_dict(), ckpt)
    write_record(ckpt, net, {})
    return ckpt


DEAD = "http://127.0.0.1:9"  # discard port: nothing listens, any download fails at once
OFFLINE = dict(HTTP_PROXY=DEAD, HTTPS_PROXY=DEAD, http_proxy=DEAD, https_proxy=DEAD, NO_PROXY="", no_proxy="")
# the case whose export and `bioimageio test` run as separate processes, as a user types them; the other
# cases run the same two command lines' __main__ in this process (zoo_testing.run_script), offline alike
AS_USER = CASES[0] if CASES else None


def _offline_env():
    return dict(env(), OMP_NUM_THREADS="1", **OFFLINE)


def _command(module, *args, cwd, as_user):
    """``python -m <module> <args>`` offline: a separate process when ``as_user``, else in this process."""
    if as_user:  # scripts as the docs write them (python scripts/<name>.py), packages with -m
        launch = [os.path.join(ROOT, *module.split(".")) + ".py"] if module.startswith("scripts.") else ["-m", module]
        return subprocess.run([sys.executable, *launch, *map(str, args)], env=_offline_env(), capture_output=True,
                              text=True, timeout=600, cwd=str(cwd))
    with environ(**OFFLINE):  # every HTTP(S) request of this process at the closed port meanwhile
        return run_script(module, *args, cwd=cwd)


@pytest.mark.parametrize("bundle,weights", CASES, ids=[f"{b}-{w}" for b, w in CASES])
def test_export_passes_bioimageio_test_and_matches_the_bundle(bundle, weights, tmp_path):
    from bioimageio.spec import load_model_description

    ckpt = os.path.join(BUNDLES, bundle, "models", "model.pt") if weights == "shipped" else _tiny_ckpt(bundle, str(tmp_path))
    pkg = tmp_path / "pkg"
    as_user = (bundle, weights) == AS_USER
    p = _command("scripts.export_bioimageio", os.path.join(BUNDLES, bundle), "--out", pkg, "--ckpt", ckpt,
                 cwd=tmp_path, as_user=as_user)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rdf = pkg / "rdf.yaml"

    # the description, as bioimageio.spec reads it
    descr = load_model_description(str(rdf), perform_io_checks=True)
    assert descr.format_version.startswith("0.5")
    assert descr.weights.torchscript is not None and descr.weights.pytorch_state_dict is not None
    assert str(descr.license) == "Apache-2.0" and any(c.doi or c.url for c in descr.cite) and descr.covers
    meta = json.load(open(os.path.join(BUNDLES, bundle, "configs", "metadata.json")))
    (in_fmt,) = meta["network_data_format"]["inputs"].values()
    step = int(in_fmt["spatial_shape"][0].split("*")[0])
    space = [a for a in descr.inputs[0].axes if a.type == "space"]
    assert [(a.size.min, a.size.step) for a in space] == [(step, step)] * len(space)
    doc = (pkg / "README.md").read_text()
    assert "## Validation" in doc and "cannot express" in doc

    # bioimageio.core's own test, offline
    summary = tmp_path / "summary.json"
    t = _command("bioimageio.core", "test", rdf, "--summary", summary, cwd=tmp_path, as_user=as_user)
    result = json.loads(summary.read_text())
    failed = [(d["name"], [e["msg"][:300] for e in d.get("errors", [])]) for d in result["details"]
              if d["status"] != "passed"]
    assert t.returncode == 0 and result["status"] == "passed", (failed, t.stdout[-2000:], t.stderr[-2000:])
    names = " ".join(d["name"] for d in result["details"])
    assert "Reproduce test outputs from test inputs (torchscript)" in names
    assert "Reproduce test outputs from test inputs (pytorch_state_dict)" in names

    # the package's test output == the bundle's own inference (its preprocessing, sliding windows, network)
    test_in = np.load(pkg / "test_input.npy")[0]
    test_out = np.load(pkg / "test_output.npy")[0]
    pre = [p.id for p in descr.inputs[0].preprocessing if p.id != "ensure_dtype"]
    if not pre:  # the package's input is the bundle-preprocessed image (documented): no raw input to run
        assert "the package input is the preprocessed image" in doc or "package input is the standardised" in doc
        return
    nd = test_in.ndim - 1
    spacing = [float(a.scale) for a in space] if all(a.unit for a in space) else None
    (tmp_path / "in").mkdir()
    write_ome_tiff(tmp_path / "in" / "sample.ome.tif", test_in, axes="C" + "ZYX"[-nd:], spacing_um=spacing)
    saver = {"_target_": "Compose", "transforms": [
        {"_target_": "common.io.SaveOmeTiffd", "keys": "pred", "output_dir": str(tmp_path / "out"),
         "output_postfix": "_raw", "squeeze_channel": False}]}
    # eager fp32 (fast false), as the package computes: the fast default's own tolerance is tests/test_fast_defaults.py
    run_bundle_inprocess(bundle, "inference.json", {"dataset_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"),
                                                    "ckpt_path": ckpt, "evaluator#postprocessing": saver, "fast": False})
    bundle_out, _, _ = read_image(tmp_path / "out" / "sample_raw.ome.tif", spatial_dims=nd)
    assert bundle_out.shape == test_out.shape
    np.testing.assert_allclose(bundle_out, test_out, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(test_out).max())))


def test_export_refuses_a_bundle_without_weights(tmp_path):
    p = _command("scripts.export_bioimageio", os.path.join(BUNDLES, "fnet_baseline"), "--out", tmp_path / "pkg",
                 "--ckpt", tmp_path / "missing.pt", cwd=tmp_path, as_user=False)
    assert p.returncode != 0 and "no weights to export" in p.stderr and not (tmp_path / "pkg").exists()

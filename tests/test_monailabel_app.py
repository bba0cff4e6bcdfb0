"""The zoo's MONAI Label app (monailabel_app/): the real `monailabel start_server` on a free loopback port
with a studies folder of sample images, called over HTTP: /info/, /infer/<bundle> for every bundle (shape,
type, and equality with the bundle's own `monai.bundle run` inference), /datastore/label, /train/<bundle>
producing a new checkpoint; plus the app's pure helpers (selection, result writing, datastore checks)."""

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest

from common.io import read_image, write_ome_tiff
from distribution_testing import (
    ALL,
    free_port,
    input_spec,
    make_copy,
    finish_driver,
    metadata,
    sample_image,
    start_driver,
    stop_process_tree,
    tiny_train_overrides,
    training_label,
    unusable_reason,
    wait_for_http,
)
from zoo_testing import ROOT, env

from monailabel_app.lib import zoo as mlzoo

APP = os.path.join(ROOT, "monailabel_app")

USABLE = [b for b in ALL if unusable_reason(b) is None]
KINDS = {b: mlzoo.bundle_kind(b, metadata(b)) for b in ALL}
IMAGE_BUNDLES = [b for b in USABLE if KINDS[b] == "image"]
# trained over HTTP: every segmentation bundle, and the first virtual-staining bundle (train_models lists it,
# its datastore "label" being the paired stain image) so that /train is exercised before any segmentation
# bundle exists
TRAINED = [b for b in USABLE if KINDS[b] == "segmentation"
           and mlzoo.datalist_keys(json.load(open(os.path.join(ROOT, "bundles", b, "configs", "train.json"))))]
TRAINED += IMAGE_BUNDLES[:1]


def _params(bundles, only=None):
    out = []
    for b in bundles:
        reason = unusable_reason(b)
        if reason is None and only is not None and b not in only:
            reason = f"{b}: not trained over HTTP in this test (virtual staining; one such bundle is)"
        out.append(pytest.param(b, marks=pytest.mark.skip(reason=reason)) if reason else b)
    return out


# ------------------------------------------------------------------------------------------ pure helpers
def test_select_and_default_train_models():
    avail = ["a_img", "b_seg", "c_seg"]
    kinds = {"a_img": "image", "b_seg": "segmentation", "c_seg": "segmentation"}
    assert mlzoo.select("all", avail, "models") == avail
    assert mlzoo.select(" b_seg, a_img ", avail, "models") == ["b_seg", "a_img"]
    assert mlzoo.select("none", avail, "models") == []
    with pytest.raises(Exception, match=r"unknown bundle\(s\) \['zzz'\]; available"):
        mlzoo.select("a_img,zzz", avail, "models")
    assert mlzoo.choose_trainers(avail, kinds, avail, None) == ["b_seg", "c_seg"]
    assert mlzoo.choose_trainers(["a_img", "b_seg"], kinds, avail, "all") == ["a_img", "b_seg"]
    assert mlzoo.choose_trainers(avail, kinds, avail, "a_img") == ["a_img"]
    assert mlzoo.choose_trainers(avail, kinds, avail, "none") == []


def test_bundle_kinds_of_the_zoo():
    # the virtual-staining bundles return images, the others labels; unknown bundles go by metadata
    for b in ALL:
        fmt = next(iter(metadata(b)["network_data_format"]["outputs"].values())).get("format")
        expected = mlzoo.KNOWN_KINDS.get(b, "segmentation" if fmt == "segmentation" else "image")
        assert KINDS[b] == expected
    assert mlzoo.bundle_kind("new", {"network_data_format": {"outputs": {"pred": {"format": "segmentation"}}}}) \
        == "segmentation"
    assert mlzoo.bundle_kind("new", {"network_data_format": {"outputs": {"pred": {"format": "magnitude"}}}}) == "image"


def test_train_overrides_global_per_bundle_and_defaults():
    o = mlzoo.parse_overrides('{"epoch_length": 5, "b": {"batch_size": 3, "epoch_length": 7}}', ["a", "b"])
    assert o == {"a": {"epoch_length": 5}, "b": {"batch_size": 3, "epoch_length": 7}}
    o = mlzoo.parse_overrides(None, ["isl_nucleus_seg", "a"])
    assert o["isl_nucleus_seg"] == {"stage": 1, "init": "scratch"} and o["a"] == {}
    with pytest.raises(Exception, match="not JSON"):
        mlzoo.parse_overrides("{nope", ["a"])


def test_write_result_keeps_grid_format_and_voxel_size(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    # NIfTI in -> NIfTI out with the input's affine, and the same array back through common.io
    vol = rng.random((6, 7, 8)).astype(np.float32)  # X, Y, Z on disk
    affine = np.diag([0.3, 0.25, 0.5, 1.0])
    affine[:3, 3] = [1, 2, 3]
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "v.nii.gz")
    src, _, _ = read_image(tmp_path / "v.nii.gz")
    out = mlzoo.write_result(src * 2, str(tmp_path / "v.nii.gz"), "image", 3)
    assert out.endswith(".nii.gz")
    np.testing.assert_allclose(nib.load(out).affine, affine)
    np.testing.assert_allclose(read_image(out)[0], src * 2, rtol=1e-6)
    # OME-TIFF in -> OME-TIFF out with the voxel size; labels become integers
    lab = np.zeros((1, 5, 9, 11), np.float32)
    lab[0, 1:3, 2:5, 3:7] = 2
    write_ome_tiff(tmp_path / "s.ome.tif", rng.random((5, 9, 11)).astype(np.float32), spacing_um=(0.4, 0.3, 0.3))
    out = mlzoo.write_result(lab, str(tmp_path / "s.ome.tif"), "segmentation", 3)
    got, spacing, known = read_image(out)
    assert out.endswith(".ome.tif") and known and np.allclose(spacing, (0.4, 0.3, 0.3))
    np.testing.assert_array_equal(got, lab)
    # PNG labels stay PNG; a prediction off the input grid is refused
    from PIL import Image

    Image.fromarray((rng.random((9, 12)) * 255).astype(np.uint8)).save(tmp_path / "p.png")
    out = mlzoo.write_result(np.ones((1, 9, 12)), str(tmp_path / "p.png"), "segmentation", 2)
    assert out.endswith(".png") and np.asarray(Image.open(out)).dtype == np.uint8
    with pytest.raises(Exception, match=r"prediction spatial shape \(9, 13\) != input \(9, 12\)"):
        mlzoo.write_result(np.ones((1, 9, 13)), str(tmp_path / "p.png"), "segmentation", 2)
    with pytest.raises(Exception, match="non-integer"):
        mlzoo.write_result(np.full((1, 9, 12), 0.5), str(tmp_path / "p.png"), "segmentation", 2)


def test_train_task_names_bad_labels_before_training(tmp_path):
    """A label whose shape differs from its image is named (file, problem) before any training starts."""
    from monailabel.datastore.local import LocalDatastore

    b = (TRAINED or USABLE or ALL)[0]
    copy = make_copy(b, str(tmp_path / "zoo"), bake_tiny=True)
    studies = tmp_path / "studies"
    arr, axes, spacing = sample_image(b)
    write_ome_tiff(studies / "good.ome.tif", arr, axes=axes, spacing_um=spacing)
    write_ome_tiff(studies / "bad.ome.tif", arr, axes=axes, spacing_um=spacing)
    dims = input_spec(b)[0]
    shape = arr.shape[-dims:]
    ds = LocalDatastore(str(studies), extensions=mlzoo.DATASTORE_EXTENSIONS, auto_reload=False)
    assert sorted(ds.list_images()) == ["bad", "good"]  # "x.ome.tif" has the id "x"
    lab_good = tmp_path / "lg.ome.tif"
    lab_bad = tmp_path / "lb.ome.tif"
    write_ome_tiff(lab_good, training_label(b, KINDS[b], shape), axes="ZYX"[-dims:], spacing_um=spacing)
    write_ome_tiff(lab_bad, training_label(b, KINDS[b], tuple(s + 3 for s in shape)), axes="ZYX"[-dims:])
    ds.save_label("good", str(lab_good), "mytag", {})
    ds.save_label("bad", str(lab_bad), "mytag", {})
    task = mlzoo.ZooTrainTask(copy, {}, {})
    with pytest.raises(Exception) as e:
        task._fetch_datalist({"label_tag": "mytag"}, ds)
    assert "shape mismatch" in str(e.value) and os.path.join("labels", "mytag", "bad.ome.tif") in str(e.value)
    with pytest.raises(Exception, match="no image has a 'other' label yet"):
        task._fetch_datalist({"label_tag": "other"}, ds)
    ds.remove_label("bad", "mytag")
    recs = task._fetch_datalist({"label_tag": "mytag"}, ds)
    assert recs == [{"image": os.path.realpath(studies / "good.ome.tif"),
                     "label": os.path.realpath(studies / "labels" / "mytag" / "good.ome.tif")}]


# ------------------------------------------------------------------------------------------ the server
def _request(method, url, data=None, headers=None, timeout=300):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _multipart(field, filename, content):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def server_env() -> dict:
    """The environment of a test server: this checkout's ``common``; outbound HTTP pointed at a dead proxy (so a
    hub call would fail), sessions off."""
    e = env()
    e.update({"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
              "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
              "MONAI_LABEL_SESSIONS": "false"})
    return e


def app_copy(base):
    """``base/app``: a copy of the app (MONAI Label writes its logs and models folders into the app folder)."""
    app = base / "app"
    if not app.exists():
        app.mkdir()
        shutil.copy(os.path.join(APP, "main.py"), app / "main.py")
        shutil.copytree(os.path.join(APP, "lib"), app / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    return app


def launch_server(base, studies, conf, host="127.0.0.1", port=None, log_name="server.log"):
    """Start `monailabel start_server` (python -m monailabel.main) on a copy of the app in ``base/app``, serving
    ``studies`` with the ``--conf`` pairs ``conf``; returns ``(process, url, log path)`` at once."""
    app = app_copy(base)
    port = port or free_port()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", host, "--port", str(port)]
    for k, v in conf:
        cmd += ["--conf", k, v]
    log = base / log_name
    proc = subprocess.Popen(cmd, cwd=str(base), env=server_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`monailabel start_server` on 127.0.0.1:<free port>, serving tiny copies of the usable bundles with random
    weights (see :func:`launch_server`)."""
    if not USABLE:
        pytest.skip("no bundle with a usable inference config: " + "; ".join(filter(None, map(unusable_reason, ALL))))
    base = tmp_path_factory.mktemp("monailabel")
    zoo_dir, studies = base / "zoo", base / "studies"
    for b in USABLE:
        make_copy(b, str(zoo_dir), bake_tiny=True)
    samples = {}
    for i, b in enumerate(USABLE):
        arr, axes, spacing = sample_image(b, seed=i)
        samples[b] = write_ome_tiff(str(studies / f"{b}_sample.ome.tif"), arr, axes=axes, spacing_um=spacing)
    for b in TRAINED:
        for j, tag in enumerate(("a", "b")):
            arr, axes, spacing = sample_image(b, seed=10 + j)
            write_ome_tiff(str(studies / f"{b}_train_{tag}.ome.tif"), arr, axes=axes, spacing_um=spacing)
    proc, url, log = launch_server(base, studies, [
        ("zoo_dir", str(zoo_dir)), ("models", "all"), ("train_models", ",".join(TRAINED) or "none"),
        ("train_overrides", json.dumps(tiny_train_overrides(USABLE)))])
    # each bundle's own inference (`monai.bundle run` of the same tiny config and weights) on its sample,
    # computed while the server starts
    jobs = [{"bundle": b, "config": str(zoo_dir / b / "configs" / "inference.json"),
             "overrides": {"bundle_root": str(zoo_dir / b), "dataset_dir": samples[b],
                           "output_dir": str(base / "reference" / b)}} for b in USABLE]
    driver = start_driver(jobs, str(base / "driver"), env())
    try:
        wait_for_http(f"{url}/info/", proc, timeout=300, log_path=str(log))
        yield {"url": url, "base": base, "zoo": zoo_dir, "studies": studies, "samples": samples, "log": log,
               "proc": proc, "driver": driver}
    finally:
        stop_process_tree(proc)
        stop_process_tree(driver["proc"])


@pytest.fixture(scope="module")
def reference(server):
    finish_driver(server["driver"])
    return server["base"] / "reference"


@pytest.mark.slow
def test_info_lists_the_zoo(server):
    status, _, body = _request("GET", f"{server['url']}/info/")
    assert status == 200
    info = json.loads(body)
    assert sorted(info["models"]) == sorted(USABLE)
    for b in USABLE:
        m = info["models"][b]
        assert m["output"] == KINDS[b] and m["version"] == metadata(b)["version"]
        assert m["dimension"] == input_spec(b)[0]
        if KINDS[b] == "image":
            assert m["type"] == "others" and m["labels"] == {}
        else:
            assert m["type"] == "segmentation"
    assert sorted(info["trainers"]) == sorted(TRAINED)
    assert "label_tag" in next(iter(info["trainers"].values()))["config"] if TRAINED else True
    log = open(server["log"]).read()
    assert "127.0.0.1:9" not in log and "ProxyError" not in log  # nothing tried to reach a hub
    # the server process keeps freed tensors' memory for the next inference, as the bundles' configs do
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert f"zoo: reuse_memory {glibc}" in log


@pytest.mark.slow
@pytest.mark.parametrize("bundle", _params(ALL))
def test_infer_returns_result_on_the_input_grid(bundle, server, reference, tmp_path):
    image_id = f"{bundle}_sample"
    status, headers, body = _request("POST", f"{server['url']}/infer/{bundle}?image={image_id}&output=image", data=b"")
    assert status == 200, body[-2000:]
    name = headers.get("content-disposition", "").split("filename=")[-1].strip('"')
    assert name.endswith(".ome.tif"), headers
    out = tmp_path / "result.ome.tif"
    out.write_bytes(body)
    dims = input_spec(bundle)[0]
    src, src_spacing, _ = read_image(server["samples"][bundle], spatial_dims=dims)
    got, spacing, known = read_image(out, spatial_dims=dims)
    assert got.shape[1:] == src.shape[1:]
    assert known and np.allclose(spacing, src_spacing)
    pred = next(iter(metadata(bundle)["network_data_format"]["outputs"].values()))
    if KINDS[bundle] == "image":
        assert got.dtype == np.float32 and got.shape[0] == pred["num_channels"]
    else:
        assert got.dtype.kind in "ui" and got.shape[0] == 1
    # the same numbers as the bundle's own inference, when it writes one file per input
    ref_files = sorted(os.listdir(reference / bundle))
    if len(ref_files) == 1:
        ref, _, _ = read_image(reference / bundle / ref_files[0], spatial_dims=dims)
        np.testing.assert_allclose(got, ref.astype(got.dtype), rtol=1e-5, atol=1e-5)
    else:  # e.g. semantic + instance maps: the result is one of them
        refs = [read_image(reference / bundle / f, spatial_dims=dims)[0] for f in ref_files]
        assert any(r.shape == got.shape and np.array_equal(r.astype(got.dtype), got) for r in refs), ref_files


@pytest.mark.slow
def test_save_label_through_the_datastore_api(server):
    b = USABLE[0]
    image_id = f"{b}_sample"
    dims = input_spec(b)[0]
    src, spacing, _ = read_image(server["samples"][b], spatial_dims=dims)
    lab_path = server["base"] / "corrected.ome.tif"
    write_ome_tiff(lab_path, training_label(b, KINDS[b], src.shape[1:]), axes="ZYX"[-dims:], spacing_um=spacing)
    body, headers = _multipart("label", "corrected.ome.tif", lab_path.read_bytes())
    status, _, resp = _request("PUT", f"{server['url']}/datastore/label?image={image_id}&tag=final", body, headers)
    assert status == 200, resp[-2000:]
    assert json.loads(resp) == {"image": image_id, "label": image_id}
    stored = server["studies"] / "labels" / "final" / f"{image_id}.ome.tif"
    assert stored.read_bytes() == lab_path.read_bytes()
    status, _, resp = _request("GET", f"{server['url']}/datastore/?output=all")
    assert "final" in json.loads(resp)["objects"][image_id]["labels"]
    status, _, resp = _request("GET", f"{server['url']}/datastore/?output=train")
    assert {"image": server["samples"][b], "label": str(stored)} in json.loads(resp)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("bundle", _params(ALL, only=TRAINED))
def test_train_writes_a_new_checkpoint(bundle, server):
    dims = input_spec(bundle)[0]
    tag = f"zoo_{bundle}"
    for j in ("a", "b"):
        image_id = f"{bundle}_train_{j}"
        src, spacing, _ = read_image(server["studies"] / f"{image_id}.ome.tif", spatial_dims=dims)
        lab = server["base"] / f"{image_id}_label.ome.tif"
        write_ome_tiff(lab, training_label(bundle, KINDS[bundle], src.shape[1:], seed=ord(j)), axes="ZYX"[-dims:],
                       spacing_um=spacing)
        body, headers = _multipart("label", lab.name, lab.read_bytes())
        status, _, resp = _request("PUT", f"{server['url']}/datastore/label?image={image_id}&tag={tag}", body, headers)
        assert status == 200, resp[-2000:]
    ckpt = server["zoo"] / bundle / "models" / "model.pt"
    before = _sha(ckpt)
    params = json.dumps({"max_epochs": 1, "val_split": 0.5, "label_tag": tag, "device": "cpu"}).encode()
    if bundle == TRAINED[0]:
        # as a client does: a background training job (its own process), polled until it ends
        status, _, resp = _request("POST", f"{server['url']}/train/{bundle}", params,
                                   {"Content-Type": "application/json"})
        assert status == 200, resp[-2000:]
        task_id = json.loads(resp)["id"]
        deadline, task = time.time() + 600, {}
        while time.time() < deadline:
            _, _, resp = _request("GET", f"{server['url']}/train/?all=true")
            tasks = json.loads(resp)
            task = next((t for t in (tasks if isinstance(tasks, list) else [tasks]) if t.get("id") == task_id), {})
            if task.get("status") in ("DONE", "ERROR"):
                break
            time.sleep(1)
        assert task.get("status") == "DONE", json.dumps(task, indent=1)[-4000:]
    else:  # the other bundles in the server process (run_sync): the same task without a new interpreter
        status, _, resp = _request("POST", f"{server['url']}/train/{bundle}?run_sync=true", params,
                                   {"Content-Type": "application/json"}, timeout=600)
        assert status == 200, resp[-2000:] + open(server["log"]).read()[-6000:].encode()
    assert _sha(ckpt) != before, "training finished but models/model.pt did not change"
    # the server picks the new weights up for inference (it reloads a model whose file changed)
    status, _, _ = _request("POST", f"{server['url']}/infer/{bundle}?image={bundle}_train_a&output=json", data=b"")
    assert status == 200


@pytest.mark.slow
def test_stopping_the_server_stops_its_training_job(server):
    """Runs last: a background training job (a child process) must not outlive the server."""
    import psutil

    if not TRAINED:
        pytest.skip("no bundle is trained over HTTP")
    b = TRAINED[0]
    params = json.dumps({"max_epochs": 1000, "val_split": 0.5, "label_tag": f"zoo_{b}", "device": "cpu"}).encode()
    status, _, resp = _request("POST", f"{server['url']}/train/{b}", params, {"Content-Type": "application/json"})
    assert status == 200, resp[-2000:]
    proc = server["proc"]
    job, deadline = None, time.time() + 120
    while job is None and time.time() < deadline:
        job = next((c for c in psutil.Process(proc.pid).children(recursive=True)
                    if "monailabel.interfaces.utils.app" in " ".join(c.cmdline())), None)
        time.sleep(0.5)
    assert job is not None, "no training process appeared"
    proc.terminate()  # as `kill <pid>` does
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs([job], timeout=30)
    for p in alive:  # do not leave it behind even when the test fails
        p.kill()
    assert not alive, "the training job outlived the server"

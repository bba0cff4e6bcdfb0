"""The MONAI Label app on a shared machine: the real server (`monailabel start_server`, one per module) on a free
loopback port, replaying path-traversal attacks (plain, URL-encoded, double-encoded, backslash, absolute and
symlink variants) against the datastore, infer and train routes; each must get a 4xx with a JSON message and
create or read no file outside the studies folder (checked on the file system). Also: label validation at upload,
inference on an image a model cannot take, a failed training job in /train/, only served bundles in /info/, the
bind-address rule, and a bounded load test (50 concurrent /infer, server memory)."""

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest

from common.io import write_ome_tiff
from distribution_testing import (
    make_copy,
    sample_image,
    stop_process_tree,
    tiny_train_overrides,
    unusable_reason,
    wait_for_http,
)
from test_monailabel_app import _multipart, _request, app_copy, launch_server, server_env

from monailabel_app.lib import safety

SERVED = ["isl_nucleus_seg", "isl_cell_instance", "fnet_baseline"]  # 2D 3-channel, 2D 1-channel instances, 3D image
UNSERVED = "unet3d_fucci"  # selected for training, but has no weights: neither infer nor train task
SECRET = b"outside-secret-bytes"


def _snapshot(folder):
    """{relative path: sha256} of every file (and link) below ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = (hashlib.sha256(open(p, "rb").read()).hexdigest()
                                               if os.path.isfile(p) else "dir-link")
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    missing = [b for b in SERVED + [UNSERVED] if unusable_reason(b)]
    if missing:
        pytest.skip("; ".join(unusable_reason(b) for b in missing))
    base = tmp_path_factory.mktemp("mlsec")
    zoo, studies, outside = base / "zoo", base / "studies", base / "outside"
    for b in SERVED + [UNSERVED]:
        make_copy(b, str(zoo), bake_tiny=True)
    os.remove(zoo / UNSERVED / "models" / "model.pt")
    samples = {}
    for i, b in enumerate(SERVED):
        arr, axes, spacing = sample_image(b, seed=i)
        samples[b] = write_ome_tiff(str(studies / f"{b}_sample.ome.tif"), arr, axes=axes, spacing_um=spacing)
    # the sentinel folder outside the studies folder, and links from inside the studies folder to it
    outside.mkdir()
    secret_img = sample_image("isl_cell_instance", seed=7)[0]
    write_ome_tiff(str(outside / "secret.ome.tif"), secret_img, axes="YX")
    (outside / "secret.txt").write_bytes(SECRET)
    shutil.copy(outside / "secret.ome.tif", outside / "victim.ome.tif")
    os.symlink(outside / "secret.ome.tif", studies / "linked.ome.tif")  # an image that leads outside
    (studies / "labels" / "final").mkdir(parents=True)
    os.symlink(outside, studies / "labels" / "escape")  # a label tag folder that leads outside
    os.symlink(outside / "victim.ome.tif", studies / "labels" / "final" / "isl_cell_instance_sample.ome.tif")
    overrides = tiny_train_overrides(SERVED)
    overrides["isl_cell_instance"] = dict(overrides["isl_cell_instance"], learning_rate="not-a-number")  # fails in the job
    proc, url, log = launch_server(base, studies, [
        ("zoo_dir", str(zoo)), ("models", "all"), ("train_models", f"isl_nucleus_seg,isl_cell_instance,{UNSERVED}"),
        ("train_overrides", json.dumps(overrides, separators=(",", ":")))])
    try:
        wait_for_http(f"{url}/info/", proc, timeout=300, log_path=str(log))
        yield {"url": url, "base": base, "studies": studies, "outside": outside, "samples": samples, "log": log,
               "proc": proc}
    finally:
        stop_process_tree(proc)


def _label_bytes(shape, value=1, dtype=np.uint8, tmp=None, axes=None):
    arr = np.zeros(shape, dtype)
    arr[tuple(slice(2, 6) for _ in shape)] = value
    path = os.path.join(tmp, "lab.ome.tif")
    write_ome_tiff(path, arr, axes=axes or "ZYX"[-len(shape):])
    return open(path, "rb").read()


# ------------------------------------------------------------------------------------------ attacks
Q = urllib.parse.quote
CELL = "isl_cell_instance_sample"


def _attacks():
    """(name, method, path?query, multipart (field, filename, content kind) or None, form params or None)."""
    o = "{outside}"  # replaced by the absolute sentinel folder
    lab = ("label", "l.ome.tif", "label")
    img = ("file", "i.ome.tif", "label")
    return [
        ("label tag ../", "PUT", f"/datastore/label?image={CELL}&tag=../../outside/x", lab, None),
        ("label tag url-encoded", "PUT", f"/datastore/label?image={CELL}&tag=..%2F..%2Foutside%2Fx", lab, None),
        ("label tag double-encoded", "PUT", f"/datastore/label?image={CELL}&tag=..%252F..%252Foutside%252Fx", lab, None),
        ("label tag backslash", "PUT", f"/datastore/label?image={CELL}&tag=..%5C..%5Coutside%5Cx", lab, None),
        ("label tag absolute", "PUT", f"/datastore/label?image={CELL}&tag={Q(o + '/x', safe='')}", lab, None),
        ("label tag symlinked folder", "PUT", f"/datastore/label?image={CELL}&tag=escape", lab, None),
        ("label file is a symlink", "PUT", f"/datastore/label?image={CELL}&tag=final", lab, None),
        ("label image id ../", "PUT", f"/datastore/label?image=../outside/secret&tag=t", lab, None),
        ("label upload name ../", "PUT", f"/datastore/label?image={CELL}&tag=t",
         ("label", "../../outside/w.ome.tif", "label"), None),
        ("label upload name backslash", "PUT", f"/datastore/label?image={CELL}&tag=t",
         ("label", "..\\..\\outside\\w.ome.tif", "label"), None),
        ("image id ../ (deprecated route)", "PUT", "/datastore/?image=../outside/y", img, None),
        ("image id url-encoded", "PUT", "/datastore/image?image=..%2Foutside%2Fy", img, None),
        ("image id double-encoded", "PUT", "/datastore/image?image=..%252Foutside%252Fy", img, None),
        ("image id backslash", "PUT", "/datastore/image?image=..%5Coutside%5Cy", img, None),
        ("image id absolute", "PUT", f"/datastore/image?image={Q(o + '/y', safe='')}", img, None),
        ("image id is a symlink", "PUT", "/datastore/image?image=linked", img, None),
        ("image upload name ../", "PUT", "/datastore/image", ("file", "../outside/z.ome.tif", "label"), None),
        ("image upload name absolute", "PUT", "/datastore/image", ("file", o + "/z.ome.tif", "label"), None),
        ("image upload name backslash", "PUT", "/datastore/image", ("file", "..\\outside\\z.ome.tif", "label"), None),
        ("infer absolute path", "POST", f"/infer/isl_cell_instance?image={o}/secret.ome.tif&output=image", None, None),
        ("infer url-encoded path", "POST", f"/infer/isl_cell_instance?image={Q(o + '/secret.ome.tif', safe='')}"
                                           "&output=image", None, None),
        ("infer double-encoded path", "POST", "/infer/isl_cell_instance?image="
                                              f"{Q(Q(o + '/secret.ome.tif', safe=''), safe='')}&output=image", None, None),
        ("infer relative ../", "POST", "/infer/isl_cell_instance?image=../outside/secret&output=image", None, None),
        ("infer backslash", "POST", "/infer/isl_cell_instance?image=..%5Coutside%5Csecret&output=image", None, None),
        ("infer symlinked image", "POST", "/infer/isl_cell_instance?image=linked&output=image", None, None),
        ("infer params image", "POST", f"/infer/isl_cell_instance?image={CELL}&output=image", None,
         {"image": o + "/secret.ome.tif"}),
        ("infer params save_label tag", "POST", f"/infer/isl_cell_instance?image={CELL}&output=json", None,
         {"save_label": True, "label_tag": "../../outside/q"}),
        ("infer params model_filename", "POST", f"/infer/isl_cell_instance?image={CELL}&output=json", None,
         {"model_filename": o + "/secret.txt"}),
        ("infer params result_extension", "POST", f"/infer/isl_cell_instance?image={CELL}&output=json", None,
         {"result_extension": "/../../outside/r.ome.tif"}),
        ("download symlinked image", "GET", "/datastore/image?image=linked", None, None),
        ("download ../", "GET", "/datastore/image?image=..%2Foutside%2Fsecret", None, None),
        ("download label tag ../", "GET", f"/datastore/label?label={CELL}&tag=..%2F..%2Foutside", None, None),
        ("delete image ../", "DELETE", "/datastore/image?id=..%2Foutside%2Fvictim", None, None),
        ("train label_tag ../", "POST", "/train/isl_nucleus_seg", None, {"label_tag": "../../outside", "max_epochs": 1}),
        ("train model_filename", "POST", "/train/isl_nucleus_seg", None, {"model_filename": "../../../outside/secret.txt"}),
        ("weights upload", "PUT", "/model/isl_cell_instance", ("file", "model.pt", "secret"), None),
    ]


ATTACKS = _attacks()


@pytest.mark.parametrize("attack", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused_and_touches_nothing_outside(attack, srv, tmp_path):
    name, method, path, upload, form = attack
    outside = str(srv["outside"])
    path = path.replace("{outside}", outside).replace(Q("{outside}", safe=""), Q(outside, safe=""))
    path = path.replace(Q(Q("{outside}", safe=""), safe=""), Q(Q(outside, safe=""), safe=""))
    before = _snapshot(srv["base"] / "outside")
    parent_before = sorted(os.listdir(srv["base"]))
    data, headers = None, {}
    if upload:
        field, filename, kind = upload
        content = SECRET if kind == "secret" else _label_bytes((75, 90), tmp=str(tmp_path))
        data, headers = _multipart(field, filename.replace("{outside}", outside), content)
    elif form is not None and path.startswith("/train/"):
        data, headers = json.dumps(form).encode(), {"Content-Type": "application/json"}
    elif form is not None:
        data = urllib.parse.urlencode({"params": json.dumps(form).replace("{outside}", outside)}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
    elif method in ("POST", "PUT"):
        data = b""
    status, _, body = _request(method, srv["url"] + path, data, headers, timeout=120)
    assert 400 <= status < 500, (status, body[:500])
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and detail, body
    assert SECRET not in body and open(os.path.join(outside, "secret.ome.tif"), "rb").read()[-64:] not in body
    assert _snapshot(srv["base"] / "outside") == before, f"{name}: the sentinel folder changed"
    assert sorted(os.listdir(srv["base"])) == parent_before, f"{name}: a file appeared beside the studies folder"


def test_at_least_twenty_attack_variants():
    assert len(ATTACKS) >= 20


# ------------------------------------------------------------------------------------------ what still works
def test_good_requests_still_work(srv, tmp_path):
    url = srv["url"]
    body, headers = _multipart("label", "cells_corrected.ome.tif", _label_bytes((75, 90), value=3, dtype=np.uint16,
                                                                               tmp=str(tmp_path)))
    status, _, resp = _request("PUT", f"{url}/datastore/label?image={CELL}&tag=cells&model=isl_cell_instance",
                               body, headers)
    assert status == 200, resp
    assert (srv["studies"] / "labels" / "cells" / f"{CELL}.ome.tif").is_file()
    status, _, resp = _request("POST", f"{url}/infer/isl_cell_instance?image={CELL}&output=json", b"")
    assert status == 200, resp
    sample = open(srv["samples"]["isl_cell_instance"], "rb").read()
    body, headers = _multipart("file", "my field 1.ome.tif", sample)
    status, _, resp = _request("POST", f"{url}/infer/isl_cell_instance?output=image", body, headers)
    assert status == 200 and resp[:2] in (b"II", b"MM"), resp[:300]
    body, headers = _multipart("file", "new field.ome.tif", sample)
    status, _, resp = _request("PUT", f"{url}/datastore/image", body, headers)
    assert status == 200 and json.loads(resp) == {"image": "new field"}, resp
    assert (srv["studies"] / "new field.ome.tif").read_bytes() == sample


def test_info_lists_served_bundles_and_their_trainers_only(srv):
    status, _, body = _request("GET", f"{srv['url']}/info/")
    info = json.loads(body)
    assert sorted(info["models"]) == sorted(SERVED)
    assert sorted(info["trainers"]) == ["isl_cell_instance", "isl_nucleus_seg"]  # not UNSERVED: no weights
    status, _, body = _request("POST", f"{srv['url']}/infer/{UNSERVED}?image={CELL}", b"")
    assert status == 404 and UNSERVED in json.loads(body)["detail"]
    status, _, body = _request("POST", f"{srv['url']}/train/{UNSERVED}", b"{}", {"Content-Type": "application/json"})
    assert status == 404 and "no train task" in json.loads(body)["detail"]


# ------------------------------------------------------------------------------------------ label validation
def _write(path, arr, axes):
    write_ome_tiff(str(path), arr, axes=axes)
    return path.read_bytes()


def _labels(tmp):
    ok = np.zeros((75, 90), np.uint8)
    ok[5:15, 5:15] = 1
    nan = np.random.default_rng(0).random((13, 45, 52)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    frac = ok.astype(np.float32) * 0.5
    return [
        ("wrong shape", "isl_nucleus_seg", _write(tmp / "a.ome.tif", ok[:70], "YX"), "spatial shape (70, 90)"),
        ("3D label for a 2D image", "isl_nucleus_seg", _write(tmp / "b.ome.tif", np.stack([ok] * 4), "ZYX"),
         "channels"),
        ("unknown class", "isl_nucleus_seg", _write(tmp / "c.ome.tif", ok * 5, "YX"), "class(es) [5] unknown"),
        ("non-integer", "isl_cell_instance", _write(tmp / "d.ome.tif", frac, "YX"), "non-integer"),
        ("negative", "isl_cell_instance", _write(tmp / "e.ome.tif", ok.astype(np.int16) * -2, "YX"), "negative"),
        ("not an image", "isl_cell_instance", b"this is a text file, not a TIFF\n", "unreadable"),
        ("NaN target", "fnet_baseline", _write(tmp / "f.ome.tif", nan, "ZYX"), "NaN"),
    ]


LABEL_CASES = ["wrong shape", "3D label for a 2D image", "unknown class", "non-integer", "negative", "not an image",
               "NaN target"]


@pytest.mark.parametrize("case", LABEL_CASES)
def test_bad_label_is_refused_at_upload(case, srv, tmp_path):
    name, model, content, expected = next(c for c in _labels(tmp_path) if c[0] == case)
    image = f"{model}_sample" if model == "fnet_baseline" else CELL
    tag = "check_" + case.replace(" ", "_").replace("-", "_")
    body, headers = _multipart("label", "lab.ome.tif", content)
    status, _, resp = _request("PUT", f"{srv['url']}/datastore/label?image={image}&tag={tag}&model={model}",
                               body, headers)
    assert status == 422, resp
    assert expected in json.loads(resp)["detail"], resp
    assert not (srv["studies"] / "labels" / tag).exists()


def test_label_without_target_must_fit_a_trained_bundle(srv, tmp_path):
    # class 5: no bundle trained on classes knows it, but instance labels (isl_cell_instance) take it
    lab = np.zeros((75, 90), np.uint8)
    lab[5:15, 5:15] = 5
    body, headers = _multipart("label", "lab.ome.tif", _write(tmp_path / "l.ome.tif", lab, "YX"))
    status, _, resp = _request("PUT", f"{srv['url']}/datastore/label?image={CELL}&tag=any", body, headers)
    assert status == 200, resp
    body, headers = _multipart("label", "lab.ome.tif", _write(tmp_path / "m.ome.tif", lab[:60], "YX"))
    status, _, resp = _request("PUT", f"{srv['url']}/datastore/label?image={CELL}&tag=any2", body, headers)
    assert status == 422 and "spatial shape (60, 90)" in json.loads(resp)["detail"], resp


# ------------------------------------------------------------------------------------------ bad input for a model
def test_inference_on_an_image_the_model_cannot_take(srv, tmp_path):
    url = srv["url"]
    log_start = os.path.getsize(srv["log"])
    # 2 channels where isl_nucleus_seg (its shipped model) takes 1: uploaded, refused by name
    two = np.random.default_rng(0).random((2, 75, 90)).astype(np.float32)
    body, headers = _multipart("file", "two.ome.tif", _write(tmp_path / "two.ome.tif", two, "CYX"))
    status, _, resp = _request("POST", f"{url}/infer/isl_nucleus_seg?output=image", body, headers)
    detail = json.loads(resp)["detail"]
    assert status == 422 and "2 channel(s)" in detail and "1 channel(s)" in detail and "2D" in detail, detail
    # a 2D image for the 3D fnet_baseline
    status, _, resp = _request("POST", f"{url}/infer/fnet_baseline?image={CELL}&output=image", b"")
    detail = json.loads(resp)["detail"]
    assert status == 422 and "2 dimensions" in detail and "expects a 3D image" in detail, detail
    # not an image at all (uploaded); the upload's temporary copy is gone afterwards
    import glob
    import tempfile

    uploads = set(glob.glob(os.path.join(tempfile.gettempdir(), "zoo-upload-*")))
    body, headers = _multipart("file", "notes.ome.tif", b"plain text\n")
    status, _, resp = _request("POST", f"{url}/infer/isl_cell_instance?output=image", body, headers)
    detail = json.loads(resp)["detail"]
    assert status == 422 and "unreadable" in detail and "expects a 2D image" in detail, detail
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "zoo-upload-*"))) <= uploads
    # refused before the network runs: MONAI Label loads a model's network when its inferer first runs, and
    # neither of these models was ever loaded
    with open(srv["log"]) as f:
        f.seek(log_start)
        log = f.read()
    loaded = [line for line in log.splitlines() if "Infer model path" in line or "Inferer::" in line]
    assert not [line for line in loaded if "isl_nucleus_seg" in line or "fnet_baseline" in line], loaded
    assert "Latencies" not in log


# ------------------------------------------------------------------------------------------ training status
def test_train_refuses_bad_labels_at_once_and_reports_a_failed_job(srv, tmp_path):
    url = srv["url"]
    lab = np.zeros((75, 90), np.uint8)
    lab[5:15, 5:15] = 7
    body, headers = _multipart("label", "lab.ome.tif", _write(tmp_path / "l.ome.tif", lab, "YX"))
    # a label saved for instances, then used to train a bundle that knows classes 0/1: refused before a job starts
    assert _request("PUT", f"{url}/datastore/label?image={CELL}&tag=seven&model=isl_cell_instance", body,
                    headers)[0] == 200
    params = {"max_epochs": 1, "label_tag": "seven", "device": "cpu"}
    status, _, resp = _request("POST", f"{url}/train/isl_nucleus_seg", json.dumps(params).encode(),
                               {"Content-Type": "application/json"})
    assert status == 422 and "class(es) [7] unknown to isl_nucleus_seg" in json.loads(resp)["detail"], resp
    status, _, resp = _request("POST", f"{url}/train/isl_nucleus_seg", json.dumps({"max_epochs": "ten"}).encode(),
                               {"Content-Type": "application/json"})
    assert status == 400 and "max_epochs" in json.loads(resp)["detail"], resp
    # a job that fails inside its process (this server's override gives isl_cell_instance an invalid learning rate)
    t0 = time.time()
    status, _, resp = _request("POST", f"{url}/train/isl_cell_instance", json.dumps(params).encode(),
                               {"Content-Type": "application/json"})
    assert status == 200, resp
    job = json.loads(resp)["id"]
    task, deadline = {}, time.time() + 240
    while time.time() < deadline:
        status, _, resp = _request("GET", f"{url}/train/?all=true")
        task = next(t for t in json.loads(resp) if t["id"] == job)
        if task["status"] != "RUNNING" and task["status"] != "SUBMITTED":
            break
        time.sleep(0.5)
    print(f"\n/train/ showed {task['status']} {time.time() - t0:.1f} s after the request (job start included)")
    assert task["status"] == "ERROR", task
    assert "learning rate" in task["message"] or "Adam" in task["message"], task["message"]


# ------------------------------------------------------------------------------------------ bind address
def test_bind_address_rule_pure():
    assert safety.server_host(["main.py", "start_server", "--app", "a"]) == ("0.0.0.0", 8000)
    assert safety.server_host(["m", "start_server", "-i", "127.0.0.1", "-p", "9"]) == ("127.0.0.1", 9)
    assert safety.server_host(["m", "-m", "train"]) == (None, None)
    assert safety.server_host(["/usr/bin/uvicorn", "monailabel.app:app"]) == ("127.0.0.1", 8000)
    assert safety.server_host(["x", "monailabel.app:app", "--host", "0.0.0.0"], "uvicorn.__main__")[0] == "0.0.0.0"
    assert safety.is_loopback("127.0.0.1") and safety.is_loopback("::1") and safety.is_loopback("localhost")
    assert not safety.is_loopback("0.0.0.0") and not safety.is_loopback("") and not safety.is_loopback("192.168.1.5")
    for bad in ("..", "../x", "a/b", "a\\b", "/abs", "a..b", ".hidden", "x.", "a%2Fb", "", "a" * 201):
        with pytest.raises(safety.RequestRejected):
            safety.check_id(bad)
    assert safety.check_id("field 1.v2") == "field 1.v2"
    with pytest.raises(safety.RequestRejected):
        safety.check_tag("my tag")


def test_server_refuses_a_network_address_without_the_opt_in(tmp_path):
    studies, zoo = tmp_path / "studies", tmp_path / "zoo"
    studies.mkdir()
    zoo.mkdir()
    conf = [("zoo_dir", str(zoo)), ("models", "none")]
    proc, url, log = launch_server(tmp_path, studies, conf, host="0.0.0.0")
    try:
        rc = proc.wait(timeout=180)
    finally:
        stop_process_tree(proc)
    text = open(log).read()
    assert rc != 0 and "refusing to listen on '0.0.0.0'" in text and "allow_remote" in text, text[-3000:]
    assert "Uvicorn running" not in text
    # with the opt-in it starts, and says that it has no authentication
    proc, url, log = launch_server(tmp_path, studies, conf + [("allow_remote", "true")], host="0.0.0.0",
                                   log_name="server2.log")
    try:
        wait_for_http(f"{url}/info/", proc, timeout=180, log_path=str(log))
        assert "NO authentication" in open(log).read()
    finally:
        stop_process_tree(proc)


def _non_loopback_ipv4():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if safety.is_loopback(ip) else ip


def test_clients_from_the_network_are_refused_when_the_bind_rule_is_bypassed(tmp_path):
    """A server started from Python (uvicorn.run: the bind rule cannot see the address) on a network address:
    the app still answers clients other than this machine with 403."""
    from distribution_testing import free_port

    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    studies, zoo = tmp_path / "studies", tmp_path / "zoo"
    studies.mkdir()
    zoo.mkdir()
    app = app_copy(tmp_path)
    port = free_port()
    e = server_env()
    e.update({"MONAI_LABEL_APP_DIR": str(app), "MONAI_LABEL_STUDIES": str(studies),
              "MONAI_LABEL_APP_CONF": json.dumps({"zoo_dir": str(zoo), "models": "none"}),
              "NO_PROXY": f"127.0.0.1,localhost,{ip}", "no_proxy": f"127.0.0.1,localhost,{ip}"})
    log = tmp_path / "uvicorn.log"
    proc = subprocess.Popen([sys.executable, "-c", f"import uvicorn; uvicorn.run('monailabel.app:app', host='{ip}', "
                             f"port={port})"], cwd=str(tmp_path), env=e, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    try:
        deadline, status, body = time.time() + 180, None, b""
        while time.time() < deadline and proc.poll() is None:
            try:
                status, _, body = _request("GET", f"http://{ip}:{port}/info/", timeout=10)
                break
            except OSError:
                time.sleep(0.5)
        assert status == 403, (status, body, open(log).read()[-3000:])
        assert "serves this machine only" in json.loads(body)["detail"]
    finally:
        stop_process_tree(proc)


# ------------------------------------------------------------------------------------------ load
def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_fifty_concurrent_inferences(srv):
    """50 concurrent /infer (a fixed count, a thread pool): every one answered, none 5xx, server memory bounded."""
    url = f"{srv['url']}/infer/isl_cell_instance?image={CELL}&output=image"
    assert _request("POST", url, b"")[0] == 200  # warm: the network is loaded
    pid = srv["proc"].pid
    rss0 = _rss_mb(pid)
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda _: _request("POST", url, b"", timeout=300), range(50)))
    wall = time.time() - t0
    rss1 = _rss_mb(pid)
    statuses = [r[0] for r in results]
    print(f"\n50 concurrent /infer: statuses {sorted(set(statuses))}, {wall:.1f} s wall, server RSS "
          f"{rss0:.0f} -> {rss1:.0f} MB ({rss1 - rss0:+.0f} MB)")
    assert len(results) == 50 and all(s == 200 for s in statuses), statuses
    assert all(r[2][:2] in (b"II", b"MM") for r in results)
    assert rss1 - rss0 < 100, (rss0, rss1)

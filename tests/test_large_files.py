"""Weights the MONAI model-zoo way: ``large_files.yml`` served over loopback HTTP and fetched with the real
``python -m monai.bundle download_large_files`` (its ``__main__`` in this process); ``package_bundles``
checks the list (hash of the local file, the 25 MB rule, required fields) and refuses a mismatch; the
committed weights obey the rule."""

import functools
import hashlib
import http.server
import json
import os
import shutil
import threading

import pytest

from scripts import package_bundles as pack
from zoo_testing import BUNDLES, environ, run_script

SHIPPED = sorted(b for b in os.listdir(BUNDLES) if os.path.isfile(os.path.join(BUNDLES, b, "models", "model.pt")))


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A folder served by ``http.server`` in a thread on 127.0.0.1 (free port); yields ``(folder, base URL)``."""
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _bundle_copy(tmp_path, bundle):
    dst = tmp_path / bundle
    shutil.copytree(os.path.join(BUNDLES, bundle), dst, ignore=shutil.ignore_patterns("runs", "eval", "__pycache__"))
    return dst


def _weights(dst):
    """The bundle copy's ``models/model.pt`` (the shipped weights when there are some, else a stand-in file)."""
    path = dst / "models" / "model.pt"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(4096))
    return path


def _write_list(dst, entries):
    lines = ["large_files:"]
    for e in entries:
        lines.append(f"  - path: \"{e['path']}\"")
        lines += [f"    {k}: \"{e[k]}\"" for k in ("url", "hash_val", "hash_type") if k in e]
    (dst / "large_files.yml").write_text("\n".join(lines) + "\n")


def _download_large_files(dst):
    """``python -m monai.bundle download_large_files --bundle_path <dst>`` (MONAI's own ``__main__``, run in
    this process: zoo_testing.run_script), past any proxy for the loopback server."""
    with environ(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost"):
        return run_script("monai.bundle", "download_large_files", "--bundle_path", dst)


BUNDLE = SHIPPED[0] if SHIPPED else "isl_nucleus_seg"


def test_download_large_files_fetches_the_listed_file_with_its_hash(http_root, tmp_path):
    www, url = http_root
    dst = _bundle_copy(tmp_path, BUNDLE)
    w = _weights(dst)
    data = w.read_bytes()
    (www / f"{BUNDLE}_model.pt").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    _write_list(dst, [{"path": "models/model.pt", "url": f"{url}/{BUNDLE}_model.pt", "hash_val": sha,
                       "hash_type": "sha256"}])
    w.unlink()
    p = _download_large_files(dst)
    assert p.returncode == 0, p.stderr[-3000:]
    assert w.read_bytes() == data
    # a file already there with the right hash is kept (MONAI: "File exists ... skipped downloading")
    p = _download_large_files(dst)
    assert p.returncode == 0 and "skipped downloading" in (p.stdout + p.stderr)
    # and the bundle then packages: the local file has the listed hash
    assert pack.check_large_files(str(dst)) == []


def test_download_large_files_refuses_a_wrong_hash_and_leaves_nothing(http_root, tmp_path):
    """MONAI downloads into a temporary folder, checks the hash there and raises ``HashCheckError``
    (exit status 1) without moving the file into the bundle."""
    www, url = http_root
    dst = _bundle_copy(tmp_path, BUNDLE)
    w = _weights(dst)
    (www / f"{BUNDLE}_other.pt").write_bytes(w.read_bytes() + b"tampered")
    _write_list(dst, [{"path": "models/model.pt", "url": f"{url}/{BUNDLE}_other.pt",
                       "hash_val": hashlib.sha256(w.read_bytes()).hexdigest(), "hash_type": "sha256"}])
    before = sorted(os.listdir(dst / "models"))
    w.unlink()
    p = _download_large_files(dst)
    assert p.returncode != 0
    assert "HashCheckError" in p.stderr and "hash check of downloaded file failed" in p.stderr
    assert not w.exists()
    assert sorted(os.listdir(dst / "models")) == [n for n in before if n != "model.pt"]  # no partial file


def test_package_checks_the_local_file_against_large_files_yml(tmp_path):
    dst = _bundle_copy(tmp_path / "bundles", BUNDLE)
    w = _weights(dst)
    good = hashlib.sha256(w.read_bytes()).hexdigest()
    url = "https://example.org/zoo/model.pt"
    _write_list(dst, [{"path": "models/model.pt", "url": url, "hash_val": "0" * 64, "hash_type": "sha256"}])
    problems = pack.check_large_files(str(dst))
    assert len(problems) == 1 and "models/model.pt has sha256" in problems[0] and "0000000000000000" in problems[0]
    with pytest.raises(pack.PackagingError, match="large_files.yml lists"):
        pack.package(str(tmp_path / "dist"), bundles=BUNDLE, bundles_dir=str(dst.parent), record_run=True)
    assert not (tmp_path / "dist").exists()
    # md5 works too (MONAI's hash types), and the list travels in the zip
    md5 = hashlib.md5(w.read_bytes()).hexdigest()
    _write_list(dst, [{"path": "models/model.pt", "url": url, "hash_val": md5, "hash_type": "md5"}])
    assert pack.check_large_files(str(dst)) == [] and good != md5
    entries = pack.package(str(tmp_path / "dist"), bundles=BUNDLE, bundles_dir=str(dst.parent), record_run=True)
    import zipfile

    with zipfile.ZipFile(tmp_path / "dist" / f"{next(iter(entries))}.zip") as zf:
        assert zf.read(f"{BUNDLE}/large_files.yml") == (dst / "large_files.yml").read_bytes()


@pytest.mark.parametrize("entry,problem", [
    ({"path": "models/model.pt", "url": "https://x/m.pt", "hash_type": "sha256"}, "hash_val missing"),
    ({"path": "../outside.pt", "url": "https://x/m.pt", "hash_val": "ab", "hash_type": "sha256"}, "outside the bundle"),
    ({"path": "models/model.pt", "url": "https://x/m.pt", "hash_val": "ab", "hash_type": "crc32"}, "not one of md5"),
    ({"path": "models/model.pt", "url": "ftp://x/m.pt", "hash_val": "ab", "hash_type": "sha256"}, "not an http(s) URL"),
])
def test_large_files_entries_need_the_model_zoo_fields(entry, problem, tmp_path):
    dst = _bundle_copy(tmp_path, BUNDLE)
    _write_list(dst, [entry])
    problems = pack.check_large_files(str(dst))
    assert any(problem in p for p in problems), problems


def test_weight_over_25_mb_must_be_listed(tmp_path):
    dst = _bundle_copy(tmp_path, BUNDLE)
    big = dst / "models" / "model_big.pt"
    with open(big, "wb") as f:  # sparse: 26 MB without writing them
        f.truncate(26 * 1024 * 1024)
    problems = pack.check_large_files(str(dst))
    assert any("models/model_big.pt is 26.0 MiB, over the model zoo's 25 MB" in p for p in problems), problems
    sha = pack.hash_file(str(big))
    _write_list(dst, [{"path": "models/model_big.pt", "url": "https://x/big.pt", "hash_val": sha, "hash_type": "sha256"}])
    assert not [p for p in pack.check_large_files(str(dst)) if "model_big" in p]


def test_committed_weights_follow_the_zoo_rule():
    """Every weight file in the repository is <= 25 MB, carries its record, is the release that
    docs/pretrained.json describes, and all of them together stay within 60 MB."""
    total = 0
    for b in SHIPPED:
        files = pack.weight_files(os.path.join(BUNDLES, b))
        rec = json.load(open(os.path.join(BUNDLES, b, "docs", "pretrained.json")))
        for fn, path in files.items():
            size = os.path.getsize(path)
            total += size
            assert size <= pack.MAX_GIT_BYTES, f"{b}/models/{fn}: {size} bytes"
            assert rec["weights"][fn]["sha256"] == pack.sha256_file(path), f"{b}/models/{fn} is not the recorded release"
            if fn.endswith(".pt"):
                assert os.path.isfile(path[:-3] + ".json"), f"{b}/models/{fn} has no record"
        assert pack.check_large_files(os.path.join(BUNDLES, b), require_records=True) == []
    assert total <= 60 * 1024 * 1024

"""scripts/zoo.py against hostile or mistyped input: zip bombs (declared and forged sizes), bad names and
versions, unknown options; and the warning for a bundle without weights. Every case runs the script as a
subprocess and checks the named error on the last line, exit code 1 and that nothing is left on disk."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile

import pytest

from distribution_testing import free_port, stop_process_tree, wait_for_http
from zoo_testing import ROOT, env

ZOO = os.path.join(ROOT, "scripts", "zoo.py")
META = json.dumps({"version": "1.0.0"}).encode()


def _zoo(*args, cwd=None):
    e = env()
    e["NO_PROXY"] = e["no_proxy"] = "127.0.0.1,localhost"
    return subprocess.run([sys.executable, ZOO, *map(str, args)], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=120)


def _last_line(p):
    return (p.stderr.strip() or p.stdout.strip()).splitlines()[-1]


def _files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def _publish(dist, name, entries, version="1.0.0", compression=zipfile.ZIP_DEFLATED, patch=None):
    """Write ``<name>_v<version>.zip`` of ``entries`` [(arcname, bytes)] into ``dist`` and add it to the index
    there (with the sha256 of the final bytes); ``patch(bytes) -> bytes`` forges the zip first."""
    os.makedirs(dist, exist_ok=True)
    path = os.path.join(dist, f"{name}_v{version}.zip")
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for arc, data in entries:
            zf.writestr(arc, data)
    raw = open(path, "rb").read()
    if patch is not None:
        raw = patch(raw)
        open(path, "wb").write(raw)
    index_path = os.path.join(dist, "model_info.json")
    index = json.load(open(index_path)) if os.path.isfile(index_path) else {}
    index[f"{name}_v{version}"] = {"checksum": hashlib.sha256(raw).hexdigest(), "source": os.path.basename(path)}
    json.dump(index, open(index_path, "w"))
    return index_path


def _set_sizes(raw: bytes, arcname: str, size: int) -> bytes:
    """Forge the uncompressed size of ``arcname`` in its local header and the central directory."""
    raw = bytearray(raw)
    name = arcname.encode()
    local = raw.find(b"PK\x03\x04")
    while local >= 0:
        n = struct.unpack_from("<H", raw, local + 26)[0]
        if bytes(raw[local + 30:local + 30 + n]) == name:
            struct.pack_into("<I", raw, local + 22, size)
            break
        local = raw.find(b"PK\x03\x04", local + 4)
    central = raw.find(b"PK\x01\x02")
    while central >= 0:
        n = struct.unpack_from("<H", raw, central + 28)[0]
        if bytes(raw[central + 46:central + 46 + n]) == name:
            struct.pack_into("<I", raw, central + 24, size)
            return bytes(raw)
        central = raw.find(b"PK\x01\x02", central + 4)
    raise AssertionError(f"{arcname} not in the zip")


def _refused(p, target, *needles, rc=1):
    assert p.returncode == rc, (p.returncode, p.stdout, p.stderr)
    last = _last_line(p)
    assert last.startswith("zoo: error: "), last
    for n in needles:
        assert n in last, (n, last)
    assert "Traceback" not in p.stderr
    assert not os.path.exists(target), _files_under(target)


@pytest.fixture(scope="module")
def http_dist(tmp_path_factory):
    """A folder served by ``python -m http.server`` on a free loopback port."""
    dist = tmp_path_factory.mktemp("dist")
    port = free_port()
    log = dist.parent / "http.log"
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(dist)], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        (dist / "ping").write_text("ok")
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=60, log_path=str(log))
        yield dist, f"http://127.0.0.1:{port}"
    finally:
        stop_process_tree(proc)


# --------------------------------------------------------------------------------------------- sizes
def test_zip_bomb_over_the_ratio_is_refused_over_http(http_dist, tmp_path):
    dist, url = http_dist
    zeros = b"\0" * (16 << 20)  # 16 MiB of zeros deflate to ~16 kB: ratio ~1000
    _publish(dist, "bomb", [("bomb/configs/metadata.json", META), ("bomb/zeros.bin", zeros)])
    target = tmp_path / "a" / "b"
    p = _zoo("download", "bomb", "--index", f"{url}/model_info.json", "--bundle_dir", target)
    _refused(p, tmp_path / "a", "compression ratio", "over the limit of 200", "--max_ratio")
    # the user who trusts the source can raise the limit
    p = _zoo("download", "bomb", "--index", f"{url}/model_info.json", "--bundle_dir", target, "--max_ratio", 5000)
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(target / "bomb" / "zeros.bin") == len(zeros)


def test_many_small_entries_over_the_ratio_are_refused(tmp_path):
    """No entry reaches the per-entry threshold (1 MiB), the zip as a whole does: 40 x 512 kB of zeros."""
    entries = [("many/configs/metadata.json", META)] + [(f"many/z{i}.bin", b"\0" * (512 << 10)) for i in range(40)]
    index = _publish(tmp_path / "dist", "many", entries)
    p = _zoo("download", "many", "--index", index, "--bundle_dir", tmp_path / "out")
    _refused(p, tmp_path / "out", "compression ratio", "expand to 20971", "over the limit of 200")


def test_total_size_over_the_limit_is_refused(tmp_path):
    incompressible = os.urandom(3 << 20)
    index = _publish(tmp_path / "dist", "big", [("big/configs/metadata.json", META), ("big/w.bin", incompressible)])
    p = _zoo("download", "big", "--index", index, "--bundle_dir", tmp_path / "out", "--max_size", 2 << 20)
    _refused(p, tmp_path / "out", "would expand to 3145", "over the limit of 2097152 bytes", "--max_size")
    p = _zoo("download", "big", "--index", index, "--bundle_dir", tmp_path / "out")  # default 2 GiB: fine
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "big" / "w.bin").read_bytes() == incompressible


def test_declared_size_over_the_default_limit_is_refused_before_extracting(tmp_path):
    """A central directory that declares 3 GiB for one entry: refused from the directory (no byte written)."""
    index = _publish(tmp_path / "dist", "huge", [("huge/configs/metadata.json", META), ("huge/w.bin", b"x" * 1000)],
                     compression=zipfile.ZIP_STORED, patch=lambda raw: _set_sizes(raw, "huge/w.bin", 3 << 30))
    p = _zoo("download", "huge", "--index", index, "--bundle_dir", tmp_path / "out")
    _refused(p, tmp_path / "out", "it would expand to 32212254", "over the limit of 2147483648 bytes")


def test_forged_small_size_does_not_get_past_the_extraction(tmp_path):
    """The headers declare 1000 bytes for an entry whose deflate stream holds 4 MiB: the declared sizes pass
    the check, the extraction stops at the declared size and refuses the entry by name."""
    data = os.urandom(1 << 20) * 4
    index = _publish(tmp_path / "dist", "liar", [("liar/configs/metadata.json", META), ("liar/w.bin", data)],
                     patch=lambda raw: _set_sizes(raw, "liar/w.bin", 1000))
    p = _zoo("download", "liar", "--index", index, "--bundle_dir", tmp_path / "out")
    _refused(p, tmp_path / "out", "entry 'liar/w.bin' is corrupt", "Bad CRC-32")


def test_largest_real_bundle_fits_the_default_limits(tmp_path):
    """A release zip as scripts/package_bundles.py makes it, with the largest weights a zip can carry (24 MiB:
    larger files go to large_files.yml and are not zipped, the model zoo's rule) stands far below the
    defaults: ratio ~1.1 of 200, ~0.03 GB of 2 GiB."""
    import shutil

    import numpy as np

    src = os.path.join(ROOT, "bundles", "fnet_baseline")
    bundles = tmp_path / "bundles"
    shutil.copytree(src, bundles / "fnet_baseline", ignore=shutil.ignore_patterns("*.pt", "*.ts", "runs", "data"))
    weights = np.random.default_rng(0).normal(0, 0.05, (24 << 20) // 4).astype(np.float32)
    (bundles / "fnet_baseline" / "models" / "model.pt").write_bytes(weights.tobytes())
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "package_bundles.py"), "--out_dir",
                        str(tmp_path / "dist"), "--bundles_dir", str(bundles), "--bundles", "fnet_baseline",
                        "--record_run"],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (zip_path,) = (tmp_path / "dist").glob("*.zip")
    with zipfile.ZipFile(zip_path) as zf:
        total = sum(i.file_size for i in zf.infolist())
        worst = max(i.file_size / max(i.compress_size, 1) for i in zf.infolist() if i.file_size >= 1 << 20)
    assert 25e6 < total < 2**31 / 10 and total / os.path.getsize(zip_path) < 2 and worst < 2
    p = _zoo("download", "fnet_baseline", "--index", tmp_path / "dist" / "model_info.json", "--bundle_dir",
             tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert "carries no weights" not in p.stderr
    assert (tmp_path / "out" / "fnet_baseline" / "models" / "model.pt").stat().st_size == weights.nbytes


# --------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "-rf", "fnet..x", "x\\y", "a b", ""])
def test_bad_bundle_names_are_refused_and_nothing_is_created(name, tmp_path):
    index = _publish(tmp_path / "dist", "ok", [("ok/configs/metadata.json", META)])
    target = tmp_path / "deep" / "target"
    p = _zoo("download", f"--name={name}", "--index", index, "--bundle_dir", target)
    _refused(p, tmp_path / "deep", "is not a plain name", repr(name))
    assert sorted(os.listdir(tmp_path)) == ["dist"]


@pytest.mark.parametrize("version, shown", [("1.0", "'1.0'"), ("../1.0.0", "'../1.0.0'"), ("latest", "'latest'"),
                                            ("1.0.0/../..", "'1.0.0/../..'")])
def test_bad_versions_are_refused(version, shown, tmp_path):
    index = _publish(tmp_path / "dist", "ok", [("ok/configs/metadata.json", META)])
    p = _zoo("download", "ok", "--index", index, "--bundle_dir", tmp_path / "out", f"--version={version}")
    _refused(p, tmp_path / "out", "is not MAJOR.MINOR.PATCH", shown)


def test_unknown_option_and_command_are_refused_before_any_download(tmp_path):
    index = _publish(tmp_path / "dist", "ok", [("ok/configs/metadata.json", META)])
    p = _zoo("download", "ok", "--index", index, "--bundle_dir", tmp_path / "out", "--overwrit")
    _refused(p, tmp_path / "out", "unknown option '--overwrit'", "--overwrite", rc=2)
    p = _zoo("download", "ok", "--index", index, "--bundle_dir", tmp_path / "out", "--version", "1.0.0", "a", "b",
             "c", "d")
    _refused(p, tmp_path / "out", "positional arguments", rc=2)
    p = _zoo("downlaod", "ok", "--index", index)
    assert p.returncode == 2 and "unknown command 'downlaod'" in _last_line(p)
    # fire's short flags still work
    p = _zoo("download", "ok", "--index", index, "-b", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "ok" / "configs" / "metadata.json").is_file()


def test_unwritable_bundle_dir_is_a_named_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/zoo_cannot_write_here"  # root ignores permission bits; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "out"
    index = _publish(tmp_path / "dist", "ok", [("ok/configs/metadata.json", META)])
    p = _zoo("download", "ok", "--index", index, "--bundle_dir", target)
    _refused(p, target, "cannot create the download folder", "writable --bundle_dir")


# --------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("extra, expected", [
    ([], "carries no weights (no models/model.pt, no large_files.yml)"),
    ([("w/large_files.yml", b"large_files: []\n")], "download_large_files"),
    ([("w/models/model.pt", b"weights")], None),
])
def test_download_warns_when_the_bundle_carries_no_weights(extra, expected, tmp_path):
    index = _publish(tmp_path / "dist", "w", [("w/configs/metadata.json", META), *extra])
    p = _zoo("download", "w", "--index", index, "--bundle_dir", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "w" / "configs" / "metadata.json").is_file()
    if expected is None:
        assert "weights" not in p.stderr
    else:
        assert expected in _last_line(p) and str(tmp_path / "out" / "w") in _last_line(p)

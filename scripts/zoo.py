"""Download a packaged bundle of the zoo: latest version by numeric order, sha256 verified, safe extraction.

    python scripts/zoo.py list --index https://example.org/labelfree-zoo/model_info.json
    python scripts/zoo.py download fnet_baseline --index https://example.org/labelfree-zoo/model_info.json
    python scripts/zoo.py download fnet_baseline --version 0.1.0 --index dist/model_info.json --bundle_dir models_zoo

The index is the ``model_info.json`` written by ``scripts/package_bundles.py`` (MONAI's format:
``{"<name>_v<version>": {"checksum": "<sha256>", "source": "<url>"}}``), given as an ``http(s)://`` or
``file://`` URL or a local path; a relative ``source`` is resolved against the index's location.

Why not only ``python -m monai.bundle download``: MONAI's lookup of the latest version sorts version strings
(so 0.9.0 beats 0.10.0) and its ``--url`` download checks no checksum. This helper

* picks the highest version by numeric (semantic-version) order, or the one given with ``--version``;
* verifies the zip's sha256 against the index and refuses a mismatch;
* refuses a zip whose entries are not all inside one top folder ``<name>/`` (absolute paths, ``..``,
  links, another top folder), and a zip whose ``configs/metadata.json`` names another version;
* extracts into a temporary folder beside the target and renames it into place, so on any error nothing is
  left behind and an existing copy is untouched (it is replaced only with ``--overwrite``).

The bundle lands in ``<bundle_dir>/<name>/``; run it from there (see the bundle's ``docs/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile

import fire

CHUNK = 1 << 20
_KEY = re.compile(r"^(?P<name>.+)_v(?P<version>\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?)$")


class ZooError(RuntimeError):
    """A download was refused or failed; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- versions
def version_key(version: str) -> tuple:
    """Sort key of a semantic version: numeric fields compare as numbers, a release ranks above its
    pre-releases (``1.0.0-rc.1 < 1.0.0``), build metadata (``+...``) is ignored.

    >>> sorted(["0.10.0", "0.9.0", "0.9.1"], key=version_key)
    ['0.9.0', '0.9.1', '0.10.0']
    """
    core, _, _build = version.partition("+")
    core, _, pre = core.partition("-")
    parts = core.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ZooError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")) if pre else ()
    return tuple(int(p) for p in parts) + ((0, pre_key) if pre else (1, ()),)


def parse_key(key: str) -> tuple[str, str] | None:
    """``"fnet_baseline_v0.10.0"`` -> ``("fnet_baseline", "0.10.0")``; ``None`` for keys of another form."""
    m = _KEY.match(key)
    return (m.group("name"), m.group("version")) if m else None


def versions_of(index: dict, name: str) -> list[str]:
    """Versions of ``name`` in the index, lowest to highest."""
    found = [p[1] for p in map(parse_key, index) if p and p[0] == name]
    return sorted(found, key=version_key)


def choose(index: dict, name: str, version: str | None = None) -> tuple[str, dict]:
    """``(version, entry)``: the requested version, or the latest one."""
    available = versions_of(index, name)
    if not available:
        names = sorted({p[0] for p in map(parse_key, index) if p})
        raise ZooError(f"no bundle named {name!r} in the index; available: {', '.join(names) or 'none'}")
    if version is None:
        version = available[-1]
    elif str(version) not in available:
        raise ZooError(f"{name} has no version {version}; available: {', '.join(available)}")
    version = str(version)
    entry = index[f"{name}_v{version}"]
    if not isinstance(entry, dict) or not entry.get("source") or not entry.get("checksum"):
        raise ZooError(f"index entry {name}_v{version} lacks 'source' or 'checksum': {entry!r}")
    return version, entry


# ---------------------------------------------------------------------------------------------- fetching
def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https", "file")


def _local_path(s: str) -> str:
    if s.startswith("file://"):
        return urllib.request.url2pathname(urllib.parse.urlparse(s).path)
    return s


def resolve_source(index_location: str, source: str) -> str:
    """A source URL/path as given, or relative to the index's folder/URL."""
    if _is_url(source) or os.path.isabs(source):
        return source
    if _is_url(index_location) and not index_location.startswith("file://"):
        return urllib.parse.urljoin(index_location, source)
    return os.path.join(os.path.dirname(os.path.abspath(_local_path(index_location))), source)


def _open(location: str, timeout: float):
    if _is_url(location) and not location.startswith("file://"):
        try:
            return urllib.request.urlopen(location, timeout=timeout)  # noqa: S310 (http/https only)
        except OSError as e:
            raise ZooError(f"cannot fetch {location}: {e}") from e
    path = _local_path(location)
    if not os.path.isfile(path):
        raise ZooError(f"{path}: not found")
    return open(path, "rb")


def load_index(index: str, timeout: float = 60) -> dict:
    """The zoo index (``model_info.json``) from a URL or path."""
    with _open(index, timeout) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{index}: not a JSON index ({e})") from e
    if not isinstance(data, dict):
        raise ZooError(f"{index}: the index must be a JSON object of '<name>_v<version>' entries")
    return data


def fetch(location: str, dest: str, timeout: float = 60, progress: bool = True) -> str:
    """Copy a URL/path to ``dest``; returns its sha256."""
    h = hashlib.sha256()
    with _open(location, timeout) as src, open(dest, "wb") as out:
        headers = getattr(src, "headers", None)
        total = int(headers.get("Content-Length") or 0) if headers is not None else 0
        done, last = 0, -1
        for block in iter(lambda: src.read(CHUNK), b""):
            out.write(block)
            h.update(block)
            done += len(block)
            if progress and total and sys.stderr.isatty():
                pct = 100 * done // total
                if pct != last:
                    print(f"\r  {done / 1e6:.1f}/{total / 1e6:.1f} MB ({pct}%)", end="", file=sys.stderr, flush=True)
                    last = pct
        if progress and total and sys.stderr.isatty():
            print(file=sys.stderr)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- checking
def check_members(zf: zipfile.ZipFile, name: str) -> list[zipfile.ZipInfo]:
    """Every entry of the zip must be a plain file or folder inside ``<name>/``; returns the entries."""
    infos = zf.infolist()
    if not infos:
        raise ZooError("the zip is empty")
    bad = []
    for info in infos:
        n = info.filename
        mode = info.external_attr >> 16
        norm = posixpath.normpath(n.replace("\\", "/"))
        if "\\" in n or n.startswith("/") or re.match(r"^[A-Za-z]:", n) or posixpath.isabs(norm):
            bad.append(f"{n!r} (absolute or non-POSIX path)")
        elif norm == ".." or norm.startswith("../") or "/../" in f"/{n}/":
            bad.append(f"{n!r} (escapes the target folder with '..')")
        elif norm.split("/")[0] != name or (norm == name and not info.is_dir()):
            bad.append(f"{n!r} (outside the top folder '{name}/')")
        elif stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # no type bits: a plain file
            bad.append(f"{n!r} (a link or special file)")
    if bad:
        raise ZooError(f"refusing the zip: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} would land outside "
                       f"'{name}/' or are not plain files: " + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    return infos


def _extract(zf: zipfile.ZipFile, infos, dest: str) -> None:
    root = os.path.realpath(dest)
    for info in infos:
        target = os.path.realpath(os.path.join(root, *info.filename.split("/")))
        if os.path.commonpath([root, target]) != root:  # belt and braces after check_members
            raise ZooError(f"refusing the zip: {info.filename!r} escapes the target folder")
        if info.is_dir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)


# ---------------------------------------------------------------------------------------------- commands
def download(name: str, index: str, version: str | None = None, bundle_dir: str = "bundles",
             overwrite: bool = False, timeout: float = 60, progress: bool = True) -> str:
    """Download bundle ``name`` into ``<bundle_dir>/<name>``; returns that folder.

    Args:
        name: bundle name, e.g. ``fnet_baseline``.
        index: ``model_info.json`` URL or path.
        version: exact version; default the highest one in the index (numeric order).
        bundle_dir: parent folder of the downloaded bundle (created if needed).
        overwrite: replace an existing ``<bundle_dir>/<name>``.
    """
    idx = load_index(index, timeout)
    version, entry = choose(idx, name, None if version is None else str(version))
    source = resolve_source(index, entry["source"])
    expected = str(entry["checksum"]).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ZooError(f"index entry {name}_v{version}: checksum {entry['checksum']!r} is not a sha256 hex digest")
    bundle_dir = os.path.abspath(bundle_dir)
    final = os.path.join(bundle_dir, name)
    if os.path.exists(final) and not overwrite:
        raise ZooError(f"{final} already exists; remove it or pass --overwrite")
    created = not os.path.isdir(bundle_dir)
    os.makedirs(bundle_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}_download_", dir=bundle_dir)
    ok = False
    try:
        zip_path = os.path.join(work, f"{name}_v{version}.zip")
        print(f"downloading {name} {version} from {source}", flush=True)
        got = fetch(source, zip_path, timeout, progress)
        if got != expected:
            raise ZooError(f"checksum mismatch for {name}_v{version} from {source}: index says sha256 {expected}, "
                           f"the download has {got}; the file is corrupt or was replaced, nothing was installed")
        try:
            zf = zipfile.ZipFile(zip_path)
        except zipfile.BadZipFile as e:
            raise ZooError(f"{source}: not a zip file ({e})") from e
        with zf:
            infos = check_members(zf, name)
            staged = os.path.join(work, "extract")
            os.makedirs(staged)
            _extract(zf, infos, staged)
        meta_path = os.path.join(staged, name, "configs", "metadata.json")
        try:
            with open(meta_path) as f:
                got_version = json.load(f).get("version")
        except (OSError, json.JSONDecodeError) as e:
            raise ZooError(f"{source}: no readable {name}/configs/metadata.json in the zip ({e})") from e
        if got_version != version:
            raise ZooError(f"{source}: metadata.json says version {got_version!r}, the index says {version}")
        old = None
        if os.path.exists(final):  # overwrite: swap in, then drop the old copy
            old = os.path.join(work, "previous")
            os.replace(final, old)
        try:
            os.replace(os.path.join(staged, name), final)
        except OSError:
            if old is not None:
                os.replace(old, final)  # put the previous copy back
            raise
        ok = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not ok and created and not os.listdir(bundle_dir):
            os.rmdir(bundle_dir)
    print(f"{name} {version} (sha256 {expected}) -> {final}")
    return final


def list_bundles(index: str, timeout: float = 60) -> dict:
    """``{name: [versions, lowest to highest]}`` of an index."""
    idx = load_index(index, timeout)
    names = sorted({p[0] for p in map(parse_key, idx) if p})
    return {n: versions_of(idx, n) for n in names}


class Cli:
    """Zoo helper: ``list`` the bundles of an index, ``download`` one."""

    def list(self, index: str):
        for n, vs in list_bundles(index).items():
            print(f"{n}: {', '.join(vs)} (latest {vs[-1]})")

    def download(self, name: str, index: str, version: str | None = None, bundle_dir: str = "bundles",
                 overwrite: bool = False):
        download(name, index, version, bundle_dir, overwrite)


def main(argv=None):
    try:
        fire.Fire(Cli, command=argv)
    except ZooError as e:
        sys.exit(f"zoo: error: {e}")


if __name__ == "__main__":
    main()

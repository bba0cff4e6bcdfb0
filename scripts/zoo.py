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
* refuses a bundle name or version that is not a plain identifier (``[A-Za-z0-9_][A-Za-z0-9_.-]*`` without
  ``..``; ``MAJOR.MINOR.PATCH``), before anything is fetched or created;
* refuses a zip whose entries are not all inside one top folder ``<name>/`` (absolute paths, ``..``,
  links, another top folder), and a zip whose ``configs/metadata.json`` names another version;
* refuses a zip that would expand to more than ``--max_size`` bytes in all (default 2 GiB, ten times the
  largest released bundle with its vendored ``common`` and weights) or whose compression ratio is over
  ``--max_ratio`` (default 200; weights and code compress about 1.1x and 4x), read from the zip's central
  directory before anything is extracted, and counted again on the bytes actually written, so a zip whose
  headers lie is stopped as well;
* warns when the bundle carries no weights (neither ``models/model.pt`` nor ``large_files.yml``);
* extracts into a temporary folder beside the target and renames it into place, so on any error nothing is
  left behind and an existing copy is untouched (it is replaced only with ``--overwrite``).

The bundle lands in ``<bundle_dir>/<name>/``; run it from there (see the bundle's ``docs/README.md``).
"""

from __future__ import annotations

import hashlib
import inspect
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
import zlib

import fire

CHUNK = 1 << 20
#: Default limit on what one bundle zip may expand to (bytes): the largest release (F-net, 89 MiB of weights,
#: plus ``model.ts`` and the vendored ``common``) is about 200 MB, so 2 GiB leaves a tenfold margin.
MAX_SIZE = 2 << 30
#: Default limit on the compression ratio (uncompressed / compressed) of the zip and of each entry of at least
#: ``RATIO_MIN_BYTES``; weights compress about 1.1x, Python and JSON about 4x, a zip bomb 1000x.
MAX_RATIO = 200.0
RATIO_MIN_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_KEY = re.compile(r"^(?P<name>.+)_v(?P<version>\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?)$")


class ZooError(RuntimeError):
    """A download was refused or failed; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- identifiers
def check_name(name) -> str:
    """``name`` if it is a plain bundle name (``[A-Za-z0-9_][A-Za-z0-9_.-]*``, no ``..``), else :class:`ZooError`.

    A name becomes a folder name and a zip's top folder, so a path separator, ``..`` or a leading ``.``/``-``
    is refused before anything is fetched or created.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ZooError(f"bundle name {name!r} is not a plain name (letters, digits, '_', '.', '-', starting with a "
                       "letter, digit or '_', no '..' or '/'); give the name as `zoo.py list` shows it")
    return name


def check_version(version) -> str:
    """``version`` as a string if it is a semantic version ``MAJOR.MINOR.PATCH[-pre][+build]``, else :class:`ZooError`."""
    v = str(version)
    if not _VERSION.fullmatch(v):
        raise ZooError(f"version {v!r} is not MAJOR.MINOR.PATCH (e.g. 0.1.0); quote it on the command line "
                       "(--version 0.1.0) and take it from `zoo.py list`")
    return v


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


def _size_hint(max_size: int, max_ratio: float) -> str:
    return (f"if you trust this source and the bundle is really this large, raise the limits with --max_size "
            f"(now {max_size} bytes) or --max_ratio (now {max_ratio:g}); otherwise do not use this zip")


def check_sizes(zf: zipfile.ZipFile, infos, zip_bytes: int, max_size: int = MAX_SIZE,
                max_ratio: float = MAX_RATIO) -> int:
    """Refuse a zip that would expand beyond the limits, from its central directory; returns the total size.

    Limits: the sum of the declared uncompressed sizes is at most ``max_size`` bytes; the ratio of that sum to
    the zip's size, and of each entry of at least :data:`RATIO_MIN_BYTES` to its compressed size, is at most
    ``max_ratio`` (small entries are exempt: a few kB of text can compress 200x and cannot fill a disk).
    The declared sizes may lie; :func:`_extract` counts the bytes it writes against the same limits.
    """
    total = sum(i.file_size for i in infos)
    hint = _size_hint(max_size, max_ratio)
    if total > max_size:
        raise ZooError(f"refusing the zip: it would expand to {total} bytes, over the limit of {max_size} bytes; "
                       f"{hint}")
    if total >= RATIO_MIN_BYTES and total > max_ratio * max(zip_bytes, 1):
        raise ZooError(f"refusing the zip: compression ratio {total / max(zip_bytes, 1):.0f} ({zip_bytes} bytes "
                       f"expand to {total}) is over the limit of {max_ratio:g}, as in a zip bomb; {hint}")
    for i in infos:
        if i.file_size >= RATIO_MIN_BYTES and i.file_size > max_ratio * max(i.compress_size, 1):
            raise ZooError(f"refusing the zip: entry {i.filename!r} has compression ratio "
                           f"{i.file_size / max(i.compress_size, 1):.0f} ({i.compress_size} bytes expand to "
                           f"{i.file_size}), over the limit of {max_ratio:g}, as in a zip bomb; {hint}")
    return total


def _extract(zf: zipfile.ZipFile, infos, dest: str, max_size: int = MAX_SIZE, max_ratio: float = MAX_RATIO) -> None:
    """Extract ``infos`` into ``dest``, counting the bytes actually written: an entry longer than its header
    says, or a total over ``max_size``, stops the extraction with :class:`ZooError`."""
    root = os.path.realpath(dest)
    written = 0
    for info in infos:
        target = os.path.realpath(os.path.join(root, *info.filename.split("/")))
        if os.path.commonpath([root, target]) != root:  # belt and braces after check_members
            raise ZooError(f"refusing the zip: {info.filename!r} escapes the target folder")
        if info.is_dir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        got = 0
        try:
            with zf.open(info) as src, open(target, "wb") as out:
                for block in iter(lambda: src.read(CHUNK), b""):
                    got += len(block)
                    written += len(block)
                    if got > info.file_size:
                        raise ZooError(f"refusing the zip: entry {info.filename!r} expands beyond the "
                                       f"{info.file_size} bytes its header declares (a forged zip); do not use it")
                    if written > max_size:
                        raise ZooError(f"refusing the zip: it expands beyond the limit of {max_size} bytes while "
                                       f"extracting {info.filename!r}; {_size_hint(max_size, max_ratio)}")
                    out.write(block)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
            if isinstance(e, ZooError):
                raise
            raise ZooError(f"refusing the zip: entry {info.filename!r} is corrupt or unsupported "
                           f"({type(e).__name__}: {e}); download it again or ask the publisher") from e
        if got != info.file_size:
            raise ZooError(f"refusing the zip: entry {info.filename!r} holds {got} bytes, its header declares "
                           f"{info.file_size} (a forged or truncated zip); do not use it")


# ---------------------------------------------------------------------------------------------- commands
def _created_dirs(path: str) -> list[str]:
    """The folders ``os.makedirs(path)`` would create, deepest first."""
    out = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def weights_note(bundle_root: str) -> str | None:
    """A warning when a bundle folder carries no weights (no ``models/model.pt``, ``models/model.ts`` nor
    ``large_files.yml``), a hint when its weights are still to be fetched; ``None`` when ``models/model.pt`` is there."""
    models = os.path.join(bundle_root, "models")
    if os.path.isfile(os.path.join(models, "model.pt")):
        return None
    if os.path.isfile(os.path.join(bundle_root, "large_files.yml")):
        return (f"note: {bundle_root} lists its weights in large_files.yml; fetch them with "
                f"`python -m monai.bundle download_large_files --bundle_path {bundle_root}`")
    if os.path.isfile(os.path.join(models, "model.ts")):
        return None
    return (f"warning: {bundle_root} carries no weights (no models/model.pt, no large_files.yml): inference will "
            "fail until you train it (see its docs/README.md) or copy a trained model.pt into its models/ folder")


def download(name: str, index: str, version: str | None = None, bundle_dir: str = "bundles",
             overwrite: bool = False, timeout: float = 60, progress: bool = True, max_size: int = MAX_SIZE,
             max_ratio: float = MAX_RATIO) -> str:
    """Download bundle ``name`` into ``<bundle_dir>/<name>``; returns that folder.

    Args:
        name: bundle name, e.g. ``fnet_baseline``.
        index: ``model_info.json`` URL or path.
        version: exact version; default the highest one in the index (numeric order).
        bundle_dir: parent folder of the downloaded bundle (created if needed).
        overwrite: replace an existing ``<bundle_dir>/<name>``.
        max_size: refuse a zip that expands to more bytes than this (see :func:`check_sizes`).
        max_ratio: refuse a zip (or a large entry) compressed more than this (see :func:`check_sizes`).

    Raises:
        ZooError: anything refused or failed; nothing is left on disk (an existing copy stays as it was).
    """
    check_name(name)
    if version is not None:
        version = check_version(version)
    if not float(max_size) > 0 or not float(max_ratio) > 0:
        raise ZooError(f"--max_size ({max_size}) and --max_ratio ({max_ratio}) must be positive numbers")
    idx = load_index(index, timeout)
    version, entry = choose(idx, name, version)
    check_version(version)
    source = resolve_source(index, entry["source"])
    expected = str(entry["checksum"]).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ZooError(f"index entry {name}_v{version}: checksum {entry['checksum']!r} is not a sha256 hex digest")
    bundle_dir = os.path.abspath(bundle_dir)
    final = os.path.join(bundle_dir, name)
    if os.path.exists(final) and not overwrite:
        raise ZooError(f"{final} already exists; remove it or pass --overwrite")
    created = _created_dirs(bundle_dir)
    work = None
    ok = False
    try:
        try:
            os.makedirs(bundle_dir, exist_ok=True)
            work = tempfile.mkdtemp(prefix=f".{name}_download_", dir=bundle_dir)
        except OSError as e:
            raise ZooError(f"cannot create the download folder in {bundle_dir}: {e.strerror or e}; choose a writable "
                           "--bundle_dir") from e
        zip_path = os.path.join(work, f"{name}_v{version}.zip")
        print(f"downloading {name} {version} from {source}", flush=True)
        got = fetch(source, zip_path, timeout, progress)
        if got != expected:
            raise ZooError(f"checksum mismatch for {name}_v{version} from {source}: index says sha256 {expected}, "
                           f"the download has {got}; the file is corrupt or was replaced, nothing was installed")
        try:
            zf = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
            raise ZooError(f"{source}: not a zip file ({e}); download it again or ask the publisher") from e
        with zf:
            infos = check_members(zf, name)
            total = check_sizes(zf, infos, os.path.getsize(zip_path), int(max_size), float(max_ratio))
            free = shutil.disk_usage(work).free
            if total > free:
                raise ZooError(f"{bundle_dir}: {free} bytes free, the bundle needs {total}; free some space or "
                               "choose another --bundle_dir")
            staged = os.path.join(work, "extract")
            os.makedirs(staged)
            _extract(zf, infos, staged, int(max_size), float(max_ratio))
        meta_path = os.path.join(staged, name, "configs", "metadata.json")
        try:
            with open(meta_path) as f:
                got_version = json.load(f).get("version")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise ZooError(f"{source}: no readable {name}/configs/metadata.json in the zip ({e}); not a bundle "
                           "of this zoo") from e
        if got_version != version:
            raise ZooError(f"{source}: metadata.json says version {got_version!r}, the index says {version}; "
                           "the index and the zip do not belong together")
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
    except OSError as e:  # disk full, permissions, ... while fetching or extracting
        raise ZooError(f"download of {name} {version} into {bundle_dir} failed: {e}; nothing was installed") from e
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if not ok:
            for d in created:  # deepest first; only the folders this call created, only when empty
                try:
                    os.rmdir(d)
                except OSError:
                    break
    print(f"{name} {version} (sha256 {expected}) -> {final}")
    note = weights_note(final)
    if note:
        print(f"zoo: {note}", file=sys.stderr, flush=True)
    return final


def list_bundles(index: str, timeout: float = 60) -> dict:
    """``{name: [versions, lowest to highest]}`` of an index."""
    idx = load_index(index, timeout)
    names = sorted({p[0] for p in map(parse_key, idx) if p})
    return {n: versions_of(idx, n) for n in names}


class Cli:
    """Zoo helper: ``list`` the bundles of an index, ``download`` one."""

    def list(self, index: str):
        """Print every bundle of the index with its versions."""
        for n, vs in list_bundles(index).items():
            print(f"{n}: {', '.join(vs)} (latest {vs[-1]})")

    def download(self, name: str, index: str, version: str | None = None, bundle_dir: str = "bundles",
                 overwrite: bool = False, max_size: int = MAX_SIZE, max_ratio: float = MAX_RATIO):
        """Download a bundle (see :func:`download`)."""
        download(name, index, version, bundle_dir, overwrite, max_size=max_size, max_ratio=max_ratio)


def _is_flag(tok: str) -> bool:
    return tok.startswith("-") and len(tok) > 1 and not re.match(r"^-\.?\d", tok)


def check_args(fn, argv, what: str) -> None:
    """Refuse options ``fn`` does not take and surplus positional arguments, before anything runs.

    Fire runs a command first and only then complains about arguments it could not use (and accepts
    abbreviations), so a mistyped ``--overwrit`` would download anyway; this check stops such a command line
    with one line naming the option and the ones ``fn`` takes.
    """
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    names = {p.name for p in params}
    given, positional, i = set(), 0, 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok == "--":  # fire's own flags follow (--help, --trace, ...)
            break
        if tok in ("-h", "--help"):
            return
        if _is_flag(tok):
            key = tok.lstrip("-").split("=", 1)[0].replace("-", "_")
            if not tok.startswith("--") and len(key) == 1:  # fire's short form: -b for --bundle_dir
                key = next(iter(n for n in names if n[0] == key), key) if sum(n[0] == key for n in names) == 1 else key
            if key not in names and not (key.startswith("no") and key[2:] in names):
                options = " ".join(f"--{n}" for n in sorted(names))
                raise ZooError(f"{what}: unknown option {tok.split('=', 1)[0]!r}; it takes {options}")
            given.add(key if key in names else key[2:])
            if "=" not in tok and i + 1 < len(argv) and not _is_flag(argv[i + 1]) and argv[i + 1] != "--":
                i += 1
        else:
            positional += 1
        i += 1
    free = [p.name for p in params if p.name not in given]
    if positional > len(free):
        raise ZooError(f"{what}: {positional} positional arguments, it takes at most {len(free)} "
                       f"({', '.join(free)}); check the quoting")


def main(argv=None):
    """Command line: ``zoo.py list ...`` / ``zoo.py download ...``; errors end as one ``zoo: error:`` line, exit
    code 1 (2 for an unknown command or option, found before anything runs)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # a usage error exits with 2 (as argparse and common.cli.strict_fire), before anything runs
        if argv and not argv[0].startswith("-"):
            if argv[0] not in ("list", "download"):
                raise ZooError(f"unknown command {argv[0]!r}; use `zoo.py list --index ...` or "
                               "`zoo.py download NAME --index ...`")
            check_args(getattr(Cli, argv[0]), argv[1:], f"zoo.py {argv[0]}")
    except ZooError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        fire.Fire(Cli, command=argv)
    except ZooError as e:
        sys.exit(f"zoo: error: {e}")


if __name__ == "__main__":
    main()

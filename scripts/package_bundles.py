"""Package the zoo's bundles as MONAI bundle zips and write the zoo index ``model_info.json``.

    python scripts/package_bundles.py --out_dir dist
    python scripts/package_bundles.py --out_dir dist --bundles fnet_baseline,spotlight_dna \
        --base_url https://example.org/labelfree-zoo/v0.1
    python scripts/package_bundles.py --out_dir dist --torchscript      # also export models/model.ts

For every bundle (a folder of ``bundles/`` with ``configs/metadata.json``) it writes
``<out_dir>/<name>_v<version>.zip`` with a single top folder ``<name>/``::

    <name>/configs/   metadata.json, inference.json, train.json, ... (as in the repository)
    <name>/docs/      README.md and figures
    <name>/LICENSE
    <name>/models/    model.pt (plain state_dict), model.json (its record: the network it was trained as)
                      and model.ts (TorchScript), when present
    <name>/large_files.yml   weight files fetched by URL (model zoo rule: files over 25 MB), when present
    <name>/scripts/   bundle-local code, when the bundle has some
    <name>/common/    the zoo's shared package, vendored so the bundle runs without this repository

A downloaded bundle runs from its own folder (``cd <name> && python -m monai.bundle run ...``: ``python -m``
puts the working directory, and so the vendored ``common``, on ``sys.path``) or from anywhere with
``PYTHONPATH=<dir>/<name>``.

``<out_dir>/model_info.json`` maps ``"<name>_v<version>"`` to ``{"checksum": "<sha256 of the zip>",
"source": "<url>"}``, MONAI's own index format. Entries already there for other versions are kept, so one
folder can hold a zoo's whole release history. Without ``--base_url`` a source is the zip's file name,
which ``scripts/zoo.py`` resolves against the index's own location (a URL or a folder).

Weights are checked against the bundle's recorded release, ``docs/pretrained.json`` (the sha256 of each
weight file of the run it describes, with its data, budget and metrics): a weight file that is not the
recorded one (e.g. a quick CPU run's narrower network) is refused, because the package's configs, README
and ``eval_metrics`` describe the recorded run. ``--record_run`` packages such weights as a new run
instead: the zip's ``docs/pretrained.json`` then names these files (and the release they replace) and the
recorded release's ``pretrained_*`` metrics are left out of the zip's metadata. A bundle without weights is
refused unless ``--allow_no_weights`` is given; its metadata then says ``"weights_included": false``.

    python scripts/package_bundles.py --out_dir dist --allow_no_weights       # configs and code only
    python scripts/package_bundles.py --out_dir dist --bundles fnet_baseline --record_run   # your own run

Weights the MONAI model-zoo way: weight files up to 25 MB live in the bundle's ``models/`` (in git, beside
their records ``models/<stem>.json``, the trained network's configuration); larger files are listed in the
bundle's ``large_files.yml`` (``large_files: [{path, url, hash_val, hash_type}]``) and fetched with
``python -m monai.bundle download_large_files --bundle_path <bundle>``. Packaging refuses a weight file over
25 MB that is not listed, an entry without ``path``/``url``/``hash_val``/``hash_type``, a path outside the
bundle, an unknown hash type, and a listed file whose local copy has another hash; ``large_files.yml``
travels in the zip, and so do the listed files that are present (fetch them first).

Versions must be semantic versions (``MAJOR.MINOR.PATCH``) with an entry in the metadata's ``changelog``;
every problem of every bundle is reported before anything is written. Zips are reproducible: the same
files give the same bytes and so the same checksum (fixed timestamps and permissions, sorted entries).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES_DIR = os.path.join(ROOT, "bundles")
COMMON_DIR = os.path.join(ROOT, "common")
INDEX_NAME = "model_info.json"

# semver.org 2.0.0 (build metadata allowed, ignored for ordering)
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
                    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$")
# what a bundle must ship (relative to its folder)
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE")
# never packaged: caches, run outputs, MONAI Label's generated config, data
SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints", "runs", "eval", "data", ".pytest_cache"}
SKIP_CONFIGS = {"monailabel_train.json"}
WEIGHT_SUFFIXES = (".pt", ".ts")
LARGE_FILES = "large_files.yml"
#: the MONAI model zoo's limit for files kept in git; larger ones go to large_files.yml
MAX_GIT_BYTES = 25 * 1024 * 1024
#: what monai.apps.utils.check_hash accepts
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # earliest date a zip can hold: reproducible archives


def _publishable(path: str) -> None:
    """mkstemp files are private (0600); released files are read by web servers: 0644 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


class PackagingError(ValueError):
    """A bundle cannot be packaged; the message lists every problem found."""


def find_bundles(bundles_dir: str = BUNDLES_DIR) -> list[str]:
    """Names of the bundle folders (those with ``configs/metadata.json``), sorted."""
    if not os.path.isdir(bundles_dir):
        raise PackagingError(f"{bundles_dir}: bundles folder not found")
    return sorted(n for n in os.listdir(bundles_dir)
                  if os.path.isfile(os.path.join(bundles_dir, n, "configs", "metadata.json")))


def check_bundle(root: str, require_weights: bool = False) -> tuple[dict, list[str]]:
    """Read and check a bundle folder; returns ``(metadata, problems)`` (problems empty when packageable)."""
    name = os.path.basename(os.path.normpath(root))
    problems = []
    for rel in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(root, rel)):
            problems.append(f"{name}: {rel} missing")
    meta = {}
    meta_path = os.path.join(root, "configs", "metadata.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{meta_path}: not valid JSON ({e})")
    version = meta.get("version")
    if meta and not isinstance(version, str):
        problems.append(f"{meta_path}: no 'version' string")
    elif meta and not SEMVER.match(version):
        problems.append(f"{meta_path}: version {version!r} is not a semantic version MAJOR.MINOR.PATCH (e.g. 0.2.0)")
    elif meta and version not in (meta.get("changelog") or {}):
        problems.append(f"{meta_path}: changelog has no entry for version {version} (add \"{version}\": \"what changed\")")
    if require_weights and not os.path.isfile(os.path.join(root, "models", "model.pt")):
        problems.append(f"{name}: models/model.pt missing (train the bundle or drop --require_weights)")
    return meta, problems


RECORD = "docs/pretrained.json"


def weight_files(root: str) -> dict[str, str]:
    """``{file name: path}`` of the weight files a package of ``root`` would carry (``models/*.pt|.ts``,
    resumable ``checkpoint*`` files excluded)."""
    models = os.path.join(root, "models")
    if not os.path.isdir(models):
        return {}
    return {fn: os.path.join(models, fn) for fn in sorted(os.listdir(models))
            if fn.endswith(WEIGHT_SUFFIXES) and not fn.startswith(("checkpoint", "."))
            and os.path.isfile(os.path.join(models, fn))}


def read_record(root: str) -> dict:
    """The bundle's recorded release (``docs/pretrained.json``), ``{}`` when it has none."""
    path = os.path.join(root, RECORD)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PackagingError(f"{path}: not valid JSON ({e})") from e
    return rec if isinstance(rec, dict) else {}


def check_weights(root: str, allow_no_weights: bool = False, record_run: bool = False) -> tuple[dict, list[str]]:
    """Compare a bundle's weight files with its recorded release; returns ``(status, problems)``.

    ``status`` holds ``files`` (``{name: {"sha256", "bytes"}}`` of what would be packaged), ``recorded``
    (the record's ``weights``) and ``state``: ``"recorded"`` (every file is the recorded one),
    ``"none"`` (no weights) or ``"new_run"`` (files differ from the record; allowed with ``record_run``).
    """
    name = os.path.basename(os.path.normpath(root))
    recorded = (read_record(root).get("weights") or {})
    files = {fn: {"sha256": sha256_file(p), "bytes": os.path.getsize(p)} for fn, p in weight_files(root).items()}
    status = {"files": files, "recorded": recorded}
    if not files:
        status["state"] = "none"
        if allow_no_weights:
            return status, []
        listed = ", ".join(f"{k} sha256 {str(v.get('sha256', '?'))[:12]}..." for k, v in recorded.items())
        what = f"the recorded release ({listed})" if recorded else "trained weights"
        return status, [f"{name}: no weights in models/: copy {what} into {os.path.join(root, 'models')}, train the "
                        "bundle, or pass --allow_no_weights to package configs and code only"]
    differ = [fn for fn, d in files.items() if (recorded.get(fn) or {}).get("sha256") != d["sha256"]]
    missing = [fn for fn in recorded if fn not in files]
    if not differ and not missing:
        status["state"] = "recorded"
        return status, []
    status["state"] = "new_run"
    if record_run:
        return status, []
    problems = []
    for fn in differ:
        rec = (recorded.get(fn) or {}).get("sha256")
        problems.append(f"{name}: models/{fn} (sha256 {files[fn]['sha256'][:12]}...) is not the recorded release "
                        + (f"(sha256 {rec[:12]}... in {RECORD})" if rec else f"(not in {RECORD})")
                        + ": package the recorded weights, or pass --record_run to package these as a new run")
    for fn in missing:
        problems.append(f"{name}: models/{fn} of the recorded release ({RECORD}) is missing; copy it into models/ "
                        "or pass --record_run to package the other files as a new run")
    return status, problems


def hash_file(path: str, hash_type: str = "sha256") -> str:
    """Hex digest of ``path`` with ``hash_type`` (one of :data:`HASH_TYPES`)."""
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_large_files(root: str) -> tuple[list[dict], list[str]]:
    """The entries of ``<root>/large_files.yml`` (``[]`` when there is none) and the problems found in them."""
    name = os.path.basename(os.path.normpath(root))
    path = os.path.join(root, LARGE_FILES)
    if not os.path.isfile(path):
        return [], []
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        return [], [f"{path}: not valid YAML ({e})"]
    entries = (doc or {}).get("large_files") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return [], [f"{path}: needs a 'large_files' list of {{path, url, hash_val, hash_type}} entries"]
    problems, good = [], []
    for i, e in enumerate(entries):
        where = f"{name}/{LARGE_FILES} entry {i}"
        if not isinstance(e, dict):
            problems.append(f"{where}: not a mapping")
            continue
        missing = [k for k in ("path", "url", "hash_val", "hash_type") if not e.get(k)]
        if missing:
            problems.append(f"{where}: {', '.join(missing)} missing (the model zoo requires path, url, hash_val, hash_type)")
            continue
        rel = str(e["path"])
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm.startswith(".."):
            problems.append(f"{where}: path {rel!r} is outside the bundle folder")
            continue
        if str(e["hash_type"]).lower() not in HASH_TYPES:
            problems.append(f"{where}: hash_type {e['hash_type']!r} is not one of {', '.join(HASH_TYPES)}")
            continue
        if not str(e["url"]).startswith(("http://", "https://")):
            problems.append(f"{where}: url {e['url']!r} is not an http(s) URL")
            continue
        good.append(dict(e, path=norm.replace(os.sep, "/"), hash_type=str(e["hash_type"]).lower()))
    return good, problems


def check_large_files(root: str, require_records: bool = False) -> list[str]:
    """Problems with the bundle's weights and ``large_files.yml`` under the model zoo's 25 MB rule.

    A listed file present in the bundle must have the listed hash (the hash of the local file is
    computed); a weight file over 25 MB must be listed; with ``require_records`` (a recorded release) a
    ``.pt`` file needs its record (``<stem>.json``, the network it was trained as) when the bundle's
    inference builds its network from records.
    """
    name = os.path.basename(os.path.normpath(root))
    entries, problems = read_large_files(root)
    listed = {e["path"] for e in entries}
    for e in entries:
        local = os.path.join(root, e["path"])
        if os.path.isfile(local):
            got = hash_file(local, e["hash_type"])
            if got != str(e["hash_val"]).lower():
                problems.append(f"{name}: {e['path']} has {e['hash_type']} {got[:16]}... but {LARGE_FILES} lists "
                                f"{str(e['hash_val'])[:16]}...: fix the entry (hash of the released file) or fetch the "
                                f"released file with `python -m monai.bundle download_large_files --bundle_path {root}`")
    for fn, path in weight_files(root).items():
        rel = f"models/{fn}"
        if os.path.getsize(path) > MAX_GIT_BYTES and rel not in listed:
            problems.append(f"{name}: {rel} is {os.path.getsize(path) / 2**20:.1f} MiB, over the model zoo's 25 MB "
                            f"for files in git: list it in {LARGE_FILES} (path, url, hash_val, hash_type) and publish it "
                            "at that URL")
    inference = os.path.join(root, "configs", "inference.json")
    uses_records = require_records and os.path.isfile(inference) and "common.networks.record" in open(inference).read()
    for fn in weight_files(root):
        if uses_records and fn.endswith(".pt") and not os.path.isfile(os.path.join(root, "models", fn[:-3] + ".json")):
            problems.append(f"{name}: models/{fn} has no record models/{fn[:-3]}.json (the network it was trained as, "
                            "written by training): without it inference builds the config's network")
    return problems


def release_notes(root: str, status: dict, staging: str) -> dict:
    """Zip entries that describe what a package really carries: ``{arc path: staged file}``.

    No weights: ``configs/metadata.json`` with ``"weights_included": false`` and a note. A new run
    (``--record_run``): ``docs/pretrained.json`` naming the packaged files and the release they replace,
    and ``configs/metadata.json`` without the recorded release's ``pretrained_*`` metrics.
    """
    if status["state"] == "recorded":
        return {}
    name = os.path.basename(os.path.normpath(root))
    with open(os.path.join(root, "configs", "metadata.json")) as f:
        meta = json.load(f)
    extra = {}
    if status["state"] == "none":
        meta["weights_included"] = False
        meta["weights_note"] = ("this package carries no trained weights: train the bundle (docs/README.md) or copy a "
                                "model.pt into models/ before running inference")
    else:
        meta["weights_included"] = True
        meta["weights_note"] = ("the weights are a run that is not the recorded release (packaged with --record_run); "
                                "the recorded release's pretrained_* metrics are not included")
        meta["eval_metrics"] = {k: v for k, v in (meta.get("eval_metrics") or {}).items() if not k.startswith("pretrained_")}
        old = read_record(root)
        record = {"bundle": name, "weights": status["files"],
                  "run": "not recorded: weights packaged with scripts/package_bundles.py --record_run; record their "
                         "data, budget and metrics with scripts/train_pretrained.py record",
                  "replaces": {"weights": old.get("weights", {}), "eval_metrics": old.get("eval_metrics", {})}}
        rec_path = os.path.join(staging, f"{name}_pretrained.json")
        _write_json_atomic(rec_path, record)
        extra[RECORD] = rec_path
    meta_path = os.path.join(staging, f"{name}_metadata.json")
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=4)
        f.write("\n")
    extra["configs/metadata.json"] = meta_path
    return extra


def _walk(folder: str, arc_prefix: str, suffixes=None) -> list[tuple[str, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith(".") or fn.endswith((".pyc", ".pyo")):
                continue
            if suffixes is not None and not fn.endswith(suffixes):
                continue
            src = os.path.join(dirpath, fn)
            if os.path.islink(src):
                continue  # a link could point anywhere; zips hold plain files only
            rel = os.path.relpath(src, folder).replace(os.sep, "/")
            out.append((f"{arc_prefix}/{rel}", src))
    return out


def bundle_files(root: str, common_dir: str = COMMON_DIR, extra: dict | None = None) -> list[tuple[str, str]]:
    """``[(name in the zip, source path), ...]`` for a bundle folder, sorted, ``common`` vendored.

    ``extra`` maps further zip paths (relative to the top folder) to source files, e.g. an exported
    ``models/model.ts``.
    """
    name = os.path.basename(os.path.normpath(root))
    files = [(a, s) for a, s in _walk(os.path.join(root, "configs"), f"{name}/configs")
             if os.path.basename(a) not in SKIP_CONFIGS]
    files += _walk(os.path.join(root, "docs"), f"{name}/docs")
    files.append((f"{name}/LICENSE", os.path.join(root, "LICENSE")))
    models = os.path.join(root, "models")
    if os.path.isdir(models):
        weights = [fn for fn in sorted(os.listdir(models)) if fn.endswith(WEIGHT_SUFFIXES)
                   and not fn.startswith(("checkpoint", ".")) and os.path.isfile(os.path.join(models, fn))]
        records = [os.path.splitext(fn)[0] + ".json" for fn in weights if fn.endswith(".pt")]
        files += [(f"{name}/models/{fn}", os.path.join(models, fn)) for fn in weights + records
                  if os.path.isfile(os.path.join(models, fn))]
    if os.path.isfile(os.path.join(root, LARGE_FILES)):
        files.append((f"{name}/{LARGE_FILES}", os.path.join(root, LARGE_FILES)))
    if os.path.isdir(os.path.join(root, "scripts")):
        files += _walk(os.path.join(root, "scripts"), f"{name}/scripts")
    if not os.path.isfile(os.path.join(common_dir, "__init__.py")):
        raise PackagingError(f"{common_dir}: not the zoo's common package (no __init__.py)")
    files += _walk(common_dir, f"{name}/common", suffixes=(".py", ".json", ".typed"))
    for arc, src in (extra or {}).items():
        files = [(a, s) for a, s in files if a != f"{name}/{arc}"] + [(f"{name}/{arc}", src)]
    return sorted(files)


def write_zip(path: str, files: list[tuple[str, str]]) -> str:
    """Write a reproducible zip atomically (temporary file + rename); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".zip", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for arc, src in sorted(files):
                info = zipfile.ZipInfo(arc, date_time=ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # unix, so that the permission bits below are honoured
                info.external_attr = (0o100644 & 0xFFFF) << 16
                with open(src, "rb") as f, zf.open(info, "w") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
        _publishable(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        _publishable(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_index(path: str) -> dict:
    """An existing ``model_info.json`` (``{}`` when there is none)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise PackagingError(f"{path}: existing index is not valid JSON ({e}); fix or remove it") from e
    if not isinstance(index, dict):
        raise PackagingError(f"{path}: existing index is not a JSON object")
    return index


def export_torchscript(root: str, out_path: str, repo_root: str = ROOT, timeout: int = 1800) -> str:
    """``monai.bundle ckpt_export`` of ``models/model.pt`` into ``out_path`` (the bundle folder is not touched)."""
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", out_path,
           "--ckpt_file", os.path.join(root, "models", "model.pt"),
           "--meta_file", os.path.join(root, "configs", "metadata.json"),
           "--config_file", os.path.join(root, "configs", "inference.json"), "--bundle_root", root]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, root, env.get("PYTHONPATH", "")) if p)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not os.path.isfile(out_path):
        raise PackagingError(f"{root}: TorchScript export failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return out_path


def package(out_dir: str = "dist", bundles="all", bundles_dir: str = BUNDLES_DIR, common_dir: str = COMMON_DIR,
            base_url: str | None = None, torchscript: bool = False, require_weights: bool = False,
            allow_no_weights: bool = False, record_run: bool = False) -> dict:
    """Package bundles into ``out_dir`` and update ``out_dir/model_info.json``; returns the new index entries.

    Args:
        out_dir: where the zips and the index go (created if needed).
        bundles: ``"all"`` or bundle names (comma-separated string or list).
        bundles_dir: folder of bundle folders (default: this repository's ``bundles/``).
        common_dir: the ``common`` package to vendor (default: this repository's).
        base_url: URL the zips will be served from; the index then holds absolute URLs.
        torchscript: export ``models/model.ts`` from ``models/model.pt`` where the bundle has none.
        require_weights: refuse bundles without ``models/model.pt`` even with ``allow_no_weights``.
        allow_no_weights: package bundles without weights (their metadata says ``"weights_included": false``).
        record_run: package weights that are not the release recorded in ``docs/pretrained.json`` as a new run.
    """
    available = find_bundles(bundles_dir)
    if bundles in (None, "all", ("all",), ["all"]):
        names = available
    else:
        names = [n.strip() for n in (bundles.split(",") if isinstance(bundles, str) else bundles) if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise PackagingError(f"unknown bundle(s) {unknown} in {bundles_dir}; available: {available}")
    if not names:
        raise PackagingError(f"{bundles_dir}: no bundles (folders with configs/metadata.json) to package")
    from common.cli import as_bool

    allow_no_weights, record_run = as_bool(allow_no_weights, "allow_no_weights"), as_bool(record_run, "record_run")
    metas, weights, problems = {}, {}, []
    for n in names:
        metas[n], p = check_bundle(os.path.join(bundles_dir, n), as_bool(require_weights, "require_weights"))
        problems += p
        weights[n], p = check_weights(os.path.join(bundles_dir, n), allow_no_weights, record_run)
        problems += p
        problems += check_large_files(os.path.join(bundles_dir, n), require_records=weights[n]["state"] == "recorded")
    if problems:
        raise PackagingError(f"{len(problems)} problem(s), nothing written:\n  " + "\n  ".join(problems))

    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, INDEX_NAME)
    index = read_index(index_path)
    entries = {}
    with tempfile.TemporaryDirectory(prefix="package_bundles_") as staging:
        for i, n in enumerate(names, 1):
            root = os.path.join(bundles_dir, n)
            version = metas[n]["version"]
            key = f"{n}_v{version}"
            zip_name = f"{key}.zip"
            extra = {}
            has_pt = os.path.isfile(os.path.join(root, "models", "model.pt"))
            if torchscript and has_pt and not os.path.isfile(os.path.join(root, "models", "model.ts")):
                print(f"[{i}/{len(names)}] {n}: exporting TorchScript", flush=True)
                extra["models/model.ts"] = export_torchscript(root, os.path.join(staging, f"{n}.ts"))
            extra.update(release_notes(root, weights[n], staging))
            files = bundle_files(root, common_dir, extra)
            zip_path = write_zip(os.path.join(out_dir, zip_name), files)
            checksum = sha256_file(zip_path)
            source = f"{base_url.rstrip('/')}/{zip_name}" if base_url else zip_name
            entries[key] = {"checksum": checksum, "source": source}
            state = {"recorded": "the recorded release", "new_run": "a new run (--record_run)",
                     "none": "NONE (--allow_no_weights)"}[weights[n]["state"]]
            packed = [a.split("/", 1)[1] for a, _ in files if a.startswith(f"{n}/models/")]
            print(f"[{i}/{len(names)}] {zip_path}: {len(files)} files, weights: {', '.join(packed) or 'none'} "
                  f"({state}), sha256 {checksum}", flush=True)
    index.update(entries)
    _write_json_atomic(index_path, index)
    print(f"index: {index_path} ({len(index)} entries)")
    return entries


def main(out_dir: str = "dist", bundles="all", bundles_dir: str = BUNDLES_DIR, common_dir: str = COMMON_DIR,
         base_url: str | None = None, torchscript: bool = False, require_weights: bool = False,
         allow_no_weights: bool = False, record_run: bool = False):
    """Command line: see the module docstring. Exits with status 1 and the list of problems on bad bundles."""
    try:
        package(out_dir, bundles, bundles_dir, common_dir, base_url, torchscript, require_weights, allow_no_weights,
                record_run)
    except PackagingError as e:
        sys.exit(f"package_bundles: error: {e}")


if __name__ == "__main__":
    from common.cli import strict_fire  # fire, refusing unknown flags before any work

    strict_fire(main)

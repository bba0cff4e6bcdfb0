#!/usr/bin/env python
"""Check a data set for a bundle before training or inference: every problem, one line each.

    python scripts/check_data.py data/train.csv --bundle fnet_baseline        # a training manifest
    python scripts/check_data.py my_stacks/ --bundle spotlight_dna             # a folder (or file) for inference
    python scripts/check_data.py stage1.csv --bundle isl_nucleus_seg --overrides "{'stage': 1}"
    python scripts/check_data.py pretrain.csv --bundle isl_cell_instance --config pretrain
    python scripts/check_data.py data/train.csv --bundle downloaded/fnet_baseline  # a bundle folder

A ``.csv`` is checked as a training manifest with the bundle's own checks, exactly as training runs
them before its first iteration: the ``train#datalist`` expression of ``configs/train.json`` (columns,
readable files, dimensions, NaN/inf, shapes, constant images, empty masks, label values, channels) and
the data checks of its ``preflight`` (e.g. Spotlight's foreground fraction), plus the number of input
channels from the bundle's metadata. A folder or an image file is checked for inference with the
bundle's ``configs/inference.json`` ``datalist`` (dimensions, channels, NaN/inf; an RGB picture given
to a 3D bundle is refused by name) and for constant images.

Output: one line per problem (file, problem, what to do) and exit code 1, or one summary line and
exit code 0. Nothing is written. ``--bundle`` is a bundle name of this repository (``bundles/<name>``)
or the path of a bundle folder (e.g. one downloaded with ``scripts/zoo.py``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# expressions of a preflight that are not about the data (the output folder, the weights)
NOT_DATA = ("prepare_output_dir", "check_checkpoint", "check_settings")


class CheckDataError(ValueError):
    """The command line cannot be used (unknown bundle, unreadable config); the message says what to do."""


def bundle_root(bundle: str) -> str:
    """The folder of ``bundle``: ``bundles/<bundle>`` of this repository, or a path to a bundle folder."""
    here = os.path.join(ROOT, "bundles")
    for cand in (bundle, os.path.join(here, bundle)):
        if os.path.isfile(os.path.join(cand, "configs", "metadata.json")):
            return os.path.abspath(cand)
    names = sorted(n for n in os.listdir(here) if os.path.isfile(os.path.join(here, n, "configs", "metadata.json"))) \
        if os.path.isdir(here) else []
    raise CheckDataError(f"--bundle {bundle!r}: no such bundle (no configs/metadata.json there); give one of "
                         f"{', '.join(names) or 'the bundles of this repository'} or the path of a bundle folder")


def _parser(root: str, config: str, overrides: dict):
    from monai.bundle import ConfigParser

    files = [os.path.join(root, "configs", "train.json")] if config != "inference" else []
    files.append(os.path.join(root, "configs", f"{config}.json"))
    files = list(dict.fromkeys(files))
    for f in files:
        if not os.path.isfile(f):
            avail = sorted(n[:-5] for n in os.listdir(os.path.join(root, "configs"))
                           if n.endswith(".json") and n != "metadata.json")
            raise CheckDataError(f"--config {config!r}: {f} not found; this bundle has {', '.join(avail)}")
    parser = ConfigParser()
    parser.read_config(files if len(files) > 1 else files[0])
    parser["bundle_root"] = root
    for k, v in (overrides or {}).items():
        parser[str(k).replace("::", "#")] = v
    return parser


def bundle_spec(root: str, parser) -> dict:
    """``{"spatial_dims", "channels", "selects_channels"}`` of a bundle: the dimensions and input channels of
    its network from ``metadata.json`` (and the config's ``in_channels``); ``selects_channels`` when the
    bundle picks its input channels out of multi-channel files (``input_channels``)."""
    with open(os.path.join(root, "configs", "metadata.json")) as f:
        meta = json.load(f)
    inp = next(iter(meta.get("network_data_format", {}).get("inputs", {}).values()), {})
    dims = len(inp.get("spatial_shape") or []) or 3
    channels = int(inp.get("num_channels") or 1)
    for key in ("in_channels", "network_def#in_channels"):
        try:
            channels = int(parser.get_parsed_content(key))
            break
        except Exception:  # key absent or not a plain number
            continue
    return {"spatial_dims": dims, "channels": channels, "selects_channels": "input_channels" in parser.config}


def _lines(exc: BaseException) -> list[str]:
    """The problems in a named error, one line each (the lines of ``"N problem(s) ...:"`` messages, with a
    closing ``(hint)`` line appended to each)."""
    from common.errors import named_error

    err = named_error(exc) or exc
    text = str(err).strip()
    rows = [r.strip() for r in text.splitlines() if r.strip()]
    if len(rows) > 1 and rows[0].endswith(":"):
        rows = rows[1:]
    hints = [r for r in rows if r.startswith("(") and r.endswith(")")]
    rows = [r for r in rows if r not in hints] or [text]
    if named_error(exc) is None:  # not one of the project's errors: say what it was
        rows = [f"{type(err).__name__}: {r}" for r in rows]
    return [re.sub(r"^datalist line \?: ", "", r) + (f" {' '.join(hints)}" if hints else "") for r in rows]


def _evaluate(parser, key: str):
    """Evaluate config item ``key``; ``(value, problems)``."""
    try:
        return parser.get_parsed_content(key), []
    except Exception as e:  # the bundle's own checks raise named errors
        return None, _lines(e)


def _preflight_data_checks(parser) -> list[str]:
    """The data-related expressions of the config's ``preflight`` list, other than the datalists themselves,
    with ``@validate#datalist`` dropped (the one manifest given is the training one)."""
    raw = parser.config.get("preflight")
    if not isinstance(raw, str) or not raw.startswith("$"):
        return []
    raw = raw.replace("::", "#")  # MONAI may store ids with either separator
    refs = {}

    def hide(m):
        refs[f"__ref{len(refs)}"] = m.group(0)
        return f"__ref{len(refs) - 1}"

    src = re.sub(r"@[\w#:]+", hide, raw[1:])
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError:
        return []
    if not isinstance(tree.body, (ast.List, ast.Tuple)):
        return []
    out = []
    for elt in tree.body.elts:
        seg = ast.get_source_segment(src, elt) or ""
        seg = re.sub(r"__ref\d+", lambda m: refs[m.group(0)], seg)
        if any(n in seg for n in NOT_DATA) or seg.strip() in ("@train#datalist", "@validate#datalist"):
            continue
        seg = seg.replace("@validate#datalist", "[]")
        out.append("$" + seg)
    return out


def _in_line_order(problems: list[str]) -> list[str]:
    """Problems without repeats, sorted by their manifest line (stable; lines without one keep their place at
    the front)."""
    def line_no(p):
        m = re.search(r" line (\d+): ", p)
        return int(m.group(1)) if m else 0

    return sorted(dict.fromkeys(problems), key=line_no)


def _extra_checks(records, key, spec, check_channels: bool, known_bad) -> list[str]:
    """Checks the bundle's loader may not make: the input channel count, and constant images."""
    from common.io import ImageReadError, read_image

    problems = []
    for rec in records:
        path = rec.get(key)
        if not path or path in known_bad:
            continue
        where = f"{rec['_manifest']} line {rec['_line']}: " if "_line" in rec else ""
        try:
            arr, _, _ = read_image(path, spatial_dims=spec["spatial_dims"])
        except ImageReadError:
            continue  # reported by the bundle's own check
        if check_channels and arr.shape[0] != spec["channels"]:
            problems.append(f"{where}{path}: {arr.shape[0]} channel(s), expected {spec['channels']}")
        if arr.size and arr.min() == arr.max():
            problems.append(f"{where}{path}: constant image (every value {arr.flat[0]}), nothing to learn from or "
                            "predict on; remove it or replace the file")
    return problems


def check_manifest(root: str, manifest: str, config: str = "train", overrides: dict | None = None):
    """Problems of a training manifest for the bundle at ``root``: ``(problems, n_records, spec)``."""
    manifest = os.path.abspath(manifest)
    parser = _parser(root, config, overrides or {})
    parser["dataset_dir"] = os.path.dirname(manifest)
    parser["train_manifest"] = manifest
    parser["val_manifest"] = manifest
    spec = bundle_spec(root, parser)
    if "train" not in parser.config or "datalist" not in parser.config["train"]:
        raise CheckDataError(f"{root}: configs/{config}.json has no train#datalist to check a manifest with")
    from common.data import DEFAULT_KEYS, ManifestError, read_manifest

    columns = parser.config.get("manifest_columns")
    columns = dict(columns) if isinstance(columns, dict) else {**DEFAULT_KEYS, "path_image": "image"}
    try:  # every row as it is, for the checks below (no column required, nothing validated)
        records = read_manifest(manifest, keys={}, optional=columns)
    except ManifestError:
        records = []  # unreadable or empty manifest: the bundle's check below says so
    checks = _preflight_data_checks(parser)
    for i, expr in enumerate(checks):  # set first: setting an item resets the parser's resolved values
        parser[f"_check_data_{i}"] = expr
    datalist, problems = _evaluate(parser, "train#datalist")
    if datalist is not None:  # the other data checks build on the datalist
        for i in range(len(checks)):
            problems += _evaluate(parser, f"_check_data_{i}")[1]
    elif checks and records:  # run them on the rows whose files passed, so that every problem shows at once
        fine = [r for r in records if not any(v in line for k, v in r.items() if not k.startswith("_")
                                              for line in problems)]
        parser["_check_records"] = [{k: v for k, v in r.items()} for r in fine]
        for i, expr in enumerate(checks):
            parser[f"_check_data_{i}"] = expr.replace("@train#datalist", "@_check_records")
        for i in range(len(checks)):
            try:
                parser.get_parsed_content(f"_check_data_{i}")
            except Exception as e:
                from common.errors import named_error

                if named_error(e) is not None:  # anything else is an artefact of the partial list
                    problems += _lines(e)
    bad = {v for r in records for k, v in r.items() if not k.startswith("_") and any(v in line for line in problems)}
    problems += _extra_checks(records, "image", spec, not spec["selects_channels"], bad)
    return _in_line_order(problems), len(records), spec


def check_folder(root: str, source: str, overrides: dict | None = None):
    """Problems of a folder (or one image file) of inputs for the bundle's inference: ``(problems, n, spec)``."""
    from common.data import ManifestError, list_images

    parser = _parser(root, "inference", overrides or {})
    parser["dataset_dir"] = os.path.abspath(source)
    spec = bundle_spec(root, parser)
    pattern = parser.get_parsed_content("file_pattern") if "file_pattern" in parser.config else None
    try:
        records = list_images(source, validate=False, pattern=pattern)
    except ManifestError as e:
        return [str(e)], 0, spec
    _, problems = _evaluate(parser, "datalist")
    bad = {r["image"] for r in records if any(r["image"] in line for line in problems)}
    problems += _extra_checks(records, "image", spec, False, bad)
    return list(dict.fromkeys(problems)), len(records), spec


def main(source: str, bundle: str, config: str = "train", overrides: dict | None = None) -> None:
    """Check ``source`` (a ``.csv`` training manifest, or a folder / image file for inference) for ``bundle``.

    Prints every problem, one line each, and exits with 1; or prints one summary line and exits with 0.

    Args:
        source: a training manifest (``.csv``), or a folder of images / one image for inference.
        bundle: a bundle name (``bundles/<name>``) or the path of a bundle folder.
        config: for a manifest, the training config layered on ``train.json`` (e.g. ``pretrain``).
        overrides: config overrides as training would get them, e.g. ``"{'stage': 1}"``.
    """
    t0 = time.time()
    if overrides is not None and not isinstance(overrides, dict):
        raise CheckDataError(f"--overrides {overrides!r}: give a dict, e.g. --overrides \"{{'stage': 1}}\"")
    if not os.path.exists(source):
        raise CheckDataError(f"{source}: not found; give a .csv training manifest, a folder of images or an image")
    root = bundle_root(bundle)
    name = os.path.basename(root)
    if source.lower().endswith(".csv"):
        problems, n, spec = check_manifest(root, source, config, overrides)
        what = f"{n} record(s) of the training manifest {source}"
    else:
        problems, n, spec = check_folder(root, source, overrides)
        what = f"{n} image(s) in {source} for inference"
    shape = f"{spec['spatial_dims']}D, {spec['channels']} input channel(s)"
    if problems:
        for line in problems:
            print(line, flush=True)
        print(f"{len(problems)} problem(s) in {source} for {name} ({shape}); fix them and run this check again",
              flush=True)
        raise SystemExit(1)
    print(f"ok: {what} fit {name} ({shape}); no problem found in {time.time() - t0:.1f} s", flush=True)


def cli(argv=None) -> None:
    """Command line (strict flags: an unknown one exits with 2 before any work)."""
    from common.cli import strict_fire

    strict_fire(main, argv, name="check_data.py", exit_on=(CheckDataError,))


if __name__ == "__main__":
    cli()

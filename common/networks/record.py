"""A trained model carries its configuration: a JSON record beside the weights, and networks built from it.

Training writes ``models/model.json`` next to ``models/model.pt`` (same stem): the network's
``_target_`` and constructor arguments, recorded by :func:`recordable` when the network was
built, plus the inference-relevant settings the bundle passes (e.g. the voxel size it was trained
at, the input channels it was trained on). Inference, evaluation, ``ckpt_export``, the MONAI
Label app and packaging then build the right network from that record with no retyped overrides:

* :func:`trained_network` is the ``_target_`` of the inference configs' ``network_def``: it builds
  the recorded network when a record exists, else the configured one. Network overrides given
  explicitly on the command line (``--network_def#...``) must agree with the record, or a
  :class:`~common.errors.CheckpointMismatchError` says what differs.
* :func:`trained_setting` returns a recorded setting (or a default) for a config key.
* :func:`check_settings` refuses settings that contradict the record (e.g. another input channel).

The record is plain JSON (``{"format": 1, "network_def": {...}, "settings": {...}}``), readable
and editable by hand.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import pydoc
import sys
from collections.abc import Mapping

import torch
from torch import nn

from common.errors import CheckpointMismatchError

__all__ = ["recordable", "network_config", "build_network", "record_path", "read_record", "write_record",
           "network_for", "trained_network", "trained_setting", "check_settings"]

RECORD_FORMAT = 1
# constructor arguments that only matter while building for training (weights are loaded after)
_INIT_ONLY = {"pretrained_path": None}
_log = logging.getLogger(__name__)


def recordable(cls):
    """Class decorator: instances remember ``{"_target_": ..., **constructor arguments}``."""
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        original(self, *args, **kwargs)
        if type(self) is cls:  # the most derived recordable class records
            args_ = {k: v for k, v in bound.arguments.items() if k != "self"}
            self._init_config = {"_target_": f"{cls.__module__}.{cls.__qualname__}", **args_}

    cls.__init__ = __init__
    return cls


def _plain(value, where: str):
    if isinstance(value, nn.Module):
        return network_config(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"{where}: cannot record a constructor argument of type {type(value).__name__}")


def _unwrap(net: nn.Module) -> nn.Module:
    while True:
        if hasattr(net, "_orig_mod"):  # torch.compile
            net = net._orig_mod
        elif isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            net = net.module
        else:
            return net


def network_config(net: nn.Module) -> dict:
    """The config that rebuilds ``net`` (``_target_`` + arguments), nested modules included."""
    net = _unwrap(net)
    cfg = getattr(net, "_init_config", None)
    target = f"{type(net).__module__}.{type(net).__qualname__}"
    if cfg is None:
        params = [p for p in inspect.signature(type(net).__init__).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if params or any(True for _ in net.parameters()):
            raise TypeError(f"{target} was not built by a @recordable class; its configuration is unknown")
        return {"_target_": target}
    out = {}
    for k, v in cfg.items():
        out[k] = _INIT_ONLY[k] if k in _INIT_ONLY else _plain(v, f"{target}.{k}")
    return out


def build_network(config: dict) -> nn.Module:
    """Instantiate a recorded network config (nested ``_target_`` dicts become modules)."""
    from monai.bundle import ConfigParser

    return ConfigParser({"net": config}).get_parsed_content("net", instantiate=True)


def record_path(ckpt_path: str | os.PathLike) -> str:
    """``models/model.pt`` -> ``models/model.json``."""
    root, _ = os.path.splitext(str(ckpt_path))
    return root + ".json"


def read_record(ckpt_path: str | os.PathLike) -> dict | None:
    """The record beside ``ckpt_path``, or None when there is none (weights from before records)."""
    path = record_path(ckpt_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointMismatchError(f"{path}: unreadable model record ({e}); restore it from the release, "
                                      "or delete it and give the network settings explicitly") from e
    if not isinstance(rec, dict) or "network_def" not in rec:
        raise CheckpointMismatchError(f"{path}: not a model record (no 'network_def')")
    return rec


def write_record(ckpt_path: str | os.PathLike, network: nn.Module, settings: dict | None = None) -> str:
    """Write (atomically) the record of ``network`` and ``settings`` beside ``ckpt_path``."""
    from common.outputs import atomic_write

    rec = {"format": RECORD_FORMAT, "network_def": network_config(network),
           "settings": _plain(dict(settings or {}), "settings")}
    path = record_path(ckpt_path)
    text = json.dumps(rec, indent=2) + "\n"
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return path
    with atomic_write(path, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    return path


def _diff(a, b, prefix="") -> list[str]:
    """Differences between two plain configs, as ``key#path: a vs b`` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}#{k}" if prefix else k)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{prefix}#{i}")]
    return [] if a == b else [f"{prefix}: {a!r} vs {b!r}"]


def _explicit_overrides(prefixes) -> list[str]:
    """Network keys given on this process's command line (``--network_def#mult_chan 4``)."""
    found = []
    for arg in sys.argv[1:]:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            if any(key == p or key.startswith(p + "#") for p in prefixes):
                found.append(key)
    return found


def _fields_set_by(key: str, override_keys) -> str | None:
    """The network field (``#`` path in the record's ``network_def``; ``""``: all of it) that the command-line
    key ``key`` sets, given ``override_keys`` (config key -> field path, ``.`` or ``#`` between its parts; a
    list: each key sets all of it)."""
    mapping = override_keys if isinstance(override_keys, Mapping) else {k: "" for k in override_keys}
    for prefix, field in mapping.items():
        if key == prefix or key.startswith(prefix + "#"):
            rest = key[len(prefix) + 1:] if key != prefix else ""
            # a config file writes a field path with dots ("base.in_channels"): MONAI's parser rewrites '#' in
            # string values
            field = str(field or "").replace("::", "#").replace(".", "#")
            return "#".join(p for p in (field, rest) if p)
    return None


def _conflicts(explicit: list[str], diff: list[str], override_keys) -> tuple[list[str], list[str]]:
    """The explicit overrides whose network fields are among ``diff``'s (``path: a vs b`` lines), and those lines."""
    keys, lines = [], []
    for key in explicit:
        field = _fields_set_by(key, override_keys)
        hit = [d for d in diff if field is not None and (
            field == "" or d.split(":", 1)[0] == field or d.split(":", 1)[0].startswith(field + "#"))]
        if hit:
            keys.append(key)
            lines += [d for d in hit if d not in lines]
    return keys, lines


def network_for(ckpt_path: str, configured: nn.Module, override_keys=("network_def",)) -> nn.Module:
    """``configured``, or the network recorded with the weights at ``ckpt_path`` where they differ.

    Args:
        override_keys: config keys whose command-line overrides must agree with the record: a list (each
            key may set any field of the network) or a mapping from key to the path of the field it sets in
            the record's ``network_def``, with dots (``{"in_channels": "base.in_channels"}``; ``""``: any field;
            ``--network_def#features`` sets ``features``). An override is a conflict only where the field it
            sets differs from the record, so ``--input_channels "[2]"`` (which stain of a stack to read) is
            no conflict for a one-channel model whose other settings the record supplies.

    Raises:
        CheckpointMismatchError: explicit network overrides on the command line disagree with the record.
    """
    rec = read_record(ckpt_path)
    if rec is None:
        return configured
    recorded = rec["network_def"]
    diff = _diff(network_config(configured), recorded)
    if not diff:
        return configured
    explicit, lines = _conflicts(_explicit_overrides(list(override_keys)), diff, override_keys)
    if explicit:
        raise CheckpointMismatchError(
            f"{ckpt_path}: the network given on the command line ({', '.join(explicit)}) differs from the one "
            f"these weights were trained as ({record_path(ckpt_path)}), given vs trained: {'; '.join(lines[:4])}. Drop those "
            "overrides (the record is used automatically) or point --ckpt_path at weights of that network")
    _log.info(f"building the network recorded with the weights ({record_path(ckpt_path)}): "
              + "; ".join(d.split(":")[0] + " = " + d.split(" vs ")[-1] for d in diff[:6]))
    return build_network(recorded)


def trained_network(ckpt_path: str, target: str, override_keys=("network_def",), **kwargs) -> nn.Module:
    """The network that ``ckpt_path`` was trained as (from its record), else ``target(**kwargs)``.

    The ``_target_`` of the inference configs' ``network_def``.

    Args:
        ckpt_path: the weights file; its record is ``<stem>.json`` beside it.
        target: dotted class of the configured network (used when there is no record).
        override_keys: config keys whose command-line overrides must agree with the record (a list, or a
            mapping to the network field each sets: :func:`network_for`).
        kwargs: the configured constructor arguments.
    """
    cls = pydoc.locate(target)
    if cls is None:
        raise ValueError(f"network class {target!r} not found")
    return network_for(ckpt_path, cls(**kwargs), override_keys)


def trained_setting(ckpt_path: str, key: str, default=None):
    """A setting recorded with the weights at ``ckpt_path`` (e.g. ``input_channels``, or ``preproc#gamma``
    inside a recorded dict), else ``default``."""
    rec = read_record(ckpt_path)
    if rec is None:
        return default
    value = rec.get("settings", {})
    for part in key.split("#"):  # 'preproc#gamma' reaches into a recorded dict
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def check_settings(ckpt_path: str, settings: dict, strict: bool = True) -> dict:
    """Compare ``settings`` with those recorded with the weights; returns ``settings``.

    Args:
        strict: a difference is a named error; ``False`` logs a warning instead (for settings that
            describe the user's data rather than the model, e.g. which channel of a stack holds the
            stain the model was trained on).
    """
    rec = read_record(ckpt_path)
    if rec is None:
        return settings
    recorded = rec.get("settings", {})
    bad = [f"{k}: given {v!r}, trained with {recorded[k]!r}" for k, v in settings.items()
           if k in recorded and _plain(v, k) != recorded[k]]
    if bad and not strict:
        _log.warning(f"{ckpt_path}: settings differ from training ({record_path(ckpt_path)}): " + "; ".join(bad)
                     + "; make sure they select the same stain in your images")
    elif bad:
        raise CheckpointMismatchError(
            f"{ckpt_path}: settings differ from those the model was trained with ({record_path(ckpt_path)}): "
            + "; ".join(bad) + ". Drop those overrides (the recorded values are the defaults) or use a model "
            "trained with them")
    return settings

"""Boolean config keys mean the same from the command line whichever spelling is typed.

fire hands ``--resume false`` to MONAI as the string ``'false'`` (truthy). Every boolean key that a
bundle config consumes by reference (``@resume``, ``@amp``, ``@preproc#clahe_enabled``, ...) goes
through ``common.cli.as_bool``; the values the configs actually consume are checked here with
MONAI's own ``ConfigParser`` and fire's own value parser, for every key of every bundle.
"""

import glob
import os
import re

import pytest
import torch
from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser

from common.cli import BooleanValueError, as_bool
from common.synthetic import write_dataset_3d
from zoo_testing import BUNDLES, TINY, TINY_TRAIN, run_bundle_here, split_manifest

SPELLINGS = {"true": True, "false": False, "True": True, "False": False, "1": True, "0": False}


def test_as_bool_values():
    for text, expected in SPELLINGS.items():
        assert as_bool(DefaultParseValue(text)) is expected  # what fire gives for the typed text
        assert as_bool(text) is expected
    assert as_bool(" FALSE ") is False and as_bool("yes") is True and as_bool("off") is False
    assert as_bool(torch.tensor(True)) is True
    for bad in ("maybe", "", 2, None, -1, "tru"):
        with pytest.raises(BooleanValueError, match="resume"):
            as_bool(bad, "resume")


def _config_sets():
    """(bundle, config files) for every workflow: train, inference, train+evaluate, train+multi_gpu, pretrain."""
    out = []
    for root in sorted(glob.glob(os.path.join(BUNDLES, "*", "configs"))):
        b = os.path.basename(os.path.dirname(root))
        out.append((b, ["train.json"]))
        out.append((b, ["inference.json"]))
        for extra in ("evaluate.json", "multi_gpu_train.json", "pretrain.json"):
            if os.path.isfile(os.path.join(root, extra)):
                out.append((b, ["train.json", extra]))
    return out


def _ids(node, prefix=""):
    """Every ``(id, raw value)`` of a config, with MONAI's ``#``-joined ids (list items by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        i = f"{prefix}#{k}" if prefix else str(k)
        yield i, v
        yield from _ids(v, i)


def _parser(bundle, files):
    p = ConfigParser()
    p.read_config([os.path.join(BUNDLES, bundle, "configs", f) for f in files])
    p.update({"bundle_root": os.path.join(BUNDLES, bundle), "device": "$torch.device('cpu')"})
    return p


def _boolean_keys(parser):
    """Boolean-valued ids that other entries consume by reference, with every consuming id."""
    flat = dict(_ids(parser.get()))
    keys = {}
    for key, value in flat.items():
        if isinstance(value, bool):
            ref = re.compile("@" + re.escape(key) + r"(?![\w#])")
            sites = [i for i, v in flat.items() if isinstance(v, str) and ref.search(v)]
            if sites:
                keys[key] = sites
    return keys


CASES = [(b, files, key, sites) for b, files in _config_sets() for key, sites in _boolean_keys(_parser(b, files)).items()]


def test_every_bundle_has_its_switches():
    found = {(b, k) for b, _, k, _ in CASES}
    for b in os.listdir(BUNDLES):
        if os.path.isfile(os.path.join(BUNDLES, b, "configs", "train.json")):
            assert (b, "resume") in found and (b, "amp") in found
    assert {("fnet_baseline", k) for k in ("bf16_cpu", "channels_last", "fuse_bn", "compile")} <= found
    assert ("isl_cell_instance", "reconstruct") in found and ("unet3d_fucci", "preproc#clahe_enabled") in found


def _consumed(value):
    """What a consuming id resolved to, as a bool: a bool itself, or a module's memory format."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.nn.Module):  # channels_last applied to the network's weights
        w = next(p for p in value.parameters() if p.ndim in (4, 5) and p.shape[1] > 1 and p.shape[-1] > 1)
        fmt = torch.channels_last_3d if w.ndim == 5 else torch.channels_last
        return w.is_contiguous(memory_format=fmt) and not w.is_contiguous()
    raise AssertionError(f"unexpected consumed value {type(value)}")


@pytest.mark.parametrize("bundle,files,key,sites", CASES, ids=[f"{b}-{'+'.join(f)}-{k}" for b, f, k, _ in CASES])
def test_boolean_key_same_meaning_for_every_spelling(bundle, files, key, sites):
    parser = _parser(bundle, files)
    for site in sites:  # every consumption goes through the coercion
        assert f"common.cli.as_bool(@{key}" in parser[site], f"{'+'.join(files)}: {site} = {parser[site]!r}"
    if bundle in TINY:
        parser.update({k: v for k, v in TINY[bundle].items() if k.startswith("network_def#")})  # small networks
    for text, expected in SPELLINGS.items():
        parser.update({key: DefaultParseValue(text)})  # exactly what `--<key> <text>` gives MONAI
        parser.parse(reset=True)
        for site in sites:
            assert _consumed(parser.get_parsed_content(site)) is expected, (site, text)
    parser.update({key: "maybe"})
    parser.parse(reset=True)
    with pytest.raises(Exception) as e:
        parser.get_parsed_content(sites[0])
    err = e.value
    while err is not None and not isinstance(err, BooleanValueError):
        err = err.__cause__ or err.__context__
    assert err is not None and str(err).startswith(f"{key}: 'maybe' is not a boolean")


@pytest.mark.slow
def test_resume_false_restarts_for_real(tmp_path):
    """A finished run, then `--resume false` with an incompatible (wider) network: it starts afresh
    instead of loading the old checkpoint (which would be a state_dict size mismatch)."""
    b = "fnet_baseline"
    data = split_manifest(write_dataset_3d(str(tmp_path / "data"), n_volumes=2, shape=(16, 32, 32), seed=1),
                          {"train": 1, "val": 1})
    ov = dict(TINY[b], **dict(TINY_TRAIN[b], num_epochs=1, epoch_length=2), train_manifest=data["train"],
              val_manifest=data["val"], ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))
    run_bundle_here(b, "train.json", ov)
    assert glob.glob(str(tmp_path / "runs" / "checkpoints" / "checkpoint*.pt"))
    wider = dict(ov, **{"network_def#mult_chan": 6})
    p = run_bundle_here(b, "train.json", dict(wider, resume="false"))
    resumed = "resuming from " + str(tmp_path / "runs" / "checkpoints")  # common.handlers.Resumable's line
    assert resumed not in p.output
    sd = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert sd["conv_out.weight"].shape[1] == 6  # the new, wider network was trained and saved
    p = run_bundle_here(b, "train.json", dict(wider, resume="true", num_epochs=2))  # and `true` does resume
    assert resumed in p.output

"""common.networks.record: which command-line overrides conflict with the network a model was trained as."""

import sys

import pytest

from common.errors import CheckpointMismatchError
from common.networks.record import network_config, network_for, write_record
from common.networks.unet3d import UNet3D

# unet3d_fucci's inference.json: the CLI key -> the network field it sets
KEYS = {"network_def": "", "input_channels": "in_channels", "num_classes": "out_channels"}


@pytest.fixture
def trained(tmp_path):
    """A 1-channel, 3-class UNet3D recorded with features [4, 8] (the config's default is [64, 128, 256])."""
    path = str(tmp_path / "model.pt")
    write_record(path, UNet3D(in_channels=1, out_channels=3, features=[4, 8]), {"input_channels": [0]})
    return path


def configured(in_channels=1, out_channels=3, features=(64, 128, 256)):
    return UNet3D(in_channels=in_channels, out_channels=out_channels, features=list(features))


@pytest.mark.parametrize("argv", [[], ["--input_channels", "[2]"], ["--input_channels=[1]", "--num_classes", "3"],
                                  ["--network_def#features", "[4, 8]"]])
def test_overrides_that_agree_with_the_record_build_the_recorded_network(trained, monkeypatch, argv):
    # a data-selection key (which stain of the stack) leaves in_channels at 1: no conflict, the record's features
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", *argv])
    features = [4, 8] if "--network_def#features" in argv else [64, 128, 256]
    net = network_for(trained, configured(features=features), KEYS)
    assert network_config(net)["features"] == [4, 8] and network_config(net)["in_channels"] == 1


@pytest.mark.parametrize("argv,given,field", [
    (["--input_channels", "[0,2]"], dict(in_channels=2), "in_channels: 2 vs 1"),
    (["--num_classes", "2"], dict(out_channels=2), "out_channels: 2 vs 3"),
    (["--network_def#features", "[8,16]"], dict(features=(8, 16)), "features#0: 8 vs 4"),
    (["--network_def", "{}"], dict(), "features")])
def test_an_override_that_changes_its_own_field_is_a_named_error(trained, monkeypatch, argv, given, field):
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", *argv])
    with pytest.raises(CheckpointMismatchError, match="given on the command line") as e:
        network_for(trained, configured(**given), KEYS)
    assert argv[0].split("=")[0][2:] in str(e.value) and field in str(e.value)


def test_a_list_of_keys_keeps_the_strict_rule(trained, monkeypatch):
    """A list (no field per key): any explicit key conflicts where the networks differ."""
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "--input_channels", "[2]"])
    with pytest.raises(CheckpointMismatchError):
        network_for(trained, configured(), list(KEYS))

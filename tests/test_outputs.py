"""common.outputs: output folders checked before work (real read-only and full file systems), atomic writes,
leftovers of killed runs removed."""

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.errors import OutputDirError, named_error
from common.io import write_ome_tiff
from common.outputs import atomic_write, expected_output_bytes, prepare_output_dir, remove_stale_temp


@contextlib.contextmanager
def _tmpfs(path, options):
    """A real tmpfs mounted at ``path`` (root only); skips the test where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_prepare_creates_and_accepts_a_writable_folder(tmp_path):
    out = tmp_path / "a" / "b"
    assert prepare_output_dir(str(out)) == str(out)
    assert out.is_dir() and os.listdir(out) == []  # the write probe leaves nothing


def test_prepare_refuses_a_file_and_a_folder_under_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(OutputDirError, match="existing file"):
        prepare_output_dir(str(f))
    with pytest.raises(OutputDirError, match="cannot create"):
        prepare_output_dir(str(f / "sub"))


def test_prepare_refuses_a_read_only_file_system(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(OutputDirError, match="not writable|cannot create") as e:
            prepare_output_dir(str(ro))
        assert str(ro) in str(e.value) and "--output_dir" in str(e.value)


def test_prepare_checks_free_space_against_the_expected_outputs(tmp_path):
    with _tmpfs(tmp_path / "small", "size=1m") as small:
        prepare_output_dir(str(small), required_bytes=100_000)  # fits
        with pytest.raises(OutputDirError, match="not enough free space") as e:
            prepare_output_dir(str(small), required_bytes=5 * 2**20)
        assert "GiB" in str(e.value)


def test_expected_output_bytes_by_hand(tmp_path):
    write_ome_tiff(tmp_path / "a.ome.tif", np.zeros((4, 10, 20), np.uint8))
    write_ome_tiff(tmp_path / "b.ome.tif", np.zeros((2, 5, 5), np.float32))
    paths = [str(tmp_path / "a.ome.tif"), str(tmp_path / "b.ome.tif")]
    # float32 outputs: 4 bytes per voxel, two outputs per image
    assert expected_output_bytes(paths, n_outputs=2) == (800 + 50) * 4 * 2


def test_atomic_write_keeps_the_old_file_on_failure_and_publishes_on_success(tmp_path):
    final = tmp_path / "model.pt"
    torch.save({"v": torch.tensor(1)}, final)
    with pytest.raises(RuntimeError):
        with atomic_write(final) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert torch.load(final, weights_only=True)["v"] == 1
    assert os.listdir(tmp_path) == ["model.pt"]
    with atomic_write(final) as tmp:
        torch.save({"v": torch.tensor(2)}, tmp)
    assert torch.load(final, weights_only=True)["v"] == 2
    assert oct(os.stat(final).st_mode & 0o777) == oct(0o644)


def test_stale_temporary_files_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / f".tmp_{_dead_pid()}_abc.ome.tif"
    live = tmp_path / f".tmp_{os.getpid()}_def.ome.tif"
    other = tmp_path / ".tmp_notapid.txt"
    for p in (dead, live, other):
        p.write_bytes(b"x")
    removed = remove_stale_temp(str(tmp_path))
    assert removed == [str(dead)]
    assert live.exists() and other.exists() and not dead.exists()


def test_inference_into_a_read_only_or_full_folder_is_named_before_any_work(tmp_path):
    """The real fnet_baseline inference: the output folder is checked before the network runs."""
    from zoo_testing import TINY, run_bundle_inprocess, tiny_model

    ckpt = tiny_model("fnet_baseline", tmp_path / "model")
    (tmp_path / "in").mkdir()
    write_ome_tiff(tmp_path / "in" / "big.ome.tif", np.random.default_rng(0).random((16, 128, 160)).astype(np.float32))
    ov = dict(TINY["fnet_baseline"], dataset_dir=str(tmp_path / "in"), ckpt_path=str(ckpt))
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(Exception) as e:
            run_bundle_inprocess("fnet_baseline", "inference.json", dict(ov, output_dir=str(ro)))
        assert isinstance(named_error(e.value), OutputDirError) and "not writable" in str(named_error(e.value))
    with _tmpfs(tmp_path / "full", "size=512k") as full:  # 16x128x160 float32 = 1.25 MiB > 512 KiB
        with pytest.raises(Exception) as e:
            run_bundle_inprocess("fnet_baseline", "inference.json", dict(ov, output_dir=str(full)))
        assert isinstance(named_error(e.value), OutputDirError) and "not enough free space" in str(named_error(e.value))
        assert os.listdir(full) == []


def test_checkpoint_saves_are_byte_reproducible(tmp_path):
    """Same tensors, same bytes (and sha256), whatever temporary name the atomic save went through."""
    import hashlib

    from common.handlers import AtomicDiskSaver

    saver = AtomicDiskSaver(str(tmp_path), "model.pt")
    digests = []
    for _ in range(2):
        saver({"w": torch.arange(12.0).reshape(3, 4)}, "ignored.pt")
        digests.append(hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert os.listdir(tmp_path) == ["model.pt"]

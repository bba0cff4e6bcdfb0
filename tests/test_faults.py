"""Fault tests: kill -9 during checkpoint saves and output writes (real separate processes, several moments).

After every kill: each file under a final name is complete, the previous best model is intact, and
a rerun of the same command finishes (training resumes from the last complete checkpoint); the
rerun removes the temporary files the killed run left. The runs that are killed are separate processes
forked from the test's (zoo_testing.Forked: no interpreter start-up); the reruns run in this process.
"""

import os
import signal
import time

import numpy as np
import pytest
import torch

from common.handlers import checkpoints_newest_first
from common.io import read_image, write_ome_tiff
from common.synthetic import write_dataset_3d
from zoo_testing import TINY, TINY_TRAIN, Forked, fork_bundle, run_bundle_here, split_manifest

pytestmark = pytest.mark.slow
B = "fnet_baseline"


def _kill_when(proc, condition, timeout=120, poll=0.001):
    """SIGKILL ``proc`` as soon as ``condition()`` holds; returns True when it was killed that way."""
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                return False
            if condition(proc):
                proc.send_signal(signal.SIGKILL)
                return True
            time.sleep(poll)
        return False
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def _temp_files(folder, pid=None):
    """Temporary files in ``folder`` (of process ``pid`` only, when given)."""
    prefix = ".tmp_" if pid is None else f".tmp_{pid}_"
    return [n for n in os.listdir(folder) if n.startswith(prefix)] if os.path.isdir(folder) else []


def _save_best_models_forever(folder):
    """A new "best model" again and again (24 MB each, so that a kill can land while one is written)."""
    from common.handlers import AtomicDiskSaver

    saver = AtomicDiskSaver(folder, "model.pt")
    for i in range(1, 10**6):
        saver({"w": torch.full((6_000_000,), float(i)), "step": torch.tensor(i)}, "ignored.pt")


def test_kill_during_best_model_save_keeps_a_complete_model(tmp_path):
    """Kill at the moment a new best model is being written (its temporary file exists), 5 times."""
    folder = tmp_path / "models"
    folder.mkdir()
    survived = 0
    for attempt in range(5):
        proc = Forked(_save_best_models_forever, str(folder))  # a separate process, forked from this one
        # the first kill may come before any model exists; later ones always find the previous one
        need_previous = attempt > 0
        killed = _kill_when(proc, lambda p: bool(_temp_files(folder, p.pid)) and (not need_previous or
                                                                                (folder / "model.pt").exists()))
        assert killed, "the writer ended before a save could be interrupted"
        if (folder / "model.pt").exists():
            sd = torch.load(folder / "model.pt", weights_only=True)
            assert sd["w"].shape == (6_000_000,) and torch.all(sd["w"] == float(sd["step"]))
            survived += 1
        assert [n for n in os.listdir(folder) if not n.startswith(".tmp_")] in ([], ["model.pt"])
    assert survived >= 4
    # the next writer removes the leftovers of the killed ones (their processes are gone)
    from common.outputs import remove_stale_temp

    remove_stale_temp(str(folder))
    assert _temp_files(folder) == []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault_data")
    manifest = write_dataset_3d(str(d), n_volumes=3, shape=(16, 48, 48), seed=7, n_cells=4)
    return split_manifest(manifest, {"train": 2, "val": 1})


def _train_overrides(data, out, epochs):
    ov = dict(TINY[B], **TINY_TRAIN[B])
    ov.update(train_manifest=data["train"], val_manifest=data["val"], ckpt_dir=str(out / "models"),
              output_dir=str(out / "runs"), num_epochs=epochs, epoch_length=2)
    return ov


def _complete(path):
    torch.load(path, map_location="cpu", weights_only=True)
    return True


def test_training_killed_at_random_moments_resumes_and_keeps_the_best_model(data, tmp_path):
    """Three kills of a real training at different moments (one while a checkpoint is being written),
    then the same command resumes from the last complete checkpoint and finishes."""
    out = tmp_path / "run"
    ov = _train_overrides(data, out, epochs=5)
    ckpts, models = out / "runs" / "checkpoints", out / "models"
    moments = [
        lambda p: len(checkpoints_newest_first(str(ckpts))) >= 1,  # right after the first checkpoint
        lambda p: bool(_temp_files(ckpts, p.pid) or _temp_files(models, p.pid)),  # while one is written
        lambda p: (models / "model.pt").exists() and time.sleep(0.3 * np.random.default_rng(1).random()) is None,
    ]
    best_before = None
    for when in moments:
        proc = fork_bundle(B, "train.json", ov)  # a separate process (forked from this one) to kill
        _kill_when(proc, when, timeout=240)
        # every file under a final name is complete
        for p in checkpoints_newest_first(str(ckpts)):
            assert _complete(p), p
        if (models / "model.pt").exists():
            assert _complete(models / "model.pt")
            assert (models / "model.json").exists()
            best_before = torch.load(models / "model.pt", weights_only=True)
    assert best_before is not None, "no best model was written before the kills"
    done = run_bundle_here(B, "train.json", ov)  # the same run again (in this process: what it does is checked)
    assert "resuming from" in done.output
    assert _complete(models / "model.pt")
    assert _temp_files(ckpts) == [] and _temp_files(models) == []
    last = checkpoints_newest_first(str(ckpts))[0]
    assert "epoch=5" in os.path.basename(last)


def test_inference_killed_while_writing_leaves_no_partial_output(data, tmp_path):
    """Kill inference while an output is being written (several moments); no partial file under a final
    name, and the rerun writes every output and removes the leftovers."""
    from common.networks.fnet import FNet
    from common.networks.record import write_record

    train_out = tmp_path / "trained"  # tiny weights with their record (training is tested above)
    net = FNet(3, 1, 1, depth=TINY[B]["network_def#depth"], mult_chan=TINY[B]["network_def#mult_chan"])
    (train_out / "models").mkdir(parents=True)
    torch.save(net.state_dict(), train_out / "models" / "model.pt")
    write_record(str(train_out / "models" / "model.pt"), net, {"target_spacing_um": [0.29, 0.29, 0.29]})
    inputs = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in range(3):
        write_ome_tiff(inputs / f"v{i}.ome.tif", rng.random((16, 96, 96)).astype(np.float32), spacing_um=(1, 1, 1))
    out = tmp_path / "pred"
    ov = {"dataset_dir": str(inputs), "output_dir": str(out), "ckpt_path": str(train_out / "models" / "model.pt")}
    caught = 0
    for n_done in (0, 1):
        proc = fork_bundle(B, "inference.json", ov)
        finals = lambda: [f for f in os.listdir(out) if not f.startswith(".")] if out.is_dir() else []
        caught += _kill_when(proc, lambda p: len(finals()) >= n_done and bool(_temp_files(out, p.pid)), timeout=240)
        for f in os.listdir(out) if out.is_dir() else []:
            if not f.startswith("."):
                arr, _, _ = read_image(out / f)
                assert arr.shape == (1, 16, 96, 96), f
    assert caught >= 1, "no kill landed during a write"
    run_bundle_here(B, "inference.json", ov)  # the same run again, in this process
    assert sorted(os.listdir(out)) == [f"v{i}_pred.ome.tif" for i in range(3)]

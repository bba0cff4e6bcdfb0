"""The ``lr_schedule`` switch: factors by hand, the scheduler's state round trip, and a real bundle run."""

import glob
import io
import math
import os

import pytest
import torch

from common.errors import named_error
from common.handlers import latest_loadable_checkpoint
from common.optim import LrScheduleError, lr_factor, lr_scheduler
from common.synthetic import write_dataset_3d
from zoo_testing import TINY, TINY_TRAIN, run_bundle_here, split_manifest


def test_factors_by_hand():
    assert lr_factor(0, "constant", 10) == lr_factor(10, "constant", 10) == 1.0
    assert lr_factor(0, "cosine", 100) == 1.0
    assert lr_factor(50, "cosine", 100) == pytest.approx(0.5)
    assert lr_factor(25, "cosine", 100) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert lr_factor(100, "cosine", 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(150, "cosine", 100) == pytest.approx(0.0, abs=1e-12)  # past the budget: stays at the end value
    assert lr_factor(50, "cosine", 100, final_fraction=0.1) == pytest.approx(0.55)
    assert lr_factor(100, "cosine", 100, final_fraction=0.1) == pytest.approx(0.1)


def test_unknown_schedule_is_a_named_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(LrScheduleError, match="lr_schedule 'linear'.*constant, cosine") as e:
        lr_scheduler(opt, "linear", 10)
    assert named_error(e.value) is e.value


def test_scheduler_steps_and_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=0.01)
    s = lr_scheduler(opt, "cosine", 8)
    for i in range(1, 5):
        opt.step()
        s.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(i, "cosine", 8))
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": s.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    s2 = lr_scheduler(opt2, "cosine", 8)
    opt2.load_state_dict(state["opt"])
    s2.load_state_dict(state["sched"])
    opt2.step()
    s2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(5, "cosine", 8))


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["fnet_baseline", "spotlight_dna"])
def test_bundle_cosine_schedule_and_resume_from_a_checkpoint_without_scheduler(bundle, tmp_path):
    """3 iterations x 2 epochs with the cosine decay: the epoch-1 checkpoint holds lr / 2, the last 0.

    A checkpoint written before the config had a scheduler (its ``lr_scheduler`` entry removed here)
    still resumes: the scheduler then starts from its initial state, with a warning.
    """
    manifest = write_dataset_3d(str(tmp_path / "data"), n_volumes=2, shape=(16, 48, 48), seed=5)
    data = split_manifest(manifest, {"train": 1, "val": 1})
    ov = dict(TINY[bundle], **TINY_TRAIN[bundle], train_manifest=data["train"], val_manifest=data["val"],
              ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"), lr_schedule="cosine",
              learning_rate=0.002, resume=False)
    run_bundle_here(bundle, "train.json", ov)
    ckpts = sorted(glob.glob(str(tmp_path / "runs" / "checkpoints" / "*.pt")), key=os.path.getmtime)
    lrs = {}
    for c in ckpts:
        st = torch.load(c, weights_only=True)
        lrs[st["trainer"]["iteration"] // 3] = st["optimizer"]["param_groups"][0]["lr"]
    assert lrs[1] == pytest.approx(0.001) and lrs[2] == pytest.approx(0.0, abs=1e-12)
    last = ckpts[-1]
    st = torch.load(last, weights_only=True)
    del st["lr_scheduler"]
    torch.save(st, last)
    p = run_bundle_here(bundle, "train.json", dict(ov, num_epochs=3, resume=True))
    assert "holds no lr_scheduler" in p.output
    # the trainer resumed at iteration 6 and ran 3 more; the schedule restarted (9 iterations in all): factor(3 of 9)
    st = torch.load(latest_loadable_checkpoint(str(tmp_path / "runs" / "checkpoints")), weights_only=True)
    assert st["trainer"]["iteration"] == 9
    assert st["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.002 * lr_factor(3, "cosine", 9))
    assert st["lr_scheduler"]["last_epoch"] == 3

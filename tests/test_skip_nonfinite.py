"""SkipNonFiniteSteps on a real MONAI SupervisedTrainer: a NaN step leaves the weights as they were."""

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from common.errors import named_error
from common.handlers import SkipNonFiniteSteps, TrainingDivergedError


class _NanAt:
    """MSE, but NaN at the given (1-based) calls."""

    def __init__(self, bad):
        self.bad, self.calls = set(bad), 0

    def __call__(self, pred, target):
        self.calls += 1
        loss = torch.nn.functional.mse_loss(pred, target)
        return loss * float("nan") if self.calls in self.bad else loss


def _trainer(bad, n=5, **kw):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    data = [{"image": torch.randn(4, 3), "label": torch.randn(4, 1)} for _ in range(n)]
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    snapshots = []
    t = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                          optimizer=opt, loss_function=_NanAt(bad), epoch_length=n)
    guard = SkipNonFiniteSteps(**kw)
    guard.attach(t)
    t.add_event_handler(Events.ITERATION_COMPLETED, lambda e: snapshots.append(net.weight.detach().clone()))
    return t, guard, snapshots


def test_nan_step_is_skipped_and_weights_stay_finite():
    t, guard, w = _trainer(bad={3})
    t.run()
    assert guard.skipped == [3]
    assert torch.equal(w[2], w[1])  # iteration 3 changed nothing
    assert not torch.equal(w[3], w[2])  # iteration 4 trained again
    assert all(torch.isfinite(x).all() for x in w)


def test_without_the_guard_one_nan_step_ruins_the_weights():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    data = [{"image": torch.randn(4, 3), "label": torch.randn(4, 1)} for _ in range(3)]
    t = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                          optimizer=torch.optim.Adam(net.parameters(), lr=0.1), loss_function=_NanAt({2}), epoch_length=3)
    t.run()
    assert not torch.isfinite(net.weight).all()


def test_many_nan_steps_in_a_row_stop_with_a_named_error():
    t, guard, _ = _trainer(bad={2, 3, 4}, n=6, max_consecutive=3)
    with pytest.raises(Exception) as e:
        t.run()
    err = named_error(e.value)
    assert isinstance(err, TrainingDivergedError) and "3 steps in a row up to iteration 4" in str(err)

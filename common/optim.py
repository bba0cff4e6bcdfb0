"""Learning-rate schedules for the bundles' training configs.

``lr_scheduler(optimizer, "cosine", total_iterations)`` is stepped once per iteration (MONAI's
``LrScheduleHandler`` with ``epoch_level=False``). Written here rather than picked from
``torch.optim.lr_scheduler`` directly so that one config switch (``lr_schedule``) selects between a
constant rate (the papers' Adam at a fixed rate) and a cosine decay, with a state that the
resumable checkpoints carry (``LambdaLR`` stores only its step count).
"""

from __future__ import annotations

import math

import torch

from common.errors import ZooError

__all__ = ["LR_SCHEDULES", "LrScheduleError", "lr_scheduler", "lr_factor"]

class LrScheduleError(ZooError):
    """The ``lr_schedule`` switch names no known schedule."""


#: the values of the ``lr_schedule`` config switch
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(iteration: int, schedule: str, total_iterations: int, final_fraction: float = 0.0) -> float:
    """Factor on the base learning rate before the ``iteration``-th optimiser step (0-based).

    ``constant``: 1. ``cosine``: ``f + (1 - f) * (1 + cos(pi * i / total)) / 2`` with
    ``f = final_fraction``, so 1 at the first step and ``f`` after the last.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = min(max(int(iteration), 0), max(int(total_iterations), 1)) / max(int(total_iterations), 1)
        f = float(final_fraction)
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise LrScheduleError(f"lr_schedule {schedule!r} is not one of {', '.join(LR_SCHEDULES)}: set --lr_schedule to one of them")


class _Factor:
    """The factor as a callable for ``LambdaLR`` (not saved in checkpoints; the config rebuilds it)."""

    def __init__(self, schedule: str, total_iterations: int, final_fraction: float):
        lr_factor(0, schedule, total_iterations, final_fraction)  # validates the name before any work starts
        self.args = (schedule, int(total_iterations), float(final_fraction))

    def __call__(self, step: int) -> float:
        return lr_factor(step, *self.args)


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str = "constant", total_iterations: int = 1,
                 final_fraction: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` following :func:`lr_factor` (``schedule``: one of :data:`LR_SCHEDULES`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Factor(str(schedule), total_iterations, final_fraction))

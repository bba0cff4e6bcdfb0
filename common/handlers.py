"""Ignite handlers shared by the bundles: resuming an interrupted training."""

from __future__ import annotations

import glob
import logging
import os
import re

import torch
from monai.handlers import CheckpointLoader

__all__ = ["latest_checkpoint", "AutoResume"]

_STEP = re.compile(r"(?:epoch|iteration)=(\d+)")


def latest_checkpoint(ckpt_dir: str, pattern: str = "*.pt") -> str | None:
    """The checkpoint in ``ckpt_dir`` with the highest ``epoch=N`` / ``iteration=N`` in its name, or None."""
    best, best_step = None, -1
    for path in glob.glob(os.path.join(ckpt_dir, pattern)):
        m = _STEP.search(os.path.basename(path))
        if m and int(m.group(1)) > best_step:
            best, best_step = path, int(m.group(1))
    return best


class AutoResume:
    """Resume training from the newest checkpoint in ``ckpt_dir``, if there is one.

    Pair it with a ``CheckpointSaver`` that writes ``{"network", "optimizer", "trainer", ...}`` to
    ``ckpt_dir`` every few epochs: after an interruption, running the same command again restores
    the weights, the optimiser and the trainer's epoch/iteration counters and carries on from there.
    Checkpoints are loaded with ``weights_only=True`` (plain state dicts and numbers only).

    Args:
        ckpt_dir: folder of resumable checkpoints.
        load_dict: objects to restore, as given to the saver.
        enabled: ``False`` starts from scratch even when checkpoints exist.
        pattern: file pattern of the resumable checkpoints.
    """

    def __init__(self, ckpt_dir: str, load_dict: dict, enabled: bool = True, pattern: str = "checkpoint*.pt",
                 map_location=None):
        self.ckpt_dir = ckpt_dir
        self.load_dict = load_dict
        self.enabled = enabled
        self.pattern = pattern
        self.map_location = map_location if map_location is not None else torch.device("cpu")
        self.logger = logging.getLogger(self.__class__.__name__)
        self.resumed_from: str | None = None

    def attach(self, engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.ckpt_dir, self.pattern)
        if path is None:
            self.logger.info(f"no checkpoint in {self.ckpt_dir}: training from the start")
            return
        self.logger.info(f"resuming from {path}")
        self.resumed_from = path
        CheckpointLoader(load_path=path, load_dict=self.load_dict, map_location=self.map_location).attach(engine)

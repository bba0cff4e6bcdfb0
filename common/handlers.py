"""Ignite handlers shared by the bundles: resuming an interrupted training."""

from __future__ import annotations

import glob
import logging
import os
import re

import torch
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = ["checkpoints_newest_first", "latest_checkpoint", "latest_loadable_checkpoint", "Resumable"]

_STEP = re.compile(r"(?:epoch|iteration)=(\d+)")


def checkpoints_newest_first(ckpt_dir: str, pattern: str = "*.pt") -> list:
    """Checkpoints in ``ckpt_dir`` with ``epoch=N`` / ``iteration=N`` in their names, highest N first."""
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, pattern)):
        m = _STEP.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: str, pattern: str = "*.pt") -> str | None:
    """The checkpoint in ``ckpt_dir`` with the highest ``epoch=N`` / ``iteration=N`` in its name, or None."""
    found = checkpoints_newest_first(ckpt_dir, pattern)
    return found[0] if found else None


def latest_loadable_checkpoint(ckpt_dir: str, pattern: str = "*.pt") -> str | None:
    """The newest checkpoint that really loads (``weights_only=True``); truncated files are skipped
    with a warning (a process killed while ignite was writing can leave one behind)."""
    for path in checkpoints_newest_first(ckpt_dir, pattern):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except Exception as e:  # truncated / corrupt file: fall back to the previous checkpoint
            logging.getLogger(__name__).warning(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
    return None


class Resumable:
    """Save resumable checkpoints every few epochs and, on start, resume from the newest one.

    Every ``save_interval`` epochs it writes ``{objects..., "trainer": engine}`` (weights, optimiser,
    the trainer's epoch/iteration counters) to ``ckpt_dir``. When the same command runs again after an
    interruption, it restores all of them before the first iteration and training carries on from
    the saved epoch. The trainer is added at ``attach`` time, so the bundle config need not refer to
    the trainer from inside its own handler list (a circular reference). Checkpoints hold plain state
    dicts and numbers, loadable with ``weights_only=True``; ignite writes them atomically and, under
    DDP, on rank 0 only.

    Args:
        ckpt_dir: folder of resumable checkpoints.
        objects: what to save besides the trainer, e.g. ``{"network": net, "optimizer": opt}``.
        save_interval: epochs between checkpoints.
        n_saved: how many to keep.
        resume: ``False`` starts from scratch even when checkpoints exist.
    """

    def __init__(self, ckpt_dir: str, objects: dict, save_interval: int = 1, n_saved: int = 1, resume: bool = True,
                 map_location=None, file_prefix: str = "checkpoint"):
        self.ckpt_dir = ckpt_dir
        self.objects = dict(objects)
        self.save_interval = int(save_interval)
        self.n_saved = n_saved
        self.resume = resume
        self.file_prefix = file_prefix
        self.map_location = map_location if map_location is not None else torch.device("cpu")
        self.logger = logging.getLogger(self.__class__.__name__)
        self.resumed_from: str | None = None

    def attach(self, engine) -> None:
        objects = dict(self.objects, trainer=engine)
        path = latest_loadable_checkpoint(self.ckpt_dir, f"{self.file_prefix}*.pt") if self.resume else None
        if path is not None:
            self.logger.info(f"resuming from {path}")
            self.resumed_from = path
            CheckpointLoader(load_path=path, load_dict=objects, map_location=self.map_location).attach(engine)
        elif self.resume:
            self.logger.info(f"no checkpoint in {self.ckpt_dir}: training from the start")
        CheckpointSaver(save_dir=self.ckpt_dir, save_dict=objects, save_interval=self.save_interval, epoch_level=True,
                        n_saved=max(2, self.n_saved), file_prefix=self.file_prefix).attach(engine)

"""Ignite handlers shared by the bundles: atomic checkpoints, resuming, checkpoints checked against the network.

Resuming an interrupted training, and named errors when a checkpoint does not fit the configured network.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re

import torch
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from common.errors import CheckpointMismatchError, ZooError
from common.outputs import atomic_write, remove_stale_temp

__all__ = ["checkpoints_newest_first", "latest_checkpoint", "latest_loadable_checkpoint", "Resumable",
           "SkipNonFiniteSteps", "TrainingDivergedError", "step_is_finite",
           "AtomicDiskSaver", "AtomicCheckpointSaver", "CheckpointMismatchError", "state_dict_mismatch",
           "check_checkpoint"]

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


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` that writes through a temporary file and a rename, readable by all.

    MONAI's ``CheckpointSaver`` uses ``atomic=False`` (ignite's atomic mode makes files readable
    by their owner only), so a kill during a save leaves a partial file under the final name; and
    with a fixed file name (``models/model.pt``) ignite *removes* the previous best model before
    writing the new one. Here the previous file stays in place until the new one is complete.

    Args:
        dirname: folder of the checkpoints.
        filename: a fixed file name (e.g. ``model.pt``) that every save replaces, or None.
    """

    def __init__(self, dirname: str, filename: str | None = None, on_saved=None):
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self.on_saved = on_saved

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        name = self.filename or filename
        super().__call__(checkpoint, name, metadata)
        if self.on_saved is not None and int(os.environ.get("RANK", "0")) == 0:
            self.on_saved(os.path.join(str(self.dirname), name))

    def _save_func(self, checkpoint, path, func) -> None:
        with atomic_write(path, suffix=".pt") as tmp:
            # through a file object: torch.save names the archive after a path, so the same
            # tensors saved to different temporary names would give different bytes (and sha256)
            with open(tmp, "wb") as f:
                func(checkpoint, f, **self.kwargs)

    def remove(self, filename: str) -> None:
        if self.filename is not None:
            return  # a fixed name is replaced atomically by the next save: never delete it first
        path = os.path.join(str(self.dirname), filename)
        if os.path.exists(path):
            super().remove(filename)


def _write_record_at(write_record, net, settings, path):
    write_record(path, net, settings)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` (same arguments) whose every file is written atomically, and whose
    fixed-name model files (``models/model.pt``) carry their record (``models/model.json``).

    A kill at any moment leaves the previous checkpoint (and the previous best model) complete
    under its name; see :class:`AtomicDiskSaver`. The record holds the network's configuration and
    ``settings`` (see :mod:`common.networks.record`), so inference needs no retyped overrides.

    Args:
        settings: inference-relevant settings the model was trained with (e.g. ``target_spacing_um``).
    """

    def __init__(self, save_dir: str, save_dict: dict, settings: dict | None = None, **kwargs):
        super().__init__(save_dir, save_dict, **kwargs)
        remove_stale_temp(save_dir)  # what a killed save left behind
        nets = [v for v in save_dict.values() if isinstance(v, torch.nn.Module)]
        on_saved = None
        if len(nets) == 1:  # the model files carry their record (common.networks.record)
            from common.networks.record import write_record

            on_saved = functools.partial(_write_record_at, write_record, nets[0], dict(settings or {}))

        fixed = {"_final_checkpoint": self._final_filename,
                 "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
                 "_interval_checkpoint": None}
        for attr, filename in fixed.items():
            ckpt = getattr(self, attr)
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(self.save_dir, filename, on_saved if filename else None)


def _strip_module(sd: dict) -> dict:
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def state_dict_mismatch(expected: dict, found: dict, limit: int = 3) -> str | None:
    """What differs between two state dicts (missing / unexpected keys, other shapes), or None."""
    expected, found = _strip_module(expected), _strip_module(found)
    problems = []
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs network {tuple(expected[k].shape)}"
              for k in expected if k in found and hasattr(found[k], "shape") and found[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) of another shape, e.g. " + "; ".join(shapes[:limit]))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {', '.join(missing[:limit])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:limit])}")
    return "; ".join(problems) or None


def _network_state(ckpt: dict, key: str | None) -> dict:
    if key is not None and isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
        return ckpt[key]
    return ckpt


def check_checkpoint(path: str, network: torch.nn.Module, what_to_do: str | None = None) -> str:
    """Check before any work that ``path`` holds weights that fit ``network``; returns ``path``.

    Raises:
        CheckpointMismatchError: the file is missing, unreadable, or made for another network.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointMismatchError(
            f"{path}: no trained model here; train the bundle first (configs/train.json), download the "
            "pretrained bundle, or give the weights with --ckpt_path <file>")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointMismatchError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); "
                                      "was it copied completely?") from e
    diff = state_dict_mismatch(network.state_dict(), _network_state(ckpt, "model"))
    if diff:
        hint = what_to_do or ("run with the network settings it was trained with (the overrides given to "
                              "train.json, e.g. --network_def#... ), or point --ckpt_path at a matching model")
        raise CheckpointMismatchError(f"{path}: does not fit the configured network: {diff}. {hint}")
    return path


class Resumable:
    """Save resumable checkpoints every few epochs and, on start, resume from the newest one.

    Every ``save_interval`` epochs it writes ``{objects..., "trainer": engine}`` (weights, optimiser,
    the trainer's epoch/iteration counters) to ``ckpt_dir``. When the same command runs again after an
    interruption, it restores all of them before the first iteration and training carries on from
    the saved epoch. The trainer is added at ``attach`` time, so the bundle config need not refer to
    the trainer from inside its own handler list (a circular reference). Checkpoints hold plain state
    dicts and numbers, loadable with ``weights_only=True``; every file is written atomically
    (:class:`AtomicDiskSaver`) and, under DDP, on rank 0 only.

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
        network = self.objects.get("network")
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if path is not None else None
        if ckpt is not None and isinstance(network, torch.nn.Module):
            diff = state_dict_mismatch(network.state_dict(), _network_state(ckpt, "network"))
            if diff:
                raise CheckpointMismatchError(
                    f"{path}: cannot resume, this checkpoint was written by another network: {diff}. "
                    f"Either start afresh with --resume false (its checkpoints in {self.ckpt_dir} are then "
                    "replaced), or train into another folder with --output_dir <new folder>")
        if path is not None:
            self.logger.info(f"resuming from {path}")
            self.resumed_from = path
            missing = [k for k in objects if k not in ckpt] if isinstance(ckpt, dict) and len(objects) > 1 else []
            if missing:  # e.g. a checkpoint written before the config gained an lr_scheduler: those start afresh
                self.logger.warning(f"{path} holds no {', '.join(missing)}: they start from their initial state")
            CheckpointLoader(load_path=path, load_dict={k: v for k, v in objects.items() if k not in missing}, map_location=self.map_location).attach(engine)
        elif self.resume:
            self.logger.info(f"no checkpoint in {self.ckpt_dir}: training from the start")
        else:
            # a fresh start: stale checkpoints of the old run would otherwise be resumed from next time
            old = checkpoints_newest_first(self.ckpt_dir, f"{self.file_prefix}*.pt")
            if old and int(os.environ.get("RANK", "0")) == 0:
                for p in old:
                    os.remove(p)
                self.logger.info(f"resume is off: removed {len(old)} old checkpoint(s) from {self.ckpt_dir}")
        AtomicCheckpointSaver(save_dir=self.ckpt_dir, save_dict=objects, save_interval=self.save_interval,
                              epoch_level=True, n_saved=max(2, self.n_saved), file_prefix=self.file_prefix).attach(engine)


def step_is_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor | None = None) -> bool:
    """True when ``loss`` (if given) and every gradient of ``optimizer``'s parameters are finite.

    One reduction per parameter tensor (``sum``: NaN or inf anywhere makes it non-finite).
    """
    parts = [p.grad.detach().sum().float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if torch.is_tensor(loss):
        parts.append(loss.detach().float().reshape(()))
    return not parts or bool(torch.isfinite(torch.stack(parts)).all())


class TrainingDivergedError(ZooError):
    """Training produced non-finite losses or gradients for many steps in a row."""


class SkipNonFiniteSteps:
    """Skip an optimiser step whose loss or gradients are not finite, as AMP's ``GradScaler`` does for fp16.

    Training under bf16 autocast on CPU has no loss scaler; a single step with an infinite or NaN
    gradient (rare: before this guard one 3D F-net run of the Spotlight comparison turned NaN at iteration
    ~140; with it, one step in six 5,000-iteration runs was skipped) would
    otherwise turn every weight into NaN for good. After ``BACKWARD_COMPLETED`` this handler checks
    the loss and every gradient; if one is not finite it drops the gradients (``grad = None``, so
    the optimiser leaves the weights and its moments as they are) and logs a warning. After
    ``max_consecutive`` skipped steps in a row it stops with :class:`TrainingDivergedError`. Under
    GPU AMP with a scaler it does nothing (the scaler skips those steps itself).

    Attributes:
        skipped: iterations (1-based) whose step was skipped.
    """

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = int(max_consecutive)
        self.skipped: list[int] = []
        self._run = 0
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            return
        loss = engine.state.output.get("loss") if isinstance(engine.state.output, dict) else None
        if step_is_finite(engine.optimizer, loss):
            self._run = 0
            return
        engine.optimizer.zero_grad(set_to_none=True)
        self._run += 1
        self.skipped.append(int(engine.state.iteration))
        self.logger.warning(f"iteration {engine.state.iteration}: loss or gradients not finite, step skipped "
                            f"({len(self.skipped)} so far)")
        if self._run >= self.max_consecutive:
            raise TrainingDivergedError(
                f"training diverged: {self._run} steps in a row up to iteration {engine.state.iteration} had a "
                "non-finite loss or gradients; lower --learning_rate or set --bf16_cpu false, then resume (the "
                "checkpoints in the resume folder hold finite weights)")

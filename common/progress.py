"""Progress of long runs: one bar for a whole training, one line per validation, one per written file.

* :class:`TrainingProgress` (a train handler): a single tqdm bar over every iteration of the run
  (resumed runs start where they stopped) with iterations/s, the ETA and the loss, instead of
  one log line per iteration; after each validation one log line with the key metric, the best
  value so far and where the best model is.
* :class:`OutputFiles` (an inference handler): logs the path of every file that appeared (or was
  replaced) in the output folder during each iteration.

When the output is not a terminal (a log file, a CI job, a test), the bar becomes a log line (the
same text: percentage, iterations, elapsed time, ETA, it/s, epoch, iteration and loss) written at
the first and last iteration of every epoch and at most every ``log_interval`` seconds between,
so a 50,000 iteration run does not fill a log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

__all__ = ["TrainingProgress", "OutputFiles"]


def _rank() -> int:
    try:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    except Exception:  # pragma: no cover
        return 0


def _scalar(v):
    try:
        return float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError):
        return None


class TrainingProgress:
    """One progress bar for a whole training run, plus one log line per validation.

    Args:
        output_transform: training engine output -> loss (e.g. ``from_engine(['loss'], first=True)``).
        tag_name: the loss's name on the bar.
        validator: the evaluator run by ``ValidationHandler``; after each of its runs a line is logged
            with its key metric, the best value so far and ``best_model``.
        best_model: the file the best model is written to (shown in the validation line).
        log_interval: seconds between redraws when the output is not a terminal.
        file: where the bar goes (default ``sys.stderr``).
    """

    def __init__(self, output_transform: Callable = lambda x: x, tag_name: str = "loss", validator=None,
                 best_model: str | None = None, log_interval: float = 10.0, file=None):
        self.output_transform = output_transform
        self.tag_name = tag_name
        self.validator = validator
        self.best_model = best_model
        self.log_interval = float(log_interval)
        self.file = file
        self.bar = None
        self.logger = logging.getLogger("TrainingProgress")
        self._trainer = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        self._trainer = engine
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._close)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._validated)

    def _open(self, engine):
        from tqdm.auto import tqdm

        out = self.file or sys.stderr
        self._tty = hasattr(out, "isatty") and out.isatty()
        self._total = engine.state.max_epochs * engine.state.epoch_length
        self._initial = engine.state.iteration - 1  # a resumed run starts where it stopped
        self._rate_from = engine.state.iteration  # log lines: iterations/s counted from the first one
        self._t0 = self._last_line = time.time()
        if self._tty:
            self.bar = tqdm(total=self._total, initial=self._initial, file=out, unit="it", dynamic_ncols=True,
                            desc="training", leave=True, disable=_rank() != 0)
        else:
            self.bar = False  # log lines instead (see the module docstring)

    def _iteration(self, engine) -> None:
        if self.bar is None:
            self._open(engine)
        s = engine.state
        i = (s.iteration - 1) % s.epoch_length + 1
        text = f"Epoch: {s.epoch}/{s.max_epochs}, Iter: {i}/{s.epoch_length}"
        loss = _scalar(self.output_transform(s.output)) if s.output is not None else None
        if loss is not None:
            text += f" -- {self.tag_name}: {loss:.4f}"
        if self.bar:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
            return
        now = time.time()
        if _rank() == 0 and (i == 1 or i == s.epoch_length or now - self._last_line >= self.log_interval):
            from tqdm import tqdm

            self._last_line = now
            self.logger.info(tqdm.format_meter(s.iteration, self._total, now - self._t0, prefix="training", ascii=True,
                                               postfix=text, initial=self._rate_from, ncols=70 + len(text)))

    def _close(self, engine=None) -> None:
        if self.bar:
            self.bar.close()
        self.bar = None

    def _validated(self, evaluator) -> None:
        s = evaluator.state
        name = getattr(s, "key_metric_name", None)
        if not name or name not in s.metrics:
            return
        epoch = self._trainer.state.epoch if self._trainer is not None else s.epoch
        best, best_epoch = getattr(s, "best_metric", None), getattr(s, "best_metric_epoch", None)
        msg = f"validation after epoch {epoch}: {name} {float(s.metrics[name]):.4f}"
        if best is not None and best_epoch is not None and best_epoch >= 0:
            msg += f" (best {float(best):.4f} at epoch {best_epoch})"
            if self.best_model:
                msg += f"; best model {'written to' if best_epoch == epoch else 'stays'} {self.best_model}"
        if _rank() == 0:
            if self.bar:
                self.bar.clear()
            self.logger.info(msg)
            if self.bar:
                self.bar.refresh()


class OutputFiles:
    """Log the path of every file written to ``output_dir`` during each iteration of an engine.

    Temporary files (``.tmp_*``, hidden files) are ignored; a file replaced in place (same name,
    newer modification time) is logged again.

    Args:
        output_dir: the folder the engine's writers write to (searched recursively).
        logger_name: name of the logger used.
    """

    def __init__(self, output_dir: str, logger_name: str = "OutputFiles"):
        self.output_dir = str(output_dir)
        self.logger = logging.getLogger(logger_name)
        self._seen: dict[str, float] = {}
        self.written: list[str] = []

    def _scan(self) -> dict[str, float]:
        found = {}
        for d, dirs, files in os.walk(self.output_dir):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            for z in [x for x in dirs if x.endswith(".zarr")]:  # an OME-Zarr output is one output
                dirs.remove(z)
                p = os.path.join(d, z)
                try:
                    found[p] = max((os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(p) for f in fs),
                                   default=os.stat(p).st_mtime_ns)
                except OSError:
                    continue
            for f in files:
                if not f.startswith("."):
                    p = os.path.join(d, f)
                    try:
                        found[p] = os.stat(p).st_mtime_ns
                    except OSError:
                        continue
        return found

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._done)

    def _start(self, engine=None) -> None:
        self._seen = self._scan()
        self._t0 = time.time()

    def _iteration(self, engine=None) -> None:
        now = self._scan()
        new = sorted(p for p, t in now.items() if self._seen.get(p) != t)
        self._seen = now
        for p in new:
            self.written.append(p)
            self.logger.info(f"wrote {p}")

    def _done(self, engine=None) -> None:
        self._iteration()
        self.logger.info(f"{len(self.written)} file(s) written to {self.output_dir} in {time.time() - self._t0:.1f} s")

"""Named errors reach the user as the last line of the output, whatever wraps them.

MONAI's config parser wraps an error raised while a config expression is evaluated in its own
``RuntimeError`` ("Failed to evaluate ..."), and ``Compose`` wraps errors raised inside a
transform ("applying transform ..."). Python prints the wrapped chain innermost first, so the
project's own message (which file, what is wrong, what to do) ends up in the middle of a
40-line traceback. :func:`install_excepthook` keeps the full traceback and repeats the
innermost project error as the very last line.

A *named error* is any exception whose class is defined in the ``common`` package (e.g.
:class:`common.io.ImageReadError`, :class:`common.data.ManifestError`) or derives from
:class:`ZooError`.
"""

from __future__ import annotations

import sys

__all__ = ["ZooError", "OutputDirError", "CheckpointMismatchError", "CheckpointNotFoundError", "DataNotFoundError", "named_error", "install_excepthook"]


class ZooError(ValueError):
    """Base class of the project's named errors: the message says which file, what is wrong and what to do."""


class OutputDirError(ZooError):
    """An output folder cannot be written (missing permission, read-only file system, not enough space)."""


class CheckpointMismatchError(ZooError):
    """A checkpoint does not fit the configured network (other width, depth or channels)."""


class DataNotFoundError(ZooError, FileNotFoundError):
    """A data set the command needs is not installed or not where it should be."""


class CheckpointNotFoundError(ZooError, FileNotFoundError):
    """A checkpoint the configuration needs (e.g. the stage-0 model for ISL transfer) is missing."""


def _is_named(exc: BaseException) -> bool:
    if isinstance(exc, ZooError):
        return True
    module = getattr(type(exc), "__module__", "") or ""
    return module == "common" or module.startswith("common.")


def named_error(exc: BaseException | None) -> BaseException | None:
    """The innermost project error in ``exc``'s chain (``__cause__`` / ``__context__``), or None."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _is_named(exc):
            found = exc
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return found


def _hook(exc_type, exc, tb, _previous=None):
    (_previous or sys.__excepthook__)(exc_type, exc, tb)
    named = named_error(exc)
    if named is not None and named is not exc:
        try:
            sys.stderr.write(f"\n{type(named).__name__}: {named}\n")
            sys.stderr.flush()
        except Exception:  # a closed stderr must not hide the original error
            pass


def install_excepthook() -> None:
    """Repeat the innermost named error as the last line of an uncaught exception's output (idempotent)."""
    current = sys.excepthook
    if getattr(current, "_zoo_named_error_hook", False):
        return

    def hook(exc_type, exc, tb):
        _hook(exc_type, exc, tb, current)

    hook._zoo_named_error_hook = True
    sys.excepthook = hook

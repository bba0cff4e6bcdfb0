"""Command-line helpers shared by the bundles' configs and the scripts: booleans and strict flags.

Two traps of `python-fire <https://github.com/google/python-fire>`_ (which both ``python -m monai.bundle``
and ``scripts/*.py`` use) are closed here:

* ``--resume false`` arrives as the *string* ``'false'``, which Python treats as true. Configs
  therefore consume their boolean keys through :func:`as_bool` (``"$common.cli.as_bool(@resume, 'resume')"``),
  which accepts ``true/false/True/False/1/0`` (and ``yes/no/on/off``) with one meaning and names
  anything else.
* fire calls the function first and complains about flags it could not use afterwards, so a
  misspelt flag (``--minutes`` where there is none) lets a long run start anyway. :func:`strict_fire`
  checks every ``--flag`` against the signature before anything runs.
* JSON handed over as a command-line value is parsed as a Python literal, so ``null``, ``true`` and
  ``false`` arrive as the strings ``'null'``, ``'true'`` and ``'false'`` (a ``None`` path became a
  file ``null``). Parent processes therefore hand a child its spec on stdin, which
  :func:`json_spec` reads.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping, Sequence

__all__ = ["BooleanValueError", "UnknownFlagError", "as_bool", "check_flags", "json_spec", "strict_fire"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class BooleanValueError(ValueError):
    """A configuration or command-line value meant as a boolean is not one."""


class UnknownFlagError(ValueError):
    """A command line names a flag (or holds more positional values) than the command accepts."""


def as_bool(value, name: str = "value") -> bool:
    """``value`` as a bool: ``True/False``, ``1/0`` and the strings ``true/false/1/0/yes/no/on/off`` (any case).

    Args:
        value: what a config or the command line gave (fire passes ``--resume false`` as ``'false'``).
        name: the config key, for the error message.

    Raises:
        BooleanValueError: for anything else (``'maybe'``, ``2``, ``None``), naming the key and the fix.
    """
    if isinstance(value, bool):
        return value
    if hasattr(value, "dtype") and getattr(value, "shape", None) == () and str(value.dtype) in ("bool", "torch.bool"):
        return bool(value)  # numpy / torch scalar bool
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().strip("'\"").lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    name = name.replace("::", "#")  # MONAI rewrites '#' to '::' inside config expressions
    raise BooleanValueError(f"{name}: {value!r} is not a boolean; give true or false (also True/False, 1/0), "
                            f"e.g. --{name} false")


def json_spec(spec) -> dict:
    """A child process's spec: ``"stdin"`` reads JSON from stdin (how parents pass it), any other string is JSON.

    Raises:
        TypeError: ``spec`` is not a string: fire made a Python literal of ``--spec '{...}'``, with JSON's
            ``null``/``true``/``false`` turned into strings.
    """
    import json

    if isinstance(spec, str):
        return json.loads(sys.stdin.read() if spec == "stdin" else spec)
    raise TypeError(f"child spec: pass the JSON on stdin with --spec stdin (got a {type(spec).__name__}: the command "
                    "line parser turns JSON's null/true/false into strings)")


def _parameters(fn: Callable) -> tuple[list[str], bool, bool, int]:
    """``(flag names, takes **kwargs, takes *args, number of positional parameters)`` of a callable."""
    sig = inspect.signature(fn)
    names, var_kw, var_pos, n_pos = [], False, False, 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is p.VAR_POSITIONAL:
            var_pos = True
        else:
            names.append(p.name)
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                n_pos += 1
    return names, var_kw, var_pos, n_pos


def check_flags(component, argv: Sequence[str], prog: str = "") -> None:
    """Raise :class:`UnknownFlagError` when ``argv`` holds a ``--flag`` the target function does not take.

    Args:
        component: what would be given to ``fire.Fire``: a function, or a dict of command name -> function.
        argv: the arguments (without the program name). Arguments after a lone ``--`` are fire's own
            (``-- --help``) and are not checked; ``-h``/``--help`` are always allowed.
        prog: the program's name, for the message.
    """
    argv = list(argv)
    if "--" in argv:
        argv = argv[:argv.index("--")]
    if any(a in ("-h", "--help") for a in argv):
        return
    where = prog
    fn = component
    if isinstance(component, Mapping):
        if not argv or argv[0].startswith("-"):
            return  # fire lists the commands
        if argv[0] not in component:
            raise UnknownFlagError(f"{prog}: unknown command {argv[0]!r}; commands: {', '.join(component)}")
        fn, argv, where = component[argv[0]], argv[1:], f"{prog} {argv[0]}".strip()
    if not callable(fn):
        return
    names, var_kw, var_pos, n_pos = _parameters(fn)
    unknown, given, positional = [], set(), []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and len(a) > 2:
            flag, has_value = a[2:].split("=", 1)[0].replace("-", "_"), "=" in a
            if flag not in names and flag.startswith("no") and flag[2:] in names and not has_value:
                flag = flag[2:]  # fire's --noflag
            if flag in names:
                given.add(flag)
            elif not var_kw:
                unknown.append("--" + a[2:].split("=", 1)[0])
            if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1  # its value (a flag followed by another flag is a boolean switch)
        else:
            positional.append(a)
        i += 1
    if unknown:
        valid = ", ".join("--" + n for n in names) or "none"
        raise UnknownFlagError(f"{where}: unknown flag(s) {', '.join(unknown)}; valid flags: {valid}")
    free = [n for n in names[:n_pos] if n not in given]
    if positional and not var_pos and len(positional) > len(free):
        raise UnknownFlagError(f"{where}: too many positional values {positional[len(free):]}; "
                               f"it takes {', '.join(free) or 'none'} (give the others as --flag value)")


def strict_fire(component, argv: Sequence[str] | None = None, name: str | None = None, exit_on: tuple = (),
                **fire_kwargs):
    """``fire.Fire(component)`` after :func:`check_flags`: an unknown flag exits with status 2 before any work.

    Args:
        component: a function or a dict of command name -> function.
        argv: the arguments (default ``sys.argv[1:]``).
        name: the program's name (default: the script's file name).
        exit_on: exception classes that end the program with ``<name>: error: <message>`` and status 1
            (a tool's named errors, without a traceback).
        fire_kwargs: passed on to ``fire.Fire`` (e.g. ``serialize``).
    """
    import os

    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = name or os.path.basename(sys.argv[0] or "")
    try:
        check_flags(component, argv, prog)
    except UnknownFlagError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return fire.Fire(component, command=argv, name=name or prog, **fire_kwargs)
    except tuple(exit_on) as e:
        sys.exit(f"{os.path.splitext(prog)[0]}: error: {e}")

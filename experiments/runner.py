"""The one way the experiments, tools and tests run a bundle config: in this process or as a subprocess.

A bundle is named by its folder under ``bundles/`` (``"spotlight_dna"``) or by a path to a bundle folder;
``configs`` is one config file name (``"train.json"``) or a list of them, merged in order as MONAI does.
Overrides are MONAI bundle ids (``{"max_epochs": 2, "network_def#channels": [4, 8]}``).

- :func:`workflow` / :func:`run_inprocess`: MONAI's ``create_workflow`` (what ``monai.bundle.run`` calls)
  in this process; no interpreter start-up, exceptions propagate as they would reach the CLI, and
  :func:`workflow` hands back the initialised ``ConfigWorkflow`` so that a caller can read its trainer
  or evaluator state after ``run()``.
- :func:`run_subprocess`: ``python -m monai.bundle <cmd>`` (optionally under ``torchrun``) exactly as a
  user types it, from the bundle's folder.

This module is not part of ``common`` on purpose: ``common`` is vendored into every bundle zip and
never parses or launches a bundle config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = os.path.join(ROOT, "bundles")


class BundleRunError(RuntimeError):
    """A ``monai.bundle`` subprocess exited non-zero; the message holds the command and its output's tail."""

    def __init__(self, message: str, process: subprocess.CompletedProcess | None = None):
        super().__init__(message)
        self.process = process


def bundle_dir(bundle: str) -> str:
    """The folder of ``bundle``: a name under ``bundles/`` or a path to a bundle folder."""
    path = bundle if os.sep in str(bundle) or os.path.isabs(str(bundle)) else os.path.join(BUNDLES, bundle)
    return os.path.abspath(str(path))


def config_files(bundle: str, configs) -> list[str]:
    """Absolute paths of ``configs`` (one name or a list) in ``bundle``'s ``configs/`` folder."""
    names = [configs] if isinstance(configs, str) else list(configs)
    return [c if os.path.isabs(c) else os.path.join(bundle_dir(bundle), "configs", c) for c in names]


def _config_arg(files: list[str]):
    return files[0] if len(files) == 1 else files


def workflow(bundle: str, configs, overrides: dict | None = None, workflow_type: str | None = None,
             logging_file: str | None = None):
    """An initialised MONAI ``ConfigWorkflow`` of ``bundle``'s ``configs`` with ``overrides``
    (``bundle_root`` defaults to the bundle's folder). Call ``run()`` and ``finalize()`` on it."""
    from monai.bundle import create_workflow

    kw = dict({"bundle_root": bundle_dir(bundle)}, **(overrides or {}))
    if workflow_type is not None:
        kw["workflow_type"] = workflow_type
    if logging_file is not None:
        kw["logging_file"] = logging_file
    return create_workflow(config_file=_config_arg(config_files(bundle, configs)), **kw)


def run_inprocess(bundle: str, configs, overrides: dict | None = None, **kwargs) -> float:
    """Run ``bundle``'s ``configs`` in this process, as ``monai.bundle.run`` does (initialise, run,
    finalise); exceptions propagate. ``kwargs`` go to :func:`workflow`. Returns the seconds taken."""
    t0 = time.time()
    wf = workflow(bundle, configs, overrides, **kwargs)
    try:
        wf.run()
    finally:
        wf.finalize()
    return time.time() - t0


def cli_overrides(overrides: dict) -> list[str]:
    """``{"a#b": 2}`` as ``monai.bundle`` command-line arguments (``--a#b 2``; non-strings as JSON)."""
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return args


def subprocess_env(threads: int | None = None, base: dict | None = None) -> dict:
    """The environment of a bundle subprocess: this checkout importable (also without ``pip install -e .``)
    and, if given, ``threads`` OpenMP/MKL/OpenBLAS threads (default: ``OMP_NUM_THREADS`` or 2)."""
    e = dict(os.environ if base is None else base)
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    if threads is not None:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            e[k] = str(threads)
    else:
        e.setdefault("OMP_NUM_THREADS", "2")
    return e


def bundle_command(bundle: str, configs, overrides: dict | None = None, cmd=("run",), torchrun: int = 0,
                   logging: bool = True) -> list[str]:
    """The argument list of ``python -m monai.bundle <cmd>`` for ``bundle`` (under ``torchrun`` with
    ``torchrun`` processes when > 0); ``run`` gets the bundle's ``configs/logging.conf`` when ``logging``."""
    root = bundle_dir(bundle)
    files = config_files(bundle, configs)
    launcher = [sys.executable, "-m"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m"]
    args = launcher + ["monai.bundle", *cmd, "--config_file", files[0] if len(files) == 1 else json.dumps(files)]
    if cmd[0] == "run" and logging:
        args += ["--logging_file", os.path.join(root, "configs", "logging.conf")]
    return args + cli_overrides(dict({"bundle_root": root}, **(overrides or {})))


def _once(args, cwd, env, timeout, log):
    if log is None:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(args) + "\n\n")
        f.flush()
        p = subprocess.run(args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    p.stdout, p.stderr = open(log).read(), ""
    return p


def run_subprocess(bundle: str, configs, overrides: dict | None = None, cmd=("run",), torchrun: int = 0,
                   timeout: float | None = 600, check: bool = True, cwd: str | None = None, env: dict | None = None,
                   threads: int | None = None, log: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <cmd>`` for ``bundle`` in a subprocess, from the bundle's folder
    (or ``cwd``), as a user types it.

    Args:
        bundle: a bundle name under ``bundles/`` or a bundle folder.
        configs: one config file name or a list (merged in order).
        overrides: MONAI bundle id -> value (``bundle_root`` defaults to the bundle's folder).
        cmd: the ``monai.bundle`` sub-command and its extra arguments, e.g. ``("run",)``, ``("verify_metadata",)``.
        torchrun: number of processes under ``torch.distributed.run --standalone`` (0: a plain process).
            No failure is retried: the gloo teardown abort that once was is fixed at its cause
            (``common.distributed.shutdown``), so a rank that aborts now is a regression to see.
        timeout: seconds before ``subprocess.TimeoutExpired``.
        check: raise :class:`BundleRunError` with the output's tail on a non-zero exit.
        cwd: working directory (default: the bundle's folder).
        env: the environment (default :func:`subprocess_env` with ``threads``).
        threads: OpenMP/MKL threads of the subprocess when ``env`` is not given.
        log: a file to stream stdout and stderr into (headed by the command) instead of capturing them.

    Returns:
        The ``CompletedProcess``, with ``output`` = stdout + stderr and ``seconds`` = wall time.
    """
    args = bundle_command(bundle, configs, overrides, cmd=cmd, torchrun=torchrun)
    cwd = cwd or bundle_dir(bundle)
    env = env if env is not None else subprocess_env(threads)
    t0 = time.time()
    p = _once(args, cwd, env, timeout, log)
    p.output = p.stdout + p.stderr
    p.seconds = time.time() - t0
    if check and p.returncode != 0:
        where = f", log {log}" if log else ""
        raise BundleRunError(f"{' '.join(args)} failed ({p.returncode}){where}:\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}",
                             p)
    return p


def popen(bundle: str, configs, overrides: dict | None = None, cwd: str | None = None, env: dict | None = None,
          **kwargs) -> subprocess.Popen:
    """Start ``python -m monai.bundle run`` for ``bundle`` without waiting (for tests that kill a run);
    ``kwargs`` go to ``subprocess.Popen`` (default: output discarded)."""
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    kwargs.setdefault("stderr", subprocess.DEVNULL)
    args = bundle_command(bundle, configs, overrides, logging=False)
    return subprocess.Popen(args, cwd=cwd or bundle_dir(bundle), env=env if env is not None else subprocess_env(),
                            **kwargs)

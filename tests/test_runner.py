"""experiments.runner: the command lines it builds, the environment, no retry and the named failure
(no bundle is run here: the bundle tests run bundles through it)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import runner


def test_bundle_dir_and_config_files_by_name_or_path(tmp_path):
    assert runner.bundle_dir("fnet_baseline") == os.path.join(runner.BUNDLES, "fnet_baseline")
    assert runner.bundle_dir(str(tmp_path)) == str(tmp_path)
    assert runner.config_files("fnet_baseline", "train.json") == [
        os.path.join(runner.BUNDLES, "fnet_baseline", "configs", "train.json")]
    files = runner.config_files(str(tmp_path), ["train.json", "/abs/evaluate.json"])
    assert files == [os.path.join(str(tmp_path), "configs", "train.json"), "/abs/evaluate.json"]


def test_command_line_as_a_user_types_it():
    root = runner.bundle_dir("fnet_baseline")
    args = runner.bundle_command("fnet_baseline", "train.json", {"max_epochs": 2, "patch_size": [8, 16], "x#y": "s"})
    assert args[:4] == [sys.executable, "-m", "monai.bundle", "run"]
    assert args[args.index("--config_file") + 1] == os.path.join(root, "configs", "train.json")
    assert args[args.index("--logging_file") + 1] == os.path.join(root, "configs", "logging.conf")
    assert args[args.index("--bundle_root") + 1] == root
    assert args[args.index("--max_epochs") + 1] == "2" and args[args.index("--patch_size") + 1] == "[8, 16]"
    assert args[args.index("--x#y") + 1] == "s"  # strings as they are, the rest as JSON
    two = runner.bundle_command("fnet_baseline", ["train.json", "multi_gpu_train.json"], {}, torchrun=2,
                                cmd=("verify_metadata",))
    assert two[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert json.loads(two[two.index("--config_file") + 1]) == runner.config_files(
        "fnet_baseline", ["train.json", "multi_gpu_train.json"])
    assert "--logging_file" not in two  # only `run` takes a logging file


def test_subprocess_env_puts_the_checkout_first_and_sets_threads():
    e = runner.subprocess_env(threads=3, base={"PYTHONPATH": "/elsewhere"})
    assert e["PYTHONPATH"] == runner.ROOT + os.pathsep + "/elsewhere"
    assert e["OMP_NUM_THREADS"] == e["MKL_NUM_THREADS"] == e["OPENBLAS_NUM_THREADS"] == "3"
    assert runner.subprocess_env(base={})["OMP_NUM_THREADS"] == "2"
    assert runner.subprocess_env(base={"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"


def _fake(outcomes, calls):
    def once(args, cwd, env, timeout, log):
        rc, out = outcomes[len(calls)]
        calls.append(args)
        return subprocess.CompletedProcess(args, rc, stdout=out, stderr="")
    return once


@pytest.mark.parametrize("torchrun,outcomes", [(0, [(1, "SIGABRT")]), (2, [(1, "rank 1 ... Signal 6 (SIGABRT)")]),
                                               (2, [(1, "ValueError: bad")])])
def test_failures_are_not_retried_and_are_named(monkeypatch, torchrun, outcomes):
    calls = []
    monkeypatch.setattr(runner, "_once", _fake(outcomes, calls))
    with pytest.raises(runner.BundleRunError, match=r"monai\.bundle run .* failed \(1\)") as e:
        runner.run_subprocess("fnet_baseline", "train.json", {}, torchrun=torchrun)
    assert len(calls) == len(outcomes) and e.value.process.returncode == 1
    calls.clear()
    p = runner.run_subprocess("fnet_baseline", "train.json", {}, torchrun=torchrun, check=False)
    assert p.returncode == 1 and p.output == outcomes[-1][1]


def test_a_log_file_gets_the_command_and_the_output(tmp_path):
    log = tmp_path / "logs" / "run.log"
    p = runner._once([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"],
                     str(tmp_path), runner.subprocess_env(), 60, str(log))
    text = log.read_text()
    assert p.returncode == 0 and text.startswith(sys.executable) and "out" in text and "err" in text
    assert p.stdout == text and p.stderr == ""

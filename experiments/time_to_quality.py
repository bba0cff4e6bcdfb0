"""Time to a good model: the wall time a training run needs to reach a validation target (issue 19).

    python -m experiments.time_to_quality fnet --peer /tmp/peers/pytorch_fnet --seeds 3 --out_dir ttq_fnet
    python -m experiments.time_to_quality fucci --seeds 3 --out_dir ttq_fucci
    python -m experiments.time_to_quality fnet --peer ... --seeds 1 --max_iterations 20 --out_dir smoke  # smoke

``fnet``: F-net to validation Pearson r 0.80 on synthetic phantoms (``common.synthetic``), three arms on
the same data, network, patches, batch and optimiser (Adam, lr 1e-3, betas 0.5/0.999, MSE, no schedule):

- ``ours``: fnet_baseline's ``configs/train.json`` as a user runs it (its defaults: fp32, channels-last,
  CacheDataset, Resumable checkpoint every epoch, TensorBoard, best-model saving, and a whole-volume
  sliding-window validation every ``val_every`` iterations), stopped at the first validation that reaches
  the target;
- ``ours, bf16``: the same with ``bf16_cpu true`` (its quality over seeds is what this arm measures);
- ``pytorch_fnet``: the peer's own training command (``fnet train --json``: its ``TiffDataset`` with
  ``norm_around_center``, ``BufferedPatchDataset``, ``Model.train_on_batch``, its loss CSV, model save,
  checkpoint and loss plot every ``val_every`` iterations) for ``max_iterations``; its checkpoints are
  scored afterwards with its own ``predict_piecewise``, off its clock (ours pays for its validations).

``fucci``: unet3d_fucci to nucleus F1 0.85 (voxel F1 = Dice of the nucleus class) on the held-out half of
cells3d, our defaults (channels-last, reuse_memory), with ``bf16_cpu true``, and eager fp32 (``channels_last false``,
``reuse_memory false``), otherwise
``experiments.fucci_cells3d``'s setup. There is no public code of the thesis' U-Net to run beside it.

Every run is a fresh process with one torch thread; ``--jobs 2`` runs two at once (one per core), so every
arm shares the machine with one other run. Time is measured from the start of the training command (after
Python imports) to the end of the first validation at or above the target.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the F-net comparison's fixed setup (a CPU-sized F-net; the same for every arm)
FNET = dict(depth=4, mult_chan=16, patch=(32, 64, 64), batch=4, lr=1e-3, shape=(32, 128, 128), n_train=4,
            spacing=(0.29, 0.29, 0.29), target=0.80)
#: the unet3d_fucci comparison (as experiments.fucci_cells3d, validation on the held-out half)
FUCCI = dict(features=(16, 32, 64), patch=(16, 64, 64), batch=2, lr=1e-3, downsample=2, target=0.85)
#: pytorch_fnet imports two things this environment lacks: the shims applied before its CLI runs
PEER_CLI_SHIMS = (
    "scipy.signal.triang = scipy.signal.windows.triang (moved in SciPy 1.13; its predict_piecewise imports the "
    "old name)",
    "a stub module 'aicsimageio' (its MultiChTiffDataset imports AICSImage at import time; not installed here and "
    "not used: the run reads its TiffDataset)",
    "matplotlib style 'seaborn' = 'seaborn-v0_8' (renamed in Matplotlib 3.6; its loss plot module selects it at "
    "import time)",
)
_PEER_PRELUDE = (
    "import sys, types, torch, scipy.signal, scipy.signal.windows\n"
    "scipy.signal.triang = scipy.signal.windows.triang\n"
    "m = types.ModuleType('aicsimageio')\n"
    "class AICSImage:\n"
    "    def __init__(self, *a, **k):\n"
    "        raise ImportError('aicsimageio is not installed (time_to_quality stub)')\n"
    "m.AICSImage = AICSImage\n"
    "sys.modules['aicsimageio'] = m\n"
    "import matplotlib.style\n"
    "matplotlib.style.library.setdefault('seaborn', matplotlib.style.library['seaborn-v0_8'])\n"
    "torch.set_num_threads(1)\n"
)


def _log(msg: str) -> None:
    print(f"[time_to_quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _seed_list(seeds) -> list[int]:
    if isinstance(seeds, int):
        return list(range(seeds))
    return [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else str(seeds).strip("[]").split(","))]


def _env(extra_path: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def first_at(history: list[dict], target: float) -> dict | None:
    """The first entry of ``history`` (``{"iteration", "seconds", "value"}``, in order) with value >= target."""
    for h in history:
        if h["value"] is not None and h["value"] >= target:
            return h
    return None


# ---------------------------------------------------------------------------------------------- ours

def bundle_child(spec: str) -> None:
    """(internal) Train one bundle config in this process, recording the validation metric after every
    validation with its wall time since the command started; stop at the target when ``stop`` is set."""
    import torch
    from ignite.engine import Events

    from common.cli import json_spec
    from experiments.runner import bundle_dir, workflow

    s = json_spec(spec)
    torch.set_num_threads(1)
    t0 = time.time()
    wf = workflow(s["bundle"], "train.json", s["overrides"],
                  logging_file=os.path.join(bundle_dir(s["bundle"]), "configs", "logging.conf"))
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    metric = s["metric"]
    if metric == "val_nucleus_f1":  # voxel F1 of the nucleus class (channel 2 of the one-hot output)
        from monai.handlers import MeanDice

        MeanDice(include_background=True, output_transform=lambda out: (
            [o["pred"][2:3] for o in out], [o["label"][2:3] for o in out])).attach(evaluator, metric)
    history = []

    def record(engine):
        v = engine.state.metrics.get(metric)
        history.append({"iteration": int(trainer.state.iteration), "seconds": round(time.time() - t0, 2),
                        "value": None if v is None else float(v)})
        if s.get("stop", True) and v is not None and v >= s["target"]:
            trainer.terminate()

    evaluator.add_event_handler(Events.COMPLETED, record)
    try:
        wf.run()
    finally:
        wf.finalize()
    out = {"history": history, "total_seconds": round(time.time() - t0, 2)}
    with open(s["out"], "w") as f:
        json.dump(out, f)


def run_bundle_arm(bundle: str, overrides: dict, metric: str, target: float, out: str, log: str) -> dict:
    spec = {"bundle": bundle, "overrides": overrides, "metric": metric, "target": target, "out": out}
    cmd = [sys.executable, "-m", "experiments.time_to_quality", "bundle_child", "--spec", "stdin"]  # JSON on stdin
    with open(log, "w") as f:
        p = subprocess.run(cmd, input=json.dumps(spec), text=True, stdout=f, stderr=subprocess.STDOUT, env=_env(),
                           cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"training failed ({p.returncode}); see {log}")
    with open(out) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- peer

def peer_options(save_dir: str, csv: str, seed: int, max_iterations: int, every: int, cfg: dict = FNET) -> dict:
    """pytorch_fnet's training options (its ``train_options.json``) for the shared setup ``cfg``."""
    return {"batch_size": cfg["batch"],
            "bpds_kwargs": {"buffer_size": cfg["n_train"], "buffer_switch_interval": -1,
                            "patch_shape": list(cfg["patch"])},
            "dataset_train": "fnet.data.TiffDataset",
            "dataset_train_kwargs": {"path_csv": csv, "transform_signal": ["fnet.transforms.norm_around_center"],
                                     "transform_target": ["fnet.transforms.norm_around_center"]},
            "dataset_val": None, "dataset_val_kwargs": {},
            "fnet_model_class": "fnet.fnet_model.Model",
            "fnet_model_kwargs": {"betas": [0.5, 0.999], "criterion_class": "fnet.losses.WeightedMSE",
                                  "init_weights": True, "lr": cfg["lr"],
                                  "nn_class": "fnet.nn_modules.fnet_nn_3d_params.Net",
                                  "nn_kwargs": {"depth": cfg["depth"], "mult_chan": cfg["mult_chan"]},
                                  "scheduler": None},
            "interval_checkpoint": int(every), "interval_save": int(every), "iter_checkpoint": [],
            "n_iter": int(max_iterations), "path_save_dir": save_dir, "seed": int(seed)}


def peer_score_server(spec: str) -> None:
    """(internal) Score pytorch_fnet checkpoints on the validation volume, one per line of stdin (a path),
    with the peer's own ``predict_piecewise`` after its ``norm_around_center``; prints one JSON line
    ``{"path", "r"}`` (Pearson r against the target) per checkpoint."""
    exec(_PEER_PRELUDE)  # noqa: S102  (the shims above, in this child only)
    import fnet.models
    import fnet.transforms

    from common.io import read_image
    from common.metrics import pearson_r

    s = json.loads(spec) if isinstance(spec, str) else spec
    sig = np.asarray(read_image(s["signal"])[0], np.float32).squeeze()
    tgt = np.asarray(read_image(s["target"])[0], np.float32).squeeze()
    x = fnet.transforms.norm_around_center(sig)
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        model = fnet.models.load_model(path, no_optim=True)
        pred = model.predict_piecewise(x[None]).numpy().squeeze()
        print(json.dumps({"path": path, "r": float(pearson_r(pred, tgt))}), flush=True)


def peer_saved(log_path: str) -> list[tuple[str, float | None]]:
    """``(checkpoint path, seconds)`` for every checkpoint pytorch_fnet reports as written ("Saved model
    checkpoint: <path>"), with the "Elapsed time: X s" it logged just before (at the same save); in order,
    empty before the log exists."""
    if not os.path.isfile(log_path):
        return []
    out, last = [], None
    with open(log_path) as f:
        for line in f:
            m = re.search(r"Elapsed time: ([0-9.]+) s", line)
            if m:
                last = float(m.group(1))
            m = re.search(r"Saved model checkpoint: (\S+)", line)
            if m:
                out.append((m.group(1), last))
    return out


def run_peer_arm(peer: str, save_dir: str, csv: str, val: tuple[str, str], seed: int, max_iterations: int,
                 every: int, log: str, cfg: dict = FNET, target: float | None = None, poll_s: float = 3.0) -> dict:
    """pytorch_fnet's own ``fnet train`` for up to ``max_iterations``; each checkpoint it reports as written
    is scored by :func:`peer_score_server` while it trains, and the run is stopped at the first one at or
    above ``target`` (its time is the peer's own "Elapsed time" of that save)."""
    os.makedirs(save_dir, exist_ok=True)
    opts = os.path.join(save_dir, "train_options.json")
    with open(opts, "w") as f:
        json.dump(peer_options(save_dir, csv, seed, max_iterations, every, cfg), f, indent=1)
    code = _PEER_PRELUDE + "sys.argv = ['fnet', 'train', '--json', sys.argv[1], '--gpu_ids', '-1']\n" \
                           "from fnet.cli.main import main\nmain()\n"
    spec = json.dumps({"signal": val[0], "target": val[1]})
    scorer = subprocess.Popen([sys.executable, "-m", "experiments.time_to_quality", "peer_score_server", "--spec", spec],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(peer), cwd=ROOT)
    train_log = os.path.join(save_dir, "train_model.log")
    scores, stopped = {}, False
    try:
        with open(log, "w") as f:
            trainer = subprocess.Popen([sys.executable, "-c", code, opts], stdout=f, stderr=subprocess.STDOUT,
                                       env=_env(peer), cwd=save_dir)
            while True:
                finished = trainer.poll() is not None
                for path, _ in peer_saved(train_log):
                    if path not in scores:
                        scorer.stdin.write(path + "\n")
                        scorer.stdin.flush()
                        reply = scorer.stdout.readline()
                        if not reply:
                            raise RuntimeError(f"the checkpoint scorer died on {path}")
                        scores[path] = json.loads(reply)["r"]
                        if target is not None and scores[path] >= target and not finished:
                            trainer.terminate()
                            trainer.wait()
                            stopped = finished = True
                if finished:
                    break
                time.sleep(poll_s)
        if not stopped and trainer.returncode != 0:
            raise RuntimeError(f"pytorch_fnet training failed ({trainer.returncode}); see {log}")
    finally:
        if scorer.poll() is None:
            scorer.stdin.close()
            scorer.wait(timeout=60)
    history = [{"iteration": int(re.search(r"model_(\d+)\.p", path).group(1)), "seconds": sec, "value": scores[path]}
               for path, sec in peer_saved(train_log) if path in scores]
    return {"history": history, "stopped_at_target": stopped}


# ------------------------------------------------------------------------------------------ drivers

def write_fnet_data(out_dir: str, seed: int = 4000) -> dict:
    """``FNET["n_train"]`` training phantoms and one validation phantom (OME-TIFF) with our manifests and
    an absolute-path CSV for the peer."""
    from common.data import split_manifest
    from common.synthetic import write_dataset_3d

    manifest = write_dataset_3d(out_dir, n_volumes=FNET["n_train"] + 1, shape=FNET["shape"], seed=seed,
                                spacing_um=FNET["spacing"])
    parts = split_manifest(manifest, {"train": FNET["n_train"], "val": 1}, seed=None)
    import csv

    def rows(path):
        with open(path) as f:
            return list(csv.DictReader(f))
    peer_csv = os.path.join(out_dir, "train_abs.csv")
    with open(peer_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path_signal", "path_target"])
        for r in rows(parts["train"]):
            w.writerow([os.path.join(out_dir, r["path_signal"]), os.path.join(out_dir, r["path_target"])])
    v = rows(parts["val"])[0]
    return {"train": parts["train"], "val": parts["val"], "peer_csv": peer_csv,
            "val_files": (os.path.join(out_dir, v["path_signal"]), os.path.join(out_dir, v["path_target"]))}


def fnet_overrides(data: dict, work: str, seed: int, max_iterations: int, every: int, bf16: bool,
                   cfg: dict = FNET) -> dict:
    """fnet_baseline's train.json overrides for the shared setup ``cfg``; everything else is the bundle default."""
    return {"network_def#depth": cfg["depth"], "network_def#mult_chan": cfg["mult_chan"],
            "patch_size": list(cfg["patch"]), "batch_size": cfg["batch"], "learning_rate": cfg["lr"],
            "lr_schedule": "constant", "epoch_length": int(every), "num_epochs": max(1, int(max_iterations) // int(every)),
            "val_interval": 1, "num_workers": 0, "seed": int(seed), "resume": False, "bf16_cpu": bool(bf16),
            "target_spacing_um": list(cfg["spacing"]), "train_manifest": data["train"], "val_manifest": data["val"],
            "ckpt_dir": os.path.join(work, "models"), "output_dir": os.path.join(work, "runs")}


def _arm_dirs(out_dir: str, seeds: list[int], arms: list[str]) -> list[tuple[int, str, str]]:
    """``(seed, arm, work folder)`` for every run, folders (and ``out_dir/done``) created."""
    os.makedirs(os.path.join(out_dir, "done"), exist_ok=True)
    out = [(s, arm, os.path.join(out_dir, f"{arm.replace(' ', '_')}_seed{s}")) for s in seeds for arm in arms]
    for *_, work in out:
        os.makedirs(work, exist_ok=True)
    return out


def _run_task(task: tuple) -> tuple:
    kind, key, args = task
    t = time.time()
    res = (run_peer_arm if kind == "peer" else run_bundle_arm)(**args)
    res["wall_seconds"] = round(time.time() - t, 1)
    return key, res


def _run_all(tasks: list, jobs: int, done_dir: str) -> dict:
    """Run ``tasks`` (``(kind, (arm, seed), kwargs)``), ``jobs`` at a time; reuse finished results."""
    from concurrent.futures import ProcessPoolExecutor

    results, todo = {}, []
    for t in tasks:
        path = os.path.join(done_dir, f"{t[1][0].replace(' ', '_').replace(',', '')}_seed{t[1][1]}.json")
        if os.path.isfile(path):
            with open(path) as f:
                results[t[1]] = json.load(f)
        else:
            todo.append((t, path))
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            futs = {ex.submit(_run_task, t): p for t, p in todo}
            for fut in futs:
                key, res = fut.result()
                results[key] = res
                _save(futs[fut], res)
                _log(f"  {key[0]}, seed {key[1]}: {_summary_line(res, tasks[0])}")
    else:
        for t, p in todo:
            key, res = _run_task(t)
            results[key] = res
            _save(p, res)
            _log(f"  {key[0]}, seed {key[1]}: {_summary_line(res, tasks[0])}")
    return results


def _save(path, res):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, path)


def _summary_line(res: dict, task) -> str:
    return " ".join(f"{h['iteration']}:{h['value']:.3f}@{h['seconds']}s" for h in res["history"] if h["value"] is not None)


def summarise(results: dict, arms: list[str], seeds: list[int], target: float, metric: str) -> tuple[str, dict]:
    """Markdown table: time and iterations to the target per arm (mean ± sd over seeds), seeds reaching it,
    best value, time per 100 iterations; and the ratios of the arms' times to the first arm's."""
    from common.report import mean_sd

    summary, lines = {}, [f"| arm | seeds at {metric} >= {target} | time to target (s) | iterations to target | "
                          f"best {metric} | s per 100 iterations |", "|---|---|---|---|---|---|"]
    for arm in arms:
        hits, its, best, rate = [], [], [], []
        for s in seeds:
            h = results[(arm, s)]["history"]
            hit = first_at(h, target)
            if hit is not None:
                hits.append(hit["seconds"])
                its.append(hit["iteration"])
            vals = [x["value"] for x in h if x["value"] is not None]
            best.append(max(vals) if vals else float("nan"))
            timed = [x for x in h if x["seconds"] is not None]
            if len(timed) >= 2:
                rate.append(100 * (timed[-1]["seconds"] - timed[0]["seconds"]) / (timed[-1]["iteration"] - timed[0]["iteration"]))
        summary[arm] = {"time_to_target_s": hits, "iterations_to_target": its, "best": best, "s_per_100_it": rate,
                        "reached": len(hits), "seeds": len(seeds)}
        lines.append(f"| {arm} | {len(hits)}/{len(seeds)} | {mean_sd(hits, '.0f') if hits else '-'} | "
                     f"{mean_sd(its, '.0f') if its else '-'} | {mean_sd(best)} | {mean_sd(rate, '.1f') if rate else '-'} |")
    ref = arms[-1]
    if summary[ref]["reached"] == len(seeds):
        lines.append("")
        for arm in arms[:-1]:
            if summary[arm]["reached"] == len(seeds):
                ratio = [b / a for a, b in zip(summary[arm]["time_to_target_s"], summary[ref]["time_to_target_s"])]
                summary[arm]["speedup_vs_" + ref] = ratio
                lines.append(f"- {arm}: {mean_sd(ratio, '.2f')}x faster to the target than {ref} (per seed "
                             + ", ".join(f"{r:.2f}" for r in ratio) + ")")
    else:  # the reference missed the target in some seed: its time there is at least its last recorded time
        lines.append("")
        for arm in arms[:-1]:
            if summary[arm]["reached"] != len(seeds):
                continue
            bound, exact = [], []
            for s in seeds:
                mine = first_at(results[(arm, s)]["history"], target)["seconds"]
                h = results[(ref, s)]["history"]
                hit = first_at(h, target)
                end = max((x["seconds"] for x in h if x["seconds"] is not None), default=None)
                if hit is None and end is None:
                    break
                bound.append((hit["seconds"] if hit is not None else end) / mine)
                exact.append(hit is not None)
            else:
                summary[arm]["speedup_at_least_vs_" + ref] = bound
                lines.append(f"- {arm}: at least {mean_sd(bound, '.2f')}x faster to the target than {ref} (per seed "
                             + ", ".join(f"{'' if e else '>= '}{r:.2f}" for r, e in zip(bound, exact))
                             + f"; '>=': {ref} had not reached it when its budget ended)")
    return "\n".join(lines), summary


def fnet(out_dir: str = "ttq_fnet", peer: str | None = None, seeds=3, jobs: int = 2, max_iterations: int = 1200,
         every: int = 50, peer_max_iterations: int | None = None, arms: str = "ours,ours bf16,pytorch_fnet",
         mult_chan: int | None = None, patch=None, batch: int | None = None) -> dict:
    """F-net to validation Pearson r ``FNET["target"]``: ours (defaults), ours with bf16, pytorch_fnet.

    Args:
        out_dir: phantoms, runs and ``summary.md`` / ``summary.json``.
        peer: a pytorch_fnet checkout (never inside this repository); without it the peer arm is skipped.
        seeds: an int ``n`` (seeds 0..n-1) or a list; each seed sets the network's initial weights and the
            patch sequence of every arm (the phantoms are the same for all seeds).
        jobs: runs at once (one torch thread each).
        max_iterations, every: our budget and validation interval (iterations); ours stops at the target.
        peer_max_iterations: the peer's fixed budget (default ``max_iterations``); it cannot stop early.
        arms: comma-separated subset.
        mult_chan, patch, batch: change :data:`FNET`'s network width, patch and batch for every arm.
    """
    from common.report import git_commit

    cfg = dict(FNET)
    for k, v in (("mult_chan", mult_chan), ("batch", batch)):
        if v is not None:
            cfg[k] = int(v)
    if patch is not None:
        cfg["patch"] = tuple(int(p) for p in patch)
    out_dir = os.path.abspath(out_dir)
    seeds = _seed_list(seeds)
    want = [a.strip() for a in (arms.split(",") if isinstance(arms, str) else arms)]
    if "pytorch_fnet" in want and not peer:
        _log("pytorch_fnet arm skipped: no checkout given (--peer <path>)")
        want.remove("pytorch_fnet")
    if peer:
        peer = os.path.abspath(os.path.expanduser(peer))
        if os.path.commonpath([peer, ROOT]) == ROOT:
            raise ValueError(f"--peer {peer} is inside this repository; clone it into a temporary folder")
        if not os.path.isfile(os.path.join(peer, "fnet", "fnet_model.py")):
            raise FileNotFoundError(f"--peer {peer} is not a pytorch_fnet checkout (no fnet/fnet_model.py)")
    t0 = time.time()
    data = write_fnet_data(os.path.join(out_dir, "data"))
    tasks = []
    for s, arm, work in _arm_dirs(out_dir, seeds, want):
        if arm == "pytorch_fnet":
            tasks.append(("peer", (arm, s), dict(peer=peer, save_dir=work, csv=data["peer_csv"], val=data["val_files"],
                                                 seed=s, max_iterations=peer_max_iterations or max_iterations,
                                                 every=every, log=os.path.join(work, "log.txt"), cfg=cfg,
                                                 target=cfg["target"])))
        else:
            tasks.append(("ours", (arm, s), dict(bundle="fnet_baseline", overrides=fnet_overrides(
                data, work, s, max_iterations, every, bf16=arm.endswith("bf16"), cfg=cfg), metric="val_pearson",
                target=cfg["target"], out=os.path.join(work, "ttq.json"), log=os.path.join(work, "log.txt"))))
    _log(f"F-net depth {cfg['depth']} x {cfg['mult_chan']} channels, patches {cfg['patch']}, batch {cfg['batch']}, "
         f"Adam {cfg['lr']}; arms {want}; seeds {seeds}; {jobs} at once")
    results = _run_all(tasks, jobs, os.path.join(out_dir, "done"))
    table, summary = summarise(results, want, seeds, cfg["target"], "val Pearson r")
    setup = dict(cfg, seeds=seeds, jobs=jobs, max_iterations=max_iterations, every=every,
                 peer_commit=git_commit(peer) if peer else None, peer_shims=list(PEER_CLI_SHIMS),
                 wall_seconds=round(time.time() - t0, 1))
    _write_summary(out_dir, "F-net to validation Pearson r 0.80 (phantoms)", table, summary, results, setup)
    return summary


def fucci(out_dir: str = "ttq_fucci", seeds=3, jobs: int = 2, max_iterations: int = 600, every: int = 20,
          arms: str = "ours,ours bf16,eager fp32") -> dict:
    """unet3d_fucci to nucleus F1 ``FUCCI["target"]`` on cells3d's held-out half: our training defaults
    (channels-last, reuse_memory), the same with ``bf16_cpu true``, and eager fp32 (``channels_last false``,
    ``reuse_memory false``: glibc's malloc defaults, as before issue 19). Args as
    :func:`fnet`."""
    from experiments.fucci_cells3d import write_halves

    out_dir = os.path.abspath(out_dir)
    seeds = _seed_list(seeds)
    want = [a.strip() for a in (arms.split(",") if isinstance(arms, str) else arms)]
    t0 = time.time()
    halves = write_halves(os.path.join(out_dir, "data"), FUCCI["downsample"])
    train_csv, test_csv, intensity_range = halves["train_csv"], halves["test_csv"], halves["intensity_range"]
    tasks = []
    for s, arm, work in _arm_dirs(out_dir, seeds, want):
        ov = {"train_manifest": train_csv, "val_manifest": test_csv, "ckpt_dir": os.path.join(work, "models"),
              "output_dir": os.path.join(work, "runs"), "batch_size": FUCCI["batch"],
              "learning_rate": FUCCI["lr"], "num_epochs": max(1, int(max_iterations) // int(every)),
              "epoch_length": int(every), "val_interval": 1, "num_workers": 0, "resume": False, "seed": s,
              "network_def#features": list(FUCCI["features"]), "patch_size": list(FUCCI["patch"]),
              "intensity_range": intensity_range, "channels_last": arm != "eager fp32",
              "reuse_memory": arm != "eager fp32",
              "bf16_cpu": arm.endswith("bf16")}
        tasks.append(("ours", (arm, s), dict(bundle="unet3d_fucci", overrides=ov, metric="val_nucleus_f1",
                                             target=FUCCI["target"], out=os.path.join(work, "ttq.json"),
                                             log=os.path.join(work, "log.txt"))))
    _log(f"unet3d_fucci features {FUCCI['features']}, patches {FUCCI['patch']}, batch {FUCCI['batch']}; arms {want}; "
         f"seeds {seeds}; {jobs} at once")
    results = _run_all(tasks, jobs, os.path.join(out_dir, "done"))
    table, summary = summarise(results, want, seeds, FUCCI["target"], "nucleus F1")
    setup = dict(FUCCI, seeds=seeds, jobs=jobs, max_iterations=max_iterations, every=every,
                 wall_seconds=round(time.time() - t0, 1))
    _write_summary(out_dir, "unet3d_fucci to nucleus F1 0.85 (cells3d, held-out half)", table, summary, results, setup)
    return summary


def _write_summary(out_dir, title, table, summary, results, setup) -> None:
    from common.report import write_json

    text = f"## {title}\n\n{table}\n\nsetup: {json.dumps(setup)}\n"
    print("\n" + text, flush=True)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(out_dir, "summary.json"),
               {"setup": setup, "summary": summary,
                "runs": {f"{k[0]}|{k[1]}": v for k, v in results.items()}})


if __name__ == "__main__":
    from common.cli import strict_fire

    strict_fire({"fnet": fnet, "fucci": fucci, "bundle_child": bundle_child, "peer_score_server": peer_score_server})

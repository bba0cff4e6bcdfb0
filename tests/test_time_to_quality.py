"""experiments.time_to_quality: the time-to-target arithmetic by hand, the peer's options and log parsing,
and one real (tiny) fnet_baseline run through the recorder that stops at the target."""

import json
import os

import pytest

from experiments import time_to_quality as ttq


def test_first_at_and_summary_by_hand():
    hist = [{"iteration": 50, "seconds": 10.0, "value": 0.5}, {"iteration": 100, "seconds": 21.0, "value": 0.81},
            {"iteration": 150, "seconds": 30.0, "value": 0.79}]
    assert ttq.first_at(hist, 0.8) == hist[1]
    assert ttq.first_at(hist, 0.9) is None
    results = {("a", 0): {"history": hist},
               ("a", 1): {"history": [{"iteration": 50, "seconds": 12.0, "value": 0.85}]},
               ("ref", 0): {"history": [{"iteration": 50, "seconds": 20.0, "value": 0.7},
                                        {"iteration": 100, "seconds": 42.0, "value": 0.8}]},
               ("ref", 1): {"history": [{"iteration": 50, "seconds": 36.0, "value": 0.9}]}}
    table, s = ttq.summarise(results, ["a", "ref"], [0, 1], 0.8, "r")
    assert s["a"]["time_to_target_s"] == [21.0, 12.0] and s["a"]["iterations_to_target"] == [100, 50]
    assert s["a"]["best"] == [0.81, 0.85]
    assert s["a"]["s_per_100_it"] == [pytest.approx(100 * 20.0 / 100)]  # seed 1 has one timed point: no rate
    assert s["ref"]["reached"] == 2
    assert s["a"]["speedup_vs_ref"] == [pytest.approx(2.0), pytest.approx(3.0)]  # 42/21, 36/12
    assert "| a | 2/2 | 16 ± 6 | 75 ± 35 |" in table
    assert "2.50 ± 0.71x faster to the target than ref" in table
    # an arm that misses the target in one seed gets no ratio
    results[("a", 1)]["history"][0]["value"] = 0.7
    _, s = ttq.summarise(results, ["a", "ref"], [0, 1], 0.8, "r")
    assert s["a"]["reached"] == 1 and "speedup_vs_ref" not in s["a"]
    # a reference that misses the target gives a lower bound: its last time over the arm's time to the target
    results[("a", 1)]["history"][0]["value"] = 0.85
    results[("ref", 1)]["history"] = [{"iteration": 50, "seconds": 30.0, "value": 0.6},
                                      {"iteration": 100, "seconds": 60.0, "value": 0.7}]
    table, s = ttq.summarise(results, ["a", "ref"], [0, 1], 0.8, "r")
    assert "speedup_vs_ref" not in s["a"] and s["a"]["speedup_at_least_vs_ref"] == [pytest.approx(2.0), pytest.approx(5.0)]
    assert "at least 3.50 ± 2.12x faster to the target than ref (per seed 2.00, >= 5.00;" in table


def test_peer_options_match_the_shared_setup_and_its_log_is_parsed(tmp_path):
    cfg = dict(ttq.FNET, mult_chan=8, patch=(16, 64, 64), batch=2)
    o = ttq.peer_options(str(tmp_path), "train.csv", 3, 200, 50, cfg)
    assert o["n_iter"] == 200 and o["interval_save"] == o["interval_checkpoint"] == 50 and o["seed"] == 3
    assert o["batch_size"] == 2 and o["bpds_kwargs"]["patch_shape"] == [16, 64, 64]
    m = o["fnet_model_kwargs"]
    assert m["nn_kwargs"] == {"depth": cfg["depth"], "mult_chan": 8}
    assert m["betas"] == [0.5, 0.999] and m["lr"] == cfg["lr"] and m["scheduler"] is None
    ours = ttq.fnet_overrides({"train": "t.csv", "val": "v.csv"}, str(tmp_path), 3, 200, 50, False, cfg)
    assert (ours["network_def#mult_chan"], ours["patch_size"], ours["batch_size"]) == (8, [16, 64, 64], 2)
    assert (ours["learning_rate"], ours["lr_schedule"], ours["epoch_length"], ours["num_epochs"]) == (cfg["lr"], "constant", 50, 4)
    log = tmp_path / "train_model.log"
    assert ttq.peer_saved(str(log)) == []  # not written yet
    log.write_text("x - INFO - Elapsed time: 12.5 s\nx - INFO - Saved model checkpoint: /a/model_000050.p\nother\n"
                   "y - INFO - Elapsed time: 30.0 s\ny - INFO - Elapsed time: 41.0 s\n"
                   "y - INFO - Saved model checkpoint: /a/model_000100.p\n")
    assert ttq.peer_saved(str(log)) == [("/a/model_000050.p", 12.5), ("/a/model_000100.p", 41.0)]
    with pytest.raises(ValueError, match="inside this repository"):
        ttq.fnet(out_dir=str(tmp_path / "o"), peer=ttq.ROOT, seeds=1)


@pytest.mark.slow
def test_recorder_stops_a_real_bundle_run_at_the_target(tmp_path):
    """fnet_baseline's own train.json, tiny network: with a target every network reaches (r >= -1) the run
    stops after its first validation; with an unreachable one it runs its whole budget."""
    data = ttq.write_fnet_data(str(tmp_path / "data"))
    cfg = dict(ttq.FNET, mult_chan=2, depth=2, patch=(16, 32, 32), batch=1)
    for target, n_val in ((-1.0, 1), (1.01, 3)):
        work = tmp_path / f"t{target}"
        ov = ttq.fnet_overrides(data, str(work), 0, 6, 2, False, cfg)
        out = str(work / "ttq.json")
        os.makedirs(work, exist_ok=True)
        ttq.bundle_child(json.dumps({"bundle": "fnet_baseline", "overrides": ov, "metric": "val_pearson",
                                     "target": target, "out": out}))
        hist = json.load(open(out))["history"]
        assert len(hist) == n_val and [h["iteration"] for h in hist] == [2, 4, 6][:n_val]
        assert all(-1 <= h["value"] <= 1 for h in hist)
        assert all(a["seconds"] < b["seconds"] for a, b in zip(hist, hist[1:]))

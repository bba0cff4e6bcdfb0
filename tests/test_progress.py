"""Progress output: one bar (or, in logs, a few lines) per training, a line per validation, a line per output file."""

import io
import logging
import os
import re

from ignite.engine import Engine, Events

from common.progress import OutputFiles, TrainingProgress
from common.synthetic import write_dataset_3d
from zoo_testing import TINY, TINY_TRAIN, run_bundle_here, split_manifest


def _trainer(epochs=3, length=7):
    trainer = Engine(lambda e, b: {"loss": 0.5 / e.state.iteration})
    return trainer, list(range(length)), epochs


def test_log_lines_instead_of_one_per_iteration(caplog):
    trainer, data, epochs = _trainer()
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def metrics(e):  # what MONAI's evaluator keeps: key metric name, value, best value and epoch
        e.state.key_metric_name, e.state.metrics = "val_r", {"val_r": 0.1 * trainer.state.epoch}
        e.state.best_metric, e.state.best_metric_epoch = 0.2, min(trainer.state.epoch, 2)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))
    TrainingProgress(lambda out: out["loss"], tag_name="loss", validator=evaluator, best_model="m/model.pt",
                     log_interval=1e9, file=io.StringIO()).attach(trainer)
    with caplog.at_level(logging.INFO, logger="TrainingProgress"):
        trainer.run(data, max_epochs=epochs)
    bars = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training:")]
    assert len(bars) == 2 * epochs  # first and last iteration of each epoch, not 21 lines
    assert "Epoch: 1/3, Iter: 1/7 -- loss: 0.5000" in bars[0] and "it/s" in bars[0]
    assert re.search(r"100%.*21/21.*Epoch: 3/3, Iter: 7/7 -- loss: 0\.0238", bars[-1])
    val = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation")]
    assert val == ["validation after epoch 1: val_r 0.1000 (best 0.2000 at epoch 1); best model written to m/model.pt",
                   "validation after epoch 2: val_r 0.2000 (best 0.2000 at epoch 2); best model written to m/model.pt",
                   "validation after epoch 3: val_r 0.3000 (best 0.2000 at epoch 2); best model stays m/model.pt"]


def test_output_files_logs_each_written_file(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.tif").write_bytes(b"before the run")

    def step(engine, i):
        (out / f".tmp_{i}.tif").write_bytes(b"partial")  # temporary files are not outputs
        (out / f"img{i}_pred.ome.tif").write_bytes(b"x")

    engine = Engine(step)
    OutputFiles(str(out)).attach(engine)
    with caplog.at_level(logging.INFO, logger="OutputFiles"):
        engine.run([0, 1, 2], max_epochs=1)
    msgs = [r.getMessage() for r in caplog.records if r.name == "OutputFiles"]  # not the engine's own lines
    assert msgs[:3] == [f"wrote {out / f'img{i}_pred.ome.tif'}" for i in range(3)]
    assert msgs[3].startswith(f"3 file(s) written to {out}")


def test_bundle_training_shows_progress_not_a_line_per_iteration(tmp_path):
    b = "fnet_baseline"
    data = split_manifest(write_dataset_3d(str(tmp_path / "data"), n_volumes=2, shape=(16, 32, 32), seed=2),
                          {"train": 1, "val": 1})
    ov = dict(TINY[b], **dict(TINY_TRAIN[b], epoch_length=6, num_epochs=2), train_manifest=data["train"],
              val_manifest=data["val"], ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))
    p = run_bundle_here(b, "train.json", ov)
    iters = re.findall(r"Epoch: \d/2, Iter: \d/6", p.output)
    assert iters == ["Epoch: 1/2, Iter: 1/6", "Epoch: 1/2, Iter: 6/6", "Epoch: 2/2, Iter: 1/6", "Epoch: 2/2, Iter: 6/6"]
    assert "it/s" in p.output and "train_loss" in p.output
    model = os.path.join(str(tmp_path / "models"), "model.pt")
    assert re.search(r"validation after epoch 2: val_pearson -?\d\.\d{4} \(best .* at epoch \d\); best model (written "
                     r"to|stays) " + re.escape(model), p.output)

"""A seeded CPU training run is deterministic: same seed, same weights and validation numbers; another
seed, other weights (so the experiments' --seeds give real spread, and a rerun reproduces a table)."""

import json
import os

import pytest
import torch

from common.synthetic import write_dataset_3d
from zoo_testing import TINY, TINY_TRAIN, run_bundle_inprocess, split_manifest

pytestmark = pytest.mark.slow
B = "fnet_baseline"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("det_data")
    manifest = write_dataset_3d(str(d), n_volumes=2, shape=(16, 48, 48), seed=11, n_cells=4)
    return split_manifest(manifest, {"train": 1, "val": 1})


def _train(data, out, seed):
    ov = dict(TINY[B], **TINY_TRAIN[B])
    ov.update(train_manifest=data["train"], val_manifest=data["val"], ckpt_dir=str(out / "models"),
              output_dir=str(out / "runs"), seed=seed, num_epochs=2, epoch_length=3)
    torch.set_num_threads(1)
    run_bundle_inprocess(B, "train.json", ov)
    return torch.load(out / "models" / "model.pt", weights_only=True)


def test_same_seed_same_model_other_seed_other_model(data, tmp_path):
    a = _train(data, tmp_path / "a", seed=3)
    b = _train(data, tmp_path / "b", seed=3)
    c = _train(data, tmp_path / "c", seed=4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.allclose(a[k], c[k]) for k in a if a[k].dtype.is_floating_point)
    # the record says the same network, whatever the seed
    rec = [json.load(open(p / "models" / "model.json")) for p in (tmp_path / "a", tmp_path / "c")]
    assert rec[0] == rec[1]
    assert os.path.isfile(tmp_path / "a" / "runs" / "checkpoints" / "checkpoint_checkpoint_epoch=2.pt")

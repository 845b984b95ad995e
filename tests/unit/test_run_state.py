"""The run state (tl_ray.training.state): checkpoints written before it had its own module still load, for predict
and for a resume, and saving what was loaded writes the same checkpoint back.

The checkpoints in tests/data/checkpoint-v1 were written by the training loop of tl-ray 0.1.0 as it was before
the restructuring (its README says how); a change to the run state's keys that an old checkpoint cannot meet fails
here. Real torch (resnet18 at 32 px); no Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import shutil
from pathlib import Path

import pytest
import torch

from tl_ray import checkpoint, model
from tl_ray.errors import TlRayError
from tl_ray.training import schedule
from tl_ray.training.config import TrainConfig
from tl_ray.training.state import LR_RANGE_TEST, LR_SELECTION, RunMeta, RunState, load_run_state, save_run_state

FIXTURES = Path(__file__).parents[1] / "data" / "checkpoint-v1"
MODEL_SHA256 = {  # of model.pt as the loop wrote it (the README's)
    "lr-select": "3bb825eac35be1d5160a70924b0f73114c6cc09a7d6a8cf24d7175b6cf099dff",
    "lr-auto": "077113f6c9efe6c7dc0f57e19c17894bc63c6fc8e6d411988a51a3ffbcf34a63",
}
CLASS_NAMES = ["cat", "dog"]
NUM_TRAIN, STEPS_PER_EPOCH = 16, 4  # 16 images in batches of 4 on one worker

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(MODEL_SHA256))
def written(request, tmp_path_factory) -> Path:
    """One v1 checkpoint folder as the loop wrote it (model.pt decompressed, checked byte for byte)."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    for file in (checkpoint.META_FILE, checkpoint.TRAIN_STATE_FILE):
        shutil.copy(FIXTURES / name / file, folder / file)
    data = lzma.decompress((FIXTURES / name / f"{checkpoint.MODEL_FILE}.xz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == MODEL_SHA256[name]
    (folder / checkpoint.MODEL_FILE).write_bytes(data)
    return folder


def _options(lr: str) -> TrainConfig:
    """The options the fixture's run was started with (a resume must pass the same)."""
    config = TrainConfig(
        data="/d",
        name="fixture-v1",
        arch="resnet18",
        image_size=32,
        num_workers=1,
        cpus_per_worker=1.0,
        weights="none",
        batch_size=4,
        epochs=2,
        lr=lr,
        freeze_depth=5,
    )
    return config.validate().for_training_set(NUM_TRAIN)


def _fresh_state(folder: Path, **changes) -> RunState:
    """A run state as a worker builds it before it resumes: the run's model at its starting weights, its optimizer
    at the peak rate's shares (the rate is found first, so 1), the curve at this group's steps an epoch."""
    lr = "auto" if folder.name.startswith("lr-auto") else "select"
    options = dataclasses.replace(_options(lr), **changes)
    net = model.create_model(options.arch, len(CLASS_NAMES), options.image_size)
    transfer = model.TransferModel(net, options.freeze_depth, train_bn=options.train_bn)
    groups = transfer.parameter_groups(1.0, options.weight_decay, options.backbone_lr_mult)
    optimizer = schedule.make_optimizer(groups, options)
    meta = RunMeta(options, CLASS_NAMES, None, 36, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], "none")
    return RunState.start(net, optimizer, options, STEPS_PER_EPOCH, torch.device("cpu"), None, meta=meta)


def test_a_v1_checkpoint_loads_for_predict(written):
    net, meta = checkpoint.load_checkpoint(written)
    assert meta["format_version"] == 1
    assert (meta["arch"], meta["num_classes"], meta["class_names"]) == ("resnet18", 2, CLASS_NAMES)
    assert (meta["image_size"], meta["resize_size"], meta["mean"], meta["std"]) == (
        32,
        36,
        [0.5, 0.4, 0.3],
        [0.2, 0.25, 0.3],
    )
    assert (meta["epoch"], meta["metrics"]["epoch"], meta["monitor"], meta["freeze_depth"]) == (1, 1, "val_acc", 5)
    assert {"val_acc", "val_loss", "macro_f1", "rank_score", "peak_lr", "val_recall"} <= set(meta["metrics"])
    assert meta["strategy"]["class_weights"] is None and meta["strategy"]["optimizer"] == "sgd"
    state = checkpoint.read_model_state(written)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_a_v1_checkpoint_resumes_into_the_run_state(written):
    saved = torch.load(written / checkpoint.TRAIN_STATE_FILE, weights_only=True)
    meta = json.loads((written / checkpoint.META_FILE).read_text())
    state = _fresh_state(written)
    load_run_state(written, state)

    assert state.epoch == 1 and state.metrics == meta["metrics"]
    assert [row["epoch"] for row in state.history] == [1]
    assert state.history[0]["node_ids"] and state.history[0]["val_acc"] == meta["metrics"]["val_acc"]
    assert state.curve.steps_per_epoch == STEPS_PER_EPOCH
    assert state.scheduler.last_epoch == STEPS_PER_EPOCH  # one epoch of steps into the curve
    loaded = state.optimizer.state_dict()
    assert len(loaded["state"]) == 2  # at depth 5 the head alone trains: its weight and bias
    for index, entry in saved["optimizer"]["state"].items():
        assert torch.equal(loaded["state"][index]["momentum_buffer"], entry["momentum_buffer"])
    rates = [group["lr"] for group in state.optimizer.param_groups]
    assert rates == [group["lr"] for group in saved["optimizer"]["param_groups"]] and rates[0] > 0
    model_state = checkpoint.read_model_state(written)
    for key, value in state.net.state_dict().items():
        assert torch.equal(value, model_state[key]), key
    if written.name.startswith("lr-select"):
        assert state.lr_curve is None and state.lr_choice is not None
        assert (state.lr_choice.rates, state.lr_choice.batch_sizes) == ([0.01, 0.03, 0.01], [4, 4, 2])
        assert (state.lr_choice.chosen, state.lr_choice.chosen_batch_size) == (0.01, 4)
        assert state.peak_lr("select") == 0.01 == meta["metrics"]["peak_lr"]
    else:
        assert state.lr_choice is None and state.lr_curve is not None
        assert state.lr_curve.steps == 12 and len(state.lr_curve.lrs) == len(state.lr_curve.losses)
        assert state.peak_lr("auto") == state.lr_curve.suggestion == meta["metrics"]["peak_lr"]


def test_saving_a_loaded_v1_state_writes_the_same_checkpoint(written, tmp_path):
    """Every key the old loop wrote is one the run state loads and saves again: the format did not change."""
    state = _fresh_state(written)
    load_run_state(written, state)
    save_run_state(tmp_path, state)

    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(path.name for path in written.iterdir())
    before = json.loads((written / checkpoint.META_FILE).read_text())
    after = json.loads((tmp_path / checkpoint.META_FILE).read_text())
    before.pop("tl_ray_version"), after.pop("tl_ray_version")
    assert list(after) == list(before) and after == before
    old = torch.load(written / checkpoint.TRAIN_STATE_FILE, weights_only=True)
    new = torch.load(tmp_path / checkpoint.TRAIN_STATE_FILE, weights_only=True)
    assert list(new) == list(old)
    assert (new[LR_RANGE_TEST], new[LR_SELECTION]) == (old[LR_RANGE_TEST], old[LR_SELECTION])
    assert (new["epoch"], new["history"], new["steps_per_epoch"]) == (old["epoch"], old["history"], 4)
    assert (new["scheduler"], new["scaler"]) == (old["scheduler"], old["scaler"])
    assert new["optimizer"]["param_groups"] == old["optimizer"]["param_groups"]
    for index, entry in old["optimizer"]["state"].items():
        assert torch.equal(new["optimizer"]["state"][index]["momentum_buffer"], entry["momentum_buffer"])
    old_model, new_model = checkpoint.read_model_state(written), checkpoint.read_model_state(tmp_path)
    assert list(new_model) == list(old_model)
    assert all(torch.equal(new_model[key], value) for key, value in old_model.items())


def test_a_run_with_other_options_does_not_resume_from_a_v1_checkpoint(written):
    state = _fresh_state(written, monitor="macro_f1")
    with pytest.raises(TlRayError, match="run fixture-v1 was started with monitor='val_acc', now 'macro_f1'"):
        load_run_state(written, state)

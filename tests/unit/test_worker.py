"""The training worker without Ray: ``train_loop_per_worker`` on one CPU worker, its few Ray calls stood in for.

What it checks is the run state's one promise: a run resumed from a checkpoint trains on exactly as the run that
was never interrupted, bit for bit, so every piece of state an epoch changes is one the checkpoint saves and a
resume loads (``tl_ray.training.state``). A state key saved but not loaded, or not saved at all, fails here. The
Ray tests (tests/ray/test_train.py) resume real runs; this is the same check in a few seconds.
"""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import pytest
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from tl_ray import checkpoint, model
from tl_ray.inputs import skiplog
from tl_ray.inputs.plan import WorkerBatches
from tl_ray.training.config import TrainConfig
from tl_ray.training.worker import LOOP_CONFIG, LoopConfig, train_loop_per_worker

NUM_TRAIN, NUM_VAL, CLASS_NAMES = 16, 6, ["cat", "dog"]
TIMINGS = {"epoch_s", "images_per_s", "data_wait_s"}

pytestmark = pytest.mark.usefixtures("one_thread")


class _Plan:
    """An input plan of random 32 px images, the same for each epoch number whichever process asks."""

    on_features = False
    decoding_every_epoch = False

    def batches(self, worker_batch, rank, world, device, mean, std) -> WorkerBatches:
        return _Batches(self, worker_batch, rank, world, device, mean, std)


class _Batches(WorkerBatches):
    def train(self, epoch):
        generator = torch.Generator().manual_seed(1000 + epoch)
        images = torch.randint(0, 256, (NUM_TRAIN, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels, order = torch.arange(NUM_TRAIN) % 2, torch.randperm(NUM_TRAIN, generator=generator)
        for start in range(0, NUM_TRAIN, self.worker_batch):
            rows = order[start : start + self.worker_batch]
            yield {"image": images[rows], "label": labels[rows]}

    def val(self):
        images = torch.randint(0, 256, (NUM_VAL, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator())
        yield {"image": images, "label": torch.arange(NUM_VAL) % 2}


def _run(monkeypatch, tmp_path: Path, options: TrainConfig, resume_from: Path | None = None) -> list[tuple]:
    """(metrics, checkpoint folder or None) of each report of one worker group."""
    reports = []

    def report(metrics, checkpoint=None, checkpoint_dir_name=None, checkpoint_upload_fn=None):
        kept = None
        if checkpoint is not None:
            kept = tmp_path / f"{len(list(tmp_path.iterdir()))}-{checkpoint_dir_name}"
            shutil.copytree(checkpoint.path, kept)
        reports.append((metrics, kept))

    context = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1, get_local_world_size=lambda: 1)
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: resume_from and Checkpoint.from_directory(resume_from))
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda module: module)
    torch.manual_seed(0)
    start = model.create_model("resnet18", len(CLASS_NAMES), 32).state_dict()
    loop = LoopConfig(
        options=options,
        class_names=CLASS_NAMES,
        num_train=NUM_TRAIN,
        train_per_class=[8, 8],
        class_weights=None,
        weights_ref=start,
        weights_source="none",
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        resize_size=36,
        cpus_per_worker=1.0,
        skipped=skiplog.SkipLog(),
        inputs=_Plan(),
    )
    train_loop_per_worker({LOOP_CONFIG: loop})
    return reports


def test_a_resumed_run_trains_on_exactly_as_the_uninterrupted_one(monkeypatch, tmp_path):
    """Resumed after epoch 1 of a probe-then-fine-tune run (SGD with momentum): epoch 2 unfreezes stages the
    optimizer state must already cover, on the LR curve's second phase."""
    options = TrainConfig(
        data="/d",
        name="run",
        arch="resnet18",
        image_size=32,
        batch_size=4,
        num_workers=1,
        cpus_per_worker=1.0,
        weights="none",
        epochs=2,
        head_epochs=1,
        freeze_depth=3,
        lr=0.05,
        optimizer="sgd",
    )
    options = options.validate().for_training_set(NUM_TRAIN)
    (whole := tmp_path / "whole").mkdir()
    (resumed := tmp_path / "resumed").mkdir()
    uninterrupted = _run(monkeypatch, whole, options)
    assert [metrics["epoch"] for metrics, _ in uninterrupted] == [1, 2]
    again = _run(monkeypatch, resumed, options, resume_from=uninterrupted[0][1])
    assert [metrics["epoch"] for metrics, _ in again] == [2]

    (expected, expected_dir), (got, got_dir) = uninterrupted[1], again[0]
    assert got["resumed_after_epoch"] == 1 and expected["resumed_after_epoch"] == 0
    for key in set(expected) - TIMINGS - {"resumed_after_epoch"}:
        assert got[key] == expected[key], key
    expected_model, got_model = checkpoint.read_model_state(expected_dir), checkpoint.read_model_state(got_dir)
    assert all(torch.equal(got_model[key], value) for key, value in expected_model.items())
    expected_state, got_state = checkpoint.read_train_state(expected_dir), checkpoint.read_train_state(got_dir)
    assert list(got_state) == list(expected_state)
    assert got_state["scheduler"] == expected_state["scheduler"]
    for index, entry in expected_state["optimizer"]["state"].items():
        assert torch.equal(got_state["optimizer"]["state"][index]["momentum_buffer"], entry["momentum_buffer"])
    assert [row["epoch"] for row in got_state["history"]] == [1, 2]

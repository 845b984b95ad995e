"""The fine-tuning toolbox on real Ray: one two-worker run with every training option of it at once (--ema,
--accumulate, --mixup and --cutmix, --layer-decay, --patience), whose worker group is killed after its first
checkpoint and resumes from it in the same run: the EMA, the accumulated schedule and the optimizer's per-stage
groups must carry on from the checkpoint (about 40 s here)."""

from __future__ import annotations

import io
import json
import math
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import kill_a_worker_once_recorded

import tl_ray
from tl_ray import cli
from tl_ray.checkpoint import read_meta, read_model_state
from tl_ray.training import toolbox

pytestmark = pytest.mark.timeout(900)

EPOCHS, BATCH, ACCUMULATE = 3, 8, 2


@pytest.mark.slow  # a worker kill, as the other resume tests (make test runs it; make test-fast does not)
def test_ema_accumulation_mixing_layer_decay_and_patience_resume_mid_run(tmp_path, ray_cluster):
    tl_ray.write_sample_data(tmp_path / "data", per_class=8, seed=3)
    data = tmp_path / "data" / "source"
    argv = [
        "train", "--data", str(data), "--weights", "none", "--arch", "resnet18", "--image-size", "32",
        "--num-workers", "2", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", "3e-3",
        "--ema", "0.9", "--accumulate", str(ACCUMULATE), "--mixup", "0.4", "--cutmix", "1.0",
        "--layer-decay", "0.7", "--patience", "1", "--storage", str(tmp_path / "runs"), "--name", "kit",
    ]  # fmt: skip
    killed: list[int] = []
    first = tmp_path / "runs" / "kit" / "checkpoint_epoch001"
    killer = threading.Thread(
        target=kill_a_worker_once_recorded, args=(first, ray_cluster.get_runtime_context().gcs_address, killed)
    )
    killer.start()
    with pytest.MonkeyPatch.context() as patch:
        printed = io.StringIO()
        patch.setattr(sys, "stdout", printed)
        try:
            assert cli.main(argv) == 0
        finally:
            killer.join()
    assert killed, "no training worker was found to kill"
    result = json.loads((tmp_path / "runs" / "kit" / "result.json").read_text())
    history = result["history"]
    # --patience 1: the run stops after the first epoch no better than the best before it (never after the last
    # epoch: there is nothing left to stop), says so in result.json and on the console.
    reasons = [toolbox.patience_reason(history[:end], "val_acc", 1) for end in range(1, len(history) + 1)]
    assert not any(reasons[:-1])
    if result["stopped_early"]:
        assert result["stopped_early"] == reasons[-1] and len(history) < EPOCHS
        assert f"stopped early    after epoch {len(history)}: --patience 1: no better val_acc" in printed.getvalue()
    else:
        assert len(history) == EPOCHS and "stopped early" not in printed.getvalue()
    # The group that replaced the killed worker resumed from epoch 1's checkpoint: the EMA, the optimizer's
    # per-stage groups and the accumulated schedule carried on from it (the step counts below span the resume).
    assert history[1]["resumed_after_epoch"] == 1
    # --ema: every epoch validated the average, as the table says.
    assert all(row["validated"] == "ema" for row in history)
    rows = [line for line in printed.getvalue().splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert rows and all(line.endswith("(ema)") for line in rows), printed.getvalue()

    last = Path(result["last_checkpoint"])
    state = torch.load(last / "train_state.pt", weights_only=True)
    # --accumulate 2: the schedule, the optimizer and the EMA all counted optimizer steps (2 batches each), across the
    # resume: each worker's batches an epoch are its shard (num_train / 2 workers) in batches of BATCH / 2.
    batches = math.ceil(history[-1]["train_images"] / 2 / (BATCH // 2))
    steps = len(history) * math.ceil(batches / ACCUMULATE)
    assert state["scheduler"]["last_epoch"] == steps
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {steps}
    assert state["ema"]["updates"] == steps
    # The checkpoint's model is the average, not the trained weights (kept for resuming).
    averaged, trained = read_model_state(last), state["ema"]["trained_model"]
    assert averaged.keys() == trained.keys()
    assert not torch.equal(averaged["layer4.1.conv2.weight"], trained["layer4.1.conv2.weight"])
    # --layer-decay 0.7 from depth 0: every stage its own groups, each 0.7 times the one above it.
    rates = {group["name"]: group["lr"] for group in state["optimizer"]["param_groups"]}
    for upper, lower in (("head", "stage5"), ("stage5", "stage4"), ("stage2", "stage1")):
        assert rates[lower] == pytest.approx(0.7 * rates[upper])
    strategy = read_meta(last)["strategy"]
    assert strategy["ema"]["decay"] == 0.9 and strategy["accumulate"] == ACCUMULATE
    assert strategy["mixing"] == {"mixup": 0.4, "cutmix": 1.0, "mix_prob": 1.0}
    assert strategy["layer_decay"]["lr_mult"]["stage1"] == pytest.approx(0.7**5)
    # Mixed batches: train_acc counts the dominant label, a share of the images seen.
    assert all(0.0 <= row["train_acc"] <= 1.0 for row in history)

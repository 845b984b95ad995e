"""--lr select on real Ray: on the sample target (60 training images), --lr left out tries the recipe's rate / 3,
x 1 and x 3 for the whole run each, trains at the best exactly as that candidate trained, records the choice, and
a rerun resumes at the chosen rate without trying again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tl_ray import cli, recipe
from tl_ray.checkpoint import read_meta
from tl_ray.training import lr_select

pytestmark = pytest.mark.timeout(900)

COMMON = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--seed", "5", "--num-workers", "1"]


def test_a_small_training_set_selects_its_rate_and_trains_as_the_winner_did(sample_root, tmp_path, ray_cluster, capsys):
    storage = tmp_path / "runs"
    argv = ["train", "--data", str(sample_root / "target"), *COMMON, "--storage", str(storage), "--name", "small"]
    assert cli.main([*argv, "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    run_dir = storage / "small"
    result = json.loads((run_dir / "result.json").read_text())
    selection = result["lr_selection"]
    rates = recipe.lr_candidates(recipe.LR["adamw"])  # from random weights: AdamW's rate, whole network

    assert selection["rates"] == pytest.approx(list(rates))
    assert [len(tried) for tried in selection["epochs"]] == [2, 2, 2]
    recomputed = lr_select.choose(selection["rates"], selection["epochs"], "val_acc", centre=recipe.LR["adamw"])
    chosen = selection["chosen"]
    assert chosen == recomputed.chosen
    assert "60 training images: batch 32 (from the training set's size), 2 steps an epoch" in printed
    assert (
        "--lr select (--lr left out on a small training set): trying peak rates 0.00033, 0.001, 0.003 for 2 epochs"
        " each, then training at the best by val_acc" in printed
    )
    assert printed.count("--lr select: 0.0") == 3 and f"--lr select: training at {chosen:.2g}, the best by" in printed

    # The run is the winning candidate's, epoch for epoch: the candidates left no trace (weights, BatchNorm,
    # random state), and the cached images are held in memory, dealt by seed and epoch.
    winner = selection["epochs"][selection["rates"].index(chosen)]
    for key in ("val_acc", "val_loss"):
        assert [row[key] for row in result["history"]] == [row[key] for row in winner]
    assert [row["peak_lr"] for row in result["history"]] == [chosen, chosen]
    meta = read_meta(result["best_checkpoint"])
    assert meta["strategy"]["lr"] == "select" and meta["metrics"]["peak_lr"] == chosen
    assert "\nlr: select\n" in (run_dir / "config.yaml").read_text()
    state = torch.load(Path(result["last_checkpoint"]) / "train_state.pt", weights_only=False)
    assert {group["initial_lr"] for group in state["optimizer"]["param_groups"]} == {chosen}

    # A rerun resumes at the chosen rate: nothing is tried again.
    assert cli.main([*argv, "--epochs", "3"]) == 0
    printed = capsys.readouterr().out
    resumed = json.loads((run_dir / "result.json").read_text())
    assert "--lr select" not in printed and "resuming from" in printed
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][2]["peak_lr"] == chosen and resumed["lr_selection"] == selection

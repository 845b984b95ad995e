"""Class imbalance without Ray: the loss weights, per-class metrics from counts summed over workers, the monitor."""

from __future__ import annotations

import math
import types

import pytest
import torch

from tl_ray import classes, location
from tl_ray.classes import rank_key
from tl_ray.training.config import TrainConfig
from tl_ray.training.driver import loss_weights
from tl_ray.training.metrics import count_classes
from tl_ray.tuning import report
from tl_ray.tuning.sweep import SweepSummary, TrialSummary


def test_balanced_weights_give_every_class_the_same_total_and_a_mean_of_one():
    counts = [10, 30, 60]
    weights = classes.balanced_weights(counts)
    assert weights == pytest.approx([100 / 30, 100 / 90, 100 / 180])  # n / (classes x n_class)
    assert [w * c for w, c in zip(weights, counts, strict=True)] == pytest.approx([100 / 3] * 3)
    assert sum(w * c for w, c in zip(weights, counts, strict=True)) / sum(counts) == pytest.approx(1.0)
    assert classes.balanced_weights([7, 7]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="every class needs training images"):
        classes.balanced_weights([5, 0])


def test_loss_weights_count_the_training_images_less_known_undecodable_ones():
    names = ["cat", "dog", "fox"]
    config = TrainConfig(data="/d", class_weights="auto")
    weights = loss_weights(config, names, [12, 40, 8], {1: 4, 2: 2})  # 12, 36, 6 decodable
    assert weights == pytest.approx({"cat": 54 / 36, "dog": 54 / 108, "fox": 54 / 18})
    assert loss_weights(TrainConfig(data="/d"), names, [12, 40, 8], {}) is None


# A validation set of 3 classes; "fox" has no validation image, but one "dog" is predicted as fox.


LABELS = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
PREDICTIONS = [0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 2]


def test_per_class_metrics_from_a_known_confusion():
    counts = count_classes(torch.tensor(LABELS), torch.tensor(PREDICTIONS), 3).tolist()
    support, predicted, correct = counts[:3], counts[3:6], counts[6:]
    assert (support, predicted, correct) == ([6, 6, 0], [7, 4, 1], [5, 3, 0])
    metrics = classes.class_metrics(support, predicted, correct)
    assert metrics["recall"] == [pytest.approx(5 / 6), 0.5, None]  # fox: no image to recall
    assert metrics["precision"] == pytest.approx([5 / 7, 3 / 4, 0.0])
    f1_cat = 2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7)
    assert metrics["f1"] == pytest.approx([f1_cat, 0.6, 0.0])
    # The mean over the classes that have validation images, as `tl-ray evaluate` averages.
    assert metrics["macro_f1"] == pytest.approx((f1_cat + 0.6) / 2)
    assert classes.class_metrics([0, 0], [0, 0], [0, 0])["macro_f1"] == 0.0


def test_the_monitor_orders_epochs_lowest_loss_or_highest_score_first():
    assert classes.best_value([0.9, 0.4, 0.6], "val_loss") == 0.4
    assert classes.best_value([0.5, 0.8, 0.7], "macro_f1") == 0.8
    assert classes.score({"val_loss": 0.3}, "val_loss") > classes.score({"val_loss": 0.5}, "val_loss")
    assert classes.score({"val_acc": 0.9}, "macro_f1") == -math.inf  # an epoch from before macro_f1
    assert classes.signed(math.nan, "val_acc") == -math.inf


def _trial(trial_id: str, val_acc: float, val_loss: float, macro_f1: float, strategy: str = "plain") -> TrialSummary:
    history = [{"epoch": 1, "val_acc": val_acc, "val_loss": val_loss, "macro_f1": macro_f1}]
    depth = 0 if strategy == report.SCRATCH else int(trial_id[-1])
    return TrialSummary(
        trial_id, depth, strategy, 1e-3, "finished", 1, val_acc, val_loss, 1, 5.0, 50.0, f"/c/{trial_id}", history,
        macro_f1,
    )  # fmt: skip


def test_a_sweep_ranks_trials_by_its_monitor():
    trials = [
        _trial("t3", 0.90, 0.50, 0.60),
        _trial("t4", 0.85, 0.30, 0.80),
        _trial("s", 0.5, 1.2, 0.4, report.SCRATCH),
    ]
    by_loss = SweepSummary("/runs/s", 1, trials, 10.0, None, 100, 3, "val_loss")
    assert by_loss.best.trial_id == "t4" and [t.trial_id for t in report.ranked(by_loss)] == ["t4", "t3", "s"]
    lines = report.verdict(by_loss)
    assert lines[1].startswith(
        "- **best by val_loss: depth 4, plain** at 0.300, ahead of depth 3, plain (0.500) by 0.200"
    )
    assert "(lower is better)" in lines[1] and "resolution is stated for val_acc only" in lines[1]
    assert lines[2] == (
        "- **transfer vs from scratch** by val_loss: 0.300 vs 1.200 (-0.900 (lower is better); val_acc 0.850 vs 0.500)"
    )
    markdown = report.markdown(by_loss)
    assert (
        "| configuration | val_loss | behind the best |" in markdown
        and "## All trials (best val_loss first)" in markdown
    )
    assert "val_loss 0.300, val_acc 0.850 at epoch 1" in markdown
    by_f1 = SweepSummary("/runs/s", 1, trials, 10.0, None, 100, 3, "macro_f1")
    assert by_f1.best.trial_id == "t4"
    by_accuracy = SweepSummary("/runs/s", 1, trials, 10.0, None, 100, 3)
    assert by_accuracy.best.trial_id == "t3" and report.ranked(by_accuracy)[0].trial_id == "t3"
    assert report.results_csv(by_f1).splitlines()[1].endswith(",0.8")  # the macro_f1 column, last


def test_a_trials_best_epoch_is_picked_by_the_monitor():
    rows = [
        {"epoch": 1, "val_acc": 0.8, "val_loss": 0.40, "macro_f1": 0.70},
        {"epoch": 2, "val_acc": 0.8, "val_loss": 0.35, "macro_f1": 0.60},
        {"epoch": 3, "val_acc": 0.7, "val_loss": 0.30, "macro_f1": 0.75},
    ]
    best = {
        monitor: max(rows, key=lambda r: rank_key(r, monitor))["epoch"]
        for monitor in ("val_acc", "val_loss", "macro_f1")
    }
    assert best == {"val_acc": 2, "val_loss": 3, "macro_f1": 3}  # val_acc ties: the lower val_loss


@pytest.mark.parametrize(("monitor", "best_epoch"), [("val_acc", 1), ("val_loss", 2), ("macro_f1", 3)])
def test_the_run_result_names_the_best_checkpoint_by_the_monitor(tmp_path, monitor, best_epoch):
    """``collect`` on what Ray Train hands back: three checkpoints, each the best by one metric."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from tl_ray.checkpoint import save_checkpoint
    from tl_ray.training.results import collect

    history = [
        {"epoch": 1, "val_acc": 0.9, "val_loss": 0.5, "macro_f1": 0.6},
        {"epoch": 2, "val_acc": 0.8, "val_loss": 0.3, "macro_f1": 0.7},
        {"epoch": 3, "val_acc": 0.7, "val_loss": 0.4, "macro_f1": 0.8},
    ]
    saved = []
    for row in history:
        folder = tmp_path / f"checkpoint_epoch{row['epoch']:03d}"
        folder.mkdir()
        state = {"epoch": row["epoch"], "history": history[: row["epoch"]]}
        meta = {"arch": "resnet18", "num_classes": 2, "class_names": ["a", "b"], "image_size": 32, "mean": [0.5] * 3}
        save_checkpoint(folder, {}, {**meta, "std": [0.2] * 3, "epoch": row["epoch"], "metrics": row}, state)
        saved.append((Checkpoint.from_directory(str(folder)), row))
    result = types.SimpleNamespace(
        best_checkpoints=saved, checkpoint=saved[-1][0], path=str(tmp_path), filesystem=pafs.LocalFileSystem()
    )
    outcome = collect(result, location.resolve(str(tmp_path), "--storage"), ["a", "b"], {}, monitor)
    assert outcome.best_checkpoint == str(tmp_path / f"checkpoint_epoch{best_epoch:03d}")
    assert (outcome.metrics["epoch"], outcome.monitor, outcome.history) == (best_epoch, monitor, history)


def _tied_checkpoints(tmp_path, history):
    from ray.train import Checkpoint

    from tl_ray.checkpoint import save_checkpoint

    saved = []
    for row in history:
        folder = tmp_path / f"checkpoint_epoch{row['epoch']:03d}"
        folder.mkdir()
        meta = {"arch": "resnet18", "num_classes": 2, "class_names": ["a", "b"], "image_size": 32, "mean": [0.5] * 3}
        state = {"epoch": row["epoch"], "history": history[: row["epoch"]]}
        save_checkpoint(folder, {}, {**meta, "std": [0.2] * 3, "epoch": row["epoch"], "metrics": row}, state)
        saved.append((Checkpoint.from_directory(str(folder)), row))
    return saved


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_a_tie_on_the_monitor_goes_to_the_lower_val_loss_whatever_order_ray_lists_them(tmp_path, order):
    """The issue's run: three epochs at val_acc 0.250; the best is the one with the lowest val_loss (epoch 3)."""
    import pyarrow.fs as pafs

    from tl_ray.training.results import collect

    history = [
        {"epoch": 1, "val_acc": 0.25, "val_loss": 6.88, "macro_f1": 0.1},
        {"epoch": 2, "val_acc": 0.25, "val_loss": 14.87, "macro_f1": 0.1},
        {"epoch": 3, "val_acc": 0.25, "val_loss": 5.23, "macro_f1": 0.1},
    ]
    saved = _tied_checkpoints(tmp_path, history)
    listed = [saved[i] for i in order]
    result = types.SimpleNamespace(
        best_checkpoints=listed, checkpoint=saved[-1][0], path=str(tmp_path), filesystem=pafs.LocalFileSystem()
    )
    outcome = collect(result, location.resolve(str(tmp_path), "--storage"), ["a", "b"], {}, "val_acc")
    assert outcome.best_checkpoint == str(tmp_path / "checkpoint_epoch003")
    assert classes.best_epoch(history, "val_acc") == 3
    assert classes.best_epoch(history[:2], "val_acc") == 1  # the star stays on epoch 1 through epoch 2


@pytest.mark.parametrize("monitor", ["val_acc", "val_loss", "macro_f1"])
def test_the_one_number_ray_prunes_by_orders_epochs_as_the_ranking_does(monitor):
    """``rank_score`` (what Ray's CheckpointConfig keeps by) sorts epochs exactly as ``rank_key``, ties included:
    pruning to the best N can never drop the epoch the run names best."""
    import random

    generator = random.Random(0)
    rows = []
    for epoch in range(1, 400):
        correct = generator.randint(0, 150)  # a 150-image validation set: accuracy ties are common
        rows.append(
            {
                "epoch": epoch,
                "val_acc": correct / 150,
                "val_loss": round(generator.uniform(0.01, 20.0), generator.choice([1, 2, 4])),
                "macro_f1": round(generator.uniform(0.0, 1.0), 2),  # 101 values: many ties
            }
        )
    by_key = sorted(rows, key=lambda r: (rank_key(r, monitor), -r["epoch"]))
    by_score = sorted(rows, key=lambda r: (classes.rank_score(r, monitor), -r["epoch"]))
    keys = [rank_key(r, monitor) for r in by_key]
    assert [rank_key(r, monitor) for r in by_score] == keys

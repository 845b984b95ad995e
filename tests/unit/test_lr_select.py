"""--lr select's choice (tl_ray.training.lr_select): the (rate, batch) candidate whose best epoch ranks first by the
run's one ranking, ties to the run's batch and then the recipe's rate; and its console lines."""

from __future__ import annotations

import io

import pytest

from tl_ray import progress
from tl_ray.training import lr_select


def epochs(*scores: tuple[float, float]) -> list[dict[str, float]]:
    """Epoch rows of (val_acc, val_loss)."""
    return [
        {"epoch": index + 1, "val_acc": acc, "val_loss": loss, "macro_f1": acc}
        for index, (acc, loss) in enumerate(scores)
    ]


RATES = [1e-3 / 3, 1e-3, 3e-3]
AT_32 = [(rate, 32) for rate in RATES]
CENTRE = (1e-3, 32)


def test_the_rate_whose_best_epoch_is_best_wins_not_the_one_whose_last_epoch_is():
    tried = [
        epochs((0.50, 1.0), (0.71, 0.8), (0.60, 0.9)),  # the best epoch of all, then worse
        epochs((0.55, 1.0), (0.65, 0.9), (0.70, 0.7)),  # the best last epoch
        epochs((0.30, 2.0), (0.40, 1.5), (0.45, 1.4)),
    ]
    choice = lr_select.choose(AT_32, tried, "val_acc", centre=CENTRE)
    assert choice.chosen == RATES[0]
    assert choice.best(0)["epoch"] == 2 and choice.best(1)["epoch"] == 3


def test_ties_on_accuracy_go_to_the_lower_loss_then_to_the_recipes_rate():
    tied_acc = [epochs((0.6, 0.9)), epochs((0.6, 1.1)), epochs((0.6, 0.8))]
    assert lr_select.choose(AT_32, tied_acc, "val_acc", centre=CENTRE).chosen == RATES[2]
    exact = [epochs((0.6, 0.9)), epochs((0.6, 0.9)), epochs((0.6, 0.9))]
    assert lr_select.choose(AT_32, exact, "val_acc", centre=CENTRE).chosen == RATES[1]
    # Without the centre among them, the nearer (by ratio) wins, the lower of two as near.
    assert lr_select.choose([(1e-4, 32), (1e-2, 32)], exact[:2], "val_acc", centre=CENTRE).chosen == 1e-4


def test_the_monitor_decides():
    tried = [epochs((0.70, 0.9)), epochs((0.65, 0.5))]
    assert lr_select.choose(AT_32[:2], tried, "val_acc", centre=CENTRE).chosen == RATES[0]
    assert lr_select.choose(AT_32[:2], tried, "val_loss", centre=CENTRE).chosen == RATES[1]


def test_a_choice_reads_back_from_json():
    choice = lr_select.choose(AT_32, [epochs((0.5, 1.0))] * 3, "val_acc", centre=CENTRE)
    again = lr_select.LrChoice.from_json(choice.to_json(), 32)
    assert again == choice
    # A run started before batches were candidates resumes at its own batch.
    older = {key: value for key, value in choice.to_json().items() if "batch" not in key}
    assert lr_select.LrChoice.from_json(older, 24) == lr_select.LrChoice(
        choice.rates, [24] * 3, choice.epochs, choice.chosen, 24, "val_acc"
    )


def test_no_validated_epoch_is_an_error():
    with pytest.raises(ValueError, match="at least one validated epoch"):
        lr_select.choose(AT_32, [epochs((0.5, 1.0)), [], epochs((0.5, 1.0))], "val_acc", centre=CENTRE)


def test_a_half_batch_candidate_wins_on_its_score_and_loses_exact_ties_to_the_runs_batch():
    candidates = [*AT_32, (1e-3, 16), (3e-3, 16)]
    scores = [epochs((0.60, 0.9))] * 3 + [epochs((0.60, 0.9)), epochs((0.66, 0.9))]
    choice = lr_select.choose(candidates, scores, "val_acc", centre=CENTRE)
    assert (choice.chosen, choice.chosen_batch_size) == (3e-3, 16)
    tied = [epochs((0.60, 0.9))] * 5
    choice = lr_select.choose(candidates, tied, "val_acc", centre=CENTRE)
    assert (choice.chosen, choice.chosen_batch_size) == (1e-3, 32)
    assert choice.batch_sizes == [32, 32, 32, 16, 16]


def test_the_console_says_what_select_does_tries_and_chose():
    from tl_ray.cli.console import Console

    out = io.StringIO()
    console = Console(out=out, err=io.StringIO())
    console(progress.selecting_lr((*AT_32, (1e-3, 16), (3e-3, 16)), 10, "val_acc", from_size=True))
    console(progress.tried_lr(RATES[0], 32, epochs((0.5, 1.0), (0.703, 0.8))[1], "val_acc", 10))
    console(progress.selected_lr(RATES[2], 16, "val_acc"))
    console.close()
    assert out.getvalue().splitlines() == [
        "--lr select (--lr left out on a small training set): trying peak rates 0.00033, 0.001, 0.003 at batch 32"
        " and 0.001, 0.003 at batch 16 for 10 epochs each, then training at the best by val_acc",
        "--lr select: 0.00033 at batch 32: val_acc 0.703 at epoch 2 of 10",
        "--lr select: training at 0.003, batch 16, the best by val_acc",
    ]

"""``--lr select``: the peak rate (and batch) chosen by training at a few and keeping the one that validated best.

On a small training set (``recipe.SELECT_MAX_TRAIN`` images or fewer, where ``--lr`` left out means ``select``) no
one rate suits every dataset: bench/regimes.py found glyph transfer wanting a third of the rate digits want, and
an LR range test misjudges a set this small (its 100 steps are many epochs of it). A careful user tries a few rates
and keeps the best by validation; the candidates are cheap at this size, so the run does the same: each candidate
trains the whole run from the same start, and the run then trains at the winner (bit for bit the run ``--lr
WINNER --batch-size ITS_BATCH`` would be, where the input plan holds the images in memory), reporting and
checkpointing only that. Half the run's batch is a candidate too (``recipe.select_candidates``): icons at 30 a
class wanted 16, digits at 10 a class 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tl_ray import classes


@dataclass(frozen=True)
class LrChoice:
    """Each candidate's (peak rate, global batch) epochs (their validation metrics) and the candidate chosen."""

    rates: list[float]
    batch_sizes: list[int]  # per candidate, alongside rates
    epochs: list[list[dict[str, float]]]  # per candidate: per epoch {"epoch", "val_acc", "val_loss", "macro_f1"}
    chosen: float
    chosen_batch_size: int
    monitor: str

    def best(self, index: int) -> dict[str, float]:
        """The best epoch of candidate ``index``."""
        return best_epoch(self.epochs[index], self.monitor)

    def to_json(self) -> dict[str, Any]:
        return {
            "rates": self.rates,
            "batch_sizes": self.batch_sizes,
            "epochs": self.epochs,
            "chosen": self.chosen,
            "chosen_batch_size": self.chosen_batch_size,
            "monitor": self.monitor,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], run_batch_size: int) -> LrChoice:
        """A stored choice; one recorded before batches were candidates tried every rate at ``run_batch_size``."""
        rates = [float(rate) for rate in data["rates"]]
        return cls(
            rates,
            [int(batch) for batch in data.get("batch_sizes", [run_batch_size] * len(rates))],
            data["epochs"],
            float(data["chosen"]),
            int(data.get("chosen_batch_size", run_batch_size)),
            data["monitor"],
        )


def best_epoch(epochs: list[dict[str, float]], monitor: str) -> dict[str, float]:
    """The best of a candidate's epochs by the run's one ranking (``classes.rank_key``)."""
    return max(epochs, key=lambda row: classes.rank_key(row, monitor))


def choose(
    candidates: list[tuple[float, int]], epochs: list[list[dict[str, float]]], monitor: str, centre: tuple[float, int]
) -> LrChoice:
    """The (rate, batch) candidate whose best epoch ranks first; of exact ties the one at ``centre``'s batch (the
    run's own), then the rate nearest ``centre``'s (the recipe's; then the lower), so a validation set too small to
    tell candidates apart leaves the run at the recipe's rate and batch."""
    if not candidates or len(candidates) != len(epochs) or not all(epochs):
        raise ValueError("every candidate needs at least one validated epoch")
    centre_rate, centre_batch = centre

    def key(index: int) -> tuple[tuple[float, float, float], bool, float]:
        rate, batch = candidates[index]
        ranked = classes.rank_key(best_epoch(epochs[index], monitor), monitor)
        return ranked, batch == centre_batch, -abs(math.log(rate / centre_rate))

    winner = max(range(len(candidates)), key=key)
    rates, batch_sizes = [rate for rate, _ in candidates], [batch for _, batch in candidates]
    return LrChoice(rates, batch_sizes, epochs, rates[winner], batch_sizes[winner], monitor)

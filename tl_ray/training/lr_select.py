"""``--lr select``: the peak rate chosen by training at a few and keeping the one that validated best.

On a small training set (``recipe.SELECT_MAX_TRAIN`` images or fewer, where ``--lr`` left out means ``select``) no
one rate suits every dataset: bench/regimes.py found glyph transfer wanting a third of the rate digits want, and
an LR range test misjudges a set this small (its 100 steps are many epochs of it). A careful user tries a few rates
and keeps the best by validation; the candidates are cheap at this size, so the run does the same: each candidate
trains the whole run from the same start, and the run then trains at the winner (bit for bit the run ``--lr
WINNER`` would be, where the input plan holds the images in memory), reporting and checkpointing only that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tl_ray import classes


@dataclass(frozen=True)
class LrChoice:
    """Each candidate rate's epochs (their validation metrics) and the rate chosen from them."""

    rates: list[float]
    epochs: list[list[dict[str, float]]]  # per rate: per epoch {"epoch", "val_acc", "val_loss", "macro_f1"}
    chosen: float
    monitor: str

    def best(self, index: int) -> dict[str, float]:
        """The best epoch of candidate ``index``."""
        return best_epoch(self.epochs[index], self.monitor)

    def to_json(self) -> dict[str, Any]:
        return {"rates": self.rates, "epochs": self.epochs, "chosen": self.chosen, "monitor": self.monitor}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LrChoice:
        return cls([float(rate) for rate in data["rates"]], data["epochs"], float(data["chosen"]), data["monitor"])


def best_epoch(epochs: list[dict[str, float]], monitor: str) -> dict[str, float]:
    """The best of a candidate's epochs by the run's one ranking (``classes.rank_key``)."""
    return max(epochs, key=lambda row: classes.rank_key(row, monitor))


def choose(rates: list[float], epochs: list[list[dict[str, float]]], monitor: str, centre: float) -> LrChoice:
    """The rate whose best epoch ranks first; of exact ties the one nearest ``centre`` (the recipe's rate; then the
    lower), so a validation set too small to tell rates apart leaves the run at the recipe's."""
    if not rates or len(rates) != len(epochs) or not all(epochs):
        raise ValueError("every candidate rate needs at least one validated epoch")

    def key(index: int) -> tuple[tuple[float, float, float], float]:
        return classes.rank_key(best_epoch(epochs[index], monitor), monitor), -abs(math.log(rates[index] / centre))

    winner = max(range(len(rates)), key=key)
    return LrChoice(list(rates), epochs, rates[winner], monitor)

"""Class balance: loss weights from the training counts, per-class validation metrics, and the monitored metric.

Pure Python on counts, so the arithmetic is the same on one worker or eight: each worker counts
its validation shard (images per true class, per predicted class, and correct per class), the
counts are summed across workers, and only then turned into rates. Averaging per-worker rates
instead would weigh unequal validation shards wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The metric that picks the best checkpoint (and ranks a sweep's trials), and which way it improves.
MONITORS = {"val_acc": "max", "val_loss": "min", "macro_f1": "max"}


def balanced_weights(counts: Sequence[int]) -> list[float]:
    """Inverse-frequency loss weights ``n / (classes x n_c)`` (scikit-learn's "balanced").

    Every class then carries the same total weight, and the mean weight over the training samples
    is 1, so the loss keeps its usual scale and the recipe's learning rates still apply.
    """
    if not counts or min(counts) <= 0:
        raise ValueError(f"every class needs training images to be weighted; got counts {list(counts)}")
    total = sum(counts)
    return [total / (len(counts) * count) for count in counts]


def class_metrics(support: Sequence[float], predicted: Sequence[float], correct: Sequence[float]) -> dict[str, Any]:
    """Per-class recall, precision and F1, and their macro F1, from counts summed over the validation set.

    ``support[c]``: validation images of class c; ``predicted[c]``: images predicted as c; ``correct[c]``:
    images of class c predicted as c. A class without validation images has no recall (None); the macro F1
    averages the classes that have images, as `tl-ray evaluate` does (0.0 when none has).
    """
    recall: list[float | None] = []
    precision: list[float] = []
    f1: list[float] = []
    for actual, guessed, hits in zip(support, predicted, correct, strict=True):
        class_recall = hits / actual if actual else None
        class_precision = hits / guessed if guessed else 0.0
        both = (class_recall or 0.0) + class_precision
        recall.append(class_recall)
        precision.append(class_precision)
        f1.append(2 * (class_recall or 0.0) * class_precision / both if both else 0.0)
    present = [score for score, actual in zip(f1, support, strict=True) if actual]
    return {
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "macro_f1": sum(present) / len(present) if present else 0.0,
    }


def signed(value: float, monitor: str) -> float:
    """``value`` of the monitored metric, signed so that larger is better (val_loss negated); NaN: -inf."""
    if value is None or math.isnan(value):
        return -math.inf
    return value if MONITORS[monitor] == "max" else -value


def score(metrics: Mapping[str, Any], monitor: str) -> float:
    """An epoch's metrics scored by ``monitor``, larger is better; -inf when the metric is missing."""
    return signed(metrics.get(monitor, math.nan), monitor)


def best_value(values: Iterable[float], monitor: str) -> float:
    """The best of ``values`` for ``monitor`` (the highest accuracy or F1, the lowest loss)."""
    return max(values, key=lambda value: signed(value, monitor))


def rank_key(metrics: Mapping[str, Any], monitor: str) -> tuple[float, float, float]:
    """The one order of epochs (and of sweep trials): by ``monitor``, ties by val_acc, then the lower val_loss.

    Small validation sets tie often (150 images: every 0.007), so the monitor alone would leave the
    best checkpoint to list order. The run's best checkpoint, the console's star, what
    ``--keep-checkpoints`` keeps and a sweep's ranking all use this key.
    """
    return score(metrics, monitor), _finite(metrics.get("val_acc")), -_finite(metrics.get("val_loss"), math.inf)


def rank_score(metrics: Mapping[str, Any], monitor: str) -> float:
    """``rank_key`` as one float, for Ray's ``CheckpointConfig``, which keeps checkpoints by a single attribute.

    The monitored value leads; val_acc and val_loss enter as tie-breaks scaled far below the
    smallest step the monitor takes on any validation set, so exact ties on the monitor order as
    ``rank_key`` does and pruning never deletes the better of two tied epochs.
    """
    primary = score(metrics, monitor)
    if math.isinf(primary):
        return -1e300
    accuracy = _finite(metrics.get("val_acc"))
    loss = _finite(metrics.get("val_loss"), math.inf)
    closeness = 1.0 / (1.0 + loss) if math.isfinite(loss) and loss >= 0 else 0.0  # in (0, 1], higher is better
    if monitor == "val_acc":
        return primary + 1e-9 * closeness
    if monitor == "val_loss":
        return primary + 1e-9 * accuracy
    return primary + 1e-7 * accuracy + 1e-12 * closeness


def best_epoch(rows: Iterable[Mapping[str, Any]], monitor: str) -> int:
    """The epoch of the best of ``rows`` (epoch metrics) by ``rank_key``; the first of exact ties."""
    best: Mapping[str, Any] | None = None
    for row in rows:
        if best is None or rank_key(row, monitor) > rank_key(best, monitor):
            best = row
    if best is None:
        raise ValueError("no epochs to choose from")
    return int(best["epoch"])


def _finite(value: Any, missing: float = -math.inf) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return float(value)

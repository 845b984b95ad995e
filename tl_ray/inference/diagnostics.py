"""What went wrong in an evaluation, as numbers: per-class precision and recall, each image's loss, the worst
images, the most-confused pairs of classes, and calibration (is a 0.9 prediction right 9 times in 10?).

Pure functions of evaluate's rows (predict's columns plus ``true``) and its confusion matrix: no Ray, no figures.

An image's loss is the cross-entropy of its true class, ``-log p(true)``. The rows carry the probabilities of
their ``top_k`` classes (``classify``); evaluate asks for ``SCORED_CLASSES`` of them, so with at most that many
classes every loss is exact. Beyond it an image whose true class is not among its top ones has a loss known only
from below: ``p(true)`` is at most the smallest listed probability and at most what the listed ones leave of 1;
such losses are marked inexact (``Losses.exact``), and they are the largest anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SCORED_CLASSES = 20  # the top classes evaluate asks classify for: exact losses up to this many classes
CALIBRATION_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) and torchmetrics measure ECE
MOST_CONFUSED = 20  # pairs kept in metrics.json
SMALLEST_PROBABILITY = 1e-12  # a probability of 0 (float32 softmax underflow) costs a finite loss


def per_class(confusion: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows true, columns predicted, in
    the same class order); a class never predicted has precision 0, one without images recall 0."""
    matrix = confusion.to_numpy()
    correct, predicted, actual = np.diag(matrix), matrix.sum(axis=0), matrix.sum(axis=1)
    result = {}
    for index, name in enumerate(confusion.index):
        precision = correct[index] / predicted[index] if predicted[index] else 0.0
        recall = correct[index] / actual[index] if actual[index] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
        result[name]["support"] = int(actual[index])
    return result


@dataclass(frozen=True)
class Losses:
    true_probability: np.ndarray  # p(true class) of each row (an upper bound where not exact)
    loss: np.ndarray  # -log p(true class) (a lower bound where not exact)
    exact: np.ndarray  # bool: the true class was among the row's listed classes


def losses(rows: pd.DataFrame) -> Losses:
    """Each row's probability of its ``true`` class and its cross-entropy loss, from the ``topK_class`` /
    ``topK_prob`` columns classify wrote."""
    ranks = sorted(int(column[3:].split("_")[0]) for column in rows.columns if column.endswith("_class"))
    classes = np.stack([rows[f"top{k}_class"].to_numpy(dtype=object) for k in ranks], axis=1)
    probabilities = np.stack([rows[f"top{k}_prob"].to_numpy(dtype=float) for k in ranks], axis=1)
    hit = classes == rows["true"].to_numpy(dtype=object)[:, None]
    exact = hit.any(axis=1)
    listed = np.where(hit, probabilities, 0.0).sum(axis=1)
    # Not listed: p(true) <= the smallest listed probability, and <= the mass the listed ones leave.
    bound = np.minimum(probabilities[:, -1], np.clip(1.0 - probabilities.sum(axis=1), 0.0, 1.0))
    true_probability = np.where(exact, listed, bound)
    loss = -np.log(np.maximum(true_probability, SMALLEST_PROBABILITY))
    return Losses(true_probability, loss, exact)


def top_losses(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` rows with the largest ``loss``, largest first; ties by path, so the order is reproducible."""
    if n <= 0 or rows.empty:
        return rows.iloc[:0]
    order = rows.sort_values(["loss", "path"], ascending=[False, True], kind="stable")
    return order.head(n).reset_index(drop=True)


def most_confused(confusion: pd.DataFrame, limit: int = MOST_CONFUSED) -> list[dict[str, str | int]]:
    """The off-diagonal cells of a confusion matrix with any image, largest first (fastai's ``most_confused``):
    ``{"true", "predicted", "count"}``; ties in the matrix's class order."""
    matrix = confusion.to_numpy()
    pairs = [
        (int(matrix[i, j]), i, j)
        for i in range(matrix.shape[0])
        for j in range(matrix.shape[1])
        if i != j and matrix[i, j] > 0
    ]
    pairs.sort(key=lambda pair: (-pair[0], pair[1], pair[2]))
    return [
        {"true": str(confusion.index[i]), "predicted": str(confusion.columns[j]), "count": count}
        for count, i, j in pairs[:limit]
    ]


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error over equal-width bins of the top-1 probability: the mean gap between how sure
    the model was and how often it was right, each bin weighted by its share of the images."""

    ece: float
    edges: np.ndarray  # bins + 1 edges from 0 to 1
    counts: np.ndarray  # images per bin
    accuracy: np.ndarray  # share right per bin (nan where empty)
    confidence: np.ndarray  # mean top-1 probability per bin (nan where empty)

    def to_json(self) -> dict:
        bins = [
            {
                "lower": float(self.edges[index]),
                "upper": float(self.edges[index + 1]),
                "images": int(count),
                "accuracy": float(self.accuracy[index]),
                "confidence": float(self.confidence[index]),
            }
            for index, count in enumerate(self.counts)
            if count
        ]
        return {"ece": self.ece, "bins": len(self.counts), "nonempty_bins": bins}


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> Calibration:
    """ECE of top-1 probabilities ``confidence`` against ``correct`` (bool). The bins are scikit-learn's
    ``calibration_curve`` bins: a value on an inner edge falls in the bin below it."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], confidence)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct.astype(float), minlength=bins) / counts
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
    total = counts.sum()
    gaps = np.where(counts > 0, np.abs(accuracy - mean_confidence), 0.0)
    ece = float((counts * gaps).sum() / total) if total else 0.0  # no image scored: as accuracy, 0
    return Calibration(ece, edges, counts, accuracy, mean_confidence)

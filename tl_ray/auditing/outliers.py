"""Outliers: images far from every class, in the pooled features' space.

Each class's centre is the mean of its items' L2-normalised features (an item's class: its label, else the
checkpoint's prediction, so an unlabelled dataset has outliers too); an item's distance is one minus its cosine
similarity to the nearest centre. An outlier's distance is more than ``z`` robust deviations above the median
(the modified z-score of Iglewicz and Hoaglin: 0.6745 (d - median) / MAD; 3.5 is their cut): robust, so the
outliers themselves do not widen the yardstick they are measured by.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tl_ray.auditing.duplicates import normalised

COLUMNS = ["item", "split", "label", "nearest", "distance", "z"]


def distances(features: np.ndarray, classes: np.ndarray, count: int, device: torch.device) -> tuple[np.ndarray, ...]:
    """(distance to the nearest class centre, that class's index) of each item."""
    x = normalised(features, device)
    index = torch.tensor(classes, dtype=torch.int64, device=device)
    sums = torch.zeros(count, x.shape[1], device=device).index_add_(0, index, x)
    centres = torch.nn.functional.normalize(sums, dim=1)
    present = torch.bincount(index, minlength=count) > 0
    similarity = (x @ centres.T).masked_fill(~present, -2.0)
    best, nearest = similarity.max(dim=1)
    return (1.0 - best).cpu().numpy(), nearest.cpu().numpy()


def robust_z(values: np.ndarray) -> np.ndarray:
    median = np.median(values) if len(values) else 0.0
    deviation = np.median(np.abs(values - median)) if len(values) else 0.0
    return 0.6745 * (values - median) / max(float(deviation), 1e-12)


def find(
    paths: np.ndarray,
    splits: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    features: np.ndarray,
    class_names: list[str],
    z: float,
    device: torch.device,
) -> pd.DataFrame:
    """outliers.csv's rows, farthest first: item, split, label ("" without one), nearest class, distance, z."""
    if not len(paths):
        return pd.DataFrame({column: [] for column in COLUMNS})
    classes = np.where(labels >= 0, labels, predicted)
    distance, nearest = distances(features, classes, len(class_names), device)
    scores = robust_z(distance)
    chosen = np.flatnonzero(scores >= z)
    chosen = chosen[np.argsort(-scores[chosen], kind="stable")]
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame(
        {
            "item": paths[chosen],
            "split": splits[chosen],
            "label": np.where(labels[chosen] >= 0, names[labels[chosen].clip(min=0)], ""),
            "nearest": names[nearest[chosen]],
            "distance": np.round(distance[chosen].astype(np.float64), 6),
            "z": np.round(scores[chosen].astype(np.float64), 3),
        },
        columns=COLUMNS,
    )

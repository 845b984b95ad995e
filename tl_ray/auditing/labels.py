"""Label suspects: items whose given label their features argue against.

Each labelled item's class probabilities come from a linear head that never saw it (k folds, stratified by class:
a multinomial logistic regression on the standardised pooled features, fitted by L-BFGS in torch, on the GPU when
the driver has one), so a mislabelled image cannot vouch for its own label. Confident learning (cleanlab's
``find_label_issues``: the field's library for it) picks the items whose label is unlikely given those
probabilities, ranked by self-confidence (the probability of the given label, cleanlab's
``get_label_quality_scores``: lower is more suspect).

The flagged items are the union of two of cleanlab's filters: its default (``prune_by_noise_rate``: the most suspect
items of each pair of classes, as many as the pair's estimated noise) and ``low_self_confidence`` (the items of
lowest self-confidence, as many as cleanlab estimates the label issues to number). The default alone fits noise
concentrated in a few pairs of classes (a user's two breeds confused); spread over many pairs (half an item a pair
on 15 letters) it left 10-16% of the planted labels unflagged though the heads gave most of them under 0.03. The
union found 88% and 89% where the default found 80% and 76% (BENCHMARKS.md, "Label suspects: two filters"); alone,
``low_self_confidence`` lost concentrated noise (0.64 where the default found 0.93).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

L2 = 1e-3  # the heads' weight penalty on standardised features: a mild prior, as scikit-learn's C=1 is per item
STEPS = 50  # L-BFGS iterations a fold: the loss is convex, and each fold starts from the last one's solution


def fold_of(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each item's fold, dealt round-robin within each class after a seeded shuffle: every fold holds a share of
    every class, and a class of fewer items than folds still has each item out-of-sample of a head that saw the
    rest."""
    generator = np.random.default_rng(seed)
    assigned = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = generator.permutation(np.flatnonzero(labels == label))
        assigned[members] = np.arange(len(members)) % folds
    return assigned


def _fit_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, start: list[torch.Tensor]
) -> torch.Tensor:
    """The held-out items' probabilities from a head fitted on the others; ``start`` (weight, bias) is the previous
    fold's solution, which four fifths of the same items make a close start, and is updated in place."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight, bias = (tensor.detach().clone().requires_grad_(True) for tensor in start)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=STEPS, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + L2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    start[:] = [weight.detach(), bias.detach()]
    with torch.no_grad():
        return torch.softmax(test_x @ weight + bias, dim=1)


def out_of_sample_probabilities(
    features: np.ndarray, labels: np.ndarray, classes: int, folds: int, seed: int, device: torch.device
) -> np.ndarray:
    """(N, classes) probabilities, each row from the head of the fold that left that item out."""
    folds = min(folds, int(np.bincount(labels, minlength=classes).max()))
    assigned = fold_of(labels, folds, seed)
    x = torch.tensor(features, dtype=torch.float32, device=device)
    y = torch.tensor(labels, dtype=torch.int64, device=device)
    probabilities = np.zeros((len(labels), classes), dtype=np.float32)
    start = [torch.zeros(x.shape[1], classes, device=device), torch.zeros(classes, device=device)]
    for fold in range(folds):
        held = torch.tensor(assigned == fold, device=device)
        if not held.any():
            continue
        predicted = _fit_predict(x[~held], y[~held], x[held], start)
        probabilities[(assigned == fold)] = predicted.cpu().numpy()
    return probabilities


def suspects(paths: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """The items either filter flags as label issues, most suspect first: item, given label, suggested label (the
    out-of-sample prediction), score (the given label's probability; lower is more suspect)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    columns = ["item", "given", "suggested", "score"]
    present = np.bincount(labels, minlength=len(class_names)) > 0
    if len(labels) == 0 or present.sum() < 2:
        return pd.DataFrame({column: [] for column in columns})
    # cleanlab wants every column a class with items: those without any are left out, and the rows renormalised.
    kept = np.flatnonzero(present)
    compact = np.searchsorted(kept, labels)
    probs = probabilities[:, kept] / probabilities[:, kept].sum(1, keepdims=True).clip(min=1e-12)
    scores = get_label_quality_scores(compact, probs)
    flagged = find_label_issues(compact, probs, n_jobs=1) | find_label_issues(
        compact, probs, filter_by="low_self_confidence", n_jobs=1
    )
    ranked = np.flatnonzero(flagged)
    ranked = ranked[np.argsort(scores[ranked], kind="stable")]
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame(
        {
            "item": paths[ranked],
            "given": names[labels[ranked]],
            "suggested": names[kept[probs[ranked].argmax(1)]],
            "score": np.round(scores[ranked].astype(np.float64), 6),
        },
        columns=columns,
    )

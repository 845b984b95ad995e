"""What went wrong in an evaluation, as numbers (tl_ray.inference.diagnostics): losses from classify's top-k
columns, the worst images, the most-confused pairs, calibration, per-class rates; and evaluate's scoring of rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tl_ray.inference import diagnostics
from tl_ray.inference.evaluate import TOP_LOSS_COLUMNS, score


def rows(*specs) -> pd.DataFrame:
    """classify's rows with a true class: each spec (path, true, [(class, probability), ...] best first)."""
    frame = []
    for path, true, ranked in specs:
        row = {"path": path, "true": true, "error": ""}
        row["predicted"], row["probability"] = ranked[0]
        for k, (name, probability) in enumerate(ranked, start=1):
            row[f"top{k}_class"], row[f"top{k}_prob"] = name, probability
        frame.append(row)
    return pd.DataFrame(frame)


def test_ece_of_a_hand_computed_case():
    # 5 bins. Bin [0.2, 0.4): 0.3, 0.3 right, wrong -> |0.5 - 0.3| = 0.2, 2 of 6 images.
    # Bin [0.6, 0.8): 0.7 right -> |1 - 0.7| = 0.3, 1 of 6. Bin [0.8, 1]: 0.9, 0.9, 1.0 right, right, wrong ->
    # accuracy 2/3, confidence 2.8/3: |0.6667 - 0.9333| = 0.2667, 3 of 6.
    # ECE = (2 * 0.2 + 1 * 0.3 + 3 * 0.26667) / 6 = 1.5 / 6 = 0.25
    found = diagnostics.calibration(
        np.array([0.3, 0.3, 0.7, 0.9, 0.9, 1.0]), np.array([True, False, True, True, True, False]), bins=5
    )
    assert found.ece == pytest.approx(0.25)
    assert found.counts.tolist() == [0, 2, 0, 1, 3]
    assert found.accuracy[4] == pytest.approx(2 / 3) and found.confidence[4] == pytest.approx(2.8 / 3)
    bins = found.to_json()["nonempty_bins"]
    assert [(b["lower"], b["images"]) for b in bins] == [(pytest.approx(0.2), 2), (pytest.approx(0.6), 1), (0.8, 3)]


def test_a_calibrated_model_has_no_gap_and_an_overconfident_one_its_gap():
    assert diagnostics.calibration(np.array([0.5, 0.5]), np.array([True, False])).ece == pytest.approx(0.0)
    assert diagnostics.calibration(np.full(10, 0.95), np.zeros(10, bool)).ece == pytest.approx(0.95)
    assert diagnostics.calibration(np.array([]), np.array([], bool)).ece == 0.0


@pytest.mark.slow  # sklearn.calibration takes seconds to import (it imports most of scikit-learn)
def test_calibration_bins_agree_with_scikit_learn():
    from sklearn.calibration import calibration_curve

    generator = np.random.default_rng(3)
    confidence = generator.uniform(0.2, 1.0, 400)
    confidence[:5] = [0.2, 0.4, 0.6, 1.0, 0.8]  # values on the edges
    correct = generator.uniform(size=400) < confidence**2
    found = diagnostics.calibration(confidence, correct, bins=10)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=10, strategy="uniform")
    filled = found.counts > 0
    assert found.accuracy[filled] == pytest.approx(accuracy)
    assert found.confidence[filled] == pytest.approx(mean_confidence)


def test_most_confused_pairs_from_a_confusion_matrix():
    names = ["cat", "dog", "fox"]
    confusion = pd.DataFrame([[5, 3, 0], [1, 7, 3], [4, 0, 2]], index=names, columns=names)
    assert diagnostics.most_confused(confusion) == [
        {"true": "fox", "predicted": "cat", "count": 4},
        {"true": "cat", "predicted": "dog", "count": 3},  # ties in the matrix's order: row, then column
        {"true": "dog", "predicted": "fox", "count": 3},
        {"true": "dog", "predicted": "cat", "count": 1},
    ]
    assert diagnostics.most_confused(confusion, limit=1) == [{"true": "fox", "predicted": "cat", "count": 4}]
    assert diagnostics.most_confused(pd.DataFrame(np.eye(2, dtype=int), index=names[:2], columns=names[:2])) == []


def test_the_loss_is_the_true_class_probabilitys_and_a_bound_when_it_is_not_listed():
    found = diagnostics.losses(
        rows(
            ("a", "cat", [("cat", 0.7), ("dog", 0.2)]),
            ("b", "dog", [("cat", 0.7), ("dog", 0.2)]),
            ("c", "fox", [("cat", 0.7), ("dog", 0.25)]),  # not listed: p(fox) <= min(0.25, 1 - 0.95) = 0.05
            ("d", "cat", [("cat", 0.0), ("dog", 0.0)]),  # underflow: a finite loss
        )
    )
    assert found.true_probability.tolist() == pytest.approx([0.7, 0.2, 0.05, 0.0])
    assert found.loss[:3] == pytest.approx([-math.log(0.7), -math.log(0.2), -math.log(0.05)])
    assert np.isfinite(found.loss[3])
    assert found.exact.tolist() == [True, True, False, True]


def test_top_losses_are_the_largest_first_ties_by_path():
    frame = pd.DataFrame({"path": ["d", "a", "c", "b", "e"], "loss": [0.1, 2.0, 3.5, 2.0, 0.7]})
    assert diagnostics.top_losses(frame, 3)["path"].tolist() == ["c", "a", "b"]
    assert diagnostics.top_losses(frame, 10)["path"].tolist() == ["c", "a", "b", "e", "d"]
    assert diagnostics.top_losses(frame, 0).empty


def test_per_class_rates_agree_with_scikit_learn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    names = ["a", "b", "c", "d"]
    generator = np.random.default_rng(0)
    truth = generator.choice(3, 60)  # class d has no image, and is never predicted
    predicted = np.where(generator.uniform(size=60) < 0.6, truth, generator.choice(3, 60))
    matrix = confusion_matrix(truth, predicted, labels=range(4))
    found = diagnostics.per_class(pd.DataFrame(matrix, index=names, columns=names))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=range(4), zero_division=0)
    for index, name in enumerate(names):
        assert found[name]["precision"] == pytest.approx(precision[index])
        assert found[name]["recall"] == pytest.approx(recall[index])
        assert found[name]["f1"] == pytest.approx(f1[index])
        assert found[name]["support"] == support[index]


def test_evaluate_scores_rows_into_metrics_pairs_losses_and_calibration():
    frame = rows(
        ("p1", "cat", [("cat", 0.9), ("dog", 0.1)]),
        ("p2", "cat", [("dog", 0.6), ("cat", 0.4)]),
        ("p3", "dog", [("cat", 0.8), ("dog", 0.2)]),
        ("p4", "dog", [("dog", 0.7), ("cat", 0.3)]),
    )
    broken = {"path": "p5", "true": "dog", "error": "cannot identify image file", "predicted": ""}
    frame = pd.concat([frame, pd.DataFrame([broken])], ignore_index=True)
    scores = score(frame, ["cat", "dog"], 2, "/ck")
    metrics = scores.metrics
    assert metrics["accuracy"] == 0.5 and metrics["images"] == 4
    assert metrics["undecodable"] == [{"path": "p5", "error": "cannot identify image file"}]
    assert metrics["most_confused"] == [
        {"true": "cat", "predicted": "dog", "count": 1},
        {"true": "dog", "predicted": "cat", "count": 1},
    ]
    assert [row["path"] for row in metrics["top_losses"]] == ["p3", "p2"]  # -log 0.2, then -log 0.4
    assert metrics["top_losses"][0]["loss"] == pytest.approx(-math.log(0.2))
    assert metrics["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.2, 0.7]))) and metrics["loss_exact"]
    expected_ece = (abs(1 - 0.9) + abs(0 - 0.6) + abs(0 - 0.8) + abs(1 - 0.7)) / 4  # each image its own bin
    assert metrics["calibration"]["ece"] == pytest.approx(expected_ece)
    assert scores.misclassified.columns.tolist() == TOP_LOSS_COLUMNS
    assert scores.misclassified["path"].tolist() == ["p2", "p3"]

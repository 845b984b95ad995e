"""The training worker's pieces that need no Ray: validation counts that sum across unequal shards
(tl_ray.training.metrics), and the checks a resumed run must pass (tl_ray.training.state)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from tl_ray import classes
from tl_ray.errors import TlRayError
from tl_ray.training.config import TrainConfig
from tl_ray.training.metrics import count_classes, evaluate, split_counts
from tl_ray.training.state import check_resumable, strategy_meta

LABELS = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]


PREDICTIONS = [0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 2]


def test_unequal_validation_shards_sum_to_the_whole_sets_metrics():
    """Two workers with 9 and 3 images: their summed counts give the whole set's metrics, which averaging the
    workers' own rates would not."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    inputs = torch.randn(len(LABELS), 4)
    labels = torch.tensor(LABELS)

    def evaluate_rows(rows: slice) -> tuple[float, float, float, list[float]]:
        batches = [{"x": inputs[rows][i : i + 2], "label": labels[rows][i : i + 2]} for i in range(0, 12, 2)]
        batches = [batch for batch in batches if len(batch["label"])]
        loss = nn.CrossEntropyLoss()
        return evaluate(net, batches, lambda b: b["x"], loss, torch.device("cpu"), None, 3)

    whole = evaluate_rows(slice(0, 12))
    shards = [evaluate_rows(slice(0, 9)), evaluate_rows(slice(9, 12))]
    summed = [sum(values) for values in zip(*[[*s[:3], *s[3]] for s in shards], strict=True)]
    assert summed == pytest.approx([*whole[:3], *whole[3]])
    assert summed[2] == 12
    predictions = net(inputs).argmax(1)
    expected = count_classes(labels, predictions, 3).tolist()
    assert whole[3] == expected
    merged = classes.class_metrics(*split_counts(summed[3:], 3))
    assert merged == classes.class_metrics(expected[:3], expected[3:6], expected[6:])
    per_worker = [classes.class_metrics(*split_counts(s[3], 3))["macro_f1"] for s in shards]
    assert merged["macro_f1"] != pytest.approx(sum(per_worker) / 2)


def _meta(**strategy_changes) -> dict:
    config = TrainConfig(data="/d", name="run").validate()
    return {
        "arch": config.arch,
        "freeze_depth": config.freeze_depth,
        "class_names": ["a", "b"],
        "strategy": {**strategy_meta(config), **strategy_changes},
        "monitor": "val_acc",
    }


def test_a_run_resumes_only_with_the_same_class_weights_and_monitor():
    config = TrainConfig(data="/d", name="run").validate()
    check_resumable(_meta(), config, ["a", "b"], None)
    old = _meta()  # a checkpoint from before class weights and --monitor
    del old["strategy"]["class_weights"], old["monitor"]
    check_resumable(old, config, ["a", "b"], None)
    with pytest.raises(TlRayError, match=r"run run was started with strategy=.*'class_weights': None"):
        check_resumable(_meta(), config, ["a", "b"], {"a": 0.75, "b": 1.5})
    weighted = _meta(class_weights={"a": 0.75, "b": 1.5})
    with pytest.raises(TlRayError, match=re.escape("class_weights': {'a': 0.75, 'b': 1.5}")):
        check_resumable(weighted, config, ["a", "b"], {"a": 0.6, "b": 3.0})
    with pytest.raises(TlRayError, match="started with monitor='val_acc', now 'macro_f1'"):
        check_resumable(_meta(), TrainConfig(data="/d", name="run", monitor="macro_f1").validate(), ["a", "b"], None)

"""Feature extraction on cached backbone features (--freeze-depth 5 --augment none) is the same model, faster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_tensors
from PIL import Image

import tl_ray
from tl_ray import cache, data, features, model
from tl_ray.checkpoint import read_model_state

pytestmark = pytest.mark.timeout(600)
SIZE = 32


def _dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for index in range(24):
        path = root / "train" / ("abc"[index % 3]) / f"{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(path)
    return root


def test_cached_features_are_the_backbone_outputs_and_follow_the_weights(tmp_path, ray_cluster):
    layout = data.discover(str(_dataset(tmp_path / "data")))
    split = cache.prepare(layout.train, layout, SIZE, str(tmp_path / "cache"))
    weights = model.initial_weights("resnet18", "none", ["a", "b", "c"], seed=1)
    built = features.prepare(split, SIZE, "resnet18", 3, weights, use_gpu=False)
    assert built.built and built.rows == len(layout.train)
    rows = features.feature_dataset(built, training=True).take_all()
    got = np.stack([row["features"] for row in rows])

    net = model.create_resnet("resnet18", 3)
    net.load_state_dict(weights.state_dict)
    backbone = model.TransferResNet(net, 5).eval()
    transform = data.eval_transform(SIZE)
    images = torch.stack(
        [transform(data.load_rgb(Path(p).read_bytes(), data.resize_size(SIZE))) for p, _ in layout.train]
    )
    with torch.no_grad():
        expected = backbone.features(data.normalize(images, torch.tensor(weights.mean), torch.tensor(weights.std)))
    # Same multiset of vectors (the cache keeps its own order): each cached vector is one image's output.
    distances = torch.cdist(torch.as_tensor(got), expected)
    assert got.shape == tuple(expected.shape) and distances.min(1).values.max() < 1e-4
    assert sorted(row["label"] for row in rows) == sorted(label for _, label in layout.train)

    assert not features.prepare(split, SIZE, "resnet18", 3, weights, use_gpu=False).built
    other = model.initial_weights("resnet18", "none", ["a", "b", "c"], seed=2)  # another backbone: other features
    assert features.prepare(split, SIZE, "resnet18", 3, other, use_gpu=False).built


def test_head_trained_on_cached_features_is_the_feature_extraction_model(
    sample_root, source_model, tmp_path, checkpoint_accuracy, ray_cluster
):
    target = sample_root / "target"
    result = tl_ray.train(
        data=str(target),
        arch="resnet18",
        weights=source_model,
        freeze_depth=5,
        augment="none",
        image_size=48,  # the source model's
        epochs=12,  # the sample target has 20 training images a class: cached-feature epochs are cheap
        lr=0.03,
        batch_size=16,
        num_workers=1,
        storage=str(tmp_path / "runs"),
        name="head",
    )
    # One CPU worker on a 2-CPU node uses both cores (the cached features leave the pipeline almost nothing to do).
    assert (result.metrics["workers"], result.metrics["torch_threads"]) == (1, 2)
    assert list((tmp_path / "runs" / ".tl-ray-cache").glob("*/features-resnet18-48-*/manifest.json"))
    # Trained on features, checked on images: the checkpoint alone reproduces the run's validation accuracy.
    layout = data.discover(str(target))
    assert checkpoint_accuracy(result.best_checkpoint, layout.val) == pytest.approx(result.metrics["val_acc"], abs=0.02)
    assert result.metrics["val_acc"] > 0.45, "3 classes: chance is 0.33"
    # Feature extraction: the backbone (weights and BatchNorm statistics) is the source model's, unchanged.
    trained, source = read_model_state(result.best_checkpoint), read_model_state(source_model)
    assert_same_tensors(
        {k: v for k, v in trained.items() if not k.startswith("fc.")},
        {k: v for k, v in source.items() if not k.startswith("fc.")},
    )

"""The three new backbones end to end through Ray: a head on cached features, full fine-tuning on images, and a
transfer from a tl-ray checkpoint with other classes and another image size, then predict."""

from __future__ import annotations

import pytest
import torch
from helpers import checkpoint_meta, initial_state

from tl_ray import checkpoint

SIZE = 32


def _images(root, class_names: str, per_class: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in class_names:
        for index in range(per_class):
            path = root / "train" / name / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return root


# Extended: 145 s of Ray Train start-ups for three archs whose models, checkpoints and exports the unit tests cover;
# make test ran 30 min 12 s with it on 2026-12-03.
@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(600)
def test_new_archs_train_through_ray_on_features_on_images_and_from_a_checkpoint_then_predict(tmp_path, ray_cluster):
    """One run each, on the three paths: a head on cached features (convnext_tiny, depth 5), full fine-tuning
    on images (efficientnet_b0, depth 0, BatchNorm training), and a transfer from a tl-ray checkpoint with other
    classes and another image size (vit_b_16, depth 3, discriminative); predict on the last."""
    import tl_ray

    three = _images(tmp_path / "three", "abc", 5)
    two = _images(tmp_path / "two", "xy", 5)
    # A rate given: --lr select (the default on a set this small) would train each run six times.
    common = {"image_size": SIZE, "epochs": 1, "batch_size": 4, "num_workers": 1, "storage": str(tmp_path / "runs")}
    common["lr"] = 1e-3

    head = tl_ray.train(data=str(three), arch="convnext_tiny", weights="none", freeze_depth=5, augment="none", **common)
    assert list((tmp_path / "runs" / ".tl-ray-cache").glob(f"*/features-convnext_tiny-{SIZE}-*/manifest.json"))
    assert checkpoint.read_meta(head.best_checkpoint)["arch"] == "convnext_tiny"

    scratch = tl_ray.train(data=str(three), arch="efficientnet_b0", weights="none", freeze_depth=0, **common)
    before, after = initial_state("efficientnet_b0"), checkpoint.read_model_state(scratch.best_checkpoint)
    assert after["features.0.1.num_batches_tracked"] > 0  # the stem's BatchNorm trained
    assert after["classifier.1.weight"].shape == (3, 1280) and before.keys() == after.keys()

    source = checkpoint_meta(
        "vit_b_16", 5, size=48
    )  # another class count and image size: its position embeddings adapt
    checkpoint.save_checkpoint(tmp_path / "vit", initial_state("vit_b_16", 5, 48), source)
    tuned = tl_ray.train(
        data=str(two),
        arch="vit_b_16",
        weights=str(tmp_path / "vit"),
        freeze_depth=3,
        strategy="discriminative",
        **common,
    )
    state, start = checkpoint.read_model_state(tuned.best_checkpoint), initial_state("vit_b_16", 5, 48)
    assert state["heads.head.weight"].shape == (2, 768) and state["encoder.pos_embedding"].shape == (1, 5, 768)
    assert torch.equal(state["conv_proj.weight"], start["conv_proj.weight"])  # frozen at depth 3
    assert not torch.equal(state["encoder.ln.weight"], start["encoder.ln.weight"])  # the last stage learned
    rows = tl_ray.predict(tuned.best_checkpoint, str(two / "train"))
    assert len(rows) == 10 and set(rows["predicted"]) <= {"x", "y"} and not rows["error"].any()

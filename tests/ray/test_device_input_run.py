"""The GPU runs' input path (issue 43), run on this CPU: the image cache's stored bytes streamed undecoded by Ray Data,
decoded and cropped on the worker's device a batch at a time. Validation's crops are the very pixels the streamed
PIL path delivers; training crops are the random crops of every cached image, once an epoch."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from tl_ray.inputs import cache, plan, skiplog, streaming
from tl_ray.inputs.sources import class_folders

pytestmark = pytest.mark.timeout(300)
SIZE = 32


def _dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 18), ("val", 9)):
        for index in range(count):
            height, width = int(rng.integers(40, 70)), int(rng.integers(40, 90))  # sizes differ: padded batches
            path = root / split / ("abc"[index % 3]) / f"{index}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return root


class _Batches(plan.DeviceCropBatches):
    """The worker's batches over whole datasets (one worker): Ray Train hands a worker its shards of the same."""

    datasets: ClassVar[dict] = {}

    def shards(self):
        return self.datasets["train"], self.datasets["val"]


def _rows(images: torch.Tensor) -> list[bytes]:
    return sorted(image.numpy().tobytes() for image in images)


def test_device_crops_deliver_the_streamed_paths_validation_and_random_training_crops(tmp_path, ray_cluster):
    layout = class_folders.discover(str(_dataset(tmp_path / "data")))
    splits = cache.prepare_splits(layout, SIZE, str(tmp_path / "cache"), skiplog.SkipLog())
    assert {name: split.image_format for name, split in splits.items()} == {"train": "jpeg", "val": "raw"}
    assert plan.crops_on_device(splits, use_gpu=True, per_image=False)
    assert not plan.crops_on_device(splits, use_gpu=False, per_image=False)
    assert not plan.crops_on_device(splits, use_gpu=True, per_image=True)  # colour jitter, policies: per image only

    _Batches.datasets = {
        name: streaming.encoded_dataset(split, name == "train", seed=3) for name, split in splits.items()
    }
    inputs = plan.InputPlan(
        on_features=False,
        held=None,
        decoding_every_epoch=False,
        image_size=SIZE,
        crop_scale=(0.35, 1.0),
        color_jitter=0.0,
        seed=3,
        crops_on_device=True,
        cached_formats={name: split.image_format for name, split in splits.items()},
    )
    mean, std = torch.zeros(3), torch.ones(3)
    batches = _Batches(inputs, 4, 0, 1, torch.device("cpu"), mean, std)

    val = list(batches.val())
    streamed = streaming.cached_dataset(splits["val"], SIZE, training=False).take_all()
    assert all(batch["image"].dtype == torch.uint8 for batch in val)
    assert _rows(torch.cat([batch["image"] for batch in val])) == _rows(
        torch.stack([torch.as_tensor(r["image"]) for r in streamed])
    )
    assert sorted(torch.cat([batch["label"] for batch in val]).tolist()) == sorted(label for _, label in layout.val)

    for epoch in (1, 2):
        train = list(batches.train(epoch))
        images = torch.cat([batch["image"] for batch in train])
        assert images.shape == (len(layout.train), 3, SIZE, SIZE) and images.dtype == torch.uint8
        assert max(len(batch["label"]) for batch in train) == 4
        assert sorted(torch.cat([batch["label"] for batch in train]).tolist()) == sorted(
            label for _, label in layout.train
        )
        # Random crops: the two epochs cut differently.
        if epoch == 1:
            first = _rows(images)
    assert _rows(images) != first
    assert batches.model_input(train[0]).dtype == torch.float32

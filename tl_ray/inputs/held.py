"""A CPU run's cached images held in each worker's memory (``HeldImages``): read and decoded once per run, then each
epoch a seeded deal of rows cropped and flipped on the worker (each crop seeded by run seed, epoch and row), so that
no Ray Data execution starts per epoch and a seeded CPU run is repeatable, resumed or not. ``fit_in_memory`` says
when a run's cached splits fit a worker's budget."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow.parquet as pq
import torch
from PIL import Image

from tl_ray.inputs import imaging, pipelines
from tl_ray.inputs.cache import CachedSplit, decode
from tl_ray.seeds import Stream, stream_seed

# A worker's copy of both splits' cached pixels, at most: above it, epochs stream through Ray Data.
IN_MEMORY_BYTES = 1 << 30


def fit_in_memory(splits: dict[str, CachedSplit | None]) -> bool:
    """Whether every split is cached and a worker can hold all of them (long side estimated at 4:3)."""
    if any(split is None for split in splits.values()):
        return False
    return sum(split.rows * split.short_side**2 * 4 for split in splits.values()) <= IN_MEMORY_BYTES


def load_images(split: CachedSplit) -> tuple[list[Image.Image], torch.Tensor]:
    """All of a split's cached images, decoded once (raw: PIL images over the pixel bytes read, not copied again),
    and labels: an epoch then crops pixels, whatever format the cache stores."""
    images, labels = [], []
    for path in split.parquet_files:
        cached = pq.read_table(path, filesystem=split.filesystem).to_pydict()
        for pixels, height, width, label in zip(
            cached["pixels"], cached["height"], cached["width"], cached["label"], strict=True
        ):
            images.append(decode(pixels, height, width, split.image_format))
            labels.append(label)
    return images, torch.tensor(labels, dtype=torch.int64)


def crop_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of one held training image's augmentation in one epoch: the same on any worker count and after a
    resume (the deal's permutation is seeded the same way, ``pipelines.deal_rows``)."""
    return stream_seed(Stream.HELD_CROP, seed, epoch, row)


class HeldImages:
    """A split's cached images in a worker's memory: read once per run, then each epoch a new deal of rows
    (``pipelines.deal_rows``), cropped and flipped here, so an epoch starts no Ray Data execution.

    Validation crops are the same every epoch: each worker computes its own share once.
    """

    def __init__(
        self,
        split: CachedSplit,
        image_size: int,
        training: bool,
        crop_scale: tuple[float, float] | None,
        color_jitter: float = 0.0,
        policies: imaging.Policies = imaging.NO_POLICIES,
    ) -> None:
        self.images, self.labels = load_images(split)
        self.training = training
        self.transform = imaging.augmentation(
            image_size, crop_scale if training else None, color_jitter, split.resize, policies
        )
        self.val_crops: dict[tuple[int, int], torch.Tensor] = {}  # (rank, world): that worker's rows, cropped

    def _crop(self, rows: list[int], seed: int = 0, epoch: int = 0) -> torch.Tensor:
        """The rows' crops; a training row's random draws seeded by (seed, epoch, row) (``crop_seed``)."""
        images = [self.images[row] for row in rows]
        if not self.training:
            return torch.stack([self.transform(image) for image in images])
        return imaging.seeded_crops(self.transform, images, [crop_seed(seed, epoch, row) for row in rows])

    def batches(
        self, batch_size: int, rank: int, world: int, seed: int = 0, epoch: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        rows = pipelines.deal_rows(len(self.labels), rank, world, self.training, seed, epoch)
        if not self.training and (rank, world) not in self.val_crops and len(rows):
            self.val_crops[rank, world] = self._crop(rows.tolist())
        for start in range(0, len(rows), batch_size):
            chosen = rows[start : start + batch_size]
            if self.training:
                images = self._crop(chosen.tolist(), seed, epoch)
            else:
                images = self.val_crops[rank, world][start : start + batch_size]
            yield {"image": images, "label": self.labels[chosen]}

"""The Ray Data pipelines that decode and augment images while training runs, and the deal of rows held in memory:
the two ways rows reach a training worker."""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import RandomSeedConfig

from tl_ray import cluster, recipe
from tl_ray.inputs import reading
from tl_ray.inputs.imaging import NO_POLICIES, Policies, Resize, augmentation, decode_item, describe_error
from tl_ray.inputs.layout import Layout
from tl_ray.seeds import Stream, stream_seed

logger = logging.getLogger(__name__)

BLOCK_ROWS = 32  # files per Ray Data block: small blocks keep epochs well mixed and decode tasks short
# At most this many blocks, however many files: each block is an object and a task, and past a few thousand the
# driver spends longer making and scheduling them than a larger block costs (a million files: 1000 of 1000).
MAX_BLOCKS = 1000


def deal_rows(count: int, rank: int, world: int, training: bool, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    """The rows of a split held in memory that one worker takes in one epoch.

    Training: a new permutation each epoch (the same on every worker, from ``seed`` and
    ``epoch``, so a resumed run sees the orders it would have), dealt in equal shards as Ray
    Data's equal split does (DDP steps in lockstep). Validation: every row once, on one
    worker or another.
    """
    if not training:
        return torch.arange(rank, count, world)
    shard = count // world
    generator = torch.Generator().manual_seed(stream_seed(Stream.DEAL, seed, epoch))
    return torch.randperm(count, generator=generator)[rank * shard : (rank + 1) * shard]


def _decode_batch(
    batch: dict[str, np.ndarray],
    opener: Any,
    image_size: int,
    training: bool,
    crop_scale: tuple[float, float] | None,
    color_jitter: float,
    skipped: ray.actor.ActorHandle,
    resize: Resize,
    retry_seconds: float,
    policies: Policies = NO_POLICIES,
) -> dict[str, np.ndarray]:
    """A block of files decoded for an uncached split; a bad file is skipped and reported. A file its storage did
    not deliver after the retries (``reading.StorageError``) is not a bad file: it fails the task, and so the
    epoch, which Ray Train retries from the last checkpoint (``--max-failures``) and then reports in one line,
    rather than train on what an outage left."""
    transform = augmentation(image_size, crop_scale if training else None, color_jitter, resize, policies)
    images, labels, bad, bad_labels = [], [], [], []
    for path, label in zip(batch["path"], batch["label"], strict=True):
        try:
            images.append(decode_item(opener, path, transform, resize.short_side, retry_seconds))
            labels.append(label)
        except reading.StorageError:
            raise
        except Exception as error:  # every way a file can be bad: skip it, keep the batch
            reason = describe_error(error)
            bad.append((opener.display(path), reason))
            bad_labels.append(int(label))
            logger.warning("skipping %s: %s", opener.display(path), reason)
    if bad:
        ray.get(skipped.add.remote(bad, bad_labels if training else None))
    return {
        "image": np.stack(images) if images else np.zeros((0, 3, image_size, image_size), np.uint8),
        "label": np.asarray(labels, dtype=np.int64),
    }


def file_rows(rows: list[dict]) -> ray.data.Dataset:
    """One row per file, ``BLOCK_ROWS`` files to a block (at most MAX_BLOCKS blocks): what every decode pass reads."""
    return ray.data.from_items(rows, override_num_blocks=row_blocks(len(rows)))


def file_columns(columns: dict[str, list | np.ndarray]) -> ray.data.Dataset:
    """``file_rows`` from columns: a million files go to Ray as Arrow blocks, not a million row dicts."""
    table = pa.table(columns)
    count, size = table.num_rows, rows_per_block(table.num_rows)
    return ray.data.from_arrow([table.slice(start, size) for start in range(0, max(count, 1), size)])


def row_blocks(count: int) -> int:
    """The blocks ``file_rows`` makes of ``count`` files."""
    return max(1, min(MAX_BLOCKS, math.ceil(count / BLOCK_ROWS)))


def rows_per_block(count: int) -> int:
    """The files in each of ``file_rows``' blocks of ``count`` files: BLOCK_ROWS, more above MAX_BLOCKS blocks."""
    return max(1, math.ceil(count / row_blocks(count)))


def image_dataset(
    files: list[tuple[str, int]],
    layout: Layout,
    image_size: int,
    training: bool,
    skipped: ray.actor.ActorHandle,
    color_jitter: float = 0.0,
    seed: int = 0,
    crop_scale: tuple[float, float] | None = recipe.STANDARD_CROP_SCALE,
    resize: Resize | None = None,
    policies: Policies = NO_POLICIES,
) -> ray.data.Dataset:
    """A lazily decoded dataset of {"image": uint8 (3, S, S), "label": int64}.

    Training data (``training=True``) comes in a new order every epoch without an
    all-to-all shuffle (whose 1-CPU tasks would stall on a machine whose training
    workers hold all but a fraction of a CPU): the file list is shuffled once here,
    so every block mixes classes, and the block order is redrawn each epoch. The
    training loop's local shuffle buffer mixes rows across blocks. Skipped files of the
    training dataset are also counted per class. Training images are randomly cropped
    (``crop_scale`` of the area) and flipped, or with ``crop_scale`` None centre-cropped like
    validation images (resized by ``resize``, by default ``Resize.for_crop(image_size)``, first; the random crops
    resize with its interpolation); ``policies``: the training crops' augmentation policy and random erasing.
    """
    rows = [{"path": path, "label": label} for path, label in files]
    if training and not getattr(layout.opener_of(files), "sequential", False):  # Parquet rows: see cache._build
        random.Random(seed).shuffle(rows)
    dataset = file_rows(rows)
    if training:
        dataset = dataset.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return dataset.map_batches(
        _decode_batch,
        batch_size=BLOCK_ROWS,
        # Half a CPU per decode task: a machine whose training workers hold all but one CPU (and a
        # sweep's trial driver a sliver of that) must still fit one, or ingest never starts.
        num_cpus=0.5,
        compute=cluster.task_pool(row_blocks(len(rows))),
        batch_format="numpy",
        fn_kwargs={
            "opener": layout.opener_of(files),
            "image_size": image_size,
            "training": training,
            "crop_scale": crop_scale,
            "color_jitter": color_jitter,
            "skipped": skipped,
            "resize": resize or Resize.for_crop(image_size),
            "retry_seconds": layout.retry_seconds,
            "policies": policies,
        },
    )

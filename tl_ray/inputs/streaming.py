"""A built cache streamed through Ray Data (``streaming_datasets``): what GPU runs, splits above the in-memory
budget, and (decoding every file, without a cache) ``--cache none`` train on. Each cache file is one block, read,
decoded, cropped and flipped by our own Ray Data task, in a new block order every training epoch; where a task only
reads (the device path's undecoded bytes), it reads several files (``files_per_task``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import RandomSeedConfig

from tl_ray import cluster, recipe
from tl_ray.inputs import imaging, pipelines
from tl_ray.inputs.cache import CachedSplit, decode
from tl_ray.inputs.layout import Layout


def _read_and_crop(
    batch: dict[str, np.ndarray],
    filesystem: pafs.FileSystem,
    image_size: int,
    crop_scale: tuple[float, float] | None,
    color_jitter: float,
    resize: imaging.Resize,
    image_format: str = "raw",
    policies: imaging.Policies = imaging.NO_POLICIES,
) -> dict[str, np.ndarray]:
    transform = imaging.augmentation(image_size, crop_scale, color_jitter, resize, policies)
    images, labels = [], []
    for path in batch["file"]:
        cached = pq.read_table(path, filesystem=filesystem).to_pydict()
        for pixels, height, width, label in zip(
            cached["pixels"], cached["height"], cached["width"], cached["label"], strict=True
        ):
            images.append(transform(decode(pixels, height, width, image_format)).numpy())
            labels.append(label)
    return {
        "image": np.stack(images) if images else np.zeros((0, 3, image_size, image_size), np.uint8),
        "label": np.asarray(labels, dtype=np.int64),
    }


# Rows a task reads where reading is all it does (cached bytes for the device, cached features): a Ray task and its
# block cost the host ~27 ms of CPU whatever they hold (scheduling, the object store, the streaming executor), ~0.9
# core-ms an image at a cache file (32 rows) a task; 16 files a task cost 0.31 (bench/ingest.py --host-cost, issue 43).
READ_ROWS_PER_TASK = 512
MIN_READ_TASKS = 4  # a small split still reads in parallel, and an epoch still has blocks to put in a new order


def files_per_task(files: int, rows: int) -> int:
    """How many cache files one reading task takes: about READ_ROWS_PER_TASK rows, at least MIN_READ_TASKS tasks."""
    per_file = max(1, rows // max(1, files))
    return max(1, min(math.ceil(READ_ROWS_PER_TASK / per_file), math.ceil(files / MIN_READ_TASKS)))


def per_file_dataset(
    paths: list[str],
    filesystem: pafs.FileSystem,
    read: Callable[..., dict[str, np.ndarray]],
    training: bool,
    seed: int = 0,
    rows: int | None = None,
    **options: Any,
) -> ray.data.Dataset:
    """Cache files read by ``read(batch, filesystem, **options)`` in our own tasks: one file a task where each row
    is costly (decoded and cropped), or, given the files' total ``rows`` where reading is all a task does, several
    (``files_per_task``); for training, in a new order every epoch (the files are put in a new order before they
    are grouped, so the groups vary too).

    Not Ray Data's Parquet reader: it adds a listing step that claims a whole CPU (which a sweep on a small
    machine does not have free) and merges small files into one block (which leaves an epoch's order nothing
    to vary).
    """
    files = [{"file": path} for path in paths]
    files_at_once = 1 if rows is None else files_per_task(len(files), rows)
    dataset = ray.data.from_items(files, override_num_blocks=max(1, len(files)))
    if training:
        dataset = dataset.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return dataset.map_batches(
        read,
        batch_size=files_at_once,
        num_cpus=0.5,
        compute=cluster.task_pool(math.ceil(len(files) / files_at_once)),
        batch_format="numpy",
        fn_kwargs={"filesystem": filesystem, **options},
    )


def cached_dataset(
    split: CachedSplit,
    image_size: int,
    training: bool,
    color_jitter: float = 0.0,
    seed: int = 0,
    crop_scale: tuple[float, float] | None = recipe.STANDARD_CROP_SCALE,
    policies: imaging.Policies = imaging.NO_POLICIES,
) -> ray.data.Dataset:
    """{"image": uint8 (3, S, S), "label": int64} from a built cache, as ``pipelines.image_dataset`` yields them."""
    return per_file_dataset(
        split.parquet_files,
        split.filesystem,
        _read_and_crop,
        training,
        seed,
        image_size=image_size,
        crop_scale=crop_scale if training else None,
        color_jitter=color_jitter,
        resize=split.resize,
        image_format=split.image_format,
        policies=policies,
    )


def streaming_datasets(
    layout: Layout,
    splits: dict[str, CachedSplit | None],
    image_size: int,
    skipped: ray.actor.ActorHandle,
    color_jitter: float = 0.0,
    seed: int = 0,
    crop_scale: tuple[float, float] | None = recipe.STANDARD_CROP_SCALE,
    resize: imaging.Resize | None = None,
    policies: imaging.Policies = imaging.NO_POLICIES,
) -> dict[str, ray.data.Dataset]:
    """A run's "train" and "val" Ray Data pipelines from ``prepare_splits``: from the cache, or, for a split
    without one (``--cache none``), decoding every file every epoch (files that fail go into ``skipped``).
    ``resize``: validation's before its centre crop, whose filter the random crops use too
    (``imaging.Resize.for_crop`` by default); ``policies``:
    the training crops' policy and erasing. Ray Data's crop tasks draw from their process's random state, unseeded
    (as their crops always have): a streamed run's augmentation is not repeated by a rerun or a resume, a held
    one's is (``held.crop_seed``)."""
    datasets = {}
    for name, split in splits.items():
        training = name == "train"
        files = layout.train if training else layout.val
        if split is None:
            datasets[name] = pipelines.image_dataset(
                files, layout, image_size, training, skipped, color_jitter, seed, crop_scale, resize, policies
            )
        else:
            datasets[name] = cached_dataset(split, image_size, training, color_jitter, seed, crop_scale, policies)
    return datasets


def _read_encoded(batch: dict[str, np.ndarray], filesystem: pafs.FileSystem) -> dict[str, np.ndarray]:
    """A cache file's rows as they are stored (encoded or raw pixels, with their sizes): nothing decoded here."""
    table = pa.concat_tables([pq.read_table(path, filesystem=filesystem) for path in batch["file"]])
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in ("pixels", "height", "width", "label")}


def encoded_dataset(split: CachedSplit, training: bool, seed: int = 0) -> ray.data.Dataset:
    """{"pixels": the cached bytes, "height", "width", "label"} of a built cache, read and passed on undecoded: the
    input of a run whose worker decodes and crops on its device (``plan.DeviceCropBatches``), so the host's share of
    an image is reading its bytes."""
    return per_file_dataset(split.parquet_files, split.filesystem, _read_encoded, training, seed, rows=split.rows)

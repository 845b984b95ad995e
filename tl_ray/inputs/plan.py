"""Which of the four input paths a run takes, decided once by the driver and handed to every worker as a typed
value: images or the backbone's cached features, each either held in every worker's memory or streamed by Ray
Data.

- **Features** (``tl_ray.inputs.features``): at freeze depth 5 with no augmentation only the head learns, so the
  frozen backbone runs once per image and the head trains on its outputs.
- **Images** (``tl_ray.inputs.cache``): decoded once into the cache, or from the files every epoch
  (``--cache none``).
- **Held** when the cached splits fit in memory: each worker deals itself rows every epoch (a CPU run crops them
  itself, cheap beside its training step). **Streamed** otherwise, and always for images on GPUs, which Ray Data's
  parallel tasks feed.

The worker asks the plan for its ``WorkerBatches`` and never chooses again.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import torch

from tl_ray import progress
from tl_ray.errors import TlRayError
from tl_ray.inputs import cache, device_input, features, imaging, skiplog, streaming
from tl_ray.inputs.held import HeldImages, fit_in_memory
from tl_ray.inputs.layout import Layout

if TYPE_CHECKING:
    from tl_ray import location, model
    from tl_ray.training.config import TrainConfig

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class InputPlan:
    """How a run's training and validation rows reach its workers."""

    on_features: bool  # the backbone's cached features (only the head trains), else images
    held: dict[str, Any] | None  # the cached splits each worker holds in memory, None: Ray Data streams them
    decoding_every_epoch: bool  # no decoded-image cache: the pipeline decodes files while training runs
    image_size: int
    crop_scale: tuple[float, float] | None  # the random crops' area (None: centre crops, as validation)
    color_jitter: float
    seed: int
    policies: imaging.Policies = imaging.NO_POLICIES  # the training crops' augmentation policy and erasing
    crops_on_device: bool = False  # streamed cached images decoded and cropped on the worker's device
    cached_formats: dict[str, str] | None = None  # each split's cache format (cache.ENCODINGS), the device decodes

    @property
    def name(self) -> str:
        """ "held features", "streamed images", ...: for logs and benchmarks."""
        return f"{'held' if self.held is not None else 'streamed'} {'features' if self.on_features else 'images'}"

    def batches(
        self, worker_batch: int, rank: int, world: int, device: torch.device, mean: torch.Tensor, std: torch.Tensor
    ) -> WorkerBatches:
        """This worker's batches under the plan (on a Ray Train worker: streamed splits are its dataset shards)."""
        if self.held is None:
            kind: type[WorkerBatches] = DeviceCropBatches if self.crops_on_device else StreamedBatches
        else:
            kind = HeldFeatureBatches if self.on_features else HeldImageBatches
        return kind(self, worker_batch, rank, world, device, mean, std)


class WorkerBatches:
    """A worker's training batches of each epoch, its validation batches, and the tensor the model takes from one;
    one subclass per input path, chosen once by ``InputPlan.batches``."""

    def __init__(
        self,
        plan: InputPlan,
        worker_batch: int,
        rank: int,
        world: int,
        device: torch.device,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> None:
        self.plan, self.worker_batch, self.rank, self.world = plan, worker_batch, rank, world
        self.device, self.mean, self.std = device, mean, std

    def at_worker_batch(self, worker_batch: int) -> WorkerBatches:
        """The same splits (held in memory or streamed: nothing is read again) dealt in batches of ``worker_batch``:
        --lr select trains candidates at two batch sizes."""
        other = copy.copy(self)
        other.worker_batch = worker_batch
        return other

    def train(self, epoch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def val(self) -> Iterator[Batch]:
        raise NotImplementedError

    def model_input(self, batch: Batch) -> torch.Tensor:
        """Features as they are; images normalised on the device (the pipeline ships uint8, 4x fewer bytes)."""
        if self.plan.on_features:
            return batch["features"]
        images = imaging.normalize(batch["image"], self.mean, self.std)
        return images.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else images


class HeldFeatureBatches(WorkerBatches):
    """The backbone's cached features, read once; each epoch is a new deal of rows already in memory."""

    def __init__(self, plan: InputPlan, *args: Any) -> None:
        super().__init__(plan, *args)
        assert plan.held is not None
        self._train = features.load(plan.held["train"], self.device)
        self._val = features.load(plan.held["val"], self.device)

    def train(self, epoch: int) -> Iterator[Batch]:
        batch, plan = self.worker_batch, self.plan
        return features.epoch_batches(*self._train, batch, self.rank, self.world, True, plan.seed, epoch)

    def val(self) -> Iterator[Batch]:
        return features.epoch_batches(*self._val, 2 * self.worker_batch, self.rank, self.world, False)


class HeldImageBatches(WorkerBatches):
    """The cached images in this worker's memory, cropped here each epoch (``HeldImages``)."""

    def __init__(self, plan: InputPlan, *args: Any) -> None:
        super().__init__(plan, *args)
        assert plan.held is not None
        self._train = HeldImages(
            plan.held["train"], plan.image_size, True, plan.crop_scale, plan.color_jitter, plan.policies
        )
        self._val = HeldImages(plan.held["val"], plan.image_size, False, None)

    def train(self, epoch: int) -> Iterator[Batch]:
        return self._train.batches(self.worker_batch, self.rank, self.world, self.plan.seed, epoch)

    def val(self) -> Iterator[Batch]:
        return self._val.batches(2 * self.worker_batch, self.rank, self.world)


class StreamedBatches(WorkerBatches):
    """This worker's shards of the Ray Data datasets the driver built (images or features)."""

    def __init__(self, plan: InputPlan, *args: Any) -> None:
        super().__init__(plan, *args)
        self._train, self._val = self.shards()

    def shards(self) -> tuple[Any, Any]:
        """This worker's shards of the "train" and "val" datasets (anything with ``iter_batches``)."""
        return ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    def train(self, epoch: int) -> Iterator[Batch]:
        batch = self.worker_batch
        return self._train.iter_torch_batches(batch_size=batch, prefetch_batches=2, local_shuffle_buffer_size=4 * batch)

    def val(self) -> Iterator[Batch]:
        return self._val.iter_torch_batches(batch_size=2 * self.worker_batch, prefetch_batches=2)


class DeviceCropBatches(StreamedBatches):
    """The cache's stored bytes streamed as they are (``streaming.encoded_dataset``), decoded and cropped here, on
    the worker's device, a batch at a time (``device_input``): the host only reads bytes, so a GPU node's cores
    are not what limits its GPU. Training boxes and flips come from a (seed, epoch, rank) generator; validation's
    centre crops are cut exactly, as the other paths cut them."""

    def _images(self, batch: dict[str, Any], split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.plan.cached_formats is not None
        image_format = self.plan.cached_formats[split]
        pixels, heights, widths = batch["pixels"], batch["height"], batch["width"]
        return device_input.pad(device_input.decode(pixels, heights, widths, image_format, self.device))

    @staticmethod
    def stored_batches(shard: Any, batch_size: int) -> Iterator[dict[str, Any]]:
        """A training shard's stored bytes in batches of ``batch_size``, as this path reads them (numpy, four
        batches prefetched, shuffled locally over four): also what bench/ingest.py's host-cost rows feed."""
        return shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", prefetch_batches=4, local_shuffle_buffer_size=4 * batch_size
        )

    def train(self, epoch: int) -> Iterator[Batch]:
        generator = device_input.generator_for(self.plan.seed, epoch, self.rank)
        size, scale = self.plan.image_size, self.plan.crop_scale
        for batch in self.stored_batches(self._train, self.worker_batch):
            images, heights, widths = self._images(batch, "train")
            if scale is None:  # --augment none: validation's crop
                crops = device_input.crop(images, device_input.centre_boxes(heights, widths, size), size)
            else:
                crops = device_input.random_resized_crops(images, heights, widths, size, scale, generator)
            yield {"image": crops, "label": torch.tensor(batch["label"], device=self.device)}

    def val(self) -> Iterator[Batch]:
        size = self.plan.image_size
        for batch in self._val.iter_batches(batch_size=2 * self.worker_batch, batch_format="numpy", prefetch_batches=4):
            images, heights, widths = self._images(batch, "val")
            crops = device_input.crop(images, device_input.centre_boxes(heights, widths, size), size)
            yield {"image": crops, "label": torch.tensor(batch["label"], device=self.device)}


@dataclass
class PreparedInputs:
    """What ``prepare`` leaves: the plan, the Ray Data datasets a streamed plan trains on (empty when held), and
    the skip log (an actor when decode tasks may still find bad files while the run trains)."""

    plan: InputPlan
    datasets: dict[str, ray.data.Dataset]
    skipped: skiplog.Skips


def prepare(
    layout: Layout,
    config: TrainConfig,
    weights: model.InitialWeights,
    cache_root: location.Location | None,
    skipped: skiplog.SkipLog,
    use_gpu: bool,
    resize: imaging.Resize,
    on_event: progress.OnEvent | None = None,
) -> PreparedInputs:
    """Choose the run's input path and build what it reads: the feature or decoded-image cache (``cache_root``;
    None: no cache) and, for a streamed plan, its datasets. ``resize``: validation's resize (the weights' short
    side and interpolation), made once by the driver; every path resizes with it. A validation split the cache's
    skips leave without images stops the run here (``check_not_empty``; the driver checks the listing's splits
    before Ray starts): nothing reports a val_acc of no images."""
    on_features = features.applies(config.freeze_depth, config.augment, cache_root)
    policies = imaging.Policies(config.augment_policy(), config.random_erasing, weights.mean, weights.std)
    held, datasets = None, {}
    if on_features:
        splits = features.prepare_splits(
            layout, config.image_size, cache_root, skipped, config.arch, weights, use_gpu, on_event, resize
        )
    else:
        splits = cache.prepare_splits(layout, config.image_size, cache_root, skipped, resize, on_event)
    if cache_root is not None:  # the build decoded every file: what validation has left is known (a training
        # class left without images is the driver's check: describe_lost_classes); checked before any pipeline
        check_not_empty(layout, splits["val"].rows if splits["val"] is not None else 0, why=AFTER_SKIPS)
    per_image = config.color_jitter > 0 or policies.any
    on_device = not on_features and crops_on_device(splits, use_gpu, per_image)
    if on_features:
        if features.fit_in_memory(splits):
            held = splits
        else:
            datasets = features.streaming_datasets(splits, config.seed)
    elif on_device:
        datasets = {
            name: streaming.encoded_dataset(split, name == "train", config.seed) for name, split in splits.items()
        }
    else:
        if not use_gpu and fit_in_memory(splits):
            held = splits
        else:
            if any(split is None for split in splits.values()):  # a split decoded from its files every epoch
                skipped = skiplog.SkippedFiles.remote(*skipped.state())
            try:
                datasets = streaming.streaming_datasets(
                    layout,
                    splits,
                    config.image_size,
                    skipped,
                    config.color_jitter,
                    config.seed,
                    config.crop_scale(),
                    resize,
                    policies,
                )
            except BaseException:
                skiplog.release_skips(skipped)
                raise
    plan = InputPlan(
        on_features=on_features,
        held=held,
        decoding_every_epoch=cache_root is None,
        image_size=config.image_size,
        crop_scale=config.crop_scale(),
        color_jitter=config.color_jitter,
        seed=config.seed,
        policies=policies,
        crops_on_device=on_device,
        cached_formats={name: split.image_format for name, split in splits.items()} if on_device else None,
    )
    return PreparedInputs(plan, datasets, skipped)


DEVICE_FORMATS = ("jpeg", "raw")  # the cached formats a worker decodes on its device (device_input.decode)


def crops_on_device(splits: dict[str, Any], use_gpu: bool, per_image: bool) -> bool:
    """Whether a run's workers decode and crop its cached images on their GPUs (issue 43): on every GPU run whose
    splits are all cached in a format the device decodes, unless it asks for augmentation only the per-image path
    (PIL in Ray Data tasks) applies (``per_image``: colour jitter, --augment trivial|randaugment,
    --random-erasing). CPU runs keep PIL's crops: on a CPU the batched crop is no faster than PIL's per-image one.

    Whatever the weights' interpolation: the device's training crops resize bilinearly (``roi_align`` has no other
    filter) where PIL's would use the weights' (bicubic for most timm weights). Accepted, not a reason to give up
    the device: it is an augmentation's filter only (timm's own train.py draws bilinear or bicubic at random per
    crop by default, ``--train-interpolation random``), while validation's centre crops here are cut exactly from
    the cache, which was resized with the weights' filter (``imaging.Resize``), so val_acc, predict and export see
    the same pixels on every path."""
    return (
        use_gpu
        and not per_image
        and all(split is not None and split.image_format in DEVICE_FORMATS for split in splits.values())
    )


AFTER_SKIPS = " after skipping the files that could not be decoded (see above)"


def check_not_empty(layout: Layout, val_images: int, train_images: int | None = None, why: str = "") -> None:
    """One line, before any training, for a split with no images (``train_images`` None: not known yet): a run
    would otherwise train on nothing, or choose its best checkpoint by a val_acc of no images."""
    if train_images == 0:
        raise TlRayError(f"--data: {layout.uri_prefix}{layout.root} has no training images{why}")
    if train_images is not None and train_images == len(layout.class_names):
        raise TlRayError(
            f"--data: each of the {train_images:,} classes of {layout.uri_prefix}{layout.root} (labels from"
            f" {layout.source}) holds one training image: nothing a model could learn a class from. Labels that name"
            " each file (a --label-pattern or a label column matching whole names) do this: check the classes with"
            " tl-ray inspect"
        )
    if not val_images:
        raise TlRayError(
            f"--data: {layout.uri_prefix}{layout.root} has no validation images{why} (validation split: "
            f"{layout.val_source}); add some (a val/ folder, a split column, --val-data) or raise --val-fraction"
        )

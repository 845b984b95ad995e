"""`tl-ray train`: the Ray Train loop and the driver that sets it up and collects its result.

The driver (``run``) finds the data, resolves the starting weights once, builds the
Ray Data pipelines and hands everything to a ``TorchTrainer``. Each worker
(``train_loop_per_worker``) trains data-parallel, evaluates its share of the
validation set, and rank 0 writes one checkpoint per epoch. Rerunning with the same
``--storage``/``--name`` resumes: Ray Train hands the loop its latest checkpoint,
which carries the optimizer, the LR schedule and the metric history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from tl_ray import (
    __version__,
    cache,
    checkpoint,
    classes,
    cluster,
    data,
    features,
    location,
    model,
    places,
    progress,
    sources,
    tracking,
)
from tl_ray.config import NUM_STAGES, TrainConfig, forbid_world_writable_files, to_yaml
from tl_ray.errors import RunError, TlRayError, UsageError

RESULT_FILE = "result.json"
# The epoch metric Ray Train keeps checkpoints by: classes.rank_score, the ranking that picks the best checkpoint.
RANK_SCORE = "rank_score"
LOOP_CONFIG = "tl_ray_loop_config"  # the one key of the TorchTrainer's train_loop_config: an object ref
CONFIG_FILE = "config.yaml"
# Ray Train's controller sees a report, and the end of training, only when it polls its workers: every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default. That is up to two polls (4 s) at the end of every run and a
# wait for one at each report that follows the previous one by less (a worker's report waits for the last to be
# taken). Polling 8 times as often costs the controller and each worker a few milliseconds of CPU a second.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# Below this many images per worker, BatchNorm's batch statistics are noisy enough to hurt: say so.
SMALL_WORKER_BATCH = 16
# How long an elastic run waits for a worker group's placement before deciding its size again.
ELASTIC_START_TIMEOUT_S = 20.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run leaves, as returned to Python callers (and written to result.json)."""

    run_dir: str
    best_checkpoint: str
    last_checkpoint: str
    metrics: dict[str, Any]  # of the best epoch
    history: list[dict[str, Any]]  # one entry per epoch, all epochs including resumed ones
    skipped_files: list[dict[str, str]]  # {"path", "reason"} for every file the pipeline dropped
    class_names: list[str]
    monitor: str = "val_acc"  # the metric that picked the best checkpoint
    tensorboard: str = ""  # the folder of the run's TensorBoard event files: `tensorboard --logdir` it

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _ShardConfig(DataConfig):
    """Equal train shards (DDP steps in lockstep), unequal val shards.

    Ray's default splits every dataset equally by dropping up to ``world_size - 1``
    rows; for validation that would make val_acc depend on the worker count.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        shards = super().configure(
            {name: ds for name, ds in datasets.items() if name != "val"},
            world_size,
            worker_handles,
            worker_node_ids,
            **kwargs,
        )
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            val.set_name("val")
            val.context.execution_options = self._resolve_execution_options("val")
            splits = val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for shard, split in zip(shards, splits, strict=True):
                shard["val"] = split
        return shards


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "fuse")


def _mount_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (Linux /proc/mounts), or "" when unknown."""
    try:
        with open("/proc/mounts", encoding="utf-8") as table:
            mounts = [line.split()[1:3] for line in table]
    except OSError:
        return ""
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")), key=len, default=None)
    return best[1] if best else ""


def check_shared_storage(storage: location.Location | str, option: str = "--storage") -> None:
    """On a multi-node cluster, refuse a node-local folder: nodes of other machines could not see its
    checkpoints (or cache). Nodes that all run on this machine (several ``ray start`` on one host) share it."""
    storage = location.resolve(storage, option)
    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) < 2 or not storage.is_local:
        return
    if _mount_type(storage.path).split(".")[0] in NETWORK_FILESYSTEMS:
        return
    if cluster.on_one_host(alive, socket.gethostname(), cluster.local_addresses()):
        return
    raise UsageError(
        f"{option}: {storage} is a node-local folder, but this Ray cluster has {len(alive)} nodes, not all on"
        " this machine; "
        "pass shared storage: s3://bucket/path, gs://bucket/path or a folder on an NFS mount"
    )


# Ray Data's decode and crop tasks ask for half a CPU each: at least that must stay free beside the workers.
PIPELINE_CPU = 0.5


def cpus_per_worker(
    total_cpus: float, num_workers: int, concurrent_runs: int = 1, largest_node: float | None = None
) -> float:
    """The CPUs Ray reserves for each CPU training worker: what is left after one CPU (or half the machine)
    for Ray Data, shared by ``concurrent_runs`` runs' workers, and never more than the largest node has
    (a worker sized from a multi-node cluster's total would fit on no node, and wait forever).

    A logical reservation only: it keeps Ray from scheduling more than fits, while each worker's
    torch threads are sized to the cores it can actually use (``torch_threads``).
    """
    spare = max(total_cpus - 1.0, total_cpus / 2.0)
    if largest_node is not None:
        spare = min(spare, largest_node * num_workers * concurrent_runs)
    return max(0.01, min(8.0, math.floor(100 * spare / (num_workers * concurrent_runs)) / 100))


def check_pipeline_room(
    total_cpus: float, num_workers: int, per_worker: float, concurrent_runs: int = 1, overhead: float = 0.0
) -> None:
    """Refuse before anything starts a CPU setting whose workers would leave Ray Data no CPU: the run would
    wait forever for a decode task that never gets scheduled."""
    reserved = num_workers * per_worker * concurrent_runs + overhead
    if total_cpus - reserved >= PIPELINE_CPU:
        return
    runs = f" x {concurrent_runs} concurrent trials (--max-concurrent)" if concurrent_runs > 1 else ""
    raise UsageError(
        f"--cpus-per-worker {per_worker:g} x --num-workers {num_workers}{runs} reserves {reserved:g} of this"
        f" cluster's {total_cpus:g} CPUs, leaving less than {PIPELINE_CPU} for loading images, so training would"
        " never start; lower them or leave --cpus-per-worker unset"
    )


def torch_threads(node_cpus: float, workers_on_node: int, decoding_every_epoch: bool) -> int:
    """Intra-op threads for a CPU worker: the node's cores shared by its workers, less one core for JPEG
    decoding when there is no cache (with the decoded-image cache or cached features the pipeline only
    crops and flips, which costs a few percent of a core)."""
    cores = node_cpus - (1 if decoding_every_epoch and node_cpus > 1 else 0)
    return max(1, int(cores // max(1, workers_on_node)))


def _resources(config: TrainConfig, started_locally: bool) -> tuple[bool, float]:
    """(use_gpu, CPUs per worker), leaving CPUs for Ray Data so a small machine never deadlocks."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
    use_gpu = gpus > 0 if config.gpu is None else config.gpu
    if use_gpu and gpus == 0 and started_locally:
        raise UsageError("--gpu: this machine has no GPU visible to Ray; drop --gpu (or pass --cpu) to train on CPU")
    if use_gpu:
        return use_gpu, config.cpus_per_worker or 1.0
    per_worker = config.cpus_per_worker or cpus_per_worker(cpus, config.max_workers, largest_node=largest_node_cpus())
    if started_locally:  # a cluster that was already running may still be adding nodes
        check_pipeline_room(cpus, config.max_workers, per_worker)
    return use_gpu, per_worker


def largest_node_cpus() -> float | None:
    """The most CPUs one alive node has: no CPU worker can be larger."""
    sizes = [node.get("Resources", {}).get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    return max(sizes, default=0.0) or None


def _node_cpus() -> float:
    """The logical CPUs of the node this process runs on (`ray start --num-cpus`, else its cores)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return node.get("Resources", {}).get("CPU", 1.0)
    return float(os.cpu_count() or 1)


def write_config(config: Any, storage: location.Location | str) -> None:
    """The resolved configuration in the run's folder: what produced its checkpoints, in a form
    `--config` reads back (the recipe's defaults written out, so a later recipe change cannot alter it)."""
    folder = location.resolve(storage, "--storage").join(config.name)
    try:
        folder.filesystem.create_dir(folder.path, recursive=True)
        with folder.filesystem.open_output_stream(folder.join(CONFIG_FILE).path) as stream:
            stream.write(to_yaml(config).encode())
    except OSError as error:
        target = folder.join(CONFIG_FILE).uri
        raise TlRayError(f"--storage: cannot write {target}: {location.describe(error)}") from error


@contextlib.contextmanager
def _train_env(config: TrainConfig) -> Iterator[None]:
    """``TRAIN_ENV`` (and the worker-group start timeout) while a ``TorchTrainer`` starts its controller here, which
    Ray hands the variables to (and it to the workers); a variable the user set keeps their value."""
    wanted = {**TRAIN_ENV, **_start_timeout(config.resource_timeout, config.elastic)}
    added = {key: value for key, value in wanted.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def run(
    config: TrainConfig,
    callbacks: list[ray.train.UserCallback] | None = None,
    on_event: progress.OnEvent | None = None,
    where: places.RunPlaces | None = None,
) -> TrainResult:
    """Train one model as `tl-ray train` does; raises TlRayError for anything the user can fix.

    ``callbacks`` are Ray Train callbacks (a sweep passes the one that reports to Tune). ``on_event`` is
    called in this process with each ``progress`` event (cache builds, steps, epochs) as the run goes.
    ``where``: the run's locations as a sweep's driver resolved and checked them (by default resolved from
    ``config`` here, and its outputs checked before anything starts).
    """
    progress.mark("run: start")
    config = config.validate().with_run_name()
    tracker = tracking.logger_settings(config.logger, config.logger_project)  # refused here, not after an epoch
    if where is None:
        where = places.resolve(config)
        places.check_outputs(config, where)
    layout = sources.discover(where.data, config.val_fraction, config.source_options(), where.val_data)
    batch_from_size = config.batch_size is None
    config = config.for_training_set(len(layout.train))
    progress.mark("run: data discovered")
    weights = model.initial_weights(config.arch, config.weights, layout.class_names, config.seed, config.image_size)
    progress.mark("run: initial weights")
    short_side = data.resize_size(config.image_size, weights.crop_fraction)  # validation's resize, as the weights'
    started_locally = data.ensure_ray()
    use_gpu, worker_cpus = _resources(config, started_locally)
    _check_batch_norm(config, use_gpu)
    storage = where.storage
    check_shared_storage(storage)
    write_config(config, storage)
    progress.mark("run: config written")

    # Files found bad before training; an actor collects them only where decode tasks may find more while it trains.
    skipped: data.Skips = data.SkipLog()
    if layout.rejected:
        skipped.add(layout.rejected)
    train_per_class = _per_class(layout.train, len(layout.class_names))
    try:
        cache_root = where.cache
        if cache_root is not None and config.cache != "auto":
            check_shared_storage(cache_root, "--cache")
        use_features = features.applies(config.freeze_depth, config.augment, cache_root)
        held_features = held_images = None  # what each worker holds in memory, instead of datasets
        if use_features:
            splits = features.prepare_splits(
                layout, config.image_size, cache_root, skipped, config.arch, weights, use_gpu, on_event
            )
            if features.fit_in_memory(splits):
                datasets, held_features = {}, splits
            else:
                datasets = features.streaming_datasets(splits, config.seed)
        else:
            splits = cache.prepare_splits(layout, config.image_size, cache_root, skipped, short_side, on_event)
            # On CPU, cached images that fit are held by each worker, which crops them itself (cheap beside
            # a CPU training step); GPUs are fed by Ray Data's parallel tasks.
            if not use_gpu and cache.fit_in_memory(splits):
                datasets, held_images = {}, splits
            else:
                if any(split is None for split in splits.values()):  # a split decoded from its files every epoch
                    skipped = data.SkippedFiles.remote(*skipped.state())
                datasets = cache.streaming_datasets(
                    layout,
                    splits,
                    config.image_size,
                    skipped,
                    config.color_jitter,
                    config.seed,
                    config.crop_scale(),
                    short_side,
                )
        skipped_per_class = data.skipped_train_counts(skipped)
        progress.mark("run: splits prepared")
        lost = labels_without_images(train_per_class, skipped_per_class)
        if lost:  # known before training when the cache has decoded every file
            raise TlRayError(_describe_lost_classes(layout, lost, data.skipped_files(skipped)))
    except BaseException:
        data.release_skips(skipped)
        raise
    num_train = len(layout.train) - sum(skipped_per_class.values())
    if on_event is not None:
        steps = steps_per_epoch(num_train, config.batch_size, config.max_workers)
        on_event(progress.batch_plan(num_train, config.batch_size, steps, batch_from_size))
    loop_config = {
        "options": dataclasses.asdict(config),
        "class_names": layout.class_names,
        # Known-bad files are left out of the schedule's step count (with --cache none they are found later).
        "num_train": num_train,
        "train_per_class": train_per_class,
        "class_weights": loss_weights(config, layout.class_names, train_per_class, skipped_per_class),
        "weights_ref": ray.put(weights.state_dict),
        "weights_source": weights.source,
        "mean": list(weights.mean),
        "std": list(weights.std),
        "resize_size": short_side,
        "cpus_per_worker": worker_cpus,
        "skipped": skipped,
        "inputs": "features" if use_features else "images",
        "held_features": held_features,
        "held_images": held_images,
        "decoding_every_epoch": cache_root is None,
    }
    try:
        with progress.relay(on_event) as events:
            if on_event is not None:
                noun = "worker" if config.max_workers == 1 else "workers"
                on_event(progress.Stage(f"starting {config.num_workers} training {noun}"))
            loop_config["progress"] = events
            run_dir = where.run_dir(config.name)
            tracked = tracking.train_callbacks(run_dir, config.epochs, tracker, dataclasses.asdict(config))
            callbacks = [*tracked, *(callbacks or [])]
            trainer = _trainer(config, loop_config, datasets, use_gpu, worker_cpus, storage, callbacks)
            progress.mark("run: fit")
            with _train_env(config):
                result = trainer.fit()
            progress.mark("run: fit returned")
        skipped_files = data.skipped_files(skipped)
        lost = labels_without_images(train_per_class, data.skipped_train_counts(skipped))
    except ray.train.TrainingFailedError as error:
        raise RunError(f"training failed: {_root_cause(error)}") from error
    finally:
        data.release_skips(skipped)
    if lost:
        raise TlRayError(_describe_lost_classes(layout, lost, skipped_files))
    outcome = _collect(result, storage, layout.class_names, skipped_files, config.monitor)
    progress.mark("run: end")
    return outcome


def _trainer(
    config: TrainConfig,
    loop_config: dict[str, Any],
    datasets: dict[str, ray.data.Dataset],
    use_gpu: bool,
    worker_cpus: float,
    storage: location.Location,
    callbacks: list[ray.train.UserCallback] | None,
) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        # By reference: Ray Train's controller unpickles the loop's config when it starts but never uses it, and its
        # tl-ray objects (cached splits, the skip log) would make it import tl-ray, torchvision and PIL first.
        train_loop_config={LOOP_CONFIG: ray.put(loop_config)},
        scaling_config=ScalingConfig(
            num_workers=(config.min_workers, config.max_workers) if config.elastic else config.max_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": worker_cpus},
            elastic_resize_monitor_interval_s=config.resize_interval,
        ),
        run_config=RunConfig(
            name=config.name,
            # Ray Train writes checkpoints through the filesystem object we resolved (a URI's endpoint and options
            # kept), beside our config.yaml and result.json.
            storage_path=storage.path,
            storage_filesystem=None if storage.is_local else storage.filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                # Not the monitor alone: of two epochs tied on it, pruning must keep the one _collect picks.
                checkpoint_score_attribute=RANK_SCORE,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=[*(callbacks or []), *_resource_wait(config, use_gpu, worker_cpus)],
        ),
        datasets=datasets,
        dataset_config=_ShardConfig(),
    )


def _resource_wait(config: TrainConfig, use_gpu: bool, worker_cpus: float) -> list[cluster.ResourceWait]:
    """The controller callback that ends a run waiting longer than --resource-timeout for its workers."""
    if not config.resource_timeout:
        return []
    workers = f"{config.min_workers}" if not config.elastic else f"at least {config.min_workers}"
    each = "1 GPU" if use_gpu else f"{worker_cpus:g} CPU"
    message = (
        f"--resource-timeout: waited {config.resource_timeout:g} s for {workers} training worker(s) of {each} each"
        " (a node lost, or the cluster too small): add nodes, lower --num-workers, or raise --resource-timeout;"
        " rerun the same command to resume from the last checkpoint"
    )
    return [cluster.ResourceWait(config.resource_timeout, message)]


def _start_timeout(resource_timeout: float, elastic: bool) -> dict[str, str]:
    """Ray Train waits up to RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) for a worker group's placement
    group before it retries; a shorter --resource-timeout must be able to fire before that. An elastic run
    retries sooner (20 s): right after a node loss its size is decided on the cluster as it was (the dead
    node not yet noticed), and the retry is decided on the nodes left."""
    if not (resource_timeout or elastic):
        return {}
    longest = ELASTIC_START_TIMEOUT_S if elastic else 60.0
    seconds = max(1.0, min(longest, resource_timeout / 2 if resource_timeout else longest))
    return {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(seconds)}


def _check_batch_norm(config: TrainConfig, use_gpu: bool) -> None:
    """SyncBatchNorm needs GPUs (torch implements it for CUDA only); small per-worker batches deserve a warning."""
    if config.sync_bn and not use_gpu:
        raise UsageError("--sync-bn: synchronised BatchNorm needs GPU workers; on CPU use --no-train-bn instead")
    worker_batch = config.batch_size // config.max_workers
    trains_batch_norm = config.train_bn and config.freeze_depth < NUM_STAGES
    if config.max_workers > 1 and not config.sync_bn and trains_batch_norm and worker_batch < SMALL_WORKER_BATCH:
        logger.warning(
            "each of the %d workers normalises BatchNorm over %d images only (--batch-size %d split over "
            "--num-workers): pass --sync-bn (GPUs), --no-train-bn, or a larger --batch-size",
            config.max_workers,
            worker_batch,
            config.batch_size,
        )


def _per_class(files: list[tuple[str, int]], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for _, label in files:
        counts[label] += 1
    return counts


def loss_weights(
    config: TrainConfig, class_names: list[str], train_per_class: list[int], skipped_per_class: dict[int, int]
) -> dict[str, float] | None:
    """``--class-weights auto``: each class's loss weight (``classes.balanced_weights``) from its training images,
    less the files already known to be undecodable; None for ``none``. By class name, as meta.json records it."""
    if config.class_weights == "none":
        return None
    counts = [total - skipped_per_class.get(label, 0) for label, total in enumerate(train_per_class)]
    return dict(zip(class_names, classes.balanced_weights(counts), strict=True))


def labels_without_images(train_per_class: list[int], skipped_per_class: dict[int, int]) -> list[int]:
    """Labels all of whose training files failed to decode: the model could never learn them."""
    return [label for label, total in enumerate(train_per_class) if skipped_per_class.get(label, 0) >= total]


def _describe_lost_classes(layout: data.Layout, lost: list[int], skipped: dict[str, str]) -> str:
    example_path, example_reason = next(iter(sorted(skipped.items())))
    if len(lost) == len(layout.class_names):
        what = f"none of the {len(layout.train)} training images could be decoded"
    else:
        names = ", ".join(layout.class_names[label] for label in lost)
        what = f"no training image of class {names} could be decoded, so the model could not learn it"
    return f"--data: {what} (e.g. {example_path}: {example_reason}); fix or remove those files"


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


def _collect(
    result: ray.train.Result,
    storage: location.Location,
    class_names: list[str],
    skipped: dict[str, str],
    monitor: str,
) -> TrainResult:
    if not result.best_checkpoints or result.checkpoint is None:
        raise RunError(f"training finished without a checkpoint in {result.path}")
    best, best_metrics = max(result.best_checkpoints, key=lambda item: classes.rank_key(item[1], monitor))
    with result.checkpoint.as_directory() as last_dir:
        train_state = checkpoint.read_train_state(last_dir, mmap=True) or {}
    previous = _read_previous_skips(result.filesystem, f"{result.path}/{RESULT_FILE}")
    skips = {**previous, **skipped}
    outcome = TrainResult(
        run_dir=storage.at(result.path).uri,
        best_checkpoint=storage.at(best.path).uri,
        last_checkpoint=storage.at(result.checkpoint.path).uri,
        metrics={key: value for key, value in best_metrics.items() if not key.startswith("_")},
        history=train_state.get("history", []),
        skipped_files=[{"path": path, "reason": reason} for path, reason in sorted(skips.items())],
        class_names=class_names,
        monitor=monitor,
        tensorboard=storage.at(result.path).join(tracking.TENSORBOARD_DIR).uri,
    )
    with result.filesystem.open_output_stream(f"{result.path}/{RESULT_FILE}") as stream:
        stream.write((json.dumps(outcome.to_json(), indent=2) + "\n").encode())
    return outcome


def _read_previous_skips(filesystem: pafs.FileSystem, path: str) -> dict[str, str]:
    """Skips found by an earlier, interrupted attempt at this run: a resumed run may not decode those files again."""
    try:
        with filesystem.open_input_stream(path) as stream:
            previous = json.loads(stream.read())
        return {item["path"]: item["reason"] for item in previous.get("skipped_files", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# ---------------------------------------------------------------- worker side


def steps_per_epoch(num_train: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps each worker takes per epoch, as the loop takes them.

    Each worker gets ``num_train // world_size`` images (equal shards) in batches of
    ``batch_size // world_size``, and skips a last batch of one image (BatchNorm cannot
    train on it). Planning the schedule from anything else ends it early (the last steps at
    learning rate 0) or late.
    """
    shard, worker_batch = num_train // world_size, batch_size // world_size
    full, rest = divmod(shard, worker_batch)
    return max(1, full + (rest >= 2))


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float, head_epochs: int = 0) -> float:
    """Linear warm-up, then cosine decay towards zero at the last step; per optimizer step, so short runs decay too.

    A run with ``head_epochs`` has two phases (the head alone, then the unfrozen backbone with
    it), each with its own warm-up (the same share of the phase) and cosine decay: the newly
    unfrozen stages start gently, as in fastai's ``fine_tune``.
    """
    head_steps = head_epochs * steps_per_epoch
    if step < head_steps:
        phase_step, phase_epochs = step, head_epochs
    else:
        phase_step, phase_epochs = step - head_steps, epochs - head_epochs
    phase_steps = phase_epochs * steps_per_epoch
    warmup = warmup_epochs * steps_per_epoch * phase_epochs / epochs
    if phase_step < warmup:
        return (phase_step + 1) / (warmup + 1)
    progress = min(1.0, (phase_step - warmup) / max(1.0, phase_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(groups: list[dict], options: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over ``TransferResNet.parameter_groups`` (each group carries its own lr and weight decay)."""
    if options.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=options.lr)
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=options.lr, momentum=options.momentum, nesterov=options.momentum > 0)
    raise ValueError(f"optimizer {options.optimizer!r} was not resolved (TrainConfig.validate)")


def _sum_across_workers(values: list[float], device: torch.device) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train_loop_per_worker(train_loop_config: dict[str, Any]) -> None:
    forbid_world_writable_files()
    loop_config: dict[str, Any] = ray.get(train_loop_config[LOOP_CONFIG])
    options = TrainConfig(**loop_config["options"])
    class_names: list[str] = loop_config["class_names"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    progress.mark("worker: loop entered", rank=rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu" and options.cpus_per_worker is None:
        decoding = loop_config["decoding_every_epoch"]
        torch.set_num_threads(torch_threads(_node_cpus(), context.get_local_world_size(), decoding))
    else:  # the CPUs given (--cpus-per-worker, or a sweep running trials side by side) are the ones to use
        torch.set_num_threads(max(1, round(loop_config["cpus_per_worker"])))
    torch.manual_seed(options.seed + rank)

    net = model.create_model(options.arch, len(class_names), options.image_size)
    net.load_state_dict(ray.get(loop_config["weights_ref"]))
    if options.sync_bn and world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    transfer = model.TransferResNet(net, options.freeze_depth, train_bn=options.train_bn)
    if device.type == "cuda":
        transfer = transfer.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(
        transfer.parameter_groups(options.lr, options.weight_decay, options.backbone_lr_mult), options
    )
    worker_batch = options.batch_size // world  # --batch-size is global: same optimisation on 1 or 8 workers
    steps_now = steps_per_epoch(loop_config["num_train"], options.batch_size, world)
    # The LR curve is planned once, in the first worker group's steps, and followed by global progress (epochs
    # and the share of this epoch done): a group resized after a node loss or join keeps the same curve.
    plan = {"steps_per_epoch": steps_now, "position": 0}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda _: lr_factor(
            plan["position"], plan["steps_per_epoch"], options.epochs, options.warmup_epochs, options.head_epochs
        ),
    )
    amp_dtype = _amp_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, history = 0, []

    resume_from = ray.train.get_checkpoint()
    if resume_from is not None:
        with resume_from.as_directory() as directory:
            meta = checkpoint.read_meta(directory)
            _check_resumable(meta, options, class_names, loop_config["class_weights"])
            transfer.net.load_state_dict(checkpoint.read_model_state(directory))
            state = checkpoint.read_train_state(directory)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        plan["steps_per_epoch"] = state.get("steps_per_epoch", steps_now)
    resumed_after_epoch = start_epoch
    node_ids = _worker_node_ids()
    progress.mark("worker: model ready", rank=rank)

    # On cached backbone features only the head runs (and DDP syncs only its gradients).
    on_features = loop_config["inputs"] == "features"
    trained = transfer.head if on_features else transfer
    wrapped = None
    weight = _weight_tensor(loop_config["class_weights"], class_names, device)  # --class-weights auto, else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=options.label_smoothing)
    # Validation loss is never class-weighted: it stays comparable between runs with and without weights.
    val_criterion = nn.CrossEntropyLoss(label_smoothing=options.label_smoothing)
    mean = torch.tensor(loop_config["mean"], device=device)
    std = torch.tensor(loop_config["std"], device=device)
    held = loop_config["held_features"]
    if held is not None:  # read once; each epoch is a new deal of rows already in memory
        train_rows, val_rows = features.load(held["train"], device), features.load(held["val"], device)

        def train_batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
            return features.epoch_batches(*train_rows, worker_batch, rank, world, True, options.seed, epoch)

        def val_batches() -> Iterator[dict[str, torch.Tensor]]:
            return features.epoch_batches(*val_rows, 2 * worker_batch, rank, world, False)
    elif loop_config["held_images"] is not None:
        held_images = loop_config["held_images"]
        crop_scale = options.crop_scale()
        train_set = cache.HeldImages(held_images["train"], options.image_size, True, crop_scale, options.color_jitter)
        val_set = cache.HeldImages(held_images["val"], options.image_size, False, None)

        def train_batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
            return train_set.batches(worker_batch, rank, world, options.seed, epoch)

        def val_batches() -> Iterator[dict[str, torch.Tensor]]:
            return val_set.batches(2 * worker_batch, rank, world)
    else:
        train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

        def train_batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
            return train_shard.iter_torch_batches(
                batch_size=worker_batch, prefetch_batches=2, local_shuffle_buffer_size=4 * worker_batch
            )

        def val_batches() -> Iterator[dict[str, torch.Tensor]]:
            return val_shard.iter_torch_batches(batch_size=2 * worker_batch, prefetch_batches=2)

    def model_input(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if on_features:
            return batch["features"]
        images = data.normalize(batch["image"], mean, std)
        return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images

    progress.mark("worker: data ready", rank=rank)
    events = loop_config["progress"] if rank == 0 else None
    if resume_from is not None:
        progress.send(events, progress.resumed_run(resume_from.path, start_epoch, options.epochs))
    for epoch in range(start_epoch + 1, options.epochs + 1):
        started = time.perf_counter()
        pacer = progress.StepPacer(events, epoch, options.epochs, steps_now)
        # A probe-then-fine-tune run trains the head alone first; DDP is (re)built for what trains now.
        depth = NUM_STAGES if epoch <= options.head_epochs else options.freeze_depth
        if wrapped is None or depth != transfer.freeze_depth:
            transfer.set_freeze_depth(depth)
            wrapped = ray.train.torch.prepare_model(trained)
        wrapped.train()
        loss_sum = correct = seen = waited = 0.0
        stepped = 0
        asked = time.perf_counter()
        for batch in train_batches(epoch):
            waited += time.perf_counter() - asked
            labels = batch["label"]
            if len(labels) < 2:  # BatchNorm cannot train on one sample; equal shards make every worker skip it
                continue
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = wrapped(model_input(batch))
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            stepped += 1
            plan["position"] = planned_position(epoch, stepped, steps_now, plan["steps_per_epoch"])
            scheduler.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            pacer.step(stepped)
            asked = time.perf_counter()
        train_seconds = time.perf_counter() - started
        progress.mark("worker: epoch trained", rank=rank, epoch=epoch)
        if _some_class_has_no_images(loop_config, rank, device):
            # Every file of a class failed to decode: stop now, the driver says which (no checkpoint of a
            # model that cannot know the class).
            ray.train.report({"epoch": epoch, "stopped": "a class has no decodable training image"})
            return
        _sync_buffers_from_rank0(transfer)
        val_loss, val_correct, val_seen, val_counts = _evaluate(
            trained, val_batches(), model_input, val_criterion, device, amp_dtype, len(class_names)
        )
        totals = _sum_across_workers([loss_sum, correct, seen, val_loss, val_correct, val_seen, *val_counts], device)
        per_class = classes.class_metrics(*_split(totals[6:], 3))
        validation = {
            "val_acc": totals[4] / max(totals[5], 1),
            "val_loss": totals[3] / max(totals[5], 1),
            "macro_f1": per_class["macro_f1"],
        }
        monitored = [*(row[options.monitor] for row in history), validation[options.monitor]]
        # Tune's live table shows the first four metrics: the ones a sweep is judged on come first.
        metrics = {
            "epoch": epoch,
            # The best so far: what a sweep ranks and stops trials on, so Tune's table agrees with the report.
            f"best_{options.monitor}": classes.best_value(monitored, options.monitor),
            **validation,
            # The best epoch so far by the one ranking (monitor, then val_acc, then the lower val_loss): the
            # console's star; rank_score is that ranking as the one number Ray's checkpoint pruning keeps by.
            "best_epoch": classes.best_epoch([*history, {**validation, "epoch": epoch}], options.monitor),
            RANK_SCORE: classes.rank_score(validation, options.monitor),
            # By class name (Tune's tables flatten it to val_recall/<name> columns); None: no validation image.
            "val_recall": dict(zip(class_names, per_class["recall"], strict=True)),
            "train_loss": totals[0] / max(totals[2], 1),
            "train_acc": totals[1] / max(totals[2], 1),
            "images_per_s": totals[2] / max(train_seconds, 1e-9),
            "epoch_s": time.perf_counter() - started,
            # Rank 0's time blocked on the next training batch: the pipeline's start-up each epoch, plus any
            # time it could not keep up.
            "data_wait_s": waited,
            "head_lr_now": scheduler.get_last_lr()[0],  # the scheduled rate at the epoch's end, not the peak
            "frozen_stages": depth,
            "train_images": int(totals[2]),
            "val_images": int(totals[5]),
            "num_classes": len(class_names),
            "workers": world,
            "nodes": len(set(node_ids)),  # the distinct nodes the workers ran on
            "torch_threads": torch.get_num_threads(),  # per worker
            # The epoch this worker group started from: > 0 after a resume or a worker-failure restart.
            "resumed_after_epoch": resumed_after_epoch,
        }
        history.append({**metrics, "node_ids": sorted(set(node_ids))})
        progress.mark("worker: validated", rank=rank, epoch=epoch)
        _report(epoch, metrics, history, transfer, optimizer, scheduler, scaler, plan, loop_config, options, rank)
        progress.send(events, progress.Epoch(metrics, options.epochs))


def planned_position(epoch: int, stepped: int, steps_now: int, planned_steps_per_epoch: int) -> int:
    """The step of the planned LR curve reached after ``stepped`` of this group's ``steps_now`` steps in ``epoch``.

    The same share of an epoch is the same point of the curve whatever the worker count: a group of
    another size (more or fewer steps per epoch) follows the curve the run was planned with.
    """
    done = min(planned_steps_per_epoch, round(stepped * planned_steps_per_epoch / max(1, steps_now)))
    return (epoch - 1) * planned_steps_per_epoch + done


def _worker_node_ids() -> list[str]:
    """Every worker's Ray node id (one collective, when the group starts): which nodes the group spans."""
    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [str(node) for node in gathered]


def _some_class_has_no_images(loop_config: dict[str, Any], rank: int, device: torch.device) -> bool:
    """Rank 0 asks the skip log after an epoch (every training file has been tried); all workers agree."""
    lost = 0.0
    if rank == 0:
        skipped = data.skipped_train_counts(loop_config["skipped"])
        lost = float(bool(labels_without_images(loop_config["train_per_class"], skipped)))
    return _sum_across_workers([lost], device)[0] > 0


def _sync_buffers_from_rank0(module: nn.Module) -> None:
    """Give every worker rank 0's BatchNorm statistics before validating.

    Each worker's last training step updated its own running statistics; rank 0's are
    the ones the checkpoint keeps, so val_acc must be measured with those.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _check_resumable(
    meta: dict[str, Any], options: TrainConfig, class_names: list[str], class_weights: dict[str, float] | None
) -> None:
    """A resumed run must be the same model; otherwise its optimizer state would be silently wrong. The monitor
    too: checkpoints already pruned by one metric cannot be ranked by another."""
    # Runs from before class weights and --monitor had neither.
    recorded = {**meta, "strategy": {"class_weights": None, **meta.get("strategy", {})}}
    recorded.setdefault("monitor", "val_acc")
    checks = (
        ("arch", options.arch),
        ("freeze_depth", options.freeze_depth),
        ("class_names", class_names),
        ("strategy", strategy_meta(options, class_weights)),
        ("monitor", options.monitor),
    )
    for key, now in checks:
        if recorded.get(key) != now:
            raise TlRayError(
                f"run {options.name} was started with {key}={recorded.get(key)!r}, now {now!r}: "
                "pass the same options to resume it, or a new --name to start over"
            )


def strategy_meta(options: TrainConfig, class_weights: dict[str, float] | None = None) -> dict[str, Any]:
    """How the model was fine-tuned, as its checkpoint records it (and a resumed run must match);
    ``class_weights``: the loss weight of each class (``--class-weights auto``), None for unweighted."""
    return {
        "name": options.strategy,
        "backbone_lr_mult": options.backbone_lr_mult,
        "head_epochs": options.head_epochs,
        "train_bn": options.train_bn,
        "sync_bn": options.sync_bn,
        "lr": options.lr,
        "optimizer": options.optimizer,
        "weight_decay": options.weight_decay,
        "class_weights": class_weights,
    }


def _weight_tensor(class_weights: dict[str, float] | None, class_names: list[str], device) -> torch.Tensor | None:
    if class_weights is None:
        return None
    return torch.tensor([class_weights[name] for name in class_names], dtype=torch.float32, device=device)


def _split(values: list[float], parts: int) -> list[list[float]]:
    size = len(values) // parts
    return [values[index * size : (index + 1) * size] for index in range(parts)]


def count_classes(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per true class, per predicted class, and correct per class, concatenated (3 x num_classes): counts
    that sum across batches and workers into ``classes.class_metrics``' arguments."""
    hits = labels[predictions == labels]
    return torch.cat([torch.bincount(values, minlength=num_classes) for values in (labels, predictions, hits)]).double()


def _evaluate(
    net, batches, model_input, criterion, device, amp_dtype, num_classes
) -> tuple[float, float, float, list[float]]:
    """Validate this worker's shard on the unwrapped model: DDP would add collectives workers do not share.

    Returns the loss sum, correct and seen images, and ``count_classes``' counts, all to be summed across workers.
    """
    net.eval()
    loss_sum = correct = seen = 0.0
    counts = torch.zeros(3 * num_classes, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            labels = batch["label"]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(model_input(batch))
            loss_sum += criterion(logits.float(), labels).item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            counts += count_classes(labels, logits.argmax(1), num_classes)
    return loss_sum, correct, seen, counts.tolist()


def _report(epoch, metrics, history, transfer, optimizer, scheduler, scaler, plan, loop_config, options, rank) -> None:
    """Every worker reports (it is a barrier); only rank 0 writes the checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if rank == 0:
            meta = {
                "arch": options.arch,
                "num_classes": len(loop_config["class_names"]),
                "class_names": loop_config["class_names"],
                "freeze_depth": options.freeze_depth,
                "strategy": strategy_meta(options, loop_config["class_weights"]),
                "monitor": options.monitor,
                "image_size": options.image_size,
                "resize_size": loop_config["resize_size"],
                "mean": loop_config["mean"],
                "std": loop_config["std"],
                "weights": loop_config["weights_source"],
                "epoch": epoch,
                "metrics": metrics,
                "tl_ray_version": __version__,
            }
            train_state = {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "steps_per_epoch": plan["steps_per_epoch"],  # the LR curve's plan, kept across resizes
                "history": history,
            }
            checkpoint.save_checkpoint(directory, transfer.net.state_dict(), meta, train_state)
            saved = Checkpoint.from_directory(directory)
            metrics = {**metrics, "skipped_files": len(data.skipped_files(loop_config["skipped"]))}
            progress.mark("worker: checkpoint written", rank=rank, epoch=epoch, bytes=_folder_bytes(directory))
        ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"checkpoint_epoch{epoch:03d}")
        progress.mark("worker: reported", rank=rank, epoch=epoch)


def _folder_bytes(directory: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())

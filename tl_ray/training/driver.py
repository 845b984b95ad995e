"""`tl-ray train`'s driver: it sets a run up and collects its result (``tl_ray.training.results``).

``run`` lists the data, resolves the starting weights once, decides the input plan (``tl_ray.inputs.plan``), sizes
the workers, and hands a ``LoopConfig`` to a ``TorchTrainer`` whose workers run ``tl_ray.training.worker``.
Rerunning with the same ``--storage``/``--name`` resumes: Ray Train hands the workers its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from tl_ray import backbones, classes, cluster, location, model, places, progress, recipe, tracking
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import RunError, TlRayError, UsageError
from tl_ray.inputs import imaging, plan, skiplog, sources
from tl_ray.inputs.layout import Layout
from tl_ray.options import to_yaml
from tl_ray.training import lr_range, run_page, schedule, toolbox
from tl_ray.training.config import LrFindConfig, TrainConfig
from tl_ray.training.metrics import RANK_SCORE
from tl_ray.training.results import LrFinding, TrainResult, collect, collect_lr_find, write_lr_find
from tl_ray.training.worker import LOOP_CONFIG, LoopConfig, train_loop_per_worker

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


def _resources(config: TrainConfig, started_locally: bool) -> tuple[bool, float]:
    """(use_gpu, CPUs per worker), leaving CPUs for Ray Data so a small machine never deadlocks."""
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 1)
    use_gpu = gpus > 0 if config.gpu is None else config.gpu
    if use_gpu and gpus == 0 and started_locally:
        raise UsageError("--gpu: this machine has no GPU visible to Ray; drop --gpu (or pass --cpu) to train on CPU")
    if use_gpu:
        return use_gpu, config.cpus_per_worker or 1.0
    per_worker = config.cpus_per_worker or cluster.cpus_per_worker(
        cpus, config.max_workers, largest_node=cluster.largest_node_cpus()
    )
    if started_locally:  # a cluster that was already running may still be adding nodes
        cluster.check_pipeline_room(cpus, config.max_workers, per_worker)
    return use_gpu, per_worker


def write_config(config: Any, storage: location.Location | str) -> None:
    """The resolved configuration in the run's folder: what produced its checkpoints, in a form
    `--config` reads back (the recipe's defaults written out, so a later recipe change cannot alter it)."""
    folder = location.resolve(storage, "--storage").join(config.name)
    try:
        folder.filesystem.create_dir(folder.path, recursive=True)
        location.write_bytes(folder.filesystem, folder.join(CONFIG_FILE).path, to_yaml(config).encode())
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


@dataclass
class _Setup:
    """A run made ready by ``_set_up``: what its TorchTrainer and its result collection need."""

    config: TrainConfig
    where: places.RunPlaces
    layout: Layout
    loop_config: LoopConfig
    datasets: dict[str, ray.data.Dataset]
    use_gpu: bool
    worker_cpus: float
    train_per_class: list[int]
    skipped: skiplog.Skips
    tracker: Any


def list_training_set(config: TrainConfig) -> Layout:
    """What the run would train and validate on, listed as the run lists it (before any place is resolved):
    `--print-config` says from it what the training set's size decides."""
    return sources.discover(config.data, config.val_fraction, config.source_options(), config.val_data)


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
    setup = _set_up(config, where, on_event)
    result, skipped_files = _fit(setup, callbacks or [], on_event, tracked=True)
    outcome = collect(result, setup.where.storage, setup.layout.class_names, skipped_files, setup.config.monitor)
    run_page.write(outcome, setup.config, setup.where.storage.at(result.path))  # report.html beside result.json
    if outcome.lr_range_test is not None:  # --lr auto: the test's plot beside the run's result
        write_lr_find(lr_range.LrCurve.from_json(outcome.lr_range_test), setup.where.storage.at(result.path))
    progress.mark("run: end")
    return outcome


def find_lr(
    config: LrFindConfig, on_event: progress.OnEvent | None = None, where: places.RunPlaces | None = None
) -> LrFinding:
    """`tl-ray lr-find`: the LR range test ``--lr auto`` starts a run with, on its own, set up as ``run`` sets a run
    up (the same data, cache, model, depth, optimizer and batch); the curve's plot and JSON go in the run folder."""
    setup = _set_up(config, where, on_event, range_test_only=True)
    result, _ = _fit(setup, [], on_event)
    return collect_lr_find(result, setup.where.storage)


def _set_up(
    config: TrainConfig,
    where: places.RunPlaces | None,
    on_event: progress.OnEvent | None,
    range_test_only: bool = False,
) -> _Setup:
    """Everything before the TorchTrainer: the data listed, the weights resolved, the input plan prepared."""
    config = config.validate().with_run_name()
    range_test = None
    if isinstance(config, LrFindConfig):
        range_test = lr_range.RangeTest(config.steps, config.start_lr, config.end_lr)
    elif range_test_only or config.lr == "auto":
        range_test = lr_range.RangeTest()
    tracker = tracking.logger_settings(config.logger, config.logger_project)  # refused here, not after an epoch
    if where is None:
        where = places.resolve(config)
        places.check_outputs(config, where)
    layout = sources.discover(where.data, config.val_fraction, config.source_options(), where.val_data)
    plan.check_not_empty(layout, len(layout.val), len(layout.train))  # before Ray starts
    batch_from_size, lr_from_size = config.batch_size is None, config.lr is None
    config = config.for_training_set(len(layout.train))
    lr_candidates = ()
    if config.lr == "select":
        lr_candidates = recipe.select_candidates(config.recipe_lr(), config.batch_size, config.max_workers)
    progress.mark("run: data discovered")
    backbones.check_freeze_depth(config.arch, config.freeze_depth)
    weights = model.initial_weights(config.arch, config.weights, layout.class_names, config.seed, config.image_size)
    progress.mark("run: initial weights")
    # Validation's resize (short side and filter), as the weights': every input path and the checkpoint use it.
    resize = imaging.Resize.for_crop(config.image_size, weights.crop_fraction, weights.interpolation)
    started_locally = cluster.ensure_ray()
    use_gpu, worker_cpus = _resources(config, started_locally)
    _check_batch_norm(config, use_gpu)
    if config.compile and not use_gpu:  # before anything is written
        raise UsageError(toolbox.COMPILE_ON_CPU)
    storage = where.storage
    cluster.check_shared_storage(storage)
    write_config(config, storage)
    progress.mark("run: config written")

    # Files found bad before training; an actor collects them only where decode tasks may find more while it trains.
    skipped: skiplog.Skips = skiplog.SkipLog()
    if layout.rejected:
        skipped.add(layout.rejected)
    train_per_class = _per_class(layout.train, len(layout.class_names))
    try:
        cache_root = where.cache
        if cache_root is not None and config.cache != "auto":
            cluster.check_shared_storage(cache_root, "--cache")
        prepared = plan.prepare(layout, config, weights, cache_root, skipped, use_gpu, resize, on_event)
        skipped = prepared.skipped
        skipped_per_class = skiplog.skipped_train_counts(skipped)
        progress.mark("run: splits prepared")
        lost = skiplog.labels_without_images(train_per_class, skipped_per_class)
        if lost:  # known before training when the cache has decoded every file
            raise TlRayError(describe_lost_classes(layout, lost, skiplog.skipped_files(skipped)))
    except BaseException:
        skiplog.release_skips(skipped)
        raise
    num_train = len(layout.train) - sum(skipped_per_class.values())
    if on_event is not None:
        steps = schedule.steps_per_epoch(num_train, config.batch_size, config.max_workers, config.accumulate)
        on_event(progress.batch_plan(num_train, config.batch_size, steps, batch_from_size, config.accumulate))
    loop_config = LoopConfig(
        options=config,
        class_names=layout.class_names,
        # Known-bad files are left out of the schedule's step count (with --cache none they are found later).
        num_train=num_train,
        train_per_class=train_per_class,
        class_weights=loss_weights(config, layout.class_names, train_per_class, skipped_per_class),
        weights_ref=ray.put(weights.state_dict),
        weights_source=weights.source,
        mean=list(weights.mean),
        std=list(weights.std),
        resize_size=resize.short_side,
        cpus_per_worker=worker_cpus,
        skipped=skipped,
        inputs=prepared.plan,
        range_test=range_test,
        range_test_only=range_test_only,
        lr_candidates=lr_candidates,
        lr_from_size=lr_from_size,
        # As the run resizes (an unknown name is bilinear by then); None, torchvision's weights: no meta.json key.
        interpolation=None if weights.interpolation is None else resize.interpolation,
    )
    return _Setup(
        config, where, layout, loop_config, prepared.datasets, use_gpu, worker_cpus, train_per_class, skipped, tracker
    )


def _fit(
    setup: _Setup, callbacks: list[ray.train.UserCallback], on_event: progress.OnEvent | None, tracked: bool = False
) -> tuple[ray.train.Result, dict[str, str]]:
    """Run the set-up run's TorchTrainer; (its result, the files skipped). ``tracked``: with the run's TensorBoard
    (and --logger) callbacks before ``callbacks``."""
    config, skipped = setup.config, setup.skipped
    try:
        if tracked:
            run_dir = setup.where.run_dir(config.name)
            tracking_callbacks = tracking.train_callbacks(
                run_dir, config.epochs, setup.tracker, dataclasses.asdict(config)
            )
            callbacks = [*tracking_callbacks, *callbacks]
        with progress.relay(on_event) as events:
            if on_event is not None:
                noun = "worker" if config.max_workers == 1 else "workers"
                on_event(progress.Stage(f"starting {config.num_workers} training {noun}"))
            loop_config = dataclasses.replace(setup.loop_config, progress=events)
            trainer = _trainer(
                config, loop_config, setup.datasets, setup.use_gpu, setup.worker_cpus, setup.where.storage, callbacks
            )
            progress.mark("run: fit")
            with _train_env(config), _interruptible(trainer):
                result = trainer.fit()
            progress.mark("run: fit returned")
        skipped_files = skiplog.skipped_files(skipped)
        lost = skiplog.labels_without_images(setup.train_per_class, skiplog.skipped_train_counts(skipped))
    except ray.train.TrainingFailedError as error:
        raise RunError(f"training failed: {_root_cause(error)}") from error
    finally:
        skiplog.release_skips(skipped)
    if lost:
        raise TlRayError(describe_lost_classes(setup.layout, lost, skipped_files))
    return result, skipped_files


class _Trainer(TorchTrainer):
    """A TorchTrainer that remembers a Ctrl-C. Ray Train's own SIGINT handler (kept: it aborts the controller and
    its workers) ends ``fit()`` with ``sys.exit(0)``, which Ray turns into ``SystemExit(1)`` when it lands inside
    ``ray.get``: the same exception a SIGTERM gives, so the signal itself has to be noted."""

    interrupted = False

    def _register_sigint_handler(self, controller) -> None:
        super()._register_sigint_handler(controller)
        rays = signal.getsignal(signal.SIGINT)

        def note_and_abort(signum, frame) -> None:
            self.interrupted = True
            if callable(rays):
                rays(signum, frame)

        signal.signal(signal.SIGINT, note_and_abort)


@contextlib.contextmanager
def _interruptible(trainer: _Trainer) -> Iterator[None]:
    """``trainer.fit()`` ended by Ctrl-C raises KeyboardInterrupt (the CLI exits 130, saying how to resume), and
    the SIGINT handler from before ``fit()`` is put back: Ray's stays installed, bound to a controller that is gone."""
    before = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as exiting:
        if trainer.interrupted:
            raise KeyboardInterrupt from exiting
        raise
    finally:
        if before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)


def _trainer(
    config: TrainConfig,
    loop_config: LoopConfig,
    datasets: dict[str, ray.data.Dataset],
    use_gpu: bool,
    worker_cpus: float,
    storage: location.Location,
    callbacks: list[ray.train.UserCallback] | None,
) -> _Trainer:
    return _Trainer(
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
                # Not the monitor alone: of two epochs tied on it, pruning must keep the one collect picks.
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
    has_batch_norm = backbones.family(config.arch).batch_norm  # LayerNorm (ConvNeXt, ViT) has no batch statistics
    trains_batch_norm = has_batch_norm and config.train_bn and config.freeze_depth < NUM_STAGES
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


def describe_lost_classes(layout: Layout, lost: list[int], skipped: dict[str, str]) -> str:
    example_path, example_reason = next(iter(sorted(skipped.items())))
    if len(lost) == len(layout.class_names):
        what = f"none of the {len(layout.train)} training images could be decoded"
    else:
        names = ", ".join(layout.class_names[label] for label in lost)
        what = f"no training image of class {names} could be decoded, so the model could not learn it"
    return f"--data: {what} (e.g. {example_path}: {example_reason}); fix or remove those files"


def _root_cause(error: BaseException) -> str:
    # A worker's own TlRayError (checkpoint.CheckpointWriteError) as written, not the last line of its traceback:
    # Ray Train hands each worker's exception back in WorkerGroupError.worker_failures, wrapped in its
    # UserExceptionWithTraceback (the original in ``_base_exc``).
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        worker = getattr(failure, "_base_exc", failure)
        if isinstance(worker, TlRayError):
            return str(worker)
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__

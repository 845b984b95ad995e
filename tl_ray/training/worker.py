"""The training worker (``train_loop_per_worker``): what every Ray Train worker runs.

Each worker builds the model from the starting weights, finds the peak rate first where it was not given
(``lr_search``), resumes from the checkpoint Ray Train hands it if there is one (a rerun, or a restart after a worker
or node was lost: ``state.load_run_state``), then runs the epoch loop (``loop``) on the batches its input plan
(``tl_ray.inputs.plan``) gives it and reports each epoch; rank 0 writes the checkpoint (``state.save_run_state``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from torch import nn

from tl_ray import checkpoint, classes, cluster, model, progress
from tl_ray.inputs import skiplog
from tl_ray.inputs.plan import InputPlan
from tl_ray.location import forbid_world_writable_files
from tl_ray.training import lr_range, lr_search, mixing, schedule, toolbox
from tl_ray.training.config import TrainConfig
from tl_ray.training.loop import Epoch, EpochLoop, amp_dtype_of
from tl_ray.training.metrics import RANK_SCORE, sum_across_workers
from tl_ray.training.state import LR_RANGE_TEST, LR_RANGE_TEST_FILE, RunMeta, RunState, load_run_state, save_run_state

LOOP_CONFIG = "tl_ray_loop_config"  # the one key of the TorchTrainer's train_loop_config: an object ref


@dataclass(frozen=True)
class LoopConfig:
    """Everything a training worker needs, built once by the driver and shared with every worker as one object ref
    (Ray Train's controller unpickles its ``train_loop_config`` but never uses it: it holds only the ref)."""

    options: TrainConfig  # validated and resolved for the training set (no "auto" left)
    class_names: list[str]
    num_train: int  # training images less the files known to be bad: the LR curve's step count
    train_per_class: list[int]  # listed training images per class, to notice a class left with none
    class_weights: dict[str, float] | None  # --class-weights auto: each class's loss weight, else None
    weights_ref: Any  # ray.ObjectRef of the starting state dict (model.initial_weights)
    weights_source: str  # what --weights resolved to, as meta.json records it
    mean: list[float]
    std: list[float]
    resize_size: int  # validation's short side, as the checkpoint records it for predict
    cpus_per_worker: float
    skipped: skiplog.Skips
    inputs: InputPlan
    progress: Any = None  # progress.relay's queue: rank 0 sends its events to the driver
    # --lr auto, or `tl-ray lr-find`: the LR range test a new run starts with (its suggestion is the peak rate)
    range_test: lr_range.RangeTest | None = None
    range_test_only: bool = False  # `tl-ray lr-find`: report the range test's curve and train no epoch
    # --lr select: the (peak rate, global batch) pairs tried before the run (recipe.select_candidates)
    lr_candidates: tuple[tuple[float, int], ...] = ()
    lr_from_size: bool = False  # --lr was left out (select, from the training set's size) rather than given
    interpolation: str | None = None  # the weights' resize (model.InitialWeights), as meta.json records it

    def run_meta(self) -> RunMeta:
        """What the run's checkpoints say of its model (meta.json)."""
        return RunMeta(
            self.options,
            self.class_names,
            self.class_weights,
            self.resize_size,
            self.mean,
            self.std,
            self.weights_source,
            self.interpolation,
        )


def train_loop_per_worker(train_loop_config: dict[str, Any]) -> None:
    """Ray Train's worker function: set up, find the rate if asked, resume if handed a checkpoint, train."""
    forbid_world_writable_files()
    loop: LoopConfig = ray.get(train_loop_config[LOOP_CONFIG])
    options, class_names = loop.options, loop.class_names
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    progress.mark("worker: loop entered", rank=rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu" and options.cpus_per_worker is None:
        threads = cluster.torch_threads(
            cluster.node_cpus(), context.get_local_world_size(), loop.inputs.decoding_every_epoch
        )
        torch.set_num_threads(threads)
    else:  # the CPUs given (--cpus-per-worker, or a sweep running trials side by side) are the ones to use
        torch.set_num_threads(max(1, round(loop.cpus_per_worker)))
    torch.manual_seed(options.seed + rank)

    transfer = _transfer_model(loop, world, device)
    # With --lr auto the groups hold their shares of the rate (1, or the backbone's multiplier) until the range
    # test has found it. They are built at the run's freeze depth, before a probe run freezes to its head phase.
    auto_lr = loop.range_test is not None
    rate_found_first = auto_lr or bool(loop.lr_candidates)
    groups = transfer.parameter_groups(
        1.0 if rate_found_first else options.lr,
        options.weight_decay,
        options.backbone_lr_mult,
        toolbox.layer_multipliers(options),
    )
    optimizer = schedule.make_optimizer(groups, options)
    worker_batch = options.batch_size // world  # --batch-size is global: same optimisation on 1 or 8 workers
    amp_dtype = amp_dtype_of(device)
    mean, std = torch.tensor(loop.mean, device=device), torch.tensor(loop.std, device=device)
    class_weights = _weight_tensor(loop.class_weights, class_names, device)  # --class-weights auto, else None
    mixes = options.mixup > 0 or options.cutmix > 0
    epochs = EpochLoop(
        options,
        transfer,
        # On cached backbone features only the head runs (and DDP syncs only its gradients).
        transfer.head if loop.inputs.on_features else transfer,
        loop.inputs.batches(worker_batch, rank, world, device, mean, std),
        schedule.steps_per_epoch(loop.num_train, options.batch_size, world, options.accumulate),
        # --mixup/--cutmix: soft targets, weighted and smoothed as the hard-label loss is (mixing.SoftTargetLoss).
        mixing.SoftTargetLoss(class_weights, options.label_smoothing)
        if mixes
        else nn.CrossEntropyLoss(weight=class_weights, label_smoothing=options.label_smoothing),
        # Validation loss is never class-weighted: it stays comparable between runs with and without weights.
        nn.CrossEntropyLoss(label_smoothing=options.label_smoothing),
        amp_dtype,
        len(class_names),
        loop.progress if rank == 0 else None,
        mixer=mixing.Mixer(options.mixup, options.cutmix, options.mix_prob, len(class_names), options.seed)
        if mixes
        else None,
        batches_now=schedule.steps_per_epoch(loop.num_train, options.batch_size, world),
    )
    resume_from = ray.train.get_checkpoint()

    lr_curve, lr_choice = None, None
    if auto_lr and (resume_from is None or loop.range_test_only):  # lr-find run again: a new test, not a resume
        assert loop.range_test is not None
        lr_curve = lr_search.find_lr(epochs, loop.range_test, announce=not loop.range_test_only)
        if loop.range_test_only:
            _report_range_test(lr_curve, rank)
            return
        for group in optimizer.param_groups:
            group["lr"] *= lr_curve.suggestion
    if loop.lr_candidates and resume_from is None:
        lr_choice = lr_search.select_lr(epochs, loop.lr_candidates, loop.num_train, loop.lr_from_size)
        for group in optimizer.param_groups:
            group["lr"] *= lr_choice.chosen
        loop, epochs = _at_batch(loop, epochs, lr_choice.chosen_batch_size)
        options = loop.options
    run = RunState.start(
        transfer.net,
        optimizer,
        options,
        epochs.steps_now,
        device,
        amp_dtype,
        meta=loop.run_meta(),
        lr_curve=lr_curve,
        lr_choice=lr_choice,
    )
    if resume_from is not None:
        with resume_from.as_directory() as directory:
            load_run_state(directory, run)
        if run.lr_choice is not None:  # a resumed --lr select run trains on at the batch it chose
            loop, epochs = _at_batch(loop, epochs, run.lr_choice.chosen_batch_size)
            options = loop.options
    start_epoch = run.epoch
    node_ids = _worker_node_ids()
    progress.mark("worker: model ready", rank=rank)

    progress.mark("worker: data ready", rank=rank)
    if resume_from is not None:
        progress.send(epochs.events, progress.resumed_run(resume_from.path, start_epoch, options.epochs))

    def stop_without_images(epoch: int) -> bool:
        progress.mark("worker: epoch trained", rank=rank, epoch=epoch)
        if _some_class_has_no_images(loop, rank, device):
            # Every file of a class failed to decode: stop now, the driver says which (no checkpoint of a
            # model that cannot know the class).
            ray.train.report({"epoch": epoch, "stopped": "a class has no decodable training image"})
            return True
        return False

    if run.stopped_early:  # a rerun of a run --patience stopped: it is done
        return
    for done in epochs.run(run, after_training=stop_without_images):
        metrics = _epoch_metrics(done, run, options, class_names, world, node_ids, start_epoch)
        run.history.append({**metrics, "node_ids": sorted(set(node_ids))})
        run.metrics = metrics
        # --patience: every worker reads the same history (validated on summed counts), so all stop together.
        if done.epoch < options.epochs:
            run.stopped_early = toolbox.patience_reason(run.history, options.monitor, options.patience)
        progress.mark("worker: validated", rank=rank, epoch=done.epoch)
        _report(run, loop.skipped, rank, checkpoint.uploader(options.storage, options.retry_seconds))
        progress.send(epochs.events, progress.Epoch(metrics, options.epochs))
        if run.stopped_early:
            progress.send(
                epochs.events, progress.Notice(f"stopped early after epoch {done.epoch}: {run.stopped_early}")
            )
            return


def _epoch_metrics(
    done: Epoch,
    run: RunState,
    options: TrainConfig,
    class_names: list[str],
    world: int,
    node_ids: list[str],
    start_epoch: int,
) -> dict[str, Any]:
    """What the worker group reports of an epoch (to Ray Train, Tune, the console, meta.json and the history)."""
    epoch, validation, totals = done.epoch, done.validation, done.totals
    history = run.history
    monitored = [*(row[options.monitor] for row in history), validation[options.monitor]]
    # Tune's live table shows the first four metrics: the ones a sweep is judged on come first.
    return {
        "epoch": epoch,
        # The best so far: what a sweep ranks and stops trials on, so Tune's table agrees with the report.
        f"best_{options.monitor}": classes.best_value(monitored, options.monitor),
        **validation,
        # The best epoch so far by the one ranking (monitor, then val_acc, then the lower val_loss): the
        # console's star; rank_score is that ranking as the one number Ray's checkpoint pruning keeps by.
        "best_epoch": classes.best_epoch([*history, {**validation, "epoch": epoch}], options.monitor),
        RANK_SCORE: classes.rank_score(validation, options.monitor),
        # By class name (Tune's tables flatten it to val_recall/<name> columns); None: no validation image.
        "val_recall": dict(zip(class_names, done.per_class["recall"], strict=True)),
        "train_loss": totals[0] / max(totals[2], 1),
        "train_acc": totals[1] / max(totals[2], 1),
        "images_per_s": totals[2] / max(done.train_seconds, 1e-9),
        "epoch_s": time.perf_counter() - done.started,
        # Rank 0's time blocked on the next training batch: the pipeline's start-up each epoch, plus any
        # time it could not keep up.
        "data_wait_s": done.waited,
        "head_lr_now": run.scheduler.get_last_lr()[0],  # the scheduled rate at the epoch's end, not the peak
        "peak_lr": run.peak_lr(options.lr),
        "batch_size": options.batch_size,  # global; --lr select may have chosen half the rule's
        "frozen_stages": done.frozen_stages,
        "validated": done.validated,  # the weights val_* measured: the trained ones ("model") or --ema's "ema"
        "train_images": int(totals[2]),
        "val_images": int(totals[5]),
        "num_classes": len(class_names),
        "workers": world,
        "nodes": len(set(node_ids)),  # the distinct nodes the workers ran on
        "torch_threads": torch.get_num_threads(),  # per worker
        # The epoch this worker group started from: > 0 after a resume or a worker-failure restart.
        "resumed_after_epoch": start_epoch,
    }


def _at_batch(loop: LoopConfig, epochs: EpochLoop, batch_size: int) -> tuple[LoopConfig, EpochLoop]:
    """(the loop's config, the epoch loop) at the global ``batch_size``."""
    if batch_size != loop.options.batch_size:
        loop = replace(loop, options=replace(loop.options, batch_size=batch_size))
    return loop, epochs.at_batch(batch_size, loop.num_train)


def _report_range_test(curve: lr_range.LrCurve, rank: int) -> None:
    """`tl-ray lr-find`'s one report: the curve as a checkpoint of one JSON file (Ray Train keeps a run's
    metrics only with a checkpoint), ranked lowest so that no checkpoint of the run could be pruned for it."""
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if rank == 0:
            with open(os.path.join(directory, LR_RANGE_TEST_FILE), "w") as file:
                json.dump(curve.to_json(), file)
            saved = Checkpoint.from_directory(directory)
        metrics = {"epoch": 0, RANK_SCORE: -1.0, "lr_suggestion": curve.suggestion}
        ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=LR_RANGE_TEST)


def _transfer_model(loop: LoopConfig, world: int, device: torch.device) -> model.TransferModel:
    """The model at its starting weights, its first stages frozen (SyncBatchNorm across GPU workers if asked)."""
    options = loop.options
    net = model.create_model(options.arch, len(loop.class_names), options.image_size)
    net.load_state_dict(ray.get(loop.weights_ref))
    if options.sync_bn and world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    transfer = model.TransferModel(net, options.freeze_depth, train_bn=options.train_bn)
    if device.type == "cuda":
        transfer = transfer.to(memory_format=torch.channels_last)
    return transfer


def _worker_node_ids() -> list[str]:
    """Every worker's Ray node id (one collective, when the group starts): which nodes the group spans."""
    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [str(node) for node in gathered]


def _some_class_has_no_images(loop: LoopConfig, rank: int, device: torch.device) -> bool:
    """Rank 0 asks the skip log after an epoch (every training file has been tried); all workers agree."""
    lost = 0.0
    if rank == 0:
        skipped = skiplog.skipped_train_counts(loop.skipped)
        lost = float(bool(skiplog.labels_without_images(loop.train_per_class, skipped)))
    return sum_across_workers([lost], device)[0] > 0


def _weight_tensor(
    class_weights: dict[str, float] | None, class_names: list[str], device: torch.device
) -> torch.Tensor | None:
    if class_weights is None:
        return None
    return torch.tensor([class_weights[name] for name in class_names], dtype=torch.float32, device=device)


def _report(run: RunState, skipped: skiplog.Skips, rank: int, upload: Any) -> None:
    """Every worker reports its epoch (it is a barrier); only rank 0 writes the checkpoint of the run state, which
    ``upload`` (``checkpoint.uploader``) puts in storage, retried as every write is."""
    metrics, epoch = run.metrics, run.epoch
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if rank == 0:
            save_run_state(directory, run)
            saved = Checkpoint.from_directory(directory)
            metrics = {**metrics, "skipped_files": len(skiplog.skipped_files(skipped))}
            progress.mark("worker: checkpoint written", rank=rank, epoch=epoch, bytes=_folder_bytes(directory))
        name = f"checkpoint_epoch{epoch:03d}"
        ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=name, checkpoint_upload_fn=upload)
        progress.mark("worker: reported", rank=rank, epoch=epoch)


def _folder_bytes(directory: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())

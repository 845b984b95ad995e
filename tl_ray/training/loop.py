"""The training worker's loop (``train_loop_per_worker``): what every Ray Train worker runs.

Each worker builds the model from the starting weights, follows the planned LR curve, trains data-parallel on the
batches its input plan (``tl_ray.inputs.plan``) gives it, evaluates its share of the validation set, and reports
each epoch; rank 0 writes the checkpoint. A resumed worker group (a rerun, or a restart after a worker or node was
lost) starts from the checkpoint Ray Train hands it, which carries the optimizer, the LR curve and the history.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
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
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import TlRayError
from tl_ray.inputs import skiplog
from tl_ray.inputs.plan import InputPlan, WorkerBatches
from tl_ray.location import forbid_world_writable_files
from tl_ray.training import lr_range, lr_select, schedule
from tl_ray.training.config import TrainConfig
from tl_ray.version import __version__

# The epoch metric Ray Train keeps checkpoints by: classes.rank_score, the ranking that picks the best checkpoint.
RANK_SCORE = "rank_score"
LOOP_CONFIG = "tl_ray_loop_config"  # the one key of the TorchTrainer's train_loop_config: an object ref
# The range test's curve (lr_range.LrCurve as JSON): `tl-ray lr-find`'s one report, and a --lr auto run's train state.
LR_RANGE_TEST = "lr_range_test"
LR_RANGE_TEST_FILE = "lr_range_test.json"
# --lr select: each candidate rate's validated epochs and the rate chosen (lr_select.LrChoice as JSON), in the train
# state (a resumed run does not select again) and result.json.
LR_SELECTION = "lr_selection"


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


@dataclass
class _Curve:
    """The LR curve's plan, in the first worker group's steps an epoch, and the point of it reached: a group resized
    after a node loss or join follows the same curve by global progress (epochs and the share of this one done)."""

    steps_per_epoch: int
    position: int = 0


def _sum_across_workers(values: list[float], device: torch.device) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def amp_dtype_of(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train_loop_per_worker(train_loop_config: dict[str, Any]) -> None:
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
        1.0 if rate_found_first else options.lr, options.weight_decay, options.backbone_lr_mult
    )
    optimizer = schedule.make_optimizer(groups, options)
    worker_batch = options.batch_size // world  # --batch-size is global: same optimisation on 1 or 8 workers
    steps_now = schedule.steps_per_epoch(loop.num_train, options.batch_size, world)
    amp_dtype = amp_dtype_of(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # On cached backbone features only the head runs (and DDP syncs only its gradients).
    trained = transfer.head if loop.inputs.on_features else transfer
    weight = _weight_tensor(loop.class_weights, class_names, device)  # --class-weights auto, else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=options.label_smoothing)
    mean, std = torch.tensor(loop.mean, device=device), torch.tensor(loop.std, device=device)
    batches = loop.inputs.batches(worker_batch, rank, world, device, mean, std)
    events = loop.progress if rank == 0 else None
    resume_from = ray.train.get_checkpoint()
    # Validation loss is never class-weighted: it stays comparable between runs with and without weights.
    val_criterion = nn.CrossEntropyLoss(label_smoothing=options.label_smoothing)

    wrapped, lr_curve, lr_choice = None, None, None
    if auto_lr and (resume_from is None or loop.range_test_only):  # lr-find run again: a new test, not a resume
        _, wrapped = _epoch_phase(1, options, transfer, trained, None)
        lr_curve = _find_lr(loop, transfer, wrapped, batches, criterion, amp_dtype, device, events)
        if loop.range_test_only:
            _report_range_test(lr_curve, rank)
            return
        for group in optimizer.param_groups:
            group["lr"] *= lr_curve.suggestion
    if loop.lr_candidates and resume_from is None:
        lr_choice = _select_lr(loop, transfer, trained, batches, criterion, val_criterion, amp_dtype, events)
        for group in optimizer.param_groups:
            group["lr"] *= lr_choice.chosen
        loop, batches, steps_now = _at_batch(loop, batches, lr_choice.chosen_batch_size, world)
        options = loop.options
    curve = _Curve(steps_now)
    scheduler = _lr_scheduler(optimizer, curve, options)
    start_epoch, history, resumed = _resume(resume_from, loop, transfer, optimizer, scheduler, scaler, curve)
    if resumed.lr_choice is not None:  # a resumed --lr select run trains on at the batch it chose
        loop, batches, steps_now = _at_batch(loop, batches, resumed.lr_choice.chosen_batch_size, world)
        options = loop.options
    found = _FoundLr(lr_curve or resumed.lr_curve, lr_choice or resumed.lr_choice)
    node_ids = _worker_node_ids()
    progress.mark("worker: model ready", rank=rank)

    progress.mark("worker: data ready", rank=rank)
    if resume_from is not None:
        progress.send(events, progress.resumed_run(resume_from.path, start_epoch, options.epochs))
    for epoch in range(start_epoch + 1, options.epochs + 1):
        started = time.perf_counter()
        pacer = progress.StepPacer(events, epoch, options.epochs, steps_now)
        depth, wrapped = _epoch_phase(epoch, options, transfer, trained, wrapped)
        trained_epoch = _train_epoch(
            wrapped, batches, epoch, criterion, optimizer, scheduler, scaler, amp_dtype, curve, steps_now, pacer
        )
        train_seconds = time.perf_counter() - started
        progress.mark("worker: epoch trained", rank=rank, epoch=epoch)
        if _some_class_has_no_images(loop, rank, device):
            # Every file of a class failed to decode: stop now, the driver says which (no checkpoint of a
            # model that cannot know the class).
            ray.train.report({"epoch": epoch, "stopped": "a class has no decodable training image"})
            return
        totals, per_class, validation = _validate(
            transfer, trained, batches, val_criterion, amp_dtype, len(class_names), trained_epoch.totals
        )
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
            "data_wait_s": trained_epoch.waited,
            "head_lr_now": scheduler.get_last_lr()[0],  # the scheduled rate at the epoch's end, not the peak
            "peak_lr": found.peak_lr(options.lr),
            "batch_size": options.batch_size,  # global; --lr select may have chosen half the rule's
            "frozen_stages": depth,
            "train_images": int(totals[2]),
            "val_images": int(totals[5]),
            "num_classes": len(class_names),
            "workers": world,
            "nodes": len(set(node_ids)),  # the distinct nodes the workers ran on
            "torch_threads": torch.get_num_threads(),  # per worker
            # The epoch this worker group started from: > 0 after a resume or a worker-failure restart.
            "resumed_after_epoch": start_epoch,
        }
        history.append({**metrics, "node_ids": sorted(set(node_ids))})
        progress.mark("worker: validated", rank=rank, epoch=epoch)
        _report(epoch, metrics, history, transfer, optimizer, scheduler, scaler, curve, loop, rank, found)
        progress.send(events, progress.Epoch(metrics, options.epochs))


def _lr_scheduler(
    optimizer: torch.optim.Optimizer, curve: _Curve, options: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The planned LR curve (warm-up, cosine; a probe run's two phases) at ``curve``'s position, step by step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda _: schedule.lr_factor(
            curve.position, curve.steps_per_epoch, options.epochs, options.warmup_epochs, options.head_epochs
        ),
    )


def _epoch_phase(
    epoch: int, options: TrainConfig, transfer: model.TransferModel, trained: nn.Module, wrapped: nn.Module | None
) -> tuple[int, nn.Module]:
    """(the stages frozen in ``epoch``, what trains, prepared for data parallelism): a probe-then-fine-tune run
    trains the head alone first; DDP is (re)built only when what trains changes."""
    depth = NUM_STAGES if epoch <= options.head_epochs else options.freeze_depth
    if wrapped is None or depth != transfer.freeze_depth:
        transfer.set_freeze_depth(depth)
        wrapped = ray.train.torch.prepare_model(trained)
    return depth, wrapped


def _find_lr(
    loop: LoopConfig,
    transfer: model.TransferModel,
    wrapped: nn.Module,
    batches: WorkerBatches,
    criterion: nn.Module,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    events: Any,
) -> lr_range.LrCurve:
    """The range test from the run's starting weights, on a throwaway optimizer of the run's kind; the model is
    put back as it started (head initialisation and BatchNorm statistics included)."""
    options, test = loop.options, loop.range_test
    assert test is not None
    progress.send(events, progress.Stage(f"LR range test: up to {test.steps} steps"))
    start = {key: value.detach().clone() for key, value in transfer.net.state_dict().items()}
    tester = schedule.make_optimizer(
        transfer.parameter_groups(1.0, options.weight_decay, options.backbone_lr_mult), options
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def mean_over_workers(loss_sum: float, images: int) -> float:
        total, seen = _sum_across_workers([loss_sum, float(images)], device)
        return total / max(seen, 1.0)

    # The random state (crops, dropout) is put back too: the run then trains as one given --lr SUGGESTION would.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _range_test_errors():
        found = lr_range.run(
            wrapped,
            batches.train,
            batches.model_input,
            criterion,
            tester,
            scaler,
            amp_dtype,
            device,
            test,
            mean_over_workers,
        )
    transfer.net.load_state_dict(start)
    if not loop.range_test_only:
        progress.send(events, progress.found_lr(found.suggestion, len(found.lrs), found.stopped))
    return found


@contextlib.contextmanager
def _range_test_errors() -> Iterator[None]:
    try:
        yield
    except ValueError as error:
        raise TlRayError(f"the LR range test could not run: {error}") from error


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


@dataclass(frozen=True)
class _FoundLr:
    """How the run's peak rate was found, when it was not given: a --lr auto run's range test, a --lr select
    run's candidates. Kept in the train state, so a resumed run trains on at the same rate."""

    lr_curve: lr_range.LrCurve | None = None
    lr_choice: lr_select.LrChoice | None = None

    def peak_lr(self, given: Any) -> float:
        """The head's peak rate: what the range test found or the candidates chose, else ``given`` (--lr)."""
        if self.lr_curve is not None:
            return self.lr_curve.suggestion
        return self.lr_choice.chosen if self.lr_choice is not None else given


def _resume(
    resume_from: Checkpoint | None,
    loop: LoopConfig,
    transfer: model.TransferModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    curve: _Curve,
) -> tuple[int, list[dict[str, Any]], _FoundLr]:
    """(the last epoch done, the history, how the peak rate was found) from the checkpoint Ray Train hands a
    resumed group; (0, [], nothing found) at the start."""
    if resume_from is None:
        return 0, [], _FoundLr()
    with resume_from.as_directory() as directory:
        meta = checkpoint.read_meta(directory)
        check_resumable(meta, loop.options, loop.class_names, loop.class_weights)
        transfer.net.load_state_dict(checkpoint.read_model_state(directory))
        state = checkpoint.read_train_state(directory)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    curve.steps_per_epoch = state.get("steps_per_epoch", curve.steps_per_epoch)
    tested, selected = state.get(LR_RANGE_TEST), state.get(LR_SELECTION)
    found = _FoundLr(
        lr_range.LrCurve.from_json(tested) if tested else None,
        lr_select.LrChoice.from_json(selected, loop.options.batch_size) if selected else None,
    )
    return state["epoch"], state["history"], found


@dataclass(frozen=True)
class _EpochTotals:
    totals: list[float]  # loss sum, correct and seen images of this worker, to be summed across workers
    waited: float  # seconds blocked on the next batch


def _train_epoch(
    wrapped: nn.Module,
    batches: WorkerBatches,
    epoch: int,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    curve: _Curve,
    steps_now: int,
    pacer: progress.StepPacer,
) -> _EpochTotals:
    device = batches.device
    wrapped.train()
    loss_sum = correct = seen = waited = 0.0
    stepped = 0
    asked = time.perf_counter()
    for batch in batches.train(epoch):
        waited += time.perf_counter() - asked
        labels = batch["label"]
        if len(labels) < 2:  # BatchNorm cannot train on one sample; equal shards make every worker skip it
            continue
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = wrapped(batches.model_input(batch))
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        stepped += 1
        curve.position = schedule.planned_position(epoch, stepped, steps_now, curve.steps_per_epoch)
        scheduler.step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        pacer.step(stepped)
        asked = time.perf_counter()
    return _EpochTotals([loss_sum, correct, seen], waited)


def _validate(
    transfer: model.TransferModel,
    trained: nn.Module,
    batches: WorkerBatches,
    criterion: nn.Module,
    amp_dtype: torch.dtype | None,
    num_classes: int,
    train_totals: list[float],
) -> tuple[list[float], dict[str, Any], dict[str, float]]:
    """Validate rank 0's model on every worker's share: (this epoch's training and validation totals summed
    across workers, the per-class metrics, {val_acc, val_loss, macro_f1})."""
    device = batches.device
    _sync_buffers_from_rank0(transfer)
    val_loss, val_correct, val_seen, val_counts = evaluate(
        trained, batches.val(), batches.model_input, criterion, device, amp_dtype, num_classes
    )
    totals = _sum_across_workers([*train_totals, val_loss, val_correct, val_seen, *val_counts], device)
    per_class = classes.class_metrics(*split_counts(totals[6:], 3))
    validation = {
        "val_acc": totals[4] / max(totals[5], 1),
        "val_loss": totals[3] / max(totals[5], 1),
        "macro_f1": per_class["macro_f1"],
    }
    return totals, per_class, validation


def _at_batch(
    loop: LoopConfig, batches: WorkerBatches, batch_size: int, world: int
) -> tuple[LoopConfig, WorkerBatches, int]:
    """(the loop's config, this worker's batches, the steps an epoch) at the global ``batch_size``."""
    if batch_size != loop.options.batch_size:
        loop = replace(loop, options=replace(loop.options, batch_size=batch_size))
    if batch_size // world != batches.worker_batch:
        batches = batches.at_worker_batch(batch_size // world)
    return loop, batches, schedule.steps_per_epoch(loop.num_train, batch_size, world)


def _select_lr(
    loop: LoopConfig,
    transfer: model.TransferModel,
    trained: nn.Module,
    batches: WorkerBatches,
    criterion: nn.Module,
    val_criterion: nn.Module,
    amp_dtype: torch.dtype | None,
    events: Any,
) -> lr_select.LrChoice:
    """--lr select: train the whole run at each candidate rate and batch from the run's start, validating every
    epoch; the model and the random state are put back after each, so the run then trains as one given --lr CHOSEN
    --batch-size ITS_BATCH would."""
    options, device, world = loop.options, batches.device, batches.world
    start = {key: value.detach().clone() for key, value in transfer.net.state_dict().items()}
    tried = []
    progress.send(events, progress.selecting_lr(loop.lr_candidates, options.epochs, options.monitor, loop.lr_from_size))
    for index, (rate, batch_size) in enumerate(loop.lr_candidates):
        _, candidate_batches, steps_now = _at_batch(loop, batches, batch_size, world)
        progress.send(events, progress.trying_lr(rate, batch_size, index, len(loop.lr_candidates), options.epochs))
        optimizer = schedule.make_optimizer(
            transfer.parameter_groups(rate, options.weight_decay, options.backbone_lr_mult), options
        )
        curve = _Curve(steps_now)
        scheduler = _lr_scheduler(optimizer, curve, options)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        epochs, wrapped = [], None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for epoch in range(1, options.epochs + 1):
                _, wrapped = _epoch_phase(epoch, options, transfer, trained, wrapped)
                pacer = progress.StepPacer(events, epoch, options.epochs, steps_now)
                trained_epoch = _train_epoch(
                    wrapped,
                    candidate_batches,
                    epoch,
                    criterion,
                    optimizer,
                    scheduler,
                    scaler,
                    amp_dtype,
                    curve,
                    steps_now,
                    pacer,
                )
                _, _, validation = _validate(
                    transfer,
                    trained,
                    candidate_batches,
                    val_criterion,
                    amp_dtype,
                    len(loop.class_names),
                    trained_epoch.totals,
                )
                epochs.append({"epoch": epoch, **validation})
        transfer.net.load_state_dict(start)
        tried.append(epochs)
        best = lr_select.best_epoch(epochs, options.monitor)
        progress.send(events, progress.tried_lr(rate, batch_size, best, options.monitor, options.epochs))
    centre = (options.recipe_lr(), options.batch_size)
    choice = lr_select.choose(list(loop.lr_candidates), tried, options.monitor, centre=centre)
    progress.send(events, progress.selected_lr(choice.chosen, choice.chosen_batch_size, options.monitor))
    return choice


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
    return _sum_across_workers([lost], device)[0] > 0


def _sync_buffers_from_rank0(module: nn.Module) -> None:
    """Give every worker rank 0's BatchNorm statistics before validating.

    Each worker's last training step updated its own running statistics; rank 0's are
    the ones the checkpoint keeps, so val_acc must be measured with those.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def check_resumable(
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


def split_counts(values: list[float], parts: int) -> list[list[float]]:
    size = len(values) // parts
    return [values[index * size : (index + 1) * size] for index in range(parts)]


def count_classes(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per true class, per predicted class, and correct per class, concatenated (3 x num_classes): counts
    that sum across batches and workers into ``classes.class_metrics``' arguments."""
    hits = labels[predictions == labels]
    return torch.cat([torch.bincount(values, minlength=num_classes) for values in (labels, predictions, hits)]).double()


def evaluate(
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


def _report(
    epoch: int,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    transfer: model.TransferModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    curve: _Curve,
    loop: LoopConfig,
    rank: int,
    found: _FoundLr,
) -> None:
    """Every worker reports (it is a barrier); only rank 0 writes the checkpoint."""
    options = loop.options
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if rank == 0:
            meta = {
                "arch": options.arch,
                "num_classes": len(loop.class_names),
                "class_names": loop.class_names,
                "freeze_depth": options.freeze_depth,
                "strategy": strategy_meta(options, loop.class_weights),
                "monitor": options.monitor,
                "image_size": options.image_size,
                "resize_size": loop.resize_size,
                "mean": loop.mean,
                "std": loop.std,
                "weights": loop.weights_source,
                "epoch": epoch,
                "metrics": metrics,
                "tl_ray_version": __version__,
            }
            train_state = {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "steps_per_epoch": curve.steps_per_epoch,  # the LR curve's plan, kept across resizes
                "history": history,
                LR_RANGE_TEST: found.lr_curve.to_json() if found.lr_curve is not None else None,
                LR_SELECTION: found.lr_choice.to_json() if found.lr_choice is not None else None,
            }
            checkpoint.save_checkpoint(directory, transfer.net.state_dict(), meta, train_state)
            saved = Checkpoint.from_directory(directory)
            metrics = {**metrics, "skipped_files": len(skiplog.skipped_files(loop.skipped))}
            progress.mark("worker: checkpoint written", rank=rank, epoch=epoch, bytes=_folder_bytes(directory))
        ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"checkpoint_epoch{epoch:03d}")
        progress.mark("worker: reported", rank=rank, epoch=epoch)


def _folder_bytes(directory: str) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())

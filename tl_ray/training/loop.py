"""The epoch loop: one run's epochs, each trained step by step on the LR curve and then validated.

A Ray Train worker (``tl_ray.training.worker``) runs it over the run's state; ``--lr select`` runs the same loop
over each candidate's own state (``tl_ray.training.lr_search``), so a candidate trains exactly as the run at its
rate and batch would. The loop changes the run state (``tl_ray.training.state``: model, optimizer, scheduler, curve,
epoch) and yields each validated epoch; what is reported and checkpointed is the caller's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from tl_ray import model, progress
from tl_ray.backbones import NUM_STAGES
from tl_ray.inputs.plan import WorkerBatches
from tl_ray.training import metrics, mixing, schedule, toolbox
from tl_ray.training.config import TrainConfig
from tl_ray.training.state import RunState


def amp_dtype_of(device: torch.device) -> torch.dtype | None:
    """The autocast dtype training and validation run in: bf16 where the GPU has it, else fp16; none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class EpochTotals:
    totals: list[float]  # loss sum, correct and seen images of this worker, to be summed across workers
    waited: float  # seconds blocked on the next batch


@dataclass(frozen=True)
class Epoch:
    """One trained and validated epoch, as the loop hands it to its caller."""

    epoch: int
    frozen_stages: int  # the freeze depth it trained at
    started: float  # time.perf_counter() at its start
    train_seconds: float
    waited: float  # rank 0's time blocked on the next training batch
    totals: list[float]  # training and validation totals summed across workers (metrics.validate)
    per_class: dict[str, Any]  # classes.class_metrics of the summed counts
    validation: dict[str, float]  # val_acc, val_loss, macro_f1
    validated: str = "model"  # the weights validated: the trained ones, or "ema" (--ema: their average)


@dataclass
class EpochLoop:
    """What trains, on which batches, with which losses: everything an epoch needs besides the run state."""

    options: TrainConfig
    transfer: model.TransferModel
    trained: nn.Module  # the whole model, or its head alone on cached backbone features
    batches: WorkerBatches
    steps_now: int  # this worker group's optimizer steps an epoch (the curve's plan may be another group's)
    criterion: nn.Module  # the training loss (class-weighted with --class-weights auto)
    val_criterion: nn.Module  # never class-weighted: val_loss stays comparable between runs
    amp_dtype: torch.dtype | None
    num_classes: int
    events: Any = None  # progress.relay's queue on rank 0, else None
    wrapped: nn.Module | None = None  # ``trained`` prepared for data parallelism (DDP), at the current depth
    mixer: mixing.Mixer | None = None  # --mixup/--cutmix: mixes each training batch (``criterion`` takes soft targets)
    batches_now: int = 0  # this worker's training batches an epoch (--accumulate: N to a step); 0: steps_now

    def phase(self, epoch: int) -> int:
        """The stages frozen in ``epoch``: a probe-then-fine-tune run trains the head alone first. Sets the model's
        depth; DDP is (re)built only when what trains changes."""
        depth = NUM_STAGES if epoch <= self.options.head_epochs else self.options.freeze_depth
        if self.wrapped is None or depth != self.transfer.freeze_depth:
            self.transfer.set_freeze_depth(depth)
            self.wrapped = ray.train.torch.prepare_model(self.trained)
            if self.options.compile:  # --compile: compiled after DDP's wrapping, as the DDP docs advise
                self.wrapped = torch.compile(self.wrapped)
        return depth

    def at_batch(self, batch_size: int, num_train: int) -> EpochLoop:
        """The loop at the global ``batch_size`` (--lr select tries two): the same splits dealt in this worker's
        share of it, and the steps an epoch that makes."""
        world = self.batches.world
        batches = self.batches
        if batch_size // world != batches.worker_batch:
            batches = batches.at_worker_batch(batch_size // world)
        options = self.options
        if batch_size != options.batch_size:
            options = dataclasses.replace(options, batch_size=batch_size)
        steps_now = schedule.steps_per_epoch(num_train, batch_size, world, options.accumulate)
        batches_now = schedule.steps_per_epoch(num_train, batch_size, world)
        return dataclasses.replace(self, options=options, batches=batches, steps_now=steps_now, batches_now=batches_now)

    def run(self, state: RunState, after_training: Callable[[int], bool] | None = None) -> Iterator[Epoch]:
        """Train and validate the epochs after ``state.epoch`` up to the run's last, advancing ``state``.

        ``after_training(epoch)`` is asked once an epoch has trained, before it is validated (every worker asks: it
        may be a collective); True ends the loop there."""
        epochs = self.options.epochs
        for epoch in range(state.epoch + 1, epochs + 1):
            started = time.perf_counter()
            pacer = progress.StepPacer(self.events, epoch, epochs, self.steps_now)
            depth = self.phase(epoch)
            trained = self._train_epoch(state, epoch, pacer)
            train_seconds = time.perf_counter() - started
            if after_training is not None and after_training(epoch):
                return
            # --ema: the averaged weights are the ones validated (and checkpointed as the model: state.py).
            validated = state.ema.transfer if state.ema is not None else self.transfer
            on_head = self.trained is not self.transfer  # cached features: the head alone runs
            totals, per_class, validation = metrics.validate(
                validated,
                validated.head if on_head else validated,
                self.batches,
                self.val_criterion,
                self.amp_dtype,
                self.num_classes,
                trained.totals,
            )
            state.epoch = epoch
            which = "ema" if state.ema is not None else "model"
            yield Epoch(epoch, depth, started, train_seconds, trained.waited, totals, per_class, validation, which)

    def _train_epoch(self, state: RunState, epoch: int, pacer: progress.StepPacer) -> EpochTotals:
        """One epoch's optimizer steps, each moving the LR curve by this group's share of an epoch. With
        --accumulate N a step takes the gradients of N batches, each batch's loss divided by its group's size
        (``toolbox.group_size``), and DDP all-reduces only on a group's last batch (``no_sync`` before it); an
        epoch always ends on a step, so a checkpoint (and a resume) never falls inside a group."""
        wrapped, amp_dtype, device = self.wrapped, self.amp_dtype, self.batches.device
        assert wrapped is not None, "phase() prepares the model first"
        optimizer = state.optimizer
        accumulate, batches_now = self.options.accumulate, self.batches_now or self.steps_now
        wrapped.train()
        loss_sum = correct = seen = waited = 0.0
        stepped = index = 0
        asked = time.perf_counter()
        for batch in self.batches.train(epoch):
            waited += time.perf_counter() - asked
            labels = batch["label"]
            if len(labels) < 2:  # BatchNorm cannot train on one sample; equal shards make every worker skip it
                continue
            inputs, targets = self.batches.model_input(batch), labels
            if self.mixer is not None:
                inputs, targets = self.mixer(inputs, labels, epoch, self.batches.rank, index)
            size = toolbox.group_size(index, batches_now, accumulate)
            closes_group = index % accumulate == size - 1
            if index % accumulate == 0:
                optimizer.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if closes_group else _no_sync(wrapped):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = wrapped(inputs)
                    loss = self.criterion(logits, targets)
                state.scaler.scale(loss / size).backward()
            index += 1
            if closes_group:
                stepped = self._step(state, epoch, stepped)
                pacer.step(stepped)
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == mixing.dominant_labels(targets)).sum().item()
            seen += len(labels)
            asked = time.perf_counter()
        if index % accumulate and toolbox.group_size(index - 1, batches_now, accumulate) > index % accumulate:
            # Fewer batches came than planned (files found bad on the way): the open group steps with what it
            # has, its gradients averaged across workers by hand (no_sync kept DDP from doing it).
            _all_reduce_gradients(self.trained)
            stepped = self._step(state, epoch, stepped)
        return EpochTotals([loss_sum, correct, seen], waited)

    def _step(self, state: RunState, epoch: int, stepped: int) -> int:
        """One optimizer step, the LR curve moved to it, the EMA updated; returns the steps taken this epoch."""
        state.scaler.step(state.optimizer)
        state.scaler.update()
        stepped += 1
        state.curve.position = schedule.planned_position(epoch, stepped, self.steps_now, state.curve.steps_per_epoch)
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(self.transfer.net)
        return stepped


def _no_sync(wrapped: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (no all-reduce on this backward); nothing to skip for a model without DDP (one worker)."""
    no_sync = getattr(wrapped, "no_sync", None)
    return no_sync() if no_sync is not None else contextlib.nullcontext()


def _all_reduce_gradients(module: nn.Module) -> None:
    """Average the gradients over the workers, as DDP's backward would have."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for param in module.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= dist.get_world_size()

"""The learning-rate schedule: how many optimizer steps an epoch takes, the warm-up and cosine curve they follow
(planned once, kept when a worker group is resized), the point of it a run has reached, and the optimizer the
parameter groups go to."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tl_ray.training.config import TrainConfig


def steps_per_epoch(num_train: int, batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """Optimizer steps each worker takes per epoch, as the loop takes them.

    Each worker gets ``num_train // world_size`` images (equal shards) in batches of
    ``batch_size // world_size``, and skips a last batch of one image (BatchNorm cannot
    train on it). Planning the schedule from anything else ends it early (the last steps at
    learning rate 0) or late. With ``accumulate`` (--accumulate N) a step takes N batches, the
    epoch's last group however many are left (``accumulate`` 1: the batches an epoch).
    """
    shard, worker_batch = num_train // world_size, batch_size // world_size
    full, rest = divmod(shard, worker_batch)
    return max(1, math.ceil(max(1, full + (rest >= 2)) / accumulate))


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
    """The optimizer over ``TransferModel.parameter_groups`` (each group carries its own lr and weight decay, so
    the optimizer's own default rate is never used)."""
    if options.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=options.momentum, nesterov=options.momentum > 0)
    raise ValueError(f"optimizer {options.optimizer!r} was not resolved (TrainConfig.validate)")


def planned_position(epoch: int, stepped: int, steps_now: int, planned_steps_per_epoch: int) -> int:
    """The step of the planned LR curve reached after ``stepped`` of this group's ``steps_now`` steps in ``epoch``.

    The same share of an epoch is the same point of the curve whatever the worker count: a group of
    another size (more or fewer steps per epoch) follows the curve the run was planned with.
    """
    done = min(planned_steps_per_epoch, round(stepped * planned_steps_per_epoch / max(1, steps_now)))
    return (epoch - 1) * planned_steps_per_epoch + done


@dataclass
class Curve:
    """The LR curve's plan, in the first worker group's steps an epoch, and the point of it reached: a group resized
    after a node loss or join follows the same curve by global progress (epochs and the share of this one done).
    The plan is part of the run state (a resumed group keeps it); the position is the scheduler's."""

    steps_per_epoch: int
    position: int = 0


def lr_scheduler(
    optimizer: torch.optim.Optimizer, curve: Curve, options: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The planned LR curve (warm-up, cosine; a probe run's two phases) at ``curve``'s position, step by step: the
    loop moves ``curve.position`` (``planned_position``), the scheduler reads it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda _: lr_factor(
            curve.position, curve.steps_per_epoch, options.epochs, options.warmup_epochs, options.head_epochs
        ),
    )

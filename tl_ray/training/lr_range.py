"""The learning-rate range test (Leslie Smith's LR finder, as fastai's ``lr_find`` runs it): what ``--lr auto`` and
`tl-ray lr-find` run before training.

The model trains for up to ``steps`` optimizer steps on the run's own batches while the rate grows exponentially
from ``start_lr`` to ``end_lr``; the loss, smoothed as fastai smooths it, is recorded at each step, and the test
stops once it diverges (above ``DIVERGED`` times its lowest, or not finite). The suggestion is fastai's default
rule, ``valley``: the rate two thirds of the way down the longest descending stretch of the curve. Every worker
takes the same steps on its own shard and records the mean loss over all of them, so all reach one suggestion.
The caller restores the model afterwards: the test only chooses a rate.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tl_ray import recipe

SMOOTHING = 0.98  # beta of the debiased exponential moving average of the loss
DIVERGED = 4.0  # the smoothed loss above this many times its lowest: stop
# The suggestion ignores the curve's first tenth (the rate has barely moved the loss) and its last 5 points
# (already diverging), as fastai's lr_find does.
SKIP_END = 5


@dataclass(frozen=True)
class RangeTest:
    """A range test's rates and length."""

    steps: int = recipe.RANGE_TEST_STEPS
    start_lr: float = recipe.RANGE_TEST_START_LR
    end_lr: float = recipe.RANGE_TEST_END_LR

    def lr_at(self, step: int) -> float:
        """The rate of step ``step`` (0-based): exponential from ``start_lr`` towards ``end_lr`` at ``steps``."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / self.steps)


@dataclass(frozen=True)
class LrCurve:
    """What a range test measured and suggests: the rate and smoothed loss of each step it took."""

    lrs: list[float]
    losses: list[float]
    suggestion: float
    suggestion_index: int  # the step of ``lrs`` the suggestion is
    stopped: str  # "diverged" (the loss ran away, the usual end) or "steps" (it reached end_lr)
    steps: int  # the steps the test was given

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LrCurve:
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})


def valley(losses: list[float]) -> int:
    """fastai's ``valley`` rule: the index two thirds of the way along the longest strictly descending subsequence
    of ``losses`` (found in O(n^2), n <= a few hundred)."""
    count = len(losses)
    longest = [1] * count
    max_start = max_end = 0
    for i in range(1, count):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[max_end] < longest[i]:
                max_end = i
                max_start = max_end - longest[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def suggest(lrs: list[float], losses: list[float], steps: int) -> tuple[float, int]:
    """(suggested rate, its index in ``lrs``) from a recorded curve, trimmed as fastai trims it; a curve too short
    to trim (it diverged within a few steps) is used whole."""
    if not lrs:
        raise ValueError("the range test took no step")
    first, last = steps // 10, len(lrs) - SKIP_END
    if last - first < 3:
        first, last = 0, len(lrs)
    finite = [index for index in range(first, last) if math.isfinite(losses[index])]
    if not finite:
        return lrs[0], 0
    end = finite[0]
    while end + 1 < last and math.isfinite(losses[end + 1]):
        end += 1  # up to the first non-finite loss, as fastai cuts at its first NaN
    index = first + valley(losses[first : end + 1])
    return lrs[index], index


def run(
    wrapped: nn.Module,
    train_batches: Callable[[int], Any],
    model_input: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    test: RangeTest,
    mean_over_workers: Callable[[float, int], float],
) -> LrCurve:
    """Run the test on this worker's batches (``train_batches(epoch)``, as many epochs as ``test.steps`` take).

    ``optimizer``'s groups hold each group's share of the rate (1.0, or the backbone's multiplier): the test
    scales them all. ``mean_over_workers(loss sum, images)`` is the mean loss over every worker's batch (one
    collective a step), so every worker stops at the same step and suggests the same rate. The model is left as
    trained: the caller restores it.
    """
    shares = [group["lr"] for group in optimizer.param_groups]
    wrapped.train()
    lrs: list[float] = []
    losses: list[float] = []
    average, lowest, stopped = 0.0, math.inf, "steps"
    epoch = 0
    while len(lrs) < test.steps and stopped == "steps":
        epoch += 1
        taken = len(lrs)
        for batch in train_batches(epoch):
            labels = batch["label"]
            if len(labels) < 2:  # as the training loop: BatchNorm cannot train on one image
                continue
            lr = test.lr_at(len(lrs))
            for group, share in zip(optimizer.param_groups, shares, strict=True):
                group["lr"] = lr * share
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(wrapped(model_input(batch)), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            value = mean_over_workers(loss.item() * len(labels), len(labels))
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            smoothed = average / (1 - SMOOTHING ** (len(lrs) + 1))
            lrs.append(lr)
            losses.append(smoothed)
            lowest = min(lowest, smoothed)
            if not math.isfinite(smoothed) or smoothed > DIVERGED * lowest:
                stopped = "diverged"
                break
            if len(lrs) >= test.steps:
                break
        if len(lrs) == taken:
            raise ValueError("the training set gave no batch of two or more images")
    suggestion, index = suggest(lrs, losses, test.steps)
    return LrCurve(lrs, losses, suggestion, index, stopped, test.steps)


def lr_find_png(curve) -> bytes:
    """The LR range test's loss against the learning rate (log scale), its suggestion marked: fastai's plot
    (``curve``: an ``LrCurve``; its last few points, already diverging, left out as fastai does). matplotlib is
    imported here, by the driver, never by a worker that only runs the test."""
    from tl_ray import figures

    plt = figures.pyplot()

    shown = max(2, len(curve.lrs) - 5) if len(curve.lrs) > 10 else len(curve.lrs)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.plot(curve.lrs[:shown], curve.losses[:shown], color="tab:blue")
    index = curve.suggestion_index
    axes.plot(
        [curve.lrs[index]], [curve.losses[index]], "o", color="tab:orange", label=f"valley: {curve.suggestion:.2e}"
    )
    axes.set_xscale("log")
    axes.set(xlabel="learning rate", ylabel="training loss (smoothed)", title="LR range test")
    axes.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()

"""Finding the peak rate on the workers before the run trains: ``--lr auto``'s range test and ``--lr select``'s
candidates (the rules are ``lr_range`` and ``lr_select``; this is running them in a worker group).

Both start from the run's starting weights and put the model back as it started, and the random state too (crops,
dropout), so the run then trains as one given the rate they found would: ``--lr SUGGESTION``, or ``--lr CHOSEN
--batch-size ITS_BATCH``. A candidate trains on the one epoch loop (``loop.EpochLoop``) over a run state of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from tl_ray import progress
from tl_ray.errors import TlRayError
from tl_ray.training import lr_range, lr_select, schedule, toolbox
from tl_ray.training.loop import EpochLoop
from tl_ray.training.metrics import sum_across_workers
from tl_ray.training.state import RunState


def _forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """The random state (CPU, and this GPU) put back as it was when the block ends."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def find_lr(epochs: EpochLoop, test: lr_range.RangeTest, announce: bool = True) -> lr_range.LrCurve:
    """The range test from the run's starting weights, at its first epoch's depth, on a throwaway optimizer of the
    run's kind; the model is put back as it started (head initialisation and BatchNorm statistics included).
    ``announce``: send the suggestion as a progress event (`tl-ray lr-find` reports the curve instead)."""
    options, transfer, events = epochs.options, epochs.transfer, epochs.events
    batches, device = epochs.batches, epochs.batches.device
    epochs.phase(1)
    progress.send(events, progress.Stage(f"LR range test: up to {test.steps} steps"))
    start = {key: value.detach().clone() for key, value in transfer.net.state_dict().items()}
    tester = schedule.make_optimizer(
        transfer.parameter_groups(
            1.0, options.weight_decay, options.backbone_lr_mult, toolbox.layer_multipliers(options)
        ),
        options,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=epochs.amp_dtype == torch.float16)

    def mean_over_workers(loss_sum: float, images: int) -> float:
        total, seen = sum_across_workers([loss_sum, float(images)], device)
        return total / max(seen, 1.0)

    with _forked_rng(device), _range_test_errors():
        found = lr_range.run(
            epochs.wrapped,
            batches.train,
            batches.model_input,
            epochs.criterion,
            tester,
            scaler,
            epochs.amp_dtype,
            device,
            test,
            mean_over_workers,
        )
    transfer.net.load_state_dict(start)
    if announce:
        progress.send(events, progress.found_lr(found.suggestion, len(found.lrs), found.stopped))
    return found


@contextlib.contextmanager
def _range_test_errors() -> Iterator[None]:
    try:
        yield
    except ValueError as error:
        raise TlRayError(f"the LR range test could not run: {error}") from error


def select_lr(
    epochs: EpochLoop, candidates: tuple[tuple[float, int], ...], num_train: int, from_size: bool
) -> lr_select.LrChoice:
    """--lr select: train the whole run at each (peak rate, global batch) candidate from the run's start,
    validating every epoch, and choose (``lr_select.choose``). ``from_size``: --lr was left out rather than given,
    as the console says."""
    options, transfer, events = epochs.options, epochs.transfer, epochs.events
    device = epochs.batches.device
    start = {key: value.detach().clone() for key, value in transfer.net.state_dict().items()}
    tried = []
    progress.send(events, progress.selecting_lr(candidates, options.epochs, options.monitor, from_size))
    for index, (rate, batch_size) in enumerate(candidates):
        candidate = dataclasses.replace(epochs.at_batch(batch_size, num_train), wrapped=None)
        progress.send(events, progress.trying_lr(rate, batch_size, index, len(candidates), options.epochs))
        optimizer = schedule.make_optimizer(
            transfer.parameter_groups(
                rate, options.weight_decay, options.backbone_lr_mult, toolbox.layer_multipliers(options)
            ),
            options,
        )
        state = RunState.start(transfer.net, optimizer, options, candidate.steps_now, device, epochs.amp_dtype)
        with _forked_rng(device):
            validated = [{"epoch": done.epoch, **done.validation} for done in candidate.run(state)]
        transfer.net.load_state_dict(start)
        tried.append(validated)
        best = lr_select.best_epoch(validated, options.monitor)
        progress.send(events, progress.tried_lr(rate, batch_size, best, options.monitor, options.epochs))
    centre = (options.recipe_lr(), options.batch_size)
    choice = lr_select.choose(list(candidates), tried, options.monitor, centre=centre)
    progress.send(events, progress.selected_lr(choice.chosen, choice.chosen_batch_size, options.monitor))
    return choice

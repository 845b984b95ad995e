"""What a run tells whoever watches it, while it runs: events, and the relay that carries them to the driver.

Training workers and Ray Train's controller run in other processes; the console (cli.py) runs in the
driver. Rank 0 puts events on a Ray queue; a thread of the driver hands each to the caller's
``on_event``. Nothing here prints: the CLI decides what an event looks like, and a Python caller may
pass its own function (or none, and see nothing). Losing an event never harms the run: a full or gone
queue drops it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.queue import Empty, Full, Queue

logger = logging.getLogger(__name__)

# Rank 0 sends at most this many step updates a second: each is one round trip to the queue actor.
STEPS_PER_SECOND = 2.0
QUEUE_SIZE = 1000


@dataclass(frozen=True)
class Stage:
    """A wait without a count, until the next event: e.g. Ray Train starting the workers."""

    text: str


@dataclass(frozen=True)
class Task:
    """Driver-side work with a count, before training starts: decoding images into the cache, computing
    backbone features."""

    name: str
    done: int
    total: int


@dataclass(frozen=True)
class CacheState:
    """The decoded-image cache of one split, where it is and its size: as a build starts ("building": ``bytes``
    estimated), as it ends ("built": ``bytes`` written), and for each older cache of the same dataset and size
    that the build superseded ("removed")."""

    state: str
    location: str
    images: int
    bytes: int


@dataclass(frozen=True)
class Step:
    """Rank 0's progress through an epoch (sent a few times a second, and at the epoch's last step)."""

    epoch: int
    epochs: int
    step: int
    steps: int


@dataclass(frozen=True)
class Notice:
    """A line worth saying once, before the table: the batch a run chose, or where a resumed run picks up."""

    text: str


def batch_plan(num_train: int, batch_size: int, steps: int, chosen: bool, accumulate: int = 1) -> Notice:
    """How the training set is cut into batches: ``chosen`` when the batch came from its size (recipe.batch_size).
    Under --accumulate N the steps are optimizer steps of N batches each, and the line says so: the schedule,
    the warm-up and the LR a user compares with another recipe's are per optimizer step."""
    how = " (from the training set's size)" if chosen else ""
    plural = "s" if steps != 1 else ""
    if accumulate == 1:
        return Notice(f"{num_train} training images: batch {batch_size}{how}, {steps} step{plural} an epoch")
    return Notice(
        f"{num_train} training images: batch {batch_size}{how}, {accumulate} batches an optimizer step"
        f" ({batch_size * accumulate} images), {steps} optimizer step{plural} an epoch"
    )


def found_lr(lr: float, steps: int, stopped: str) -> Notice:
    """What --lr auto's range test chose."""
    how = "the loss diverged" if stopped == "diverged" else "the test reached its highest rate"
    return Notice(f"--lr auto: peak learning rate {lr:.2e}, from an LR range test of {steps} steps ({how})")


def selecting_lr(candidates: tuple[tuple[float, int], ...], epochs: int, monitor: str, from_size: bool) -> Notice:
    """What --lr select will do before the run (``from_size``: --lr was left out on a small training set)."""
    why = " (--lr left out on a small training set)" if from_size else ""
    by_batch: dict[int, list[float]] = {}
    for rate, batch in candidates:
        by_batch.setdefault(batch, []).append(rate)
    listed = " and ".join(
        f"{', '.join(f'{rate:.2g}' for rate in rates)} at batch {batch}" for batch, rates in by_batch.items()
    )
    return Notice(
        f"--lr select{why}: trying peak rates {listed} for {epochs} epochs each, then training at the best by {monitor}"
    )


def trying_lr(rate: float, batch: int, index: int, count: int, epochs: int) -> Stage:
    return Stage(f"--lr select: candidate {index + 1} of {count}, {rate:.2g} at batch {batch}, {epochs} epochs")


def tried_lr(rate: float, batch: int, best: dict[str, float], monitor: str, epochs: int) -> Notice:
    """One candidate's outcome: its best epoch."""
    shown = "" if monitor == "val_acc" else f"{monitor} {best[monitor]:.3f}, "
    return Notice(
        f"--lr select: {rate:.2g} at batch {batch}: {shown}val_acc {best['val_acc']:.3f}"
        f" at epoch {int(best['epoch'])} of {epochs}"
    )


def selected_lr(rate: float, batch: int, monitor: str) -> Notice:
    return Notice(f"--lr select: training at {rate:.2g}, batch {batch}, the best by {monitor}")


def resumed_run(checkpoint: str, epochs_done: int, epochs: int) -> Notice:
    left = epochs - epochs_done
    plural = "s" if left != 1 else ""
    return Notice(f"resuming from {checkpoint}: {epochs_done} of {epochs} epochs done, {left} epoch{plural} left")


def resumed_sweep(run_dir: str, trials: int, done: int, started: int) -> Notice:
    """``done`` trials ended, ``started`` to resume from their last checkpoint, the rest of ``trials`` not started."""
    return Notice(
        f"resuming sweep {run_dir}: {done} of {trials} trials done, {started} to resume from their last checkpoint,"
        f" {max(0, trials - done - started)} not started"
    )


@dataclass(frozen=True)
class Epoch:
    """An epoch's metrics as reported (all workers summed), as it ends."""

    metrics: dict[str, Any]
    epochs: int


@dataclass(frozen=True)
class TrialEpoch:
    """A sweep trial's epoch (a trial is a training run of its own)."""

    trial_id: str
    point: dict[str, Any]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class TrialEnd:
    """A sweep trial that will report no more: finished, stopped early by the scheduler, or failed."""

    trial_id: str
    point: dict[str, Any]
    status: str  # "finished", "stopped early", "error"
    epochs: int  # epochs it ran
    best: dict[str, Any] = field(default_factory=dict)  # its best epoch's metrics (empty: none finished)
    error: str = ""


OnEvent = Callable[[Any], None]

# A file to append timestamped phases to (``mark``): where a run's or a sweep's seconds go (bench/sweep_cost.py).
# Ray's processes started by this driver inherit it.
TIMELINE_ENV = "TL_RAY_TIMELINE"


def mark(phase: str, **details: Any) -> None:
    """Append ``{"t": wall time, "pid", "phase", **details}`` to the file in TL_RAY_TIMELINE; nothing when unset."""
    path = os.environ.get(TIMELINE_ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "phase": phase, **details}, default=str) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(line)
    except OSError as error:
        logger.debug("timeline mark dropped: %s", error)


class StepPacer:
    """Sends rank 0's step progress at most ``STEPS_PER_SECOND`` times a second, and the last step always."""

    def __init__(self, queue: Queue | None, epoch: int, epochs: int, steps: int) -> None:
        self.queue, self.epoch, self.epochs, self.steps = queue, epoch, epochs, steps
        self.sent_at = 0.0

    def step(self, done: int) -> None:
        """``done`` optimizer steps of the epoch taken."""
        now = time.monotonic()
        if self.queue is not None and (done >= self.steps or now - self.sent_at >= 1.0 / STEPS_PER_SECOND):
            self.sent_at = now
            send(self.queue, Step(self.epoch, self.epochs, min(done, self.steps), self.steps))


def send(queue: Queue | None, event: Any) -> None:
    """Put ``event`` on the relay's queue if there is one; drop it if the queue is full or gone."""
    if queue is None:
        return
    try:
        queue.put_nowait(event)
    except (Full, ray.exceptions.RayError) as error:
        logger.debug("progress event dropped: %s", error)


@contextlib.contextmanager
def relay(on_event: OnEvent | None) -> Iterator[Queue | None]:
    """A queue other processes put events on, drained into ``on_event`` by a driver thread until the block
    ends (then what is left is drained too). Without ``on_event``, no queue: events are not even sent."""
    if on_event is None:
        yield None
        return
    queue = Queue(maxsize=QUEUE_SIZE, actor_options={"num_cpus": 0})
    stop = threading.Event()

    def drain() -> None:
        while True:
            try:
                on_event(queue.get(timeout=0.2))
            except Empty:
                if stop.is_set():
                    return
            except ray.exceptions.RayError:
                return
            except Exception:  # the watcher's own failure must not end the run it watches
                logger.exception("progress callback failed")

    thread = threading.Thread(target=drain, name="tl-ray-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=5)
        queue.shutdown(force=True)

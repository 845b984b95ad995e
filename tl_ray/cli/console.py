"""What `tl-ray` shows while a command runs: part of the CLI (only cli.py uses it), fed ``progress`` events.

Rows go to stdout as things finish (an epoch, a sweep trial), one line each, so a log or a pipe keeps
the story; progress bars with ETAs go to stderr, and only when it is a terminal (tqdm's rule), so logs
stay free of bar redraws.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from typing import Any, TextIO

from tqdm import tqdm

from tl_ray import progress

EPOCH_HEADER = (
    f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8} {'img/s':>8} {'time':>7}"
    f" {'eta':>7}"
)
TRIAL_HEADER = (
    f"{'trial':<12} {'depth':>5} {'strategy':<15} {'lr':>8} {'epochs':>7} {'val_acc':>8} {'val_loss':>9}"
    f" {'time':>7}  status"
)

SWEEP_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} epochs [{elapsed}<{remaining}] {postfix}"


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 1h02m: short enough for a column."""
    if math.isnan(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def size(count: float) -> str:
    """1.2 GB, 340.0 MB, 12.0 KB: decimal units, as disks are sold."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def cache_row(event: progress.CacheState) -> str:
    """A cache build's start, end or clean-up, in one line."""
    per_image = f", {size(event.bytes / event.images)} an image" if event.images else ""
    if event.state == "building":
        return f"cache: decoding {event.images} images into {event.location} (~{size(event.bytes)} expected)"
    if event.state == "built":
        return f"cache: {event.images} images, {size(event.bytes)}{per_image}, in {event.location}"
    return f"cache: removed {event.location} ({size(event.bytes)}), superseded by the new build"


def epoch_row(metrics: dict[str, Any], epochs: int, mean_epoch_s: float) -> str:
    """One epoch as the console prints it; starred when it is the best so far (its ``best_epoch``), ranked as the
    best checkpoint is: by --monitor, ties by val_acc, then the lower val_loss."""
    eta = duration(mean_epoch_s * (epochs - metrics["epoch"]))
    mark = "*" if metrics.get("best_epoch") == metrics["epoch"] else " "
    # --ema: the val_* columns measured the averaged weights; the row says so (the trained weights are not validated).
    weights = "  (ema)" if metrics.get("validated") == "ema" else ""
    return (
        f"{metrics['epoch']:>5} {metrics['train_loss']:>10.4f} {metrics['train_acc']:>9.3f}"
        f" {metrics['val_loss']:>9.4f} {metrics['val_acc']:>7.3f}{mark} {metrics['images_per_s']:>8.1f}"
        f" {duration(metrics['epoch_s']):>7} {eta:>7}{weights}"
    )


def trial_row(event: progress.TrialEnd, max_epochs: int, seconds: float) -> str:
    """One finished sweep trial: its point, its best epoch, and how it ended."""
    point, best = event.point, event.best
    strategy = "scratch" if point.get("weights") == "none" else str(point.get("strategy", ""))
    val_acc = f"{best['val_acc']:.3f}" if best else "-"
    val_loss = f"{best['val_loss']:.4f}" if best else "-"
    status = f"{event.status}: {event.error}" if event.error else event.status
    swept = {key: value for key, value in point.items() if key not in ("freeze_depth", "strategy", "lr", "weights")}
    status += "".join(f"  {key}={value}" for key, value in swept.items())  # tune --grid's values of the trial
    return (
        f"{event.trial_id:<12} {point.get('freeze_depth', '?'):>5} {strategy:<15} {point.get('lr', math.nan):>8.2e}"
        f" {f'{event.epochs}/{max_epochs}':>7} {val_acc:>8} {val_loss:>9} {duration(seconds):>7}  {status}"
    )


def reader_left(stream: TextIO) -> None:
    """The reader of ``stream`` has gone (`tl-ray train ... | head -3`): what is still to be printed goes to
    /dev/null, as Python's own recipe for a closed pipe has it, so that neither the rest of the command nor the
    flush at exit fails again; the work itself goes on and the command ends as it would have."""
    with contextlib.suppress(OSError, ValueError):  # not a file (a test's StringIO), or already closed
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class Console:
    """Renders a command's ``progress`` events; call it with each event (it is the ``on_event`` callback).

    ``trials`` and ``max_epochs`` describe a sweep (its overall bar counts trial-epochs); a training run
    needs neither.
    """

    def __init__(self, trials: int = 0, max_epochs: int = 0, out: TextIO | None = None, err: TextIO | None = None):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.trials, self.max_epochs = trials, max_epochs
        self.bars: dict[str, tqdm] = {}
        self.epoch_seconds: list[float] = []
        self.rows = 0  # rows printed: epochs, or finished trials
        self.trial_started: dict[str, float] = {}

    def __call__(self, event: Any) -> None:
        self._close("stage")  # a wait ends with the next event
        if isinstance(event, progress.Stage):
            self._bar("stage", None, event.text, unit="s")
        elif isinstance(event, progress.Task):
            self._bar(event.name, event.total, event.name).update(event.done - self.bars[event.name].n)
            if event.done >= event.total:
                self._close(event.name)
        elif isinstance(event, progress.CacheState):
            self._print(cache_row(event))
        elif isinstance(event, progress.Step):
            bar = self._bar("epoch", event.steps, f"epoch {event.epoch}/{event.epochs}", unit="step")
            bar.update(event.step - bar.n)
        elif isinstance(event, progress.Notice):
            self._print(event.text)
        elif isinstance(event, progress.Epoch):
            self._close("epoch")
            self._epoch(event)
        elif isinstance(event, progress.TrialEpoch):
            self.trial_started.setdefault(event.trial_id, time.monotonic() - event.metrics.get("epoch_s", 0.0))
            bar = self._bar("sweep", self.trials * self.max_epochs, "sweep", unit="epoch", rate=False)
            bar.update(1)
            point = event.point
            bar.set_postfix_str(
                f"{event.trial_id} depth {point.get('freeze_depth')} epoch {event.metrics['epoch']}"
                f" val_acc {event.metrics['val_acc']:.3f}"
            )
        elif isinstance(event, progress.TrialEnd):
            self._trial_end(event)

    def close(self) -> None:
        for name in list(self.bars):
            self._close(name)

    def _epoch(self, event: progress.Epoch) -> None:
        metrics = event.metrics
        self.epoch_seconds.append(metrics["epoch_s"])
        # The first epoch carries warm-up costs; once there are others, the ETA leaves it out.
        recent = self.epoch_seconds[1:] or self.epoch_seconds
        if not self.rows:
            self._print(EPOCH_HEADER)
        self._print(epoch_row(metrics, event.epochs, sum(recent) / len(recent)))
        self.rows += 1

    def _trial_end(self, event: progress.TrialEnd) -> None:
        started = self.trial_started.get(event.trial_id)
        seconds = time.monotonic() - started if started is not None else math.nan
        if "sweep" in self.bars:  # a trial stopped early will not report the epochs it was budgeted
            self.bars["sweep"].total -= max(0, self.max_epochs - event.epochs)
            self.bars["sweep"].refresh()
        if not self.rows:
            self._print(TRIAL_HEADER)
        self._print(trial_row(event, self.max_epochs, seconds))
        self.rows += 1

    def _bar(self, key: str, total: int | None, description: str, unit: str = "image", rate: bool = True) -> tqdm:
        bar = self.bars.get(key)
        if bar is None:
            # A wait shows its elapsed time; a sweep's epochs come too unevenly (trial start-ups) for a rate.
            form = "{desc} {elapsed}" if total is None else None if rate else SWEEP_BAR
            bar = self.bars[key] = tqdm(
                total=total,
                desc=description,
                unit=unit,
                file=self.err,
                leave=False,
                dynamic_ncols=True,
                disable=None,
                bar_format=form,
            )
            if total is None:  # tqdm redraws only on updates: tick the elapsed time from a thread
                threading.Thread(target=self._tick, args=(bar,), daemon=True).start()
        bar.set_description_str(description, refresh=False)
        return bar

    def _tick(self, bar: tqdm) -> None:
        while self.bars.get("stage") is bar:
            bar.refresh()
            time.sleep(1.0)

    def _close(self, key: str) -> None:
        bar = self.bars.pop(key, None)
        if bar is not None:
            bar.close()

    def _print(self, line: str) -> None:
        try:
            tqdm.write(line, file=self.out)
            self.out.flush()
        except BrokenPipeError:
            reader_left(self.out)

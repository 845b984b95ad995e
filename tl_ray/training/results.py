"""What a finished run leaves, collected from what Ray Train hands back: ``result.json`` and ``TrainResult`` for
`tl-ray train`, the range test's plot and curve (``LrFinding``) for `tl-ray lr-find` and ``--lr auto``.

The best checkpoint is picked here by the run's one ranking (``classes.rank_key``): Ray Train's own pruning keeps
checkpoints by ``rank_score``, the same ranking as one number, so the one picked is never pruned.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray.train

from tl_ray import checkpoint, classes, location, tracking
from tl_ray.errors import RunError
from tl_ray.training import lr_range
from tl_ray.training.state import LR_RANGE_TEST, LR_RANGE_TEST_FILE, LR_SELECTION, STOPPED_EARLY

RESULT_FILE = "result.json"
LR_FIND_PLOT, LR_FIND_JSON = "lr_find.png", "lr_find.json"


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
    lr_range_test: dict[str, Any] | None = None  # --lr auto: the range test's curve (lr_range.LrCurve as JSON)
    lr_selection: dict[str, Any] | None = None  # --lr select: the rates tried and chosen (lr_select.LrChoice as JSON)
    stopped_early: str | None = None  # --patience: why the run stopped before its last epoch; None: it did not

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LrFinding:
    """What `tl-ray lr-find` leaves: the range test's curve and suggestion, and where its plot and JSON went."""

    run_dir: str
    curve: lr_range.LrCurve
    plot: str  # lr_find.png
    json: str  # lr_find.json

    @property
    def suggestion(self) -> float:
        return self.curve.suggestion


def collect(
    result: ray.train.Result,
    storage: location.Location,
    class_names: list[str],
    skipped: dict[str, str],
    monitor: str,
) -> TrainResult:
    """The run's result from Ray Train's: the best checkpoint by ``monitor``, the history from the last one, the
    skipped files (with those an interrupted earlier attempt found); written to the run folder's result.json."""
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
        lr_range_test=train_state.get(LR_RANGE_TEST),
        lr_selection=train_state.get(LR_SELECTION),
        stopped_early=train_state.get(STOPPED_EARLY),
    )
    location.write_bytes(
        result.filesystem, f"{result.path}/{RESULT_FILE}", (json.dumps(outcome.to_json(), indent=2) + "\n").encode()
    )
    return outcome


def _read_previous_skips(filesystem: pafs.FileSystem, path: str) -> dict[str, str]:
    """Skips found by an earlier, interrupted attempt at this run: a resumed run may not decode those files again."""
    try:
        with filesystem.open_input_stream(path) as stream:
            previous = json.loads(stream.read())
        return {item["path"]: item["reason"] for item in previous.get("skipped_files", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def collect_lr_find(result: ray.train.Result, storage: location.Location) -> LrFinding:
    """`tl-ray lr-find`'s result: the curve its one report carried, plotted and written beside it in the run
    folder."""
    if result.checkpoint is None:
        raise RunError(f"the LR range test ended without a result in {result.path}")
    with result.checkpoint.as_directory() as directory, open(os.path.join(directory, LR_RANGE_TEST_FILE)) as file:
        curve = lr_range.LrCurve.from_json(json.load(file))
    run_dir = storage.at(result.path)
    plot, curve_json = write_lr_find(curve, run_dir)
    return LrFinding(run_dir.uri, curve, plot, curve_json)


def write_lr_find(curve: lr_range.LrCurve, run_dir: location.Location) -> tuple[str, str]:
    """The range test's plot and curve in the run folder; (their URIs)."""
    plot, curve_json = run_dir.join(LR_FIND_PLOT), run_dir.join(LR_FIND_JSON)
    filesystem = run_dir.filesystem
    location.write_bytes(filesystem, curve_json.path, (json.dumps(curve.to_json(), indent=2) + "\n").encode())
    location.write_bytes(filesystem, plot.path, lr_range.lr_find_png(curve))
    return plot.uri, curve_json.uri

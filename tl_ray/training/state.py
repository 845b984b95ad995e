"""The run state: everything a run carries from one epoch to the next, as one record, and its checkpoint.

A checkpoint is this record written down (``save_run_state``) and a resumed worker group reads it back into the
same record (``load_run_state``), key for key, as torchvision's classification reference keeps its checkpoint as
one dict (``model``, ``optimizer``, ``lr_scheduler``, ...). On disk it is ``tl_ray.checkpoint``'s format:

- ``model.pt``: the model's state dict (``RunState.net``; with --ema the averaged weights), all predict and export
  need;
- ``meta.json``: what the model is (``RunMeta``: arch, classes, preprocessing, how it was fine-tuned), the epoch
  and its metrics; a resumed run must describe the same model (``check_resumable``);
- ``train_state.pt``: what only resuming needs: the optimizer, the scheduler and AMP scaler, the LR curve's plan,
  the history, and how the peak rate was found (``--lr auto``'s range test, ``--lr select``'s choice).

A feature that carries state across epochs (say EMA weights) is a field of ``RunState``, one key in
``save_run_state`` and one in ``load_run_state``. Nothing here needs Ray: the worker hands the folder to Ray Train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tl_ray import checkpoint, recipe
from tl_ray.errors import TlRayError
from tl_ray.training import lr_range, lr_select, schedule, toolbox
from tl_ray.training.config import TrainConfig
from tl_ray.training.ema import WeightEma
from tl_ray.version import __version__

# The range test's curve (lr_range.LrCurve as JSON): `tl-ray lr-find`'s one report, and a --lr auto run's train state.
LR_RANGE_TEST = "lr_range_test"
LR_RANGE_TEST_FILE = "lr_range_test.json"  # `tl-ray lr-find`'s checkpoint: that curve alone, no model
# --ema: the average's update count (its warm-up) and the trained weights, which model.pt (the average) is not.
EMA = "ema"
EMA_TRAINED_MODEL = "trained_model"
# --patience: why the run stopped before its last epoch (toolbox.patience_reason), in the train state and result.json.
STOPPED_EARLY = "stopped_early"
# --lr select: each candidate rate's validated epochs and the rate chosen (lr_select.LrChoice as JSON), in the train
# state (a resumed run does not select again) and result.json.
LR_SELECTION = "lr_selection"


@dataclass(frozen=True)
class RunMeta:
    """What ``meta.json`` says of the model, fixed for the whole run: its architecture and classes, how to
    preprocess for it (predict reads these), and how it was fine-tuned (a resumed run must match)."""

    options: TrainConfig
    class_names: list[str]
    class_weights: dict[str, float] | None  # --class-weights auto: each class's loss weight, else None
    resize_size: int  # validation's short side, for predict
    mean: list[float]
    std: list[float]
    weights_source: str  # what --weights resolved to
    interpolation: str | None = None  # the weights' resize, where they say (timm's pretrained_cfg; else bilinear)

    def to_json(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """``meta.json`` at ``epoch`` (``checkpoint.save_checkpoint`` adds the format version first)."""
        options = self.options
        return {
            "arch": options.arch,
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "freeze_depth": options.freeze_depth,
            "strategy": strategy_meta(options, self.class_weights),
            "monitor": options.monitor,
            "image_size": options.image_size,
            "resize_size": self.resize_size,
            "mean": self.mean,
            "std": self.std,
            "weights": self.weights_source,
            "epoch": epoch,
            "metrics": metrics,
            "tl_ray_version": __version__,
            **({"interpolation": self.interpolation} if self.interpolation else {}),
        }

    def check_resumable(self, recorded: dict[str, Any]) -> None:
        """Raise TlRayError unless the checkpoint's ``recorded`` meta describes this run's model."""
        check_resumable(recorded, self.options, self.class_names, self.class_weights)


@dataclass
class RunState:
    """One run's state after ``epoch`` epochs: what each epoch changes and a checkpoint keeps.

    The model, optimizer, scheduler and scaler are the live objects training uses; loading a checkpoint loads into
    them. A --lr select candidate trains a state of its own (``meta`` None: it is never saved).
    """

    net: nn.Module  # model.pt: the plain torchvision model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    curve: schedule.Curve  # the LR curve's plan, kept across resizes, and the point of it reached
    meta: RunMeta | None = None  # meta.json's fixed part: checked on load, not loaded
    epoch: int = 0  # the last epoch done
    metrics: dict[str, Any] = field(default_factory=dict)  # that epoch's, as reported
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's metrics, resumed ones included
    lr_curve: lr_range.LrCurve | None = None  # --lr auto: the range test the run started with
    lr_choice: lr_select.LrChoice | None = None  # --lr select: the candidates tried and the one chosen
    ema: WeightEma | None = None  # --ema: the average of the weights (validated, and saved as model.pt)
    stopped_early: str | None = None  # --patience: why the run stopped before its last epoch

    @classmethod
    def start(
        cls,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        options: TrainConfig,
        steps_per_epoch: int,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        **values: Any,
    ) -> RunState:
        """A run at its start: the LR curve planned at ``steps_per_epoch`` (the worker group's steps an epoch, with
        the optimizer's rates already the peak ones), a loss scaler where fp16 needs one."""
        curve = schedule.Curve(steps_per_epoch)
        scheduler = schedule.lr_scheduler(optimizer, curve, options)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        if options.ema is not None:
            values["ema"] = WeightEma(net, options.ema, options.train_bn)
        return cls(net, optimizer, scheduler, scaler, curve, **values)

    def peak_lr(self, given: Any) -> float:
        """The head's peak rate: what the range test found or the candidates chose, else ``given`` (--lr)."""
        if self.lr_curve is not None:
            return self.lr_curve.suggestion
        return self.lr_choice.chosen if self.lr_choice is not None else given


def save_run_state(directory: str | os.PathLike, state: RunState) -> None:
    """Write ``state`` as a checkpoint in ``directory`` (model.pt, train_state.pt, then meta.json)."""
    assert state.meta is not None, "a --lr select candidate's state is never saved"
    train_state = {
        "epoch": state.epoch,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "steps_per_epoch": state.curve.steps_per_epoch,
        "history": state.history,
        LR_RANGE_TEST: state.lr_curve.to_json() if state.lr_curve is not None else None,
        LR_SELECTION: state.lr_choice.to_json() if state.lr_choice is not None else None,
    }
    if state.stopped_early:  # only then: a resumed older checkpoint is written back as it was
        train_state[STOPPED_EARLY] = state.stopped_early
    model_state = state.net.state_dict()
    if state.ema is not None:  # the average is the model; the trained weights are for resuming only
        train_state[EMA] = {**state.ema.state_dict(), EMA_TRAINED_MODEL: model_state}
        model_state = state.ema.net.state_dict()
    meta = state.meta.to_json(state.epoch, state.metrics)
    checkpoint.save_checkpoint(directory, model_state, meta, train_state)


def load_run_state(directory: str | os.PathLike, state: RunState) -> None:
    """Load the checkpoint in ``directory`` into ``state``, after checking it is of the same model and run
    (``state.meta``); keys a checkpoint from an older tl-ray lacks keep their defaults."""
    assert state.meta is not None, "a --lr select candidate never resumes"
    recorded = checkpoint.read_meta(directory)
    state.meta.check_resumable(recorded)
    saved = checkpoint.read_train_state(directory)
    model_state = checkpoint.read_model_state(directory)
    if state.ema is not None:
        state.ema.net.load_state_dict(model_state)
        state.ema.load_state_dict(saved[EMA])
        model_state = saved[EMA][EMA_TRAINED_MODEL]
    state.net.load_state_dict(model_state)
    state.epoch = saved["epoch"]
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.curve.steps_per_epoch = saved.get("steps_per_epoch", state.curve.steps_per_epoch)
    state.history = saved["history"]
    tested, selected = saved.get(LR_RANGE_TEST), saved.get(LR_SELECTION)
    state.lr_curve = lr_range.LrCurve.from_json(tested) if tested else None
    state.lr_choice = lr_select.LrChoice.from_json(selected, state.meta.options.batch_size) if selected else None
    state.metrics = recorded.get("metrics", {})
    state.stopped_early = saved.get(STOPPED_EARLY)


def check_resumable(
    meta: dict[str, Any], options: TrainConfig, class_names: list[str], class_weights: dict[str, float] | None
) -> None:
    """A resumed run must be the same model; otherwise its optimizer state would be silently wrong. The monitor
    too: checkpoints already pruned by one metric cannot be ranked by another."""
    # Runs from before class weights and --monitor had neither.
    recorded = {**meta, "strategy": {"class_weights": None, **meta.get("strategy", {})}}
    recorded.setdefault("monitor", "val_acc")
    # --patience and --compile may change on a resume: they stop or speed the run, the model is the same.
    for_model = {key: value for key, value in recorded["strategy"].items() if key not in toolbox.RUN_ONLY}
    recorded["strategy"] = for_model
    now_strategy = {
        key: value for key, value in strategy_meta(options, class_weights).items() if key not in toolbox.RUN_ONLY
    }
    checks = (
        ("arch", options.arch),
        ("freeze_depth", options.freeze_depth),
        ("class_names", class_names),
        ("strategy", now_strategy),
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
    # An augmentation policy and random erasing are recorded when used, so that a checkpoint without them stays
    # byte-identical when resumed; a run resumes only with the same ones.
    augmentation: dict[str, Any] = {"augment": options.augment} if options.augment in recipe.AUGMENT_POLICIES else {}
    if options.random_erasing:
        augmentation["random_erasing"] = options.random_erasing
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
        **toolbox.meta(options),  # --ema, --accumulate, --mixup, --layer-decay (per group) ...: those set
        **augmentation,
    }

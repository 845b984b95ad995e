"""The fine-tuning toolbox: the training options timm and fastai users reach for (``ToolboxOptions``: EMA of the
weights, gradient accumulation, early stopping, MixUp/CutMix, layer-wise LR decay, torch.compile), declared once here
and taken by ``TrainConfig`` with ``same_option``; their checks, what a checkpoint records of them (``meta``), and
the maths that needs no torch (read before torch loads, as the config is): the EMA's warm-up (``ema_decay``), the
accumulation groups (``group_size``), the layer-decay multipliers, patience (``patience_reason``). What runs on
tensors is beside it: ``ema.WeightEma`` and ``mixing`` (MixUp/CutMix and the soft-target loss).

Every option is off by default, so a run without them trains exactly as before (and its checkpoint's strategy meta,
which a resumed run must match, has none of their keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tl_ray import classes
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import UsageError
from tl_ray.options import flag, option

# timm's ModelEmaV3 warm-up of the decay, 1 - (1 + step / gamma) ** -power, at the power its docstring gives for
# runs of fewer than a million steps (fine-tunes are thousands): the EMA follows the weights closely at first,
# when the head is random, and reaches --ema's decay after (1 - decay) ** (-1 / power) steps (0.999: 10k).
EMA_WARMUP_GAMMA = 1.0
EMA_WARMUP_POWER = 3 / 4
# Options a resumed run may change: they stop or speed the run, they do not change the model it trains.
RUN_ONLY = ("patience", "compile")


@dataclass(frozen=True)
class ToolboxOptions:
    """The toolbox's flags (train, tune and lr-find take them through ``TrainConfig``)."""

    ema: float | None = option(
        None,
        "keep an exponential moving average of the weights with this decay (0.999, 0.9998), warmed up as timm's"
        " ModelEmaV3 (decay 1 - (1 + step)^-3/4 until it reaches DECAY); validation, the best checkpoint and the"
        " saved model use the averaged weights (BatchNorm statistics averaged too)",
        between=(0.0, 1.0),
    )
    accumulate: int = option(
        1,
        "accumulate the gradients of N batches per optimizer step: the effective global batch is --batch-size x N"
        " (the LR schedule counts optimizer steps; DDP all-reduces once per step)",
        positive=True,
    )
    patience: int | None = option(
        None,
        "stop training after N epochs without a better monitored value (result.json says so); default: train"
        " every epoch",
        positive=True,
    )
    mixup: float = option(
        0.0,
        "MixUp alpha: blend pairs of training images and their labels with a Beta(alpha, alpha) share (0.2; 0 = off);"
        " train_acc then counts the label with the larger share",
        between=(0.0, 100.0),
    )
    cutmix: float = option(
        0.0,
        "CutMix alpha: paste a box of another training image, labels mixed by the box's area (1.0; 0 = off); with"
        " --mixup too, each mixed batch is one or the other",
        between=(0.0, 100.0),
    )
    mix_prob: float = option(
        1.0, "the share of training batches --mixup/--cutmix mix (the others train on plain labels)", between=(0, 1)
    )
    layer_decay: float | None = option(
        None,
        "layer-wise LR decay over the backbone's 5 stages: the head trains at the rate, the top stage at X times"
        " it, the next at X^2 ... (0.75), times the strategy's backbone multiplier; default: one backbone rate",
        between=(0.0, 1.0),
        positive=True,
    )
    compile: bool = option(
        False, "torch.compile the model for training (GPU runs; refused on CPU, where it measured slower)"
    )


def check(config: Any) -> None:
    """The toolbox checks that need other options (resolved by the recipe); one UsageError line each."""
    if config.ema is not None and not 0.0 < config.ema < 1.0:
        raise UsageError(f"{flag('ema')} is a decay between 0 and 1, exclusive (0.999); got {config.ema}")
    mixing = config.mixup > 0 or config.cutmix > 0
    if mixing and config.freeze_depth == NUM_STAGES and config.augment == "none" and config.cache != "none":
        which = flag("mixup") if config.mixup > 0 else flag("cutmix")
        raise UsageError(
            f"{which} mixes images, but at {flag('freeze_depth')} {NUM_STAGES} with {flag('augment')} none and the"
            " cache on, the head trains on cached pooled features: pass --augment light (images through the frozen"
            " backbone) or --cache none"
        )


def meta(config: Any) -> dict[str, Any]:
    """What the checkpoint's strategy meta records of the toolbox: only the options set (runs without them keep
    the meta they always had, so their checkpoints still resume)."""
    recorded: dict[str, Any] = {}
    if config.ema is not None:
        recorded["ema"] = {"decay": config.ema, "warmup_power": EMA_WARMUP_POWER}
    if config.accumulate != 1:
        recorded["accumulate"] = config.accumulate
    if config.mixup > 0 or config.cutmix > 0:
        recorded["mixing"] = {"mixup": config.mixup, "cutmix": config.cutmix, "mix_prob": config.mix_prob}
    if config.layer_decay is not None:
        recorded["layer_decay"] = {"decay": config.layer_decay, "lr_mult": layer_multipliers(config)}
    if config.patience is not None:
        recorded["patience"] = config.patience
    if config.compile:
        recorded["compile"] = True
    return recorded


# --ema -------------------------------------------------------------------------------------------------------------


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the ``updates``-th update (1-based), as timm's ModelEmaV3 with use_warmup: the first update
    copies the weights (decay 0), then 1 - (1 + step)^-power, capped at ``decay``."""
    step = updates - 1
    if step <= 0:
        return 0.0
    return min(decay, 1.0 - (1.0 + step / EMA_WARMUP_GAMMA) ** -EMA_WARMUP_POWER)


def layer_multipliers(config: Any) -> dict[str, float] | None:
    """--layer-decay X: each trained part's share of the head's rate (``TransferModel.parameter_groups`` gives each
    its groups): the head 1, the top backbone stage --backbone-lr-mult x X, the one below it x X^2, down to the
    first stage trained at --freeze-depth (stage N is the Nth of the backbone's NUM_STAGES freeze stages, stage1 the
    stem). The strategy's backbone multiplier scales every stage alike, so discriminative with X keeps its 0.1 at
    the top and decays below it. None: no --layer-decay (one backbone group at the backbone multiplier)."""
    if config.layer_decay is None:
        return None
    scale = 1.0 if config.backbone_lr_mult is None else config.backbone_lr_mult
    multipliers = {"head": 1.0}
    for index in range(NUM_STAGES - 1, config.freeze_depth - 1, -1):
        multipliers[f"stage{index + 1}"] = scale * config.layer_decay ** (NUM_STAGES - index)
    return multipliers


# --accumulate -------------------------------------------------------------------------------------------------------


def group_size(index: int, batches: int, accumulate: int) -> int:
    """How many batches the accumulation group of batch ``index`` (0-based) of ``batches`` holds: each batch's loss
    is divided by it, so an optimizer step's gradient is the mean over its group's batches, that is the gradient of
    one batch ``accumulate`` times the size (the epoch's last group may be shorter: its mean is over fewer)."""
    start = index - index % accumulate
    return max(1, min(accumulate, batches - start))


# --mixup, --cutmix --------------------------------------------------------------------------------------------------


# --patience ---------------------------------------------------------------------------------------------------------


def patience_reason(history: list[dict[str, Any]], monitor: str, patience: int | None) -> str | None:
    """Why the run stops now, if ``patience`` epochs have gone by without a better ``monitor`` value than the best
    before them (``classes.best_value``'s direction); None: go on."""
    if patience is None or len(history) <= patience:
        return None
    values = [row[monitor] for row in history]
    before, recent = values[:-patience], values[-patience:]
    best_before = classes.best_value(before, monitor)
    if any(value != best_before and classes.best_value([value, best_before], monitor) == value for value in recent):
        return None
    best_epoch = history[len(before) - 1 - before[::-1].index(best_before)]["epoch"]
    return (
        f"--patience {patience}: no better {monitor} than {best_before:.4f} (epoch {best_epoch}) in the"
        f" {patience} epochs since"
    )


# --compile ----------------------------------------------------------------------------------------------------------

# Why a CPU run refuses --compile (BENCHMARKS.md, "--compile on CPU", has the measurement).
COMPILE_ON_CPU = (
    "--compile is for GPU runs: on CPU, torch.compile measured slower than eager here (resnet18 at 64 px: 8.0 s a"
    " step against 7.3 s, after 8 minutes of compiling; BENCHMARKS.md); leave it out"
)

"""Options for every command, as dataclasses, merged from defaults < YAML file < flags.

The YAML file holds the same keys as the command-line flags, with underscores
(``freeze_depth: 3`` for ``--freeze-depth 3``), so a config file and a command line
are interchangeable and one validation covers both. Values are taken as engineers write
them: numbers in any spelling (``lr: 3e-4``, which YAML 1.1 reads as text, ``1_000``,
``.5``, an int for a float), YAML booleans, and lists for the list options
(``freeze_depths: [0, 3, 5]`` as well as ``freeze_depths: 0,3,5``). Every mistake is a
``UsageError`` naming the key, the file and what was expected. ``to_yaml`` writes a config
that ``merge`` reads back into an equal one (``tl-ray ... --print-config``).

Each option is declared once, as a dataclass field made by ``option``: its default, help, choices and bounds.
The flags (tl_ray.cli builds them from the fields), the YAML coercion (by the field's type), the checks
(``check_options``) and ``--print-config`` all read that one declaration.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

from tl_ray import backbones, recipe
from tl_ray.backbones import ARCHS, NUM_STAGES
from tl_ray.errors import UsageError

OPTIMIZERS = recipe.OPTIMIZERS
# auto: light below 128 px, standard above; light/standard: random crops of at least 60%/25% of the
# image, and flips; none: training images centre-cropped like validation ones.
AUGMENTS = ("auto", "standard", "light", "none")
# none: every sample counts the same; auto: loss weights n / (classes x n_class) from the training counts.
CLASS_WEIGHTS = ("none", "auto")
# The metric that picks the best checkpoint (and ranks a sweep's trials), and which way it improves.
MONITORS = {"val_acc": "max", "val_loss": "min", "macro_f1": "max"}
# Where a run's metrics go besides TensorBoard (tl_ray.tracking); the module each imports, and what to install for it
# (the tl-ray extra of the same name installs it).
LOGGERS = ("none", "wandb", "mlflow")
LOGGER_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}


def absolute(location: str) -> str:
    """A local path made absolute (Ray and pyarrow want that); URIs (s3://, gs://) unchanged."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def check_logger(kind: str) -> None:
    """``--logger``: one of LOGGERS, with its package importable (else a UsageError naming what to install)."""
    if kind not in LOGGERS:
        raise UsageError(f"{flag('logger')} must be one of {', '.join(LOGGERS)}; got {kind!r}")
    if kind != "none" and importlib.util.find_spec(LOGGER_PACKAGES[kind][0]) is None:
        package = LOGGER_PACKAGES[kind][1]
        raise UsageError(f"--logger {kind} needs the {package} package: pip install {package} (or tl-ray[{kind}])")


def flag(key: str) -> str:
    """The command-line spelling of a config key, used in every error message."""
    return "--" + key.replace("_", "-")


# A list-valued option (TuneConfig's freeze_depths, strategies, lrs) holds its canonical comma-separated text,
# "0,3,5", as its flag takes it; a config file or the Python API may give a list, or a single value, instead.
LIST_ITEMS = "list_items"  # field metadata: the item type, and how the error messages describe the items
WORDS = "words"  # field metadata: the texts a number option takes besides numbers (lr: auto)


def option(
    default: Any,
    help: str,
    *,
    choices: Iterable[str] = (),
    between: tuple[float, float] | None = None,
    positive: bool = False,
    items: tuple[type, str, str] | None = None,
    negative: tuple[str, str] | None = None,
    words: tuple[str, ...] = (),
) -> Any:
    """A config field declared once: the CLI makes its flag from it (type from the annotation, ``help``, the
    default from the dataclass), ``merge`` coerces YAML values to that type, ``validate`` checks ``choices``,
    ``between`` (inclusive bounds) and ``positive`` (``check_options``; None, where allowed, is not checked).

    ``items``: a list option's item type, how errors describe the items, an example (see ``_coerce_list``);
    ``negative``: a bool option's opposite flag and that flag's help (``--cpu`` for ``--gpu``): one or neither;
    ``words``: the only texts a number option also takes (``--lr auto``).
    """
    metadata: dict[str, Any] = {"help": help, "choices": tuple(choices), "between": between, "positive": positive}
    if items is not None:
        metadata[LIST_ITEMS] = items
    if negative is not None:
        metadata["negative"] = negative
    if words:
        metadata[WORDS] = words
    return dataclasses.field(default=default, metadata=metadata)


def same_option(config_class: type, key: str) -> Any:
    """Another config's option, for a config that takes it too (TrainConfig the SourceOptions): declared there."""
    declared = config_class.__dataclass_fields__[key]
    return dataclasses.field(default=declared.default, metadata=declared.metadata)


def check_options(config: Any) -> None:
    """The checks each option declares (choices, bounds), in field order; the error names the flag. Options the
    config ignores (its IGNORED: tune's searched ones) are not checked: their values are never used."""
    for field in dataclasses.fields(config):
        value, declared = getattr(config, field.name), field.metadata
        if value is None or field.name in getattr(config, "IGNORED", ()):
            continue
        words = declared.get(WORDS, ())
        if words and isinstance(value, str):  # a number option's word (lr: auto); merge coerced, the API may not
            if value in words:
                continue
            raise UsageError(f"{flag(field.name)} must be {number_or_words(words)}; got {value!r}")
        if declared["choices"] and value not in declared["choices"]:
            raise UsageError(f"{flag(field.name)} must be one of {', '.join(declared['choices'])}; got {value!r}")
        if declared["between"] is not None:
            _check_range(field.name, value, *declared["between"])
        if declared["positive"]:
            _check_positive(field.name, value)


LABEL_PATTERN_HINT = r"^(\w+)\."  # cat.0.jpg -> cat: what the flat-folder error suggests


@dataclass(frozen=True)
class SourceOptions:
    """How a source's items are labelled and split (tl_ray.sources): the flags every command that reads --data takes."""

    label_pattern: str | None = option(
        None,
        "labels in the file names: a regex searched in each image's name, the label its group 'label' or group 1"
        f" (cat.0.jpg: '{LABEL_PATTERN_HINT}'); files that do not match are skipped and reported",
    )
    path_column: str = option(
        "path", "a manifest's column of image paths (relative to the manifest's folder, absolute, or URIs)"
    )
    label_column: str = option("label", "a manifest's or Parquet's column of labels: class names, or integer ids")
    split_column: str = option("split", "a manifest's or Parquet's column of splits, train or val (if it has one)")
    image_column: str | None = option(
        None,
        "Parquet's column of encoded images, binary or {bytes, path} (default: the one named image, else the first"
        " that holds images)",
    )

    def validate(self) -> SourceOptions:
        if self.label_pattern is not None:
            try:
                compiled = re.compile(self.label_pattern)
            except re.error as error:
                pattern = self.label_pattern
                raise UsageError(f"--label-pattern: {pattern!r} is not a regular expression: {error}") from None
            if "label" not in compiled.groupindex and compiled.groups < 1:
                raise UsageError(
                    f"--label-pattern: {self.label_pattern!r} has no group: the label is the group named 'label' or"
                    f" group 1, as in '{LABEL_PATTERN_HINT}'"
                )
        for key in ("path_column", "label_column", "split_column"):
            if not getattr(self, key):
                raise UsageError(f"{flag(key)} must name a column")
        return self


SOURCE_KEYS = tuple(field.name for field in dataclasses.fields(SourceOptions))


@dataclass
class TrainConfig:
    """Everything `tl-ray train` needs. Field names are the YAML keys and, with dashes, the flags; each field's
    ``option`` is the one declaration of its default, help and choices."""

    IGNORED: ClassVar[tuple[str, ...]] = ()  # options this command takes no flag for (see TuneConfig)
    RUN_PREFIX: ClassVar[str] = "train"  # a run left unnamed is <prefix>-<timestamp>

    data: str | None = option(
        None,
        "the dataset: ROOT/train/<class>/*.jpg (+ optional ROOT/val/); a flat folder with --label-pattern; a"
        " manifest FILE.csv|.tsv|.jsonl|.parquet of path,label[,split]; or Parquet files holding the images (a file,"
        " folder or glob; Hugging Face's train-*/validation-* recognised). A path or a URI (s3://, gs://, abfs://,"
        " hdfs://; an S3-compatible endpoint as ?endpoint_override=HOST:PORT&scheme=http or AWS_ENDPOINT_URL)",
    )
    val_data: str | None = option(
        None, "a validation set stored elsewhere, any source --data takes (replaces --data's own val split)"
    )
    label_pattern: str | None = same_option(SourceOptions, "label_pattern")
    path_column: str = same_option(SourceOptions, "path_column")
    label_column: str = same_option(SourceOptions, "label_column")
    split_column: str = same_option(SourceOptions, "split_column")
    image_column: str | None = same_option(SourceOptions, "image_column")
    arch: str = option("resnet50", f"backbone: {', '.join(ARCHS)}", choices=ARCHS)
    weights: str = option(
        "imagenet",
        "imagenet | a torchvision weights name (IMAGENET1K_V1) | none | a .pth state dict | a tl-ray checkpoint dir"
        " (paths or URIs)",
    )
    freeze_depth: int | None = option(
        None,
        f"freeze the first N of the {NUM_STAGES} backbone stages: {NUM_STAGES} = feature extraction, 0 = full"
        f" fine-tuning (default: {NUM_STAGES}; 0 with --weights none)",
        between=(0, NUM_STAGES),
    )
    epochs: int = option(10, "number of epochs", positive=True)
    lr: float | str | None = option(
        None,
        "the head's peak learning rate, after warm-up, then cosine decay; auto: found by an LR range test on the"
        " run's own batches before it trains (as tl-ray lr-find runs it: fastai's valley rule); select: the run"
        " first trains at the recipe's rate / 3, x 1 and x 3, and x 1 and x 3 at half the batch, all its epochs each,"
        " then at the one whose best epoch scored best (default: select for a training set of at most"
        f" {recipe.SELECT_MAX_TRAIN} images, else the recipe's rate for the optimizer: {recipe.LR['adamw']} for"
        f" adamw, {recipe.LR['sgd']} for sgd; at --freeze-depth 5 {recipe.HEAD_ONLY_LR['adamw']} and"
        f" {recipe.HEAD_ONLY_LR['sgd']}; discriminative and probe {recipe.DISCRIMINATIVE_HEAD_LR['adamw']} and"
        f" {recipe.DISCRIMINATIVE_HEAD_LR['sgd']})",
        positive=True,
        words=("auto", "select"),
    )
    optimizer: str = option(
        "auto",
        f"{' | '.join(OPTIMIZERS)} (default: auto: sgd at --freeze-depth {NUM_STAGES}, where a head alone trains, adamw"
        " otherwise; tl_ray/recipe.py says why)",
        choices=OPTIMIZERS,
    )
    momentum: float = option(0.9, "SGD momentum (with --optimizer sgd; Nesterov)", between=(0.0, 1.0))
    weight_decay: float | None = option(
        None,
        "weight decay, never on BatchNorm weights or biases (default: the recipe's for --optimizer:"
        f" {recipe.WEIGHT_DECAY['adamw']} for adamw, {recipe.WEIGHT_DECAY['sgd']} for sgd)",
        between=(0.0, 1.0),
    )
    warmup_epochs: float | None = option(
        None, "linear LR warm-up length, in epochs (default: 5% of the run, at most 1 epoch)"
    )
    strategy: str = option(
        "auto",
        "how the unfrozen backbone trains: plain (one learning rate) | discriminative (backbone at 0.1 x --lr) |"
        " probe (the head alone for a fifth of the epochs, then discriminative) | auto (plain, from any start:"
        " see BENCHMARKS.md)",
        choices=recipe.STRATEGIES,
    )
    backbone_lr_mult: float | None = option(
        None,
        "the backbone's learning rate as a multiple of --lr (default: the strategy's)",
        between=(0.0, 100.0),
    )
    head_epochs: int | None = option(
        None, "epochs of the head alone before unfreezing to --freeze-depth (default: the strategy's)"
    )
    train_bn: bool = option(
        True,
        "BatchNorm of the fine-tuned stages updates its running statistics (--no-train-bn keeps the starting"
        " ones: for small per-worker batches)",
    )
    sync_bn: bool = option(False, "synchronise BatchNorm statistics across GPU workers (SyncBatchNorm)")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss", between=(0.0, 0.99))
    class_weights: str = option(
        "none",
        f"{' | '.join(CLASS_WEIGHTS)}: auto weighs each class's training loss by n / (classes x n_class), from the"
        " training images' counts, so rare classes count as much as common ones (validation loss stays unweighted)",
        choices=CLASS_WEIGHTS,
    )
    monitor: str = option(
        "val_acc",
        f"{' | '.join(MONITORS)}: the validation metric that picks the best checkpoint (val_loss: lowest) and, in"
        " tune, ranks and early-stops trials; macro_f1 (the mean of per-class F1) suits imbalanced classes",
        choices=MONITORS,
    )
    batch_size: int | None = option(
        None,
        "global batch size, split evenly over the workers (default: chosen once the training set is listed:"
        f" {recipe.BATCH_SIZE}, or the whole set when smaller, and at least 2 a worker)",
    )
    image_size: int = option(224, "training crop size in pixels", between=(16, 4096))
    val_fraction: float = option(0.2, "share of train/ held out for validation when there is no val/ folder")
    color_jitter: float = option(0.0, "colour jitter strength for training augmentation (0 = off)", between=(0.0, 1.0))
    augment: str = option(
        "auto",
        f"auto: none at --freeze-depth {NUM_STAGES} (a head alone), else light below 128 px, else standard |"
        " standard: random crops of 25-100% of the image and flips |"
        " light: crops of 60-100% and flips | none: training images centre-cropped like validation ones;"
        " at --freeze-depth 5 with the cache on, the backbone's features are then computed once and only the head"
        " trains",
        choices=AUGMENTS,
    )
    num_workers: int | str = option(
        1,
        "data-parallel training workers (one GPU each on a GPU cluster); MIN-MAX (1-4): elastic, as many as the"
        " alive nodes fit: a lost node shrinks the group, a new one grows it at the next --resize-interval check,"
        " each time from the last checkpoint",
    )
    gpu: bool | None = option(None, "train on GPUs", negative=("cpu", "train on CPUs"))  # None: GPUs if any
    cpus_per_worker: float | None = option(
        None,
        "CPUs reserved per worker, and its torch threads on CPU (default: reserve all but one CPU (or half the"
        " machine) for the data pipeline, and use the node's cores, shared by its workers)",
        positive=True,
    )
    storage: str = option(
        "./runs",
        "where runs are written: a local folder or a URI (s3://bucket/path, gs://..., endpoint as for --data); on a"
        " multi-node cluster or in a Ray job it must be shared storage (a URI or an NFS folder), checked writable"
        " before the run starts",
    )
    cache: str = option(
        "auto",
        "decoded-image cache: auto (under --storage/.tl-ray-cache) | a folder or URI | none (decode every epoch);"
        " images are decoded and resized once, and reused by later epochs, runs and sweep trials",
    )
    name: str | None = option(
        None, "run name: its folder under --storage; rerunning a name resumes it (default: train-<timestamp>)"
    )
    keep_checkpoints: int = option(
        2, "keep the best N checkpoints by --monitor (the latest is always kept too)", positive=True
    )
    max_failures: int = option(
        3,
        "restart failed training workers from the last checkpoint up to N times (-1: forever)",
        between=(-1, 1_000_000),
    )
    resource_timeout: float = option(
        600.0,
        "seconds a run may wait for its workers' resources (at the start, or after losing a node) before it fails"
        " with an error; 0: wait forever",
        between=(0.0, 1e9),
    )
    resize_interval: float = option(
        60.0,
        "elastic --num-workers MIN-MAX: seconds between checks for room to grow the worker group (each growth"
        " restarts the group from the last checkpoint)",
        positive=True,
    )
    seed: int = option(0, "random seed for the new head's initialisation and the workers")
    logger: str = option(
        "none",
        f"{' | '.join(LOGGERS)}: also log every epoch to Weights & Biases or MLflow (TensorBoard files are always"
        " written to the run folder's tensorboard/), configured by their variables: WANDB_MODE (offline),"
        " WANDB_API_KEY, MLFLOW_TRACKING_URI; tune logs one tracker run per trial",
        choices=LOGGERS,
    )
    logger_project: str | None = option(
        None, "the W&B project or MLflow experiment (default: WANDB_PROJECT or MLFLOW_EXPERIMENT_NAME, else tl-ray)"
    )

    def validate(self) -> TrainConfig:
        """Raise UsageError naming the first bad option; return the config with defaults resolved.

        Freeze depth defaults to feature extraction, except from random weights
        (``--weights none``), where a frozen backbone would only compute noise.
        """
        check_options(self)
        if self.freeze_depth is None:
            default_depth = 0 if self.weights == "none" else NUM_STAGES
            return dataclasses.replace(self, freeze_depth=default_depth).validate()
        unresolved = (self.weight_decay, self.warmup_epochs, self.backbone_lr_mult, self.head_epochs)
        head_only_auto = self.freeze_depth == NUM_STAGES and self.augment == "auto"
        if None in unresolved or "auto" in (self.strategy, self.optimizer) or head_only_auto:
            return self.with_recipe().validate()
        if not self.data:
            raise UsageError(f"{flag('data')} is required: a folder with train/<class>/ image sub-folders")
        check_logger(self.logger)
        self.source_options().validate()
        workers = parse_workers(self.num_workers)
        if workers is None or not 1 <= workers[0] <= workers[1]:
            raise UsageError(
                f"{flag('num_workers')} must be a positive number of workers (4) or a range MIN-MAX (1-4) with"
                f" 1 <= MIN <= MAX; got {self.num_workers!r}"
            )
        if self.batch_size is not None and self.batch_size < 2 * self.max_workers:
            raise UsageError(
                f"{flag('batch_size')} is the global batch, split over {flag('num_workers')}: it must be at least "
                f"2 per worker ({2 * self.max_workers}); got {self.batch_size}"
            )
        backbones.check_image_size(self.arch, self.image_size, flag("image_size"))
        _check_range("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))  # bounds that depend on epochs
        _check_range("head_epochs", self.head_epochs, 0, self.epochs - 1)
        if self.head_epochs and self.freeze_depth == NUM_STAGES:
            raise UsageError(
                f"{flag('head_epochs')} trains the head alone before unfreezing to {flag('freeze_depth')}, "
                f"which is {NUM_STAGES} (nothing to unfreeze): pass a smaller depth, or leave it out"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"{flag('val_fraction')} must be between 0 and 1 (exclusive); got {self.val_fraction}")
        if not self.cache:
            raise UsageError(f"{flag('cache')} must be auto, none, or a folder or URI for the decoded-image cache")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise UsageError(f"{flag('name')} must be a plain folder name (no '/', not hidden); got {self.name!r}")
        return self

    def source_options(self) -> SourceOptions:
        return SourceOptions(**{key: getattr(self, key) for key in SOURCE_KEYS})

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with (``--num-workers`` N, or MIN of MIN-MAX)."""
        return (parse_workers(self.num_workers) or (1, 1))[0]

    @property
    def max_workers(self) -> int:
        """The most workers the run trains with: what CPUs, batches and concurrency are sized for."""
        return (parse_workers(self.num_workers) or (1, 1))[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def with_recipe(self) -> TrainConfig:
        """Options left out (None) filled in from the recipe (tl_ray.recipe), for this start and optimizer; not the
        batch size and the learning rate, which depend on the training set's size (``for_training_set``)."""
        strategy, backbone_lr_mult, head_epochs = recipe.strategy_options(self.strategy, self.epochs)
        if self.freeze_depth == NUM_STAGES:
            head_epochs = 0  # feature extraction: the head is all that ever trains
        steps_share = recipe.WARMUP_SHARE * self.epochs
        head_only = self.freeze_depth == NUM_STAGES
        optimizer = recipe.optimizer(self.optimizer, head_only)
        return dataclasses.replace(
            self,
            augment=recipe.augment(self.augment, head_only),
            optimizer=optimizer,
            weight_decay=recipe.WEIGHT_DECAY[optimizer] if self.weight_decay is None else self.weight_decay,
            warmup_epochs=min(1.0, steps_share) if self.warmup_epochs is None else self.warmup_epochs,
            strategy=strategy,
            backbone_lr_mult=backbone_lr_mult if self.backbone_lr_mult is None else self.backbone_lr_mult,
            head_epochs=head_epochs if self.head_epochs is None else self.head_epochs,
        )

    def for_training_set(self, num_train: int) -> Self:
        """The config for a training set of ``num_train`` images: a batch size left out comes from its size
        (``recipe.batch_size``), so that a small set still gets enough optimizer steps an epoch, and a learning
        rate left out is ``select`` on a small set (``recipe.selects_lr``), else the recipe's rate."""
        config = self.validate()
        batch_size = config.batch_size or recipe.batch_size(num_train, config.max_workers)
        lr = config.lr
        if lr is None and "lr" not in config.IGNORED:  # tune's trials and lr-find set their rates themselves
            lr = "select" if recipe.selects_lr(num_train) else config.recipe_lr()
        return dataclasses.replace(config, batch_size=batch_size, lr=lr).validate()

    def recipe_lr(self) -> float:
        """The recipe's peak rate for this optimizer, depth and strategy (resolved ones): what ``--lr`` left out
        trains at, and the centre of what ``select`` tries."""
        return recipe.peak_lr(self.optimizer, self.freeze_depth == NUM_STAGES, self.strategy)

    def crop_scale(self) -> tuple[float, float] | None:
        """The training crops' smallest and largest share of the image; None: centre crops (no augmentation)."""
        if self.augment == "none":
            return None
        if self.augment == "auto":
            return recipe.crop_scale(self.image_size)
        return recipe.LIGHT_CROP_SCALE if self.augment == "light" else recipe.STANDARD_CROP_SCALE

    def with_run_name(self) -> Self:
        """Fill in a timestamped name, so every run lands in its own folder unless told otherwise."""
        if self.name:
            return self
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return dataclasses.replace(self, name=f"{self.RUN_PREFIX}-{stamp}")


@dataclass
class LrFindConfig(TrainConfig):
    """`tl-ray lr-find`: the LR range test ``--lr auto`` runs before training, on its own: train's options say
    what it runs on (data, model, depth, optimizer, batch), and these how far it goes."""

    # What a range test does not use: its rates are its own, it trains no epoch and keeps no checkpoint.
    IGNORED: ClassVar[tuple[str, ...]] = ("lr", "epochs", "keep_checkpoints", "monitor", "logger", "logger_project")
    RUN_PREFIX: ClassVar[str] = "lr-find"

    steps: int = option(recipe.RANGE_TEST_STEPS, "optimizer steps the test takes at most (it stops on divergence)")
    start_lr: float = option(recipe.RANGE_TEST_START_LR, "the test's first learning rate", positive=True)
    end_lr: float = option(recipe.RANGE_TEST_END_LR, "the rate the test reaches at --steps", positive=True)

    def validate(self) -> LrFindConfig:
        check_options(self)
        if self.steps < MIN_RANGE_TEST_STEPS:
            raise UsageError(f"{flag('steps')} must be at least {MIN_RANGE_TEST_STEPS}; got {self.steps}")
        if self.start_lr >= self.end_lr:
            raise UsageError(f"{flag('start_lr')} ({self.start_lr}) must be below {flag('end_lr')} ({self.end_lr})")
        return super().validate()


MIN_RANGE_TEST_STEPS = 6  # as fastai: fewer leaves no curve to read


def parse_workers(value: int | str) -> tuple[int, int] | None:
    """``--num-workers`` as (min, max): ``4`` is (4, 4), ``1-4`` is (1, 4); None if it is neither."""
    if isinstance(value, int):
        return value, value
    low, dash, high = value.strip().partition("-")
    if not dash or not low.strip().isdigit() or not high.strip().isdigit():
        return None
    return int(low), int(high)


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise UsageError(f"{flag(key)} must be positive; got {value}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UsageError(f"{flag(key)} must be between {low} and {high}; got {value}")


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}
# Numbers as YAML 1.1 (PyYAML) leaves them as text: 3e-4, 1e-3, 1.5e3, -.5 (and 1_000 wherever it is text).
_NUMBER = re.compile(r"[-+]?(?=\.?\d)(\d[\d_]*)?(\.[\d_]*)?([eE][-+]?\d+)?", re.ASCII)
_INVALID = object()


def _where(path: str | None, key: str) -> str:
    """How an error names the option: ``FILE: key`` for a config file, the flag otherwise."""
    return f"{path}: {key}" if path else flag(key)


def _number(value: Any) -> int | float | None:
    """A finite number from an int, a float or numeric text; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        if text.lstrip("+-").isdigit():
            return int(text)
        number = float(text)
    else:
        return None
    return number if math.isfinite(number) else None


def _convert(value: Any, kind: Any, text: str | None = None) -> Any:
    """``value`` as ``kind`` where that loses nothing, else _INVALID. ``text``: the value as written in a config
    file, which a str option takes when YAML read it as a number (``name: 007``)."""
    if isinstance(value, bool) or kind is bool:  # YAML true/false, and only for bool options
        return value if isinstance(value, bool) and kind is bool else _INVALID
    if kind is str:
        if isinstance(value, str | Path):
            return str(value)
        return text if text is not None and isinstance(value, int | float) else _INVALID
    number = _number(value)
    if number is None:
        return _INVALID
    if kind is float:
        return float(number)
    if kind is int and (isinstance(number, int) or number.is_integer()):
        return int(number)
    return _INVALID


def _coerce(
    key: str,
    value: Any,
    hint: Any,
    path: str | None,
    items: Any = None,
    text: str | None = None,
    words: tuple[str, ...] = (),
) -> Any:
    """One value from a config file (``path``), a flag or a keyword (``path`` None), checked against its field's
    type and converted where that loses nothing: numbers in any YAML spelling (3e-4, 1_000, .5; an int for a
    float, an integral float for an int), booleans only as booleans, list options as ``_coerce_list`` says; a
    number option with ``words`` takes those texts too, and no other."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    if items is not None:
        return _coerce_list(key, value, path, *items)
    if words:
        if isinstance(value, str) and value.strip() in words:
            return value.strip()
        allowed = tuple(kind for kind in allowed if kind is not str)
    for kind in allowed:
        converted = _convert(value, kind, text)
        if converted is not _INVALID:
            return converted
    names = " or ".join(_TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind))) for kind in allowed)
    if words:
        names = number_or_words(words, nullable=type(None) in allowed and path is not None)  # YAML's null
    hint = " (YAML reads yes, no, on, off as booleans: quote the text)" if isinstance(value, bool) else ""
    raise UsageError(f"{_where(path, key)} must be {names}; got {value!r}{hint if str in allowed else ''}")


def number_or_words(words: tuple[str, ...], nullable: bool = False) -> str:
    """What a number option with ``words`` takes, as an error says it: "a number, auto, select or null"."""
    choices = ["a number", *words, *(["null"] if nullable else [])]
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _coerce_list(key: str, value: Any, path: str | None, items: type, described: str, example: str) -> str:
    """A list option's canonical text ("0,3,5"; numbers as Python writes them) from that text, a list or one value."""
    if isinstance(value, str):
        parts: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    else:
        parts = list(value) if isinstance(value, list | tuple) else [value]
    converted = [_convert(part, items) for part in parts]
    if any(item is _INVALID or (items is str and "," in item) for item in converted):
        if path:
            listed = "[" + example.replace(",", ", ") + "]"
            expected = f"a list of {described} like {listed} (or the same comma-separated: {example})"
        else:
            expected = f"comma-separated {described} like {example}"
        raise UsageError(f"{_where(path, key)} must be {expected}; got {value!r}")
    return ",".join(repr(item) if items is float else str(item).strip() for item in converted)


def list_items(config: Any, key: str) -> list[Any] | None:
    """The items of a list option (from its canonical text), as ``to_yaml`` writes them."""
    items = config.__dataclass_fields__[key].metadata[LIST_ITEMS][0]
    text = getattr(config, key)
    if text is None:
        return None
    return [_convert(part.strip(), items) for part in text.split(",") if part.strip()]


def merge(config_class: type, yaml_path: str | None, overrides: dict[str, Any]):
    """Build a config: dataclass defaults, then the YAML file, then explicit overrides (flags, keywords)."""
    hints = typing.get_type_hints(config_class)
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    if yaml_path:
        loaded, texts = _read_yaml(yaml_path, set(fields))
        for key, value in loaded.items():
            declared = fields[key].metadata
            values[key] = _coerce(
                key, value, hints[key], yaml_path, declared.get(LIST_ITEMS), texts.get(key), declared.get(WORDS, ())
            )
    for key, value in overrides.items():
        if key not in fields:
            raise UsageError(f"unknown option {key!r}; known: {', '.join(sorted(fields))}")
        declared = fields[key].metadata
        values[key] = _coerce(key, value, hints[key], None, declared.get(LIST_ITEMS), None, declared.get(WORDS, ()))
    return config_class(**values)


def _read_yaml(path: str, known: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's mapping (keys with underscores), and the text of each plain scalar value as written."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"--config: cannot read {path}: {error.strerror or error}") from error
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        texts = _plain_texts(path, node) if isinstance(node, yaml.MappingNode) else {}
        loaded = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"--config: {path} is not valid YAML: {where}{problem}") from error
    finally:
        loader.dispose()
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict):
        raise UsageError(f"--config: {path} must hold a mapping of option: value, got {type(loaded).__name__}")
    normalised = {str(key).replace("-", "_"): value for key, value in loaded.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise UsageError(f"--config: {path} has unknown keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return normalised, texts


def _plain_texts(path: str, mapping: yaml.MappingNode) -> dict[str, str]:
    """Each top-level key's value as written, where it is a plain scalar; refuses a key given twice (which YAML
    would let the last one win). Read before construction, which folds merge keys (``<<: *base``) into the node."""
    texts: dict[str, str] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in mapping.value:
        key = str(key_node.value).replace("-", "_")
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line = key_node.start_mark.line + 1
        if key in lines:
            raise UsageError(f"--config: {path} sets {key} twice (lines {lines[key]} and {line}); keep one")
        lines[key] = line
        if isinstance(value_node, yaml.ScalarNode) and value_node.style is None:
            texts[key] = value_node.value
    return texts


class _Dumper(yaml.SafeDumper):
    """One option a line; lists inline, as engineers write them: ``freeze_depths: [0, 3, 5]``."""


_Dumper.add_representer(list, lambda dumper, items: dumper.represent_sequence("tag:yaml.org,2002:seq", items, True))


def to_yaml(config: Any) -> str:
    """The config as YAML that ``merge`` reads back into an equal config (list options written as lists)."""
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if LIST_ITEMS in field.metadata and value is not None:
            items = list_items(config, field.name)
            value = value if _INVALID in items else items
        values[field.name] = value
    return yaml.dump(values, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1_000_000)


SCHEDULERS = ("asha", "fifo")


@dataclass
class TuneConfig(TrainConfig):
    """`tl-ray tune`: the train options plus the search space and how to search it.

    ``epochs`` is ignored: every trial's budget is ``max_epochs``. ``freeze_depth``,
    ``lr`` and ``strategy`` are searched, so their train values are ignored too.
    Every depth and strategy is tried with the same learning rates: a comparison of depths
    in which each had its own random rate would measure the draws, not the depths.
    """

    IGNORED: ClassVar[tuple[str, ...]] = ("freeze_depth", "lr", "epochs", "strategy")  # searched, or max_epochs
    RUN_PREFIX: ClassVar[str] = "tune"

    # The list options take comma-separated text as flags; in --config, a YAML list too (freeze_depths: [0, 3, 5]).
    freeze_depths: str = option(
        "0,1,2,3,4,5",
        "comma-separated freeze depths to compare (0,3,5), each a grid point",
        items=(int, "integers", "0,3,5"),
    )
    strategies: str = option(
        "auto",
        "comma-separated fine-tuning strategies to compare (plain,probe; see --strategy); depth 5 runs once",
        items=(str, "strategy names", "discriminative,probe"),
    )
    lrs: str | None = option(
        None,
        "comma-separated learning rates (1e-3,3e-3), each tried at every depth and strategy",
        items=(float, "numbers", "1e-3,3e-3"),
    )
    lr_min: float | None = option(
        None, "without --lrs: lowest learning rate of the grid (default: the recipe's / 3)", positive=True
    )
    lr_max: float | None = option(
        None, "without --lrs: highest learning rate of the grid (default: the recipe's x 3)", positive=True
    )
    num_samples: int = option(
        1,
        "without --lrs: learning rates, log-spaced from --lr-min to --lr-max, each tried at every depth and"
        " strategy (1: the recipe's rate)",
        positive=True,
    )
    max_epochs: int = option(5, "epochs per trial (ASHA may stop a trial sooner)", positive=True)
    scheduler: str = option(
        "asha", "asha: stop weak trials early on --monitor | fifo: run every trial to the end", choices=SCHEDULERS
    )
    max_concurrent: int | None = option(
        None, "trials at once (default: GPUs / --num-workers on a GPU cluster, else 1)", positive=True
    )
    scratch_baseline: bool = option(
        False,
        "also train from random weights (full fine-tuning, never stopped early): the report shows what transfer gains",
    )

    def depths(self) -> list[int]:
        depths = sorted(set(_int_list("freeze_depths", self.freeze_depths)))
        if not depths or not all(0 <= depth <= NUM_STAGES for depth in depths):
            raise UsageError(
                f"{flag('freeze_depths')} must list depths between 0 and {NUM_STAGES}; got {self.freeze_depths!r}"
            )
        return depths

    def strategy_names(self) -> list[str]:
        given = [part.strip() for part in self.strategies.split(",") if part.strip()]
        unknown = [name for name in given if name not in recipe.STRATEGIES]
        if not given or unknown:
            known = ", ".join(recipe.STRATEGIES)
            raise UsageError(f"{flag('strategies')} must list strategies among {known}; got {self.strategies!r}")
        # "auto" is named for what it is (plain).
        resolved = (recipe.strategy_options(name, self.max_epochs)[0] for name in given)
        return list(dict.fromkeys(resolved))

    def learning_rates(self, depth: int = 0, strategy: str = "plain") -> list[float]:
        """The learning rates the trials at ``depth`` with ``strategy`` are tried with: ``lrs``, or ``num_samples``
        rates spaced evenly on a log scale from ``lr_min`` to ``lr_max``; an end left out is the recipe's rate for
        those trials (``recipe.peak_lr``, by optimizer, depth and strategy) / 3 or x 3; one sample: the recipe's
        rate, or the middle of the range. Rates the user gives are every trial's; the recipe's differ where the
        recipe does (a head alone trains with SGD, at a larger step), so that no depth is judged at a rate
        that is wrong for it."""
        if self.lrs is not None:
            try:
                rates = sorted({float(part) for part in self.lrs.split(",") if part.strip()})
            except ValueError:
                raise UsageError(
                    f"{flag('lrs')} must be comma-separated numbers like 1e-3,3e-3; got {self.lrs!r}"
                ) from None
            if not rates or min(rates) <= 0:
                raise UsageError(f"{flag('lrs')} must list positive learning rates; got {self.lrs!r}")
            return rates
        head_only = depth == NUM_STAGES
        centre = recipe.peak_lr(recipe.optimizer(self.optimizer, head_only), head_only, strategy)
        low = centre / 3 if self.lr_min is None else self.lr_min
        high = centre * 3 if self.lr_max is None else self.lr_max
        if self.num_samples == 1:
            both_default = self.lr_min is None and self.lr_max is None
            return [centre if both_default else math.sqrt(low * high)]
        step = math.log(high / low) / (self.num_samples - 1)
        return [low * math.exp(step * index) for index in range(self.num_samples)]

    def search_points(self) -> list[dict[str, Any]]:
        """Every (freeze depth, strategy, lr) trial. At depth 5 only the head trains, so strategies (which
        differ in how the backbone trains) would repeat one trial: it is run once, as "plain"."""
        points = []
        for depth in self.depths():
            names = ["plain"] if depth == NUM_STAGES else self.strategy_names()
            for strategy in names:
                for lr in self.learning_rates(depth, strategy):
                    points.append({"freeze_depth": depth, "strategy": strategy, "lr": lr})
        if self.scratch_baseline:
            # The yardstick: the same task and budget from random weights, with the recipe's rate for that start.
            scratch_lr = recipe.LR[recipe.optimizer(self.optimizer, head_only=False)]
            points.append({"freeze_depth": 0, "strategy": "plain", "lr": scratch_lr, "weights": "none"})
        return points

    def grace_epochs(self) -> int:
        """The first epoch ASHA may stop a trial after: once warm-up (and a probe's head-alone phase) is over,
        and the trial has trained at least as long after warm-up as in it."""
        longest_head = 0
        for strategy in self.strategy_names():
            trial = dataclasses.replace(self, strategy=strategy, freeze_depth=0, epochs=self.max_epochs, lr=1.0)
            resolved = TrainConfig.with_recipe(trial)
            longest_head = max(longest_head, resolved.head_epochs)
            warmup = resolved.warmup_epochs
        return min(self.max_epochs, longest_head + max(1, math.ceil(2 * warmup)))

    def validate(self) -> TuneConfig:
        check_options(self)
        check_logger(self.logger)  # the trials' own Train runs log nothing but TensorBoard: see trial_config
        self.depths()
        self.strategy_names()
        if self.lr_min is not None and self.lr_max is not None and self.lr_min > self.lr_max:
            raise UsageError(f"{flag('lr_min')} ({self.lr_min}) must not exceed {flag('lr_max')} ({self.lr_max})")
        self.learning_rates()
        for point in self.search_points():
            TrainConfig.validate(self.trial_config(point, self.storage, self.name or "check"))
        return dataclasses.replace(self, epochs=self.max_epochs)

    def trial_config(self, point: dict[str, Any], storage: str, name: str) -> TrainConfig:
        """The TrainConfig of one trial: this sweep's train options with one point of the search space."""
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        options = {key: value for key, value in dataclasses.asdict(self).items() if key in train_fields}
        # The sweep logs each trial to --logger through Tune's callbacks; the trial's Train run does not too.
        options.update(point, epochs=self.max_epochs, storage=storage, name=name, logger="none")
        return TrainConfig(**options)


def _int_list(key: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag(key)} must be comma-separated integers like 0,3,5; got {text!r}") from None


def forbid_world_writable_files() -> None:
    """Clear the umask's "others may write" bit in this process, whatever the shell set.

    A world-writable checkpoint or report is one anybody on the machine can replace.
    Called by every process tl-ray runs code in: the CLI, training workers, sweep trials.
    """
    os.umask(os.umask(0o022) | 0o002)

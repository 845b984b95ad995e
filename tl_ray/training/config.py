"""The options of `tl-ray train` (``TrainConfig``) and `tl-ray lr-find` (``LrFindConfig``), each declared once as
a field (``tl_ray.options.option``), and what follows from them: the recipe's defaults filled in, the checks that
need several options at once, the worker range."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
from dataclasses import dataclass
from typing import ClassVar, Self

from tl_ray import backbones, recipe
from tl_ray.backbones import ARCHS, NUM_STAGES
from tl_ray.classes import MONITORS
from tl_ray.errors import UsageError
from tl_ray.inputs.config import InspectConfig, ReadsSource, SourceOptions, check_val_fraction
from tl_ray.options import check_options, check_range, check_required, flag, option, same_option
from tl_ray.training import toolbox
from tl_ray.training.toolbox import ToolboxOptions

OPTIMIZERS = recipe.OPTIMIZERS
# auto: light below 128 px, standard above; light/standard: random crops of at least 60%/25% of the
# image, and flips; none: training images centre-cropped like validation ones; trivial/randaugment: auto's crops
# and flips, then TrivialAugmentWide or RandAugment (recipe.AUGMENT_POLICIES).
AUGMENTS = ("auto", "standard", "light", "none", *recipe.AUGMENT_POLICIES)
# none: every sample counts the same; auto: loss weights n / (classes x n_class) from the training counts.
CLASS_WEIGHTS = ("none", "auto")
# The metric that picks the best checkpoint (and ranks a sweep's trials), and which way it improves.
# Where a run's metrics go besides TensorBoard (tl_ray.tracking); the module each imports, and what to install for it
# (the tl-ray extra of the same name installs it).
LOGGERS = ("none", "wandb", "mlflow")
LOGGER_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}


def check_logger(kind: str) -> None:
    """``--logger``: one of LOGGERS, with its package importable (else a UsageError naming what to install)."""
    if kind not in LOGGERS:
        raise UsageError(f"{flag('logger')} must be one of {', '.join(LOGGERS)}; got {kind!r}")
    if kind != "none" and importlib.util.find_spec(LOGGER_PACKAGES[kind][0]) is None:
        package = LOGGER_PACKAGES[kind][1]
        raise UsageError(f"--logger {kind} needs the {package} package: pip install {package} (or tl-ray[{kind}])")


@dataclass
class TrainConfig(ReadsSource):
    """Everything `tl-ray train` needs. Field names are the YAML keys and, with dashes, the flags; each field's
    ``option`` is the one declaration of its default, help and choices."""

    IGNORED: ClassVar[tuple[str, ...]] = ()  # options this command takes no flag for (see TuneConfig)
    RUN_PREFIX: ClassVar[str] = "train"  # a run left unnamed is <prefix>-<timestamp>

    data: str | None = same_option(InspectConfig, "data")
    val_data: str | None = same_option(InspectConfig, "val_data")
    label_pattern: str | None = same_option(SourceOptions, "label_pattern")
    path_column: str = same_option(SourceOptions, "path_column")
    label_column: str = same_option(SourceOptions, "label_column")
    split_column: str = same_option(SourceOptions, "split_column")
    image_column: str | None = same_option(SourceOptions, "image_column")
    retry_seconds: float = same_option(SourceOptions, "retry_seconds")
    arch: str = option(
        "resnet50",
        f"backbone: torchvision's {', '.join(ARCHS)}, or any timm model by name (convnext_atto; timm/NAME where"
        " torchvision has the name too); tl-ray archs lists them",
    )
    weights: str = option(
        "imagenet",
        "imagenet | a torchvision weights name (IMAGENET1K_V1) or timm tag (in22k_ft_in1k) | none | a .pth or"
        " .safetensors state dict | a tl-ray checkpoint dir (paths or URIs)",
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
    val_fraction: float = same_option(InspectConfig, "val_fraction")
    color_jitter: float = option(0.0, "colour jitter strength for training augmentation (0 = off)", between=(0.0, 1.0))
    augment: str = option(
        "auto",
        f"auto: none at --freeze-depth {NUM_STAGES} (a head alone), else light below 128 px, else standard |"
        " standard: random crops of 25-100% of the image and flips |"
        " light: crops of 60-100% and flips | none: training images centre-cropped like validation ones;"
        " at --freeze-depth 5 with the cache on, the backbone's features are then computed once and only the head"
        " trains | trivial, randaugment: auto's crops and flips, then torchvision's TrivialAugmentWide or"
        " RandAugment (2 operations at magnitude 9, timm's rand-m9) on each crop",
        choices=AUGMENTS,
    )
    random_erasing: float = option(
        0.0,
        "probability of erasing a random box (2-33% of the crop) of each training crop with noise, after the"
        " other augmentation (timm's --reprob; 0.25 is its usual value); like --color-jitter, ignored with"
        " --augment none (the default for a head alone, whose features are then computed once)",
        between=(0.0, 1.0),
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
    # The fine-tuning toolbox (tl_ray.training.toolbox): declared there.
    ema: float | None = same_option(ToolboxOptions, "ema")
    accumulate: int = same_option(ToolboxOptions, "accumulate")
    patience: int | None = same_option(ToolboxOptions, "patience")
    mixup: float = same_option(ToolboxOptions, "mixup")
    cutmix: float = same_option(ToolboxOptions, "cutmix")
    mix_prob: float = same_option(ToolboxOptions, "mix_prob")
    layer_decay: float | None = same_option(ToolboxOptions, "layer_decay")
    compile: bool = same_option(ToolboxOptions, "compile")

    def validate(self) -> TrainConfig:
        """Raise UsageError naming the first bad option; return the config with defaults resolved.

        Freeze depth defaults to feature extraction, except from random weights
        (``--weights none``), where a frozen backbone would only compute noise.
        """
        check_options(self)
        config = self
        if config.freeze_depth is None:
            default_depth = 0 if config.weights == "none" else NUM_STAGES
            config = dataclasses.replace(config, freeze_depth=default_depth)
        if config.needs_recipe():
            config = config.with_recipe()
            check_options(config)
        config.check_together()
        return config

    def needs_recipe(self) -> bool:
        """Whether an option the recipe fills in (``with_recipe``) is left out, or left to ``auto``."""
        unresolved = (self.weight_decay, self.warmup_epochs, self.backbone_lr_mult, self.head_epochs)
        head_only_auto = self.freeze_depth == NUM_STAGES and self.augment == "auto"
        return None in unresolved or "auto" in (self.strategy, self.optimizer) or head_only_auto

    def check_together(self) -> None:
        """The checks that need several options, once the recipe has filled in what was left out."""
        check_required(self)
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
        backbones.check_arch(self.arch, flag("arch"))
        backbones.check_image_size(self.arch, self.image_size, flag("image_size"))
        backbones.check_freeze_depth(self.arch, self.freeze_depth, flag("freeze_depth"))
        check_range("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))  # bounds that depend on epochs
        check_range("head_epochs", self.head_epochs, 0, self.epochs - 1)
        if self.head_epochs and self.freeze_depth == NUM_STAGES:
            raise UsageError(
                f"{flag('head_epochs')} trains the head alone before unfreezing to {flag('freeze_depth')}, "
                f"which is {NUM_STAGES} (nothing to unfreeze): pass a smaller depth, or leave it out"
            )
        check_val_fraction(self.val_fraction)
        toolbox.check(self)
        if not self.cache:
            raise UsageError(f"{flag('cache')} must be auto, none, or a folder or URI for the decoded-image cache")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise UsageError(f"{flag('name')} must be a plain folder name (no '/', not hidden); got {self.name!r}")

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
        if self.augment == "auto" or self.augment in recipe.AUGMENT_POLICIES:  # a policy goes on top of auto's crops
            return recipe.crop_scale(self.image_size)
        return recipe.LIGHT_CROP_SCALE if self.augment == "light" else recipe.STANDARD_CROP_SCALE

    def augment_policy(self) -> str:
        """The automatic augmentation policy of the training crops (``recipe.AUGMENT_POLICIES``), or "none"."""
        return self.augment if self.augment in recipe.AUGMENT_POLICIES else "none"

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


@dataclass
class ArchsConfig:
    """`tl-ray archs`: the backbones --arch takes (torchvision's table, then timm's), and which have weights."""

    pattern: str | None = option(
        None, "only names matching this (fnmatch: convnext*, *vit*_224; a bare word matches anywhere)", positional=True
    )
    pretrained: bool = option(False, "only those with pretrained weights (what --weights imagenet loads)")

    def validate(self) -> ArchsConfig:
        check_options(self)
        return self


def parse_workers(value: int | str) -> tuple[int, int] | None:
    """``--num-workers`` as (min, max): ``4`` is (4, 4), ``1-4`` is (1, 4); None if it is neither."""
    if isinstance(value, int):
        return value, value
    low, dash, high = value.strip().partition("-")
    if not dash or not low.strip().isdigit() or not high.strip().isdigit():
        return None
    return int(low), int(high)

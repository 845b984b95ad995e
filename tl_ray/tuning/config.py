"""The options of `tl-ray tune` (``TuneConfig``): train's, plus the search space and how to search it; and the grid
they make (``search_points``), each point one trial's ``TrainConfig``."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from tl_ray import recipe
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import UsageError
from tl_ray.inputs.config import SourceOptions
from tl_ray.options import canonical_item, check_options, check_required, coerce_value, flag, int_list, option
from tl_ray.training.config import TrainConfig, check_logger

SCHEDULERS = ("asha", "fifo")
# The train options tune searches with flags of its own: --grid points at those.
SEARCHED = {
    "freeze_depth": "--freeze-depths",
    "strategy": "--strategies",
    "lr": "--lrs (or --lr-min, --lr-max, --num-samples)",
    "epochs": "--max-epochs (every trial's budget is the same)",
    "weights": "--scratch-baseline (random weights beside --weights)",
}
# What every trial must share for the comparison to be fair or the sweep to run: the data and its validation split
# (the one set every trial is scored on), the metric that ranks them, where runs go, the workers and resources.
NOT_SWEPT = (
    "data",
    "val_data",
    "val_fraction",
    *(field.name for field in dataclasses.fields(SourceOptions)),
    "monitor",
    "storage",
    "name",
    "cache",
    "keep_checkpoints",
    "num_workers",
    "gpu",
    "cpus_per_worker",
    "max_failures",
    "resource_timeout",
    "resize_interval",
    "logger",
    "logger_project",
)


def sweepable() -> list[str]:
    """The train options ``--grid`` varies."""
    names = (field.name for field in dataclasses.fields(TrainConfig))
    return [name for name in names if name not in NOT_SWEPT and name not in SEARCHED]


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
    grid: Mapping[str, str] | None = option(
        None,
        "OPTION=V1,V2,... (repeatable): also try every value of this train option (label_smoothing=0,0.1;"
        " augment=auto,trivial), each with every depth, strategy and rate above; several --grid make their"
        " product (YAML: grid: a mapping of option: [values]). Values are checked as the option's own flag checks them",
        mapping=True,
    )

    def depths(self) -> list[int]:
        depths = sorted(set(int_list("freeze_depths", self.freeze_depths)))
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

    def grid_values(self) -> dict[str, list[Any]]:
        """``--grid``'s options and their values, each coerced and checked by the train option's own declaration
        (``options.coerce_value``); an option tune searches itself, or one every trial must share, is refused."""
        swept: dict[str, list[Any]] = {}
        for key, text in (self.grid or {}).items():
            if key in SEARCHED:
                raise UsageError(f"{flag('grid')} {key}: tune searches it with {SEARCHED[key]}")
            if key not in sweepable():
                raise UsageError(
                    f"{flag('grid')} {key}: not a train option a sweep can vary (the data, its validation split, the"
                    f" monitor, where runs go and the resources are every trial's); it varies: {', '.join(sweepable())}"
                )
            try:
                values = [coerce_value(TrainConfig, key, part) for part in text.split(",")]
            except UsageError as error:
                raise UsageError(f"{flag('grid')} {key}={text}: {error}") from None
            swept[key] = list(dict.fromkeys(values))
        return swept

    def search_points(self) -> list[dict[str, Any]]:
        """Every (freeze depth, strategy, lr) trial, for every combination of ``--grid``'s values (their product;
        the rates those of the combination, by the same rule). At depth 5 only the head trains, so strategies
        (which differ in how the backbone trains) would repeat one trial: it is run once, as "plain"."""
        points = []
        swept = self.grid_values()
        for values in itertools.product(*swept.values()):
            combination = dict(zip(swept, values, strict=True))
            options = dataclasses.replace(self, **combination) if combination else self
            for depth in self.depths():
                names = ["plain"] if depth == NUM_STAGES else self.strategy_names()
                for strategy in names:
                    for lr in options.learning_rates(depth, strategy):
                        points.append({"freeze_depth": depth, "strategy": strategy, "lr": lr, **combination})
        if self.scratch_baseline:
            # The yardstick: the same task and budget from random weights, with the recipe's rate for that start
            # (once, with the sweep's own options: not one per --grid combination).
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
        swept = self.grid_values()
        for point in self.search_points():
            TrainConfig.validate(self.trial_config(point, self.storage, self.name or "check"))
        grid = {key: ",".join(canonical_item(value) for value in values) for key, values in swept.items()} or None
        return dataclasses.replace(self, epochs=self.max_epochs, grid=grid)

    def trial_config(self, point: dict[str, Any], storage: str, name: str) -> TrainConfig:
        """The TrainConfig of one trial: this sweep's train options with one point of the search space."""
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        options = {key: value for key, value in dataclasses.asdict(self).items() if key in train_fields}  # --grid's
        # values come in the point, with the depth, strategy and rate
        # The sweep logs each trial to --logger through Tune's callbacks; the trial's Train run does not too.
        options.update(point, epochs=self.max_epochs, storage=storage, name=name, logger="none")
        return TrainConfig(**options)


@dataclass
class ReportConfig:
    """`tl-ray report`: the sweep whose report to (re)write."""

    run_dir: str | None = option(
        None, "the sweep's folder: STORAGE/NAME (a path or URI)", required="a sweep's folder", positional=True
    )

    def validate(self) -> ReportConfig:
        check_options(self)
        check_required(self)
        return self

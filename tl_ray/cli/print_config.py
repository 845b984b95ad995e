"""`--print-config`: the command's options, validated and resolved, as YAML that --config reads back; for train,
tune and lr-find with what the recipe fills in said in comments (what the training set's size decides, the grid)."""

from __future__ import annotations

import dataclasses

from tl_ray import recipe
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import TlRayError
from tl_ray.options import to_yaml
from tl_ray.training.config import TrainConfig
from tl_ray.tuning.config import TuneConfig
from tl_ray.version import __version__


def resolved_yaml(command: str, config: object) -> str:
    """Any command's config validated, as YAML with a header saying how to run it."""
    if isinstance(config, TrainConfig):
        return training_yaml(command, config)
    header = f"# tl-ray {command}: the resolved configuration (tl-ray {__version__}); run it with\n"
    return header + f"#   tl-ray {command} --config FILE\n" + to_yaml(config.validate())


def training_yaml(command: str, config: TrainConfig) -> str:
    """`--print-config`: the config validated, with what the config resolves by itself filled in (train: the
    recipe's learning rate, weight decay, warm-up and strategy; tune: a trial's epochs), as YAML for --config.

    Without --data the rest is still checked and resolved, and data is written as null: a template to fill in.
    """
    resolved = dataclasses.replace(config, data=config.data or "DATA").validate()
    lines = [f"# tl-ray {command}: the resolved configuration (tl-ray {__version__}); run it with"]
    lines.append(f"#   tl-ray {command} --config FILE")
    rule = f"{recipe.BATCH_SIZE}, or the whole training set when smaller, at least 2 a worker"
    lr_rule = ""
    if resolved.lr is None and "lr" not in resolved.IGNORED:
        rates = ", ".join(f"{rate:.2g}" for rate in recipe.lr_candidates(resolved.recipe_lr()))
        halves = ", ".join(f"{resolved.recipe_lr() * factor:.2g}" for factor in recipe.SELECT_HALF_BATCH_FACTORS)
        lr_rule = (
            f"at most {recipe.SELECT_MAX_TRAIN} training images: select, trying {rates}, and {halves} at half the"
            " batch where that is still 2 images a worker, for all the epochs each, then training at the best; more:"
            f" the recipe's {resolved.recipe_lr():g}"
        )
    if not config.data:
        resolved = dataclasses.replace(resolved, data=None)
        lines.append("# data is not set: fill it in, or pass --data, before running")
        if resolved.batch_size is None:
            lines.append(f"# batch_size: null: chosen from the training set's size when it runs ({rule})")
        if lr_rule:
            lines.append(f"# lr: null: chosen from the training set's size when it runs ({lr_rule})")
    elif resolved.batch_size is None or resolved.lr is None:
        from tl_ray.training.driver import list_training_set  # imports Ray: only when the set must be listed
        from tl_ray.training.schedule import steps_per_epoch

        try:
            num_train = len(list_training_set(resolved).train)
        except TlRayError as error:  # the run itself will refuse it; the template is still worth printing
            if resolved.batch_size is None:
                lines.append(f"# batch_size: null: chosen from the training set's size when it runs ({rule});")
            if lr_rule:
                lines.append(f"# lr: null: chosen from the training set's size when it runs ({lr_rule});")
            lines.append(f"#   the training set could not be listed: {error}")
        else:
            batch_from_size = resolved.batch_size is None
            resolved = resolved.for_training_set(num_train)
            steps = steps_per_epoch(num_train, resolved.batch_size, resolved.max_workers, resolved.accumulate)
            kind = "optimizer step" if resolved.accumulate > 1 else "step"
            if batch_from_size:
                lines.append(
                    f"# batch_size: from the training set's size: {num_train} training images ->"
                    f" {resolved.batch_size}, {steps} {kind}{'s' if steps != 1 else ''} an epoch ({rule})"
                )
            if lr_rule:
                chosen = resolved.lr if isinstance(resolved.lr, str) else f"{resolved.lr:g}"
                lines.append(f"# lr: from the training set's size: {num_train} training images -> {chosen} ({lr_rule})")
    if resolved.accumulate > 1:  # the schedule, warm-up and rates are per optimizer step: say what one holds
        batch = resolved.batch_size if resolved.batch_size is not None else "batch_size"
        lines.append(
            f"# accumulate: {resolved.accumulate} batches an optimizer step: {batch} x {resolved.accumulate} images"
            + (f" = {resolved.batch_size * resolved.accumulate}" if resolved.batch_size is not None else "")
            + " a step; the LR schedule and its warm-up count optimizer steps"
        )
    if isinstance(resolved, TuneConfig):
        points = resolved.search_points()
        trials: dict[tuple[int, str], list[str]] = {}
        for point in points:
            if "weights" not in point:  # the scratch baseline is named below
                rates = trials.setdefault((point["freeze_depth"], point["strategy"]), [])
                rates += [] if f"{point['lr']:g}" in rates else [f"{point['lr']:g}"]
        depths = ", ".join(str(depth) for depth in resolved.depths())
        swept = "".join(f" x {key} {(resolved.grid or {})[key].replace(',', ', ')}" for key in resolved.grid or {})
        lines.append(
            f"# the grid: {len(points)} trials: freeze depths {depths} x strategies"
            f" {', '.join(resolved.strategy_names())}{swept} x learning rates"
            + (f" (depth {NUM_STAGES} once)" if NUM_STAGES in resolved.depths() else "")
            + (", and the scratch baseline" if resolved.scratch_baseline else "")
            + ": "
            + "; ".join(f"depth {depth} {strategy} {', '.join(rates)}" for (depth, strategy), rates in trials.items())
        )
    return "\n".join(lines) + "\n" + to_yaml(resolved)

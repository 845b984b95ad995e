"""The freeze-depth comparison: results.csv, report.md and report.png from a sweep summary.

A comparison is only as sharp as the validation set it is scored on: with ``n`` images, one
image is worth ``1/n`` of val_acc, and an accuracy ``p`` has a standard error of
``sqrt(p(1-p)/n)``. The report states both, and names a winner only when the best
configuration leads the next by more than ``resolution`` (two standard errors, at least one
image); otherwise it says the sweep cannot tell them apart.

A sweep run with ``--monitor val_loss`` or ``macro_f1`` is ranked by that metric instead. No
resolution is stated for those (their standard error depends on more than the image count), so
the verdict names the leader and says so.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from tl_ray import classes, figures, html_report
from tl_ray.backbones import NUM_STAGES

plt = figures.pyplot()  # files only, text in any script

CSV_COLUMNS = (
    "trial_id",
    "freeze_depth",
    "strategy",
    "lr",
    "val_acc",
    "val_loss",
    "epochs",
    "seconds",
    "images_per_s",
    "checkpoint",
    "status",
    "best_epoch",
    "macro_f1",
)
DEPTH_NAMES = {0: "full fine-tuning", 5: "feature extraction"}
SCRATCH = "from scratch"
STRATEGY_STYLES = {"plain": "-", "discriminative": "--", "probe": ":", SCRATCH: "-."}


def _depth_label(depth: int) -> str:
    return f"{depth} ({DEPTH_NAMES[depth]})" if depth in DEPTH_NAMES else str(depth)


def _grid_label(trial) -> str:
    """A trial's values of the sweep's --grid options: "label_smoothing 0.1, augment trivial"."""
    return ", ".join(f"{key} {value}" for key, value in trial.grid.items())


def _config_label(trial) -> str:
    """What a configuration is called: every swept dimension but the rate (depth, strategy, then --grid's)."""
    if trial.strategy == SCRATCH:
        return SCRATCH
    label = f"depth {trial.freeze_depth}" + ("" if trial.freeze_depth == NUM_STAGES else f", {trial.strategy}")
    return label + (f" / {_grid_label(trial)}" if trial.grid else "")


def grid_keys(summary) -> list[str]:
    """The sweep's --grid options, in the order given (none for a sweep without a grid)."""
    return list(dict.fromkeys(key for trial in summary.trials for key in trial.grid))


def resolution(accuracy: float, val_images: int) -> float:
    """The smallest val_acc difference this validation set resolves: two standard errors, at least one image."""
    if val_images <= 0:
        return 0.0
    p = min(max(accuracy, 0.0), 1.0)
    return max(1.0 / val_images, 2.0 * math.sqrt(p * (1.0 - p) / val_images))


def _value(trial, summary) -> float:
    """The trial's best epoch's value of the sweep's monitored metric."""
    return getattr(trial, summary.monitor)


def ranked(summary) -> list:
    """Trials by the monitored metric (val_acc unless the sweep said otherwise), best first; no result last."""
    return sorted(summary.trials, key=lambda t: -classes.signed(_value(t, summary), summary.monitor))


def results_csv(summary) -> str:
    """One row per trial: CSV_COLUMNS, then a column per --grid option (its value in that trial)."""
    out = io.StringIO()
    swept = grid_keys(summary)
    writer = csv.DictWriter(out, fieldnames=[*CSV_COLUMNS, *swept], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for trial in ranked(summary):
        row = {column: getattr(trial, column) for column in CSV_COLUMNS}
        writer.writerow({**row, **{key: trial.grid.get(key, "") for key in swept}})
    return out.getvalue()


def table(summary) -> str:
    """The trial table, as markdown: also what `tl-ray tune` prints (a column per --grid option after the rate)."""
    swept = grid_keys(summary)
    lines = [
        "| trial | freeze depth | strategy | lr | "
        + "".join(f"{key} | " for key in swept)
        + "val_acc | val_loss | macro_f1 | epochs | status | seconds | images/s |",
        "|---|---|---|---|" + "---|" * len(swept) + "---|---|---|---|---|---|---|",
    ]
    for t in ranked(summary):
        values = "".join(f"{t.grid.get(key, '')} | " for key in swept)
        lines.append(
            f"| {t.trial_id} | {_depth_label(t.freeze_depth)} | {t.strategy} | {t.lr:.2e} | {values}{t.val_acc:.3f} "
            f"| {t.val_loss:.4f} | {t.macro_f1:.3f} | {t.epochs}/{summary.max_epochs} | {t.status} | {t.seconds:.0f} "
            f"| {t.images_per_s:.1f} |"
        )
    return "\n".join(lines)


def best_per_config(summary) -> dict[str, object]:
    """The best trial of each (freeze depth, strategy) and of the from-scratch baseline, best first."""
    best: dict[str, object] = {}
    for trial in ranked(summary):
        if not math.isnan(_value(trial, summary)):
            best.setdefault(_config_label(trial), trial)
    return best


def best_per_value(summary) -> list[tuple[str, str, object]]:
    """For each swept dimension with more than one value (freeze depth, strategy, each --grid option): the best
    trial at each of its values, as (dimension, value, trial), dimensions in order and values best first. The
    from-scratch baseline is not a value of any of them."""
    dimensions: dict[str, object] = {
        "freeze depth": lambda t: _depth_label(t.freeze_depth),
        "strategy": lambda t: t.strategy,
    }
    dimensions.update({key: (lambda t, key=key: str(t.grid.get(key, ""))) for key in grid_keys(summary)})
    rows = []
    transfer = [t for t in ranked(summary) if t.strategy != SCRATCH and not math.isnan(_value(t, summary))]
    for name, value_of in dimensions.items():
        best: dict[str, object] = {}
        for trial in transfer:
            best.setdefault(value_of(trial), trial)
        if len(best) > 1:
            rows += [(name, value, trial) for value, trial in best.items()]
    return rows


def verdict(summary) -> list[str]:
    """What the sweep can and cannot say: the winner if it leads by more than the resolution, the transfer gain."""
    configs = best_per_config(summary)
    transfer = [t for t in configs.values() if t.strategy != SCRATCH]
    n = summary.val_images
    lines = []
    if n:
        lines.append(
            f"- validation set: {n} images; one image = {1 / n:.3f} of val_acc"
            + (f"; chance = {1 / summary.num_classes:.3f}" if summary.num_classes else "")
        )
    if summary.monitor != "val_acc":
        return lines + _verdict_without_resolution(summary, transfer, configs.get(SCRATCH))
    if len(transfer) >= 2:
        first, second = transfer[0], transfer[1]
        gap = first.val_acc - second.val_acc
        noise = resolution((first.val_acc + second.val_acc) / 2, n)
        images = f" ({round(gap * n)} images)" if n else ""
        if n and gap <= noise:
            tied = [_config_label(t) for t in transfer if first.val_acc - t.val_acc <= noise]
            lines.append(
                f"- **no clear winner**: {', '.join(tied)} are within {noise:.3f} of the best ({first.val_acc:.3f}), "
                f"the resolution of {n} validation images (two standard errors); a larger validation set or more "
                "seeds would tell them apart"
            )
        else:
            lines.append(
                f"- **best: {_config_label(first)}** at {first.val_acc:.3f}, ahead of {_config_label(second)} "
                f"({second.val_acc:.3f}) by {gap:.3f}{images}"
                + (f", more than the resolution of {noise:.3f}" if n else " (validation set size unknown)")
            )
    if n and len(transfer) >= 2:
        first = transfer[0]
        behind = [t for t in transfer[1:] if first.val_acc - t.val_acc > resolution((first.val_acc + t.val_acc) / 2, n)]
        if behind:
            described = ", ".join(
                f"{_config_label(t)} ({t.val_acc:.3f}, {round((first.val_acc - t.val_acc) * n)} images behind)"
                for t in behind
            )
            lines.append(f"- clearly behind the best, by more than the resolution: {described}")
    scratch = configs.get(SCRATCH)
    if scratch is not None and transfer:
        gain = transfer[0].val_acc - scratch.val_acc
        lines.append(
            f"- **transfer vs from scratch**: {transfer[0].val_acc:.3f} vs {scratch.val_acc:.3f} "
            f"({gain:+.3f}" + (f", {round(gain * n):+d} images)" if n else ")")
        )
    return lines


def _verdict_without_resolution(summary, transfer: list, scratch) -> list[str]:
    """The verdict of a sweep ranked by val_loss or macro_f1: the leader and the gaps, without a resolution."""
    monitor = summary.monitor
    lower = " (lower is better)" if monitor == "val_loss" else ""
    lines = []
    if len(transfer) >= 2:
        first, second = transfer[0], transfer[1]
        gap = abs(_value(first, summary) - _value(second, summary))
        lines.append(
            f"- **best by {monitor}: {_config_label(first)}** at {_value(first, summary):.3f}, ahead of "
            f"{_config_label(second)} ({_value(second, summary):.3f}) by {gap:.3f}{lower}; a resolution is stated for"
            f" val_acc only, so a small {monitor} gap needs more seeds or a larger validation set to be trusted"
        )
    if scratch is not None and transfer:
        gain = _value(transfer[0], summary) - _value(scratch, summary)
        lines.append(
            f"- **transfer vs from scratch** by {monitor}: {_value(transfer[0], summary):.3f} vs "
            f"{_value(scratch, summary):.3f} ({gain:+.3f}{lower}; val_acc {transfer[0].val_acc:.3f} vs"
            f" {scratch.val_acc:.3f})"
        )
    return lines


def markdown(summary) -> str:
    best = summary.best
    trial_epochs = sum(t.epochs for t in summary.trials)
    parts = [
        f"# Freeze-depth sweep: {summary.run_dir}",
        "",
        f"- trials: {len(summary.trials)}, trial-epochs run: {trial_epochs} "
        f"(of {len(summary.trials) * summary.max_epochs} without early stopping)",
        f"- wall time: {summary.wall_seconds:.0f} s",
    ]
    monitor = summary.monitor
    if best is not None:
        score = "" if monitor == "val_acc" else f"{monitor} {_value(best, summary):.3f}, "
        parts.append(
            f"- best trial: {best.trial_id}, freeze depth {_depth_label(best.freeze_depth)}, {best.strategy}, "
            + (f"{_grid_label(best)}, " if best.grid else "")
            + f"lr {best.lr:.2e}: {score}val_acc {best.val_acc:.3f} at epoch {best.best_epoch}"
        )
        parts.append(f"- best checkpoint: {summary.best_checkpoint or best.checkpoint}")
    parts += verdict(summary)
    swept = "".join(f", {key}" for key in grid_keys(summary))
    parts += ["", f"## Best per freeze depth and strategy{swept}", ""]
    parts += [f"| configuration | {monitor} | behind the best | lr | trial |", "|---|---|---|---|---|"]
    configs = best_per_config(summary)
    top = next(iter(configs.values()), None)
    n = summary.val_images if monitor == "val_acc" else 0  # images: a count of val_acc only
    for label, trial in configs.items():
        behind = abs(_value(top, summary) - _value(trial, summary))
        behind_text = f"{behind:.3f}" + (f" ({round(behind * n)} images)" if n else "")
        parts.append(f"| {label} | {_value(trial, summary):.3f} | {behind_text} | {trial.lr:.2e} | {trial.trial_id} |")
    if grid_keys(summary):  # the best at each value of each swept dimension, the others at their best for it
        parts += ["", "## Best per value of each swept dimension", ""]
        parts += [f"| dimension | value | {monitor} | behind the best | configuration | lr | trial |"]
        parts += ["|---|---|---|---|---|---|---|"]
        for name, value, trial in best_per_value(summary):
            behind = abs(_value(top, summary) - _value(trial, summary))
            behind_text = f"{behind:.3f}" + (f" ({round(behind * n)} images)" if n else "")
            parts.append(
                f"| {name} | {value} | {_value(trial, summary):.3f} | {behind_text} | {_config_label(trial)} "
                f"| {trial.lr:.2e} | {trial.trial_id} |"
            )
    parts += ["", f"## All trials (best {monitor} first)", "", table(summary)]
    stopped = [t for t in summary.trials if t.status == "stopped early"]
    parts += ["", "## Stopped early by ASHA", ""]
    parts += [f"- {t.trial_id} ({_config_label(t)}, lr {t.lr:.2e}) after epoch {t.epochs}" for t in stopped]
    if not stopped:
        parts.append("- none")
    problems = [t for t in summary.trials if t.status in ("error", "incomplete")]
    if problems:
        parts += ["", "## Errored or incomplete", ""]
        parts += [f"- {t.trial_id} ({_config_label(t)}): {t.status} after {t.epochs} epochs" for t in problems]
    parts += ["", f"![{monitor} per epoch and best per configuration](report.png)", ""]
    return "\n".join(parts)


def _colour(trial):
    return "0.45" if trial.strategy == SCRATCH else plt.get_cmap("viridis")(trial.freeze_depth / 5)


def plot(summary, path: Path) -> None:
    monitor = summary.monitor
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    chance = 1 / summary.num_classes if summary.num_classes and monitor == "val_acc" else None
    unit_range = monitor != "val_loss"  # accuracy and F1 lie in [0, 1]
    for trial in summary.trials:
        if not trial.history:
            continue
        epochs = [h["epoch"] for h in trial.history]
        accuracies = [h.get(monitor, math.nan) for h in trial.history]
        style = STRATEGY_STYLES.get(trial.strategy, "-")
        curves.plot(epochs, accuracies, style, marker="o", markersize=3, color=_colour(trial), alpha=0.85)
        if trial.status == "stopped early":
            curves.plot(epochs[-1], accuracies[-1], "x", color="crimson", markersize=9, markeredgewidth=2)
    handles = [
        Line2D([], [], color=plt.get_cmap("viridis")(d / 5), label=f"depth {_depth_label(d)}")
        for d in sorted({t.freeze_depth for t in summary.trials if t.strategy != SCRATCH})
    ]
    handles += [
        Line2D([], [], color="black" if s != SCRATCH else "0.45", linestyle=STRATEGY_STYLES.get(s, "-"), label=s)
        for s in sorted({t.strategy for t in summary.trials})
    ]
    if any(t.status == "stopped early" for t in summary.trials):
        handles.append(Line2D([], [], color="crimson", marker="x", linestyle="", label="stopped by ASHA"))
    if chance is not None:
        curves.axhline(chance, color="0.5", linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color="0.5", linestyle=":", label=f"chance ({chance:.2f})"))
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set(xlabel="epoch", ylabel=monitor, title=f"{monitor} per epoch, every trial")
    if unit_range:
        curves.set_ylim(0, 1.02)
    curves.legend(handles=handles, fontsize="small", loc="best")
    curves.grid(alpha=0.3)

    configs = best_per_config(summary)
    labels = [label.replace(", ", "\n") for label in configs]
    values = [_value(t, summary) for t in configs.values()]
    drawn = bars.bar(labels, values, color=[_colour(t) for t in configs.values()])
    texts = [
        f"{_value(t, summary):.3f}" + (f"\nstopped after {t.epochs}" if t.status == "stopped early" else "")
        for t in configs.values()
    ]
    bars.bar_label(drawn, labels=texts, fontsize="small", padding=2)
    if chance is not None:
        bars.axhline(chance, color="0.5", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
        bars.legend(fontsize="small", loc="lower right")
    n = summary.val_images
    bars.set_title(f"best {monitor} per configuration" + (f" ({n} validation images)" if n else ""))
    bars.set(ylabel=f"best {monitor}")
    if unit_range:
        bars.set_ylim(0, 1.08)
    bars.tick_params(axis="x", labelsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(summary, out_dir: str | Path) -> dict[str, Path]:
    """Write results.csv, report.md, report.png and report.html into ``out_dir`` (a local folder)."""
    from tl_ray.tuning import sweep_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "markdown": out / "report.md", "plot": out / "report.png"}
    paths["csv"].write_text(results_csv(summary))
    paths["markdown"].write_text(markdown(summary))
    plot(summary, paths["plot"])
    paths["html"] = out / "report.html"
    paths["html"].write_text(html_report.render(sweep_page.page(summary, paths["plot"].read_bytes())), "utf-8")
    return paths

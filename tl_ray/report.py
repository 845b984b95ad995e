"""The freeze-depth comparison: results.csv, report.md and report.png from a sweep summary."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

CSV_COLUMNS = (
    "trial_id",
    "freeze_depth",
    "lr",
    "val_acc",
    "val_loss",
    "epochs",
    "seconds",
    "images_per_s",
    "checkpoint",
    "status",
    "best_epoch",
)
DEPTH_NAMES = {0: "full fine-tuning", 5: "feature extraction"}


def _depth_label(depth: int) -> str:
    return f"{depth} ({DEPTH_NAMES[depth]})" if depth in DEPTH_NAMES else str(depth)


def ranked(summary) -> list:
    """Trials by val_acc, best first; trials without a result last."""
    return sorted(summary.trials, key=lambda t: (math.isnan(t.val_acc), -t.val_acc if not math.isnan(t.val_acc) else 0))


def results_csv(summary) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for trial in ranked(summary):
        writer.writerow({column: getattr(trial, column) for column in CSV_COLUMNS})
    return out.getvalue()


def table(summary) -> str:
    """The trial table, as markdown: also what `tl-ray tune` prints."""
    lines = [
        "| trial | freeze depth | lr | val_acc | val_loss | epochs | status | seconds | images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in ranked(summary):
        lines.append(
            f"| {t.trial_id} | {_depth_label(t.freeze_depth)} | {t.lr:.2e} | {t.val_acc:.3f} | {t.val_loss:.4f} "
            f"| {t.epochs}/{summary.max_epochs} | {t.status} | {t.seconds:.0f} | {t.images_per_s:.1f} |"
        )
    return "\n".join(lines)


def best_per_depth(summary) -> dict[int, object]:
    best: dict[int, object] = {}
    for trial in ranked(summary):
        if not math.isnan(trial.val_acc):
            best.setdefault(trial.freeze_depth, trial)
    return dict(sorted(best.items()))


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
    if best is not None:
        parts.append(
            f"- best: trial {best.trial_id}, freeze depth {_depth_label(best.freeze_depth)}, lr {best.lr:.2e}: "
            f"val_acc {best.val_acc:.3f} at epoch {best.best_epoch}"
        )
        parts.append(f"- best checkpoint: {summary.best_checkpoint or best.checkpoint}")
    parts += ["", "## All trials (best val_acc first)", "", table(summary), "", "## Best per freeze depth", ""]
    parts += ["| freeze depth | val_acc | lr | trial |", "|---|---|---|---|"]
    for depth, trial in best_per_depth(summary).items():
        parts.append(f"| {_depth_label(depth)} | {trial.val_acc:.3f} | {trial.lr:.2e} | {trial.trial_id} |")
    stopped = [t for t in summary.trials if t.status == "stopped early"]
    parts += ["", "## Stopped early by ASHA", ""]
    parts += [f"- {t.trial_id} (depth {t.freeze_depth}, lr {t.lr:.2e}) after epoch {t.epochs}" for t in stopped]
    if not stopped:
        parts.append("- none")
    problems = [t for t in summary.trials if t.status in ("error", "incomplete")]
    if problems:
        parts += ["", "## Errored or incomplete", ""]
        parts += [f"- {t.trial_id} (depth {t.freeze_depth}): {t.status} after {t.epochs} epochs" for t in problems]
    parts += ["", "![val_acc per epoch and best per freeze depth](report.png)", ""]
    return "\n".join(parts)


def plot(summary, path: Path) -> None:
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("viridis")
    for trial in summary.trials:
        if trial.history:
            colour = colours(trial.freeze_depth / 5)
            epochs = [h["epoch"] for h in trial.history]
            curves.plot(epochs, [h["val_acc"] for h in trial.history], marker="o", color=colour, alpha=0.8)
    for depth in sorted({t.freeze_depth for t in summary.trials}):
        curves.plot([], [], color=colours(depth / 5), label=f"depth {_depth_label(depth)}")
    curves.set(xlabel="epoch", ylabel="val_acc", title="val_acc per epoch, every trial")
    curves.legend(fontsize="small")
    curves.grid(alpha=0.3)
    best = best_per_depth(summary)
    bars.bar([str(d) for d in best], [t.val_acc for t in best.values()], color=[colours(d / 5) for d in best])
    bars.set(xlabel="freeze depth (0 = full fine-tuning, 5 = feature extraction)", ylabel="best val_acc")
    bars.set_title("best val_acc per freeze depth")
    bars.set_ylim(0, 1)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(summary, out_dir: str | Path) -> dict[str, Path]:
    """Write results.csv, report.md and report.png into ``out_dir`` (a local folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "markdown": out / "report.md", "plot": out / "report.png"}
    paths["csv"].write_text(results_csv(summary))
    paths["markdown"].write_text(markdown(summary))
    plot(summary, paths["plot"])
    return paths

"""A sweep's report.html: report.md's verdict, comparison and trial table, and report.png, on one page
(``html_report``), written beside them (``report.write_report``)."""

from __future__ import annotations

import math

from tl_ray import html_report
from tl_ray.tuning import report

FAILED = ("error", "incomplete")  # the statuses report.md lists as errored or incomplete


def _score(value: float) -> float | None:
    return None if math.isnan(value) else value


def _config_row(label: str, trial, top, monitor: str) -> list:
    behind = abs(getattr(top, monitor) - getattr(trial, monitor))
    return [label, getattr(trial, monitor), behind, f"{trial.lr:.2e}", trial.trial_id]


def _trial_row(t, max_epochs: int) -> list:
    scores = [_score(t.val_acc), _score(t.val_loss), _score(t.macro_f1)]
    ran = [f"{t.epochs}/{max_epochs}", t.status, round(t.seconds), round(t.images_per_s, 1)]
    return [t.trial_id, t.freeze_depth, t.strategy, f"{t.lr:.2e}", *scores, *ran]


def page(summary, plot_png: bytes) -> html_report.Page:
    """The sweep's page: the verdict against the validation set's resolution, the plot, the best per
    configuration, every trial (best first), those ASHA stopped and those that failed."""
    Section, Table = html_report.Section, html_report.Table
    monitor, best = summary.monitor, summary.best
    facts = [
        ("trials", len(summary.trials)),
        ("trial-epochs run", f"{sum(t.epochs for t in summary.trials)} of {len(summary.trials) * summary.max_epochs}"),
        ("wall time", f"{summary.wall_seconds:.0f} s"),
        ("validation images", summary.val_images or "unknown"),
        ("ranked by", monitor),
    ]
    if best is not None:
        facts += [
            ("best trial", f"{best.trial_id}: freeze depth {best.freeze_depth}, {best.strategy}, lr {best.lr:.2e}"),
            (f"best {monitor}", f"{getattr(best, monitor):.4f} (val_acc {best.val_acc:.4f}, epoch {best.best_epoch})"),
            ("best checkpoint", summary.best_checkpoint or best.checkpoint),
        ]
    verdict = Section(
        "Verdict",
        text=[line.removeprefix("- ") for line in report.verdict(summary)] or ["No trial has a result yet."],
        facts=facts,
        images=[html_report.Image(plot_png, alt=f"{monitor} per epoch and best per configuration")],
    )
    configs = report.best_per_config(summary)
    top = next(iter(configs.values()), None)
    comparison = Section(
        "Best per freeze depth and strategy",
        tables=[
            Table(
                ["configuration", monitor, "behind the best", "lr", "trial"],
                [_config_row(label, trial, top, monitor) for label, trial in configs.items()],
            )
        ],
    )
    header = ["trial", "freeze depth", "strategy", "lr", "val_acc", "val_loss", "macro_f1", "epochs", "status"]
    header += ["seconds", "images/s"]
    trials = Section(
        f"All trials (best {monitor} first)",
        tables=[
            Table(
                header,
                [_trial_row(trial, summary.max_epochs) for trial in report.ranked(summary)],
            )
        ],
    )
    stopped = [f"{t.trial_id} after epoch {t.epochs}" for t in summary.trials if t.status == "stopped early"]
    failed = [f"{t.trial_id}: {t.status} after {t.epochs} epochs" for t in summary.trials if t.status in FAILED]
    ends = Section(
        "Stopped early or failed",
        text=[f"Stopped early by ASHA: {', '.join(stopped) or 'none'}."]
        + ([f"Errored or incomplete: {'; '.join(failed)}."] if failed else []),
    )
    return html_report.Page(f"tl-ray tune: {summary.run_dir}", [verdict, comparison, trials, ends])

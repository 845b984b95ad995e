"""A finished run's report.html: its outcome, its epoch curves (loss and accuracy per epoch, from result.json's
history) and its settings (config.yaml's), written in the run folder beside result.json, local or in object
storage (``html_report.write``: one retried write)."""

from __future__ import annotations

import math
from typing import Any

import yaml

from tl_ray import figures, html_report, location, options
from tl_ray.training.results import TrainResult

CURVES = {"loss": ("train_loss", "val_loss"), "accuracy": ("train_acc", "val_acc", "macro_f1")}


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The epochs that report ``key`` with a number, and its values."""
    points = [(row["epoch"], row[key]) for row in history if isinstance(row.get(key), int | float)]
    points = [(epoch, float(value)) for epoch, value in points if not math.isnan(value)]
    return [epoch for epoch, _ in points], [value for _, value in points]


def curves_png(history: list[dict[str, Any]], best_epoch: int | None) -> bytes:
    """Loss and accuracy per epoch, training and validation side by side, the best epoch marked."""
    plt = figures.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (title, keys) in zip(axes, CURVES.items(), strict=True):
        for key in keys:
            epochs, values = _series(history, key)
            if epochs:
                axis.plot(epochs, values, marker="o", markersize=3, label=key)
        if best_epoch is not None:
            axis.axvline(best_epoch, color="0.5", linestyle=":", linewidth=1, label=f"best epoch ({best_epoch})")
        axis.set(xlabel="epoch", title=f"{title} per epoch")
        if title == "accuracy":
            axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", loc="best")
    figure.tight_layout()
    return figures.png(figure)


def _number(value: Any) -> Any:
    return value if isinstance(value, int | float | str) or value is None else str(value)


def page(outcome: TrainResult, config: Any) -> html_report.Page:
    """The run's page: what it reached and where, the curves, every epoch, the settings it ran with."""
    Section, Table = html_report.Section, html_report.Table
    metrics, monitor = outcome.metrics, outcome.monitor
    best_epoch = metrics.get("epoch")
    summary = Section(
        "Outcome",
        facts=[
            (f"best {monitor}", _number(metrics.get(monitor))),
            ("val_acc (that epoch)", _number(metrics.get("val_acc"))),
            ("best epoch", best_epoch),
            ("epochs run", len(outcome.history)),
            ("classes", ", ".join(outcome.class_names)),
            ("skipped files", len(outcome.skipped_files)),
            ("best checkpoint", outcome.best_checkpoint),
            ("run folder", outcome.run_dir),
            ("tensorboard", f"tensorboard --logdir {outcome.tensorboard}"),
        ],
    )
    columns = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "macro_f1"]
    columns += [key for key in ("peak_lr", "batch_size") if any(key in row for row in outcome.history)]
    epochs = Section(
        "Epochs",
        images=[html_report.Image(curves_png(outcome.history, best_epoch), alt="loss and accuracy per epoch")],
        tables=[Table(columns, [[_number(row.get(key)) for key in columns] for row in outcome.history], digits=4)],
    )
    sections = [summary, epochs]
    recall = metrics.get("val_recall") or {}
    if recall:
        rows = sorted(recall.items(), key=lambda item: math.inf if item[1] is None else item[1])
        table = Table(["class", "recall"], [[name, value] for name, value in rows])
        sections.append(Section("Validation recall per class (best epoch, lowest first)", tables=[table]))
    if outcome.skipped_files:
        sections.append(
            Section(
                "Skipped files",
                tables=[Table(["file", "reason"], [[item["path"], item["reason"]] for item in outcome.skipped_files])],
            )
        )
    settings = yaml.safe_load(options.to_yaml(config)) or {}
    sections.append(
        Section(
            "Settings (config.yaml)",
            tables=[Table(["option", "value"], [[key, _number(value)] for key, value in settings.items()])],
        )
    )
    return html_report.Page(f"tl-ray train: {config.name}", sections, subtitle=outcome.run_dir)


def write(outcome: TrainResult, config: Any, run_dir: location.Location) -> str:
    """report.html in the run folder; its URI."""
    return html_report.write(page(outcome, config), run_dir.join(html_report.FILE_NAME))

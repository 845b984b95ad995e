"""`tl-ray evaluate`: accuracy, per-class precision/recall/F1, a confusion matrix, the most-confused pairs, the
images with the highest loss and calibration of a checkpoint on labelled images (any source train reads),
classified by the same pipeline as predict (``classify``). The numbers: ``diagnostics``; the figures and
report.html: ``evaluate_report``."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tl_ray import checkpoint as checkpoints
from tl_ray import html_report, location, progress
from tl_ray.errors import TlRayError
from tl_ray.inference import diagnostics, evaluate_report
from tl_ray.inference.classify import ERROR_COLUMN, classify_items, output_location, undelivered
from tl_ray.inference.config import EvaluateConfig
from tl_ray.inputs import sources

TOP_LOSS_COLUMNS = ["path", "true", "predicted", "probability", "true_probability", "loss"]


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    predictions: pd.DataFrame  # predict's rows plus the true class
    misclassified: pd.DataFrame


def evaluate(config: EvaluateConfig, on_event: progress.OnEvent | None = None) -> Evaluation:
    """Accuracy, per-class precision/recall/F1 and a confusion matrix on labelled images: DIR/<class>/ folders, or
    any source train reads (its every item, scored with its label)."""
    config = config.validate()
    checkpoint, data_dir = config.checkpoint, config.data
    target = output_location(config.out)
    meta = checkpoints.read_meta(checkpoint)
    where = location.resolve(data_dir, "--data")
    options = config.source_options()
    listing = sources.list_split(where, options, config.split) if config.split else sources.list_source(where, options)
    unknown = sorted(set(listing.labels) - set(meta["class_names"]))
    if unknown:
        raise TlRayError(
            f"--data: classes {', '.join(unknown)} in {data_dir} are not among the checkpoint's classes "
            f"({', '.join(meta['class_names'])})"
        )
    if not listing.items:
        raise TlRayError(f"--data: {data_dir} holds no labelled images")
    shown = {listing.opener.display(item): item for item in listing.items}
    truth = {listing.opener.display(item): label for item, label in zip(listing.items, listing.labels, strict=True)}
    classes = meta["class_names"]
    rows = classify_items(
        checkpoint,
        meta,
        listing.opener,
        listing.items,
        listing.rejected,
        min(diagnostics.SCORED_CLASSES, len(classes)),  # every loss exact up to that many classes
        config.batch_size,
        config.retry_seconds,
        on_event=on_event,
        tta=config.tta,
    )
    rows["true"] = rows["path"].map(truth).fillna("")
    scores = score(rows, classes, config.top_losses, str(checkpoint))
    scores.metrics["tta"] = config.tta  # the probabilities scored: the image's, or averaged with its mirror's
    if target is not None:
        items = [shown[path] for path in scores.worst["path"]]
        thumbnails = evaluate_report.read_thumbnails(listing.opener, items, config.retry_seconds)
        _write_evaluation(target, scores, thumbnails, str(data_dir))
    return Evaluation(scores.metrics, rows, scores.misclassified.reset_index(drop=True))


@dataclass(frozen=True)
class Scores:
    """An evaluation's numbers (metrics.json) and the tables its files are drawn from."""

    metrics: dict[str, Any]
    misclassified: pd.DataFrame  # TOP_LOSS_COLUMNS of the scored rows predicted wrong, by path
    confusion: pd.DataFrame  # rows true, columns predicted, in the checkpoint's class order
    calibration: diagnostics.Calibration
    worst: pd.DataFrame  # the rows with the highest loss, worst first


def score(rows: pd.DataFrame, classes: list[str], worst_shown: int, checkpoint: str) -> Scores:
    """Score classify's rows (with their ``true`` class): a row with an error is not scored, and is listed as
    undecodable or, when its storage did not deliver it, unreadable."""
    failed = rows[ERROR_COLUMN] != ""
    unreadable = undelivered(rows)
    scored = rows[~failed].copy()
    scored_losses = diagnostics.losses(scored)
    scored["true_probability"], scored["loss"] = scored_losses.true_probability, scored_losses.loss
    correct = (scored["true"] == scored["predicted"]).to_numpy()
    confusion = pd.crosstab(scored["true"], scored["predicted"]).reindex(index=classes, columns=classes, fill_value=0)
    per_class = diagnostics.per_class(confusion)
    present = [name for name in classes if per_class[name]["support"] > 0]
    calibration = diagnostics.calibration(scored["probability"].to_numpy(dtype=float), correct)
    worst = diagnostics.top_losses(scored, worst_shown)[TOP_LOSS_COLUMNS]
    metrics = {
        "accuracy": float(correct.mean()) if len(scored) else 0.0,
        "images": len(scored),
        "undecodable": rows.loc[failed & ~unreadable, ["path", ERROR_COLUMN]].to_dict("records"),
        # delivered by no read within --retry-seconds (at most reading.MAX_UNREADABLE_SHARE: classify_items)
        "unreadable": rows.loc[unreadable, ["path", ERROR_COLUMN]].to_dict("records"),
        "per_class": per_class,
        "macro": {
            key: float(np.mean([per_class[name][key] for name in present])) if present else 0.0
            for key in ("precision", "recall", "f1")
        },
        "confusion": {"classes": classes, "matrix": confusion.to_numpy().tolist()},
        "most_confused": diagnostics.most_confused(confusion),
        "calibration": calibration.to_json(),
        "log_loss": float(scored["loss"].mean()) if len(scored) else 0.0,
        "loss_exact": bool(scored_losses.exact.all()),  # False: true classes beyond the SCORED_CLASSES listed
        "top_losses": worst.to_dict("records"),
        "checkpoint": checkpoint,
    }
    misclassified = scored.loc[~correct, TOP_LOSS_COLUMNS]
    return Scores(metrics, misclassified, confusion, calibration, worst)


def _write_evaluation(
    target: location.Location, scores: Scores, thumbnails: list[evaluate_report.Thumbnail], data: str
) -> None:
    """metrics.json, misclassified.csv, the figures and report.html into ``target``: written there, or (object
    storage) into a scratch folder and uploaded."""
    if target.is_local:
        write_evaluation_files(Path(target.path), scores, thumbnails, data)
        return
    with tempfile.TemporaryDirectory() as scratch:
        write_evaluation_files(Path(scratch), scores, thumbnails, data)
        try:
            location.upload(scratch, target)
        except OSError as error:
            raise TlRayError(f"--out: cannot write {target.uri}: {location.describe(error)}") from error


def write_evaluation_files(
    out: Path, scores: Scores, thumbnails: list[evaluate_report.Thumbnail], data: str
) -> dict[str, bytes]:
    """metrics.json, misclassified.csv, the figures and report.html into the local folder ``out``; the figures."""
    metrics = scores.metrics
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    scores.misclassified.to_csv(out / "misclassified.csv", index=False)
    pngs = {
        "confusion.png": evaluate_report.confusion_png(scores.confusion, metrics["accuracy"]),
        "per_class.png": evaluate_report.per_class_png(metrics["per_class"]),
        "reliability.png": evaluate_report.reliability_png(scores.calibration),
        "top_losses.png": evaluate_report.top_losses_png(scores.worst, thumbnails),
    }
    for name, png in pngs.items():
        (out / name).write_bytes(png)
    page = evaluate_report.page(metrics, pngs, scores.worst, thumbnails, data)
    (out / html_report.FILE_NAME).write_text(html_report.render(page), encoding="utf-8")
    return pngs

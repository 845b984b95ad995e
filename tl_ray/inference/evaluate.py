"""`tl-ray evaluate`: accuracy, per-class precision/recall/F1 and a confusion matrix of a checkpoint on labelled
images (any source train reads), classified by the same pipeline as predict (``classify``)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tl_ray import checkpoint as checkpoints
from tl_ray import figures, location, progress
from tl_ray.errors import TlRayError
from tl_ray.inference.classify import ERROR_COLUMN, classify_items, output_location, undelivered
from tl_ray.inference.config import EvaluateConfig
from tl_ray.inputs import sources


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
    truth = {listing.opener.display(item): label for item, label in zip(listing.items, listing.labels, strict=True)}
    rows = classify_items(
        checkpoint,
        meta,
        listing.opener,
        listing.items,
        listing.rejected,
        3,
        config.batch_size,
        config.retry_seconds,
        on_event=on_event,
        tta=config.tta,
    )
    rows["true"] = rows["path"].map(truth).fillna("")
    failed = rows[ERROR_COLUMN] != ""
    unreadable = undelivered(rows)
    scored = rows[~failed]
    classes = meta["class_names"]
    confusion = pd.crosstab(scored["true"], scored["predicted"]).reindex(index=classes, columns=classes, fill_value=0)
    per_class = {}
    for name in classes:
        tp = int(confusion.loc[name, name])
        predicted, actual = int(confusion[name].sum()), int(confusion.loc[name].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    present = [name for name in classes if per_class[name]["support"] > 0]
    metrics = {
        "accuracy": float((scored["true"] == scored["predicted"]).mean()) if len(scored) else 0.0,
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
        "checkpoint": str(checkpoint),
        "tta": config.tta,
    }
    misclassified = scored.loc[scored["true"] != scored["predicted"], ["path", "true", "predicted", "probability"]]
    if target is not None:
        _write_evaluation(target, metrics, misclassified, confusion)
    return Evaluation(metrics, rows, misclassified.reset_index(drop=True))


def _write_evaluation(
    target: location.Location, metrics: dict, misclassified: pd.DataFrame, confusion: pd.DataFrame
) -> None:
    """metrics.json, misclassified.csv and confusion.png into ``target``: written there, or (object storage) into
    a scratch folder and uploaded."""
    if target.is_local:
        _write_evaluation_files(Path(target.path), metrics, misclassified, confusion)
        return
    with tempfile.TemporaryDirectory() as scratch:
        _write_evaluation_files(Path(scratch), metrics, misclassified, confusion)
        try:
            location.upload(scratch, target)
        except OSError as error:
            raise TlRayError(f"--out: cannot write {target.uri}: {location.describe(error)}") from error


def _write_evaluation_files(out: Path, metrics: dict, misclassified: pd.DataFrame, confusion: pd.DataFrame) -> None:
    plt = figures.pyplot()

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    misclassified.to_csv(out / "misclassified.csv", index=False)
    size = max(4.0, 0.6 * len(confusion) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(confusion.to_numpy(), cmap="Blues")
    axes.set_xticks(range(len(confusion)), confusion.columns, rotation=45, ha="right")
    axes.set_yticks(range(len(confusion)), confusion.index)
    axes.set(xlabel="predicted", ylabel="true", title=f"accuracy {metrics['accuracy']:.3f}")
    peak = confusion.to_numpy().max(initial=0)
    for (i, j), count in np.ndenumerate(confusion.to_numpy()):
        axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.tight_layout()
    figure.savefig(out / "confusion.png", dpi=100)
    plt.close(figure)

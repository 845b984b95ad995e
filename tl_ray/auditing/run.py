"""`tl-ray audit`, in order: check --out, list --data as train would, compute every item's features once, then
the label suspects, the duplicates and leaks, the outliers, and write them (``writing``; ``page``: report.html) into
one record (``result.AuditResult``)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from tl_ray import checkpoint as checkpoints
from tl_ray import location, progress
from tl_ray.auditing import duplicates, features, labels, outliers, page, writing
from tl_ray.auditing.config import AuditConfig
from tl_ray.auditing.result import AuditResult, Finding
from tl_ray.errors import TlRayError


def device() -> torch.device:
    """Where the heads train and the similarity blocks multiply: this process's GPU when it has one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def audit(config: AuditConfig, on_event: progress.OnEvent | None = None) -> AuditResult:
    """Label suspects (with labels), duplicates and leaks, and outliers of --data, found with --checkpoint's
    pooled features; written into --out (new or empty) and returned as one record."""
    config = config.validate()
    target = writing.check_out(config.out)
    meta = checkpoints.read_meta(config.checkpoint)
    options = config.source_options()
    planned = features.plan(config.data, config.val_data, config.val_fraction, options, meta["class_names"])
    if config.fix_list:
        writing.check_fix_list(planned, planned.source)
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 3)
        clock = now

    items = features.compute(
        config.checkpoint, meta, planned, config.batch_size, config.retry_seconds, on_event=on_event
    )
    if not len(items.paths):
        raise TlRayError(f"--data: no image of {config.data} could be decoded; nothing to audit")
    lap("features")
    where = device()
    suspect_rows = None
    if items.labelled:
        mask = items.labels >= 0
        probabilities = labels.out_of_sample_probabilities(
            items.features[mask], items.labels[mask], len(items.class_names), config.folds, config.seed, where
        )
        suspect_rows = labels.suspects(items.paths[mask], items.labels[mask], probabilities, items.class_names)
    lap("labels")
    pairs = duplicates.find(
        items.paths,
        items.splits,
        items.features,
        items.digests,
        items.thumbnails,
        config.duplicate_threshold,
        config.duplicate_pixel_threshold,
        where,
    )
    lap("duplicates")
    far = outliers.find(
        items.paths,
        items.splits,
        items.labels,
        items.predicted,
        items.features,
        items.class_names,
        config.outlier_z,
        where,
    )
    lap("outliers")
    tables = {writing.DUPLICATES: pairs, writing.OUTLIERS: far}
    if suspect_rows is not None:
        tables = {writing.SUSPECTS: suspect_rows, **tables}
    if config.fix_list:
        tables[writing.FIX_LIST] = writing.fix_list(items, writing.removed(suspect_rows, pairs, far))
    written = writing.write(target, tables, items, config.retry_seconds)
    lap("writing")

    drawn: dict[str, str] = {}  # each finding's gallery file, by finding name: report.html embeds them

    def finding(name: str, table: str, rows) -> Finding:
        gallery = table.replace(".csv", ".png")
        if gallery in written:
            drawn[name] = gallery
        return Finding(name, rows, written.get(table), written.get(gallery))

    splits, counts = np.unique(items.splits, return_counts=True)
    result = AuditResult(
        out=target.uri,
        checkpoint=str(config.checkpoint),
        data=str(config.data),
        images={str(split) or "data": int(count) for split, count in zip(splits, counts, strict=True)},
        labelled=items.labelled,
        suspects=None if suspect_rows is None else finding("label suspects", writing.SUSPECTS, suspect_rows),
        duplicates=finding("duplicates", writing.DUPLICATES, pairs),
        outliers=finding("outliers", writing.OUTLIERS, far),
        duplicate_threshold=config.duplicate_threshold,
        fix_list=written.get(writing.FIX_LIST),
        skipped=items.skipped,
        notes=items.notes,
        seconds=seconds,
    )
    try:
        report = page.write(result, target, drawn)
    except OSError as error:
        raise TlRayError(f"--out: cannot write {target.uri}: {location.describe(error)}") from error
    return dataclasses.replace(result, report=report)

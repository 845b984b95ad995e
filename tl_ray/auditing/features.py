"""What the audit looks at: every item of --data's splits (train, val, test), listed as train lists them, and
each one's pooled backbone features and content digest, computed once by predict's pipeline (``classify``: Ray
Data decode tasks, a pool of model actors, one GPU each when the cluster has GPUs)."""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from tl_ray import location, progress
from tl_ray.errors import TlRayError
from tl_ray.inference.classify import ERROR_COLUMN, classify_items
from tl_ray.inputs import sources
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.imaging import THUMBNAIL_BYTES
from tl_ray.inputs.sources import class_folders, listing

NO_LABEL = -1


@dataclass(frozen=True)
class Group:
    """Items one opener reads, with each one's split ("" where the source names none) and class index."""

    opener: Any
    items: list[str]
    splits: list[str]
    labels: list[int]


@dataclass(frozen=True)
class Plan:
    """What the audit reads: the items, grouped by opener, and what the listing decided."""

    groups: list[Group]
    class_names: list[str]
    labelled: bool
    rejected: list[tuple[str, str]]
    notes: list[str]
    source: str  # what --data was recognised as (``sources``' names)


@dataclass(frozen=True)
class Items:
    """The decoded items, row for row: display path, split, class index (``NO_LABEL``), pooled features (float32,
    one row each), the SHA-256 of its bytes, its thumbnail (``imaging.thumbnail``: uint8, one row each), the
    checkpoint's predicted class; ``where`` reads an item again (galleries)."""

    paths: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    digests: np.ndarray
    thumbnails: np.ndarray
    predicted: np.ndarray
    class_names: list[str]
    labelled: bool
    where: dict[str, tuple[Any, str]]
    skipped: list[tuple[str, str]]
    notes: list[str]


def _unlabelled(where: location.Location, source: Any, options: SourceOptions) -> bool:
    """--data carries no labels: a folder of images with neither train/ nor class folders, or a table or source
    whose items all lack a label."""
    if source is class_folders:
        return not listing.has_folder(where, "train") and not listing.find_classes(where.filesystem, where.path)
    if source is sources.parquet or source is sources.manifest:
        unlabelled = source.list_items(where, options, False)
        return not any(unlabelled.labels)
    return False


def plan(
    data: str, val_data: str | None, val_fraction: float, options: SourceOptions, checkpoint_classes: list[str]
) -> Plan:
    """The items to audit, as train would list them (its splits, --val-data, the held-out share), refused in one
    line for classes other than the checkpoint's or a class of one image; a dataset without labels is listed
    without them (duplicates and outliers only)."""
    where = location.resolve(data, "--data")
    source = sources.recognise(where, options)
    if _unlabelled(where, source, options):
        found = sources.list_source(where, options, labelled=False)
        group = Group(found.opener, found.items, [split or "" for split in found.splits], [NO_LABEL] * len(found.items))
        note = f"--data: {where.uri} has no labels: duplicates and outliers only, no label suspects"
        return Plan([group], list(checkpoint_classes), False, found.rejected, [*found.notes, note], found.source)
    layout = sources.discover(where, val_fraction, options, val_data)
    if set(layout.class_names) != set(checkpoint_classes):
        raise TlRayError(
            f"--checkpoint: its classes ({', '.join(checkpoint_classes[:10])}) differ from --data's"
            f" ({', '.join(layout.class_names[:10])}): audit with a checkpoint trained on these classes"
        )
    counts = collections.Counter(label for _, label in layout.train + layout.val)
    single = [layout.class_names[label] for label, count in sorted(counts.items()) if count < 2]
    if single:
        raise TlRayError(
            f"--data: class(es) {', '.join(single[:10])} of {where.uri} have one image: an out-of-sample label check"
            " needs two or more a class; add images or leave the class out"
        )
    # The checkpoint's class order: its features are the same whatever the order, its predictions are in its own.
    order = {name: index for index, name in enumerate(checkpoint_classes)}
    remap = [order[name] for name in layout.class_names]

    def group(opener: Any, files: list[tuple[str, int]], split: str) -> Group:
        labels = [remap[label] if label >= 0 else NO_LABEL for _, label in files]
        return Group(opener, [path for path, _ in files], [split] * len(files), labels)

    groups = [group(layout.opener, layout.train, "train"), group(layout.val_opener, layout.val, "val")]
    groups.append(group(layout.opener, layout.test, "test"))
    chosen = [g for g in groups if g.items]
    return Plan(chosen, list(checkpoint_classes), True, layout.rejected, list(layout.notes), layout.source)


def compute(
    checkpoint: str,
    meta: dict[str, Any],
    planned: Plan,
    batch_size: int,
    retry_seconds: float,
    on_event: progress.OnEvent | None = None,
) -> Items:
    """Every planned item's features, digest and predicted class, in one pass of the classify pipeline per opener;
    an item that cannot be decoded is skipped and reported."""
    merged: list[Group] = []
    for group in planned.groups:  # one pipeline per opener: train, val and test share one unless --val-data
        same = next((m for m in merged if m.opener is group.opener), None)
        if same is None:
            merged.append(
                dataclasses.replace(
                    group, items=list(group.items), splits=list(group.splits), labels=list(group.labels)
                )
            )
        else:
            same.items.extend(group.items)
            same.splits.extend(group.splits)
            same.labels.extend(group.labels)
    names = ("paths", "splits", "labels", "features", "digests", "thumbnails", "predicted")
    columns: dict[str, list] = {name: [] for name in names}
    where: dict[str, tuple[Any, str]] = {}
    skipped = list(planned.rejected)
    index = {name: position for position, name in enumerate(meta["class_names"])}
    for group in merged:
        rows = classify_items(
            checkpoint, meta, group.opener, group.items, [], 1, batch_size, retry_seconds, None, on_event, features=True
        )
        by_path = {path: row for row, path in enumerate(rows["path"])}
        for item, split, label in zip(group.items, group.splits, group.labels, strict=True):
            shown = group.opener.display(item)
            row = by_path.get(shown)
            if row is None or shown in where:  # an item listed twice is audited once
                continue
            error = rows[ERROR_COLUMN].iat[row]
            if error:
                skipped.append((shown, error))
                continue
            where[shown] = (group.opener, item)
            columns["paths"].append(shown)
            columns["splits"].append(split)
            columns["labels"].append(label)
            columns["features"].append(np.asarray(rows["features"].iat[row], dtype=np.float32))
            columns["digests"].append(rows["digest"].iat[row])
            columns["thumbnails"].append(np.asarray(rows["thumbnail"].iat[row], dtype=np.uint8))
            columns["predicted"].append(index[rows["predicted"].iat[row]])
    width = int(meta.get("feature_dim", 0)) or (len(columns["features"][0]) if columns["features"] else 0)
    return Items(
        paths=np.asarray(columns["paths"], dtype=object),
        splits=np.asarray(columns["splits"], dtype=object),
        labels=np.asarray(columns["labels"], dtype=np.int64),
        features=np.stack(columns["features"]) if columns["features"] else np.zeros((0, width), np.float32),
        digests=np.asarray(columns["digests"], dtype=object),
        thumbnails=np.stack(columns["thumbnails"])
        if columns["thumbnails"]
        else np.zeros((0, THUMBNAIL_BYTES), np.uint8),
        predicted=np.asarray(columns["predicted"], dtype=np.int64),
        class_names=list(meta["class_names"]),
        labelled=planned.labelled,
        where=where,
        skipped=skipped,
        notes=list(planned.notes),
    )

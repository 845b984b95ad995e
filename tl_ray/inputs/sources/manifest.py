"""The manifest source: a table of path, label[, split] rows (CSV, TSV, JSON lines, or Parquet without an image
column), for a dataset whose labels live beside its images rather than in their folders or names. Paths are
relative to the manifest's folder, absolute, or URIs of anywhere; a row whose file is missing is left out and
reported."""

from __future__ import annotations

import collections
import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tl_ray import location
from tl_ray.errors import TlRayError
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.layout import FileOpener, is_local
from tl_ray.inputs.sources.columns import label_texts, missing_column, split_values
from tl_ray.inputs.sources.listing import PARQUET_SUFFIX, Listing, or_unknown, uri_prefix

NAME = "manifest"


def _read_table(where: location.Location) -> pa.Table:
    """A manifest file as a table: CSV, TSV, JSON lines or Parquet, by its suffix."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    name = where.base.lower()
    try:
        if name.endswith(PARQUET_SUFFIX):
            return pq.read_table(where.path, filesystem=where.filesystem)
        with where.filesystem.open_input_stream(where.path) as stream:
            if name.endswith((".jsonl", ".ndjson")):
                return pajson.read_json(stream)
            delimiter = "\t" if name.endswith(".tsv") else ","
            return pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except (OSError, pa.ArrowException) as error:
        raise TlRayError(f"--data: cannot read the manifest {where.uri}: {location.describe(error)}") from error


def list_items(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """A table of path, label[, split] rows (CSV, TSV, JSON lines, Parquet): paths relative to the manifest's folder,
    absolute, or URIs. A row whose file is missing is left out and reported; the caches are keyed by each file's
    size and modification time, found by listing the folders the files are in (one LIST page per 1,000)."""
    table = _read_table(where)
    shown = where.uri
    names = table.column_names
    if options.path_column not in names:
        raise missing_column("manifest", shown, options.path_column, "--path-column", names)
    if labelled and options.label_column not in names:
        raise missing_column("manifest", shown, options.label_column, "--label-column", names)
    raw_paths = table.column(options.path_column).to_pylist()
    if options.label_column in names:
        texts, order = label_texts(table.column(options.label_column), options.label_column, shown, None)
    else:
        texts, order = [""] * len(raw_paths), None
    splits = (
        split_values(table.column(options.split_column), options.split_column, shown)
        if (options.split_column in names)
        else [""] * len(raw_paths)
    )
    folder = where.parent()
    prefix = uri_prefix(where)
    items, labels, item_splits, keys, rejected = [], [], [], [], []
    for row, (raw, label, split) in enumerate(zip(raw_paths, texts, splits, strict=True)):
        if raw is None or not str(raw).strip():
            rejected.append((f"{shown} row {row + 1}", "no path"))
            continue
        raw = str(raw).strip()
        item = _resolve_item(raw, folder)
        if labelled and label is None:
            rejected.append((_shown(item, prefix), f"no label ({shown} row {row + 1})"))
            continue
        items.append(item)
        labels.append(label or "")
        item_splits.append(split)
        keys.append(raw)
    stats, missing = _stat_items(where.filesystem, items)
    if items and missing.all():  # not a few bad rows: the paths are wrong, which is the one thing to say
        raise TlRayError(
            f"{option}: none of the {len(items)} files {shown} names exists (the first: {_shown(items[0], prefix)});"
            " its paths are relative to the manifest's folder, absolute, or URIs"
        )
    keep = ~missing
    rejected += [
        (_shown(item, prefix), f"file not found (named in {shown})")
        for item, gone in zip(items, missing, strict=True)
        if gone
    ]
    chosen = np.flatnonzero(keep).tolist()
    return Listing(
        NAME,
        where,
        FileOpener(where.filesystem, prefix),
        [items[i] for i in chosen],
        [labels[i] for i in chosen],
        [item_splits[i] for i in chosen],
        stats[keep],
        [keys[i] for i in chosen],
        class_names=order,
        rejected=rejected,
        split_rule=(
            f"the {options.split_column!r} column" if options.split_column in names else "a held-out share by hash"
        ),
    )


def _shown(item: str, prefix: str) -> str:
    return item if location.is_uri(item) else prefix + item


def _resolve_item(raw: str, folder: location.Location) -> str:
    """A manifest's path as an item: a URI as written; a relative path under the manifest's folder. A path written
    on Windows (``images\\red\\000.jpg``) is read with ``/`` for its backslashes."""
    if location.is_uri(raw):
        return raw
    raw = raw.replace("\\", "/")
    if folder.is_local:
        return os.path.normpath(os.path.join(folder.path, os.path.expanduser(raw)))
    return raw.lstrip("/") if raw.startswith("/") else f"{folder.path}/{raw}"


def _stat_items(filesystem: pafs.FileSystem, items: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime in ns) of each item, and which are missing: local files by ``stat``; elsewhere by listing each
    folder the files are in once (a LIST page holds 1,000 stats), never a request per file."""
    stats = np.full((len(items), 2), -1, dtype=np.int64)
    missing = np.zeros(len(items), dtype=bool)
    by_folder: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for index, item in enumerate(items):
        if not location.is_uri(item) and is_local(filesystem):
            try:
                status = os.stat(item)
                stats[index] = status.st_size, status.st_mtime_ns
                missing[index] = not stat.S_ISREG(status.st_mode)
            except OSError:
                missing[index] = True
            continue
        folder, _, _ = item.rpartition("/")
        by_folder[("uri" if location.is_uri(item) else "", folder)].append(index)
    for (kind, folder), indices in by_folder.items():
        try:
            if kind:
                where = location.resolve(folder, "--data")
                listing_fs, path = where.filesystem, where.path
            else:
                listing_fs, path = filesystem, folder
            found = {
                entry.base_name: entry
                for entry in listing_fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            }
        except (OSError, ValueError):
            found = {}
        for index in indices:
            entry = found.get(items[index].rpartition("/")[2])
            if entry is None or entry.type != pafs.FileType.File:
                missing[index] = True
            else:
                stats[index] = or_unknown(entry.size), or_unknown(entry.mtime_ns)
    return stats, missing

"""Where a dataset's images come from: the sources tl-ray reads, and the one interface they share.

A **source** lists *items*, each with its class name and, where the source says, its split, and opens an item's
bytes. Everything downstream (decoding, skips, the decoded-image and feature caches, held images, streaming,
predict, evaluate) sees only that interface, so adding a source is adding a listing here:

- an **item** is a string: a file's path (or URI), or ``FILE#ROW`` for an image stored in a Parquet file's row;
  what predict writes, what skip reports name (through ``Opener.display``);
- an **opener** (``Opener``) reads an item's bytes in any process (it is pickled into Ray tasks);
- a **listing** (``Listing``) is what a source found: items, class names, splits, and each item's (size, mtime)
  as the listing returned them (for a Parquet row: its file's), which key the caches, so a changed file or row
  rebuilds them and a run over a built cache asks the data location nothing per item.

``discover`` recognises the source from ``--data`` alone where that is unambiguous (``recognise``) and turns its
listing into a ``Layout`` (classes, the train and val splits). Class folders keep ``class_folders.discover``
unchanged: ImageFolder's classes and order, the same files, the same held-out split.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tl_ray import location
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs import class_folders
from tl_ray.inputs.config import LABEL_PATTERN_HINT as PATTERN_HINT
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.layout import FileOpener, Layout, is_local, no_stats, read_bytes

CLASS_FOLDERS, FILE_NAMES, MANIFEST, PARQUET = "class folders", "file names", "manifest", "parquet images"
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
PARQUET_SUFFIX = ".parquet"
# Hugging Face's split file names (train-00000-of-00004.parquet) or split folders (data/validation/x.parquet).
_HF_SPLIT = re.compile(r"^(train|training|validation|valid|val|dev|test|testing)(?=[-_.]|$)", re.IGNORECASE)
_HF_SPLITS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val"}
_SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
IMAGE_COLUMNS = ("image", "img", "picture", "photo")


class Opener(Protocol):
    """How a source's items are read: in the driver, in Ray Data's tasks and in predict's pipeline alike."""

    def read(self, item: str) -> bytes:
        """The item's encoded image; raises (any exception) when it cannot be read."""

    def display(self, item: str) -> str:
        """The item as the user sees it: a path or URI, or ``FILE#ROW``."""


class ParquetOpener:
    """Items ``FILE#ROW``: row ROW (counted from 0 in the file) of FILE's image column, binary or Hugging Face's
    ``{bytes, path}`` struct (a row without bytes names a file beside the Parquet file).

    A row is read with its row group (Hugging Face writes 100 images a group); the last few groups read are kept,
    so a task's block of rows from one group reads it once.
    """

    KEEP_GROUPS = 4
    sequential = True  # read in listing order where the order is ours to choose (cache.prepare's build)

    def __init__(self, filesystem: pafs.FileSystem, uri_prefix: str, column: str) -> None:
        self.filesystem = filesystem
        self.uri_prefix = uri_prefix
        self.column = column
        self._starts: dict[str, np.ndarray] = {}
        self._groups: collections.OrderedDict[tuple[str, int], pa.Array] = collections.OrderedDict()

    def __getstate__(self) -> dict:
        return {"filesystem": self.filesystem, "uri_prefix": self.uri_prefix, "column": self.column}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["filesystem"], state["uri_prefix"], state["column"])

    def _file(self, path: str) -> pq.ParquetFile:
        return pq.ParquetFile(path if is_local(self.filesystem) else self.filesystem.open_input_file(path))

    def read(self, item: str) -> bytes:
        path, row = split_row(item)
        if path not in self._starts:
            metadata = self._file(path).metadata
            sizes = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
            self._starts[path] = np.cumsum([0, *sizes])
        starts = self._starts[path]
        group = int(np.searchsorted(starts, row, side="right")) - 1
        if not 0 <= row < starts[-1]:
            raise IndexError(f"row {row} is not in the file ({starts[-1]} rows)")
        key = (path, group)
        if key not in self._groups:
            self._groups[key] = self._file(path).read_row_group(group, columns=[self.column]).column(0).combine_chunks()
            while len(self._groups) > self.KEEP_GROUPS:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        value = self._groups[key][row - int(starts[group])].as_py()
        if isinstance(value, dict):  # Hugging Face's Image: {"bytes": ..., "path": ...}
            if value.get("bytes") is None and value.get("path"):
                return read_bytes(self.filesystem, f"{path.rsplit('/', 1)[0]}/{value['path']}")
            value = value.get("bytes")
        if value is None:
            raise ValueError(f"no image in column {self.column!r}")
        return value

    def display(self, item: str) -> str:
        return self.uri_prefix + item


def row_item(path: str, row: int) -> str:
    return f"{path}#{row}"


def split_row(item: str) -> tuple[str, int]:
    path, _, row = item.rpartition("#")
    return path, int(row)


@dataclass
class Listing:
    """The items one source found, before any split: what every command starts from.

    ``labels`` holds each item's class name ("" where the source has none: predict needs none); ``splits`` its
    split where the source says ("train", "val"; "" where it does not); ``keys`` what the held-out split hashes
    (a path relative to the dataset, or ``FILE#ROW``). ``class_names`` is the source's own class order (Hugging
    Face's ``ClassLabel``), None for sorted names.
    """

    source: str
    where: location.Location
    opener: Opener
    items: list[str]
    labels: list[str]
    splits: list[str]
    stats: np.ndarray  # int64 (len(items), 2): (size, mtime in ns), -1 where unknown
    keys: list[str]
    class_names: list[str] | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (item as shown, reason): left out unread
    notes: list[str] = field(default_factory=list)  # what the listing decided that a user may want to know
    split_rule: str = ""


# ---------------------------------------------------------------- recognising --data


def _glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def is_glob(where: location.Location) -> bool:
    """A pattern of Parquet files (``data/train-*.parquet``): glob characters, and no file or folder of that name."""
    return _glob(where.path) and where.info("--data").type == pafs.FileType.NotFound


def recognise(where: location.Location, options: SourceOptions, option: str = "--data") -> str:
    """Which source ``where`` is, from its shape alone (and --label-pattern): one of the source names above."""
    if is_glob(where):
        return PARQUET
    info = where.info(option)
    if info.type == pafs.FileType.NotFound:
        raise TlRayError(f"{option}: {where.uri} does not exist")
    name = where.base.lower()
    if info.type == pafs.FileType.File:
        if name.endswith(MANIFEST_SUFFIXES):
            return MANIFEST
        if name.endswith(PARQUET_SUFFIX):
            return PARQUET if _image_column(_schema(where.filesystem, where.path), options) else MANIFEST
        raise TlRayError(
            f"{option}: {where.uri} is a file; expected a folder holding train/<class>/ image folders, a manifest"
            f" ({', '.join(MANIFEST_SUFFIXES)}, .parquet with path and label columns) or Parquet files of images"
        )
    if options.label_pattern:
        return FILE_NAMES
    return CLASS_FOLDERS if _has_folder(where, "train") or not _parquet_files(where) else PARQUET


def _has_folder(where: location.Location, name: str) -> bool:
    return class_folders._info(where.filesystem, f"{where.path}/{name}").type == pafs.FileType.Directory


def _parquet_files(where: location.Location) -> list[str]:
    """The Parquet files of a folder (recursively) or a glob, sorted."""
    if is_glob(where):
        first = min(index for index, char in enumerate(where.path) if char in "*?[")
        folder = where.path[: max(where.path.rfind("/", 0, first), 0)]
        entries = class_folders._list(where.filesystem, folder or "/", True)
        return sorted(
            entry.path
            for entry in entries
            if entry.type == pafs.FileType.File and fnmatch.fnmatchcase(entry.path, where.path)
        )
    if where.info("--data").type == pafs.FileType.File:
        return [where.path]
    entries = class_folders._list(where.filesystem, where.path, True)
    return sorted(
        entry.path
        for entry in entries
        if entry.type == pafs.FileType.File
        and entry.base_name.lower().endswith(PARQUET_SUFFIX)
        and not entry.base_name.startswith((".", "_"))
    )


def check_shape(where: location.Location, option: str = "--data") -> None:
    """The common wrong shapes of a class-folders --data, each refused in one line that says what to pass."""
    if _has_folder(where, "train"):
        train = f"{where.path}/train"
        if not class_folders.find_classes(where.filesystem, train):
            _refuse_flat(where.filesystem, train, where.join("train").uri, option)
        return
    entries = class_folders._list(where.filesystem, where.path, False)
    manifests = sorted(
        entry.base_name
        for entry in entries
        if entry.type == pafs.FileType.File and entry.base_name.lower().endswith(MANIFEST_SUFFIXES)
    )
    if manifests:
        raise TlRayError(
            f"{option}: {where.uri} has no train/ folder but holds the manifest {manifests[0]}: pass it itself:"
            f" {option} {where.join(manifests[0]).uri}"
        )
    classes = class_folders.find_classes(where.filesystem, where.path)
    if classes and where.name.lower() in ("train", "training"):
        raise TlRayError(
            f"{option}: {where.uri} is a train/ folder itself (its {len(classes)} sub-folders are the classes);"
            f" pass the folder above it: {option} {where.parent().uri}"
        )
    if not classes:
        _refuse_flat(where.filesystem, where.path, where.uri, option)


def _refuse_flat(filesystem: pafs.FileSystem, folder: str, shown: str, option: str) -> None:
    images = class_folders.list_images(filesystem, folder)
    if images:
        raise UsageError(
            f"{option}: found {len(images):,} images directly in {shown} and no class folders: are the labels in"
            f" the file names? try --label-pattern '{suggest_label_pattern(images)}'"
        )


def suggest_label_pattern(paths: list[str]) -> str:
    r"""A --label-pattern for these files: the letters before the separator most of their names have after their
    first word (``cat.0.jpg``: ``^(\w+)\.``, ``circle_0050.jpg``: ``^([A-Za-z]+)_``), or the usual hint."""
    separators = collections.Counter(
        found.group(1) for path in paths[:1000] if (found := re.match(r"[A-Za-z]+([._-])", path.rsplit("/", 1)[-1]))
    )
    if not separators:
        return PATTERN_HINT
    separator = separators.most_common(1)[0][0]
    return PATTERN_HINT if separator == "." else f"^([A-Za-z]+){re.escape(separator)}"


# ---------------------------------------------------------------- the sources


def list_source(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """The listing of any source; class folders as DIR/<class>/ (``class_dirs``: evaluate, --val-data)."""
    kind = recognise(where, options, option)
    if kind == FILE_NAMES:
        return file_names(where, options, option)
    if kind == MANIFEST:
        return manifest(where, options, labelled, option)
    if kind == PARQUET:
        return parquet_images(where, options, labelled, option)
    return class_dirs(where, option)


def class_dirs(where: location.Location, option: str = "--data") -> Listing:
    """DIR/<class>/ images (evaluate's and --val-data's class folders): labels from the folder names."""
    check_shape_dirs(where, option)
    filesystem = where.filesystem
    items, labels, stats, rejected = [], [], [no_stats()], []
    for name in class_folders.find_classes(filesystem, where.path):
        listed, unreadable = class_folders._readable(class_folders.list_image_stats(filesystem, f"{where.path}/{name}"))
        paths, class_stats = class_folders._columns(listed)
        items += paths
        labels += [name] * len(paths)
        stats.append(class_stats)
        rejected += unreadable
    prefix = _prefix(where)
    return Listing(
        CLASS_FOLDERS,
        where,
        FileOpener(filesystem, prefix),
        items,
        labels,
        [""] * len(items),
        np.concatenate(stats),
        [os.path.relpath(path, where.path) for path in items],
        rejected=[(prefix + path, reason) for path, reason in rejected],
        split_rule="every image (a folder per class)",
    )


def check_shape_dirs(where: location.Location, option: str) -> None:
    if where.info(option).type != pafs.FileType.Directory:
        raise TlRayError(f"{option}: {where.uri} is not a folder of <class>/ image folders")
    if not class_folders.find_classes(where.filesystem, where.path):
        _refuse_flat(where.filesystem, where.path, where.uri, option)
        raise TlRayError(f"{option}: {where.uri} holds no <class>/ image folders")


def _prefix(where: location.Location) -> str:
    return "" if where.is_local else where.base.split("://", 1)[0] + "://"


def file_names(where: location.Location, options: SourceOptions, option: str = "--data") -> Listing:
    """Images whose label is in their file name (``--label-pattern``): ROOT/train/ and an optional ROOT/val/, or
    every image under ROOT; a file whose name does not match is left out, and reported."""
    pattern = re.compile(options.validate().label_pattern or "")
    group = "label" if "label" in pattern.groupindex else 1
    if where.info(option).type != pafs.FileType.Directory:
        raise TlRayError(f"{option}: {where.uri} is not a folder; --label-pattern reads the names of a folder's images")
    folders = [("", where.path)]
    rule = f"a held-out share of {where.uri} by each file's hash (--val-fraction)"
    if _has_folder(where, "train"):
        folders = [("train", f"{where.path}/train")]
        rule = "train/ and a held-out share of it by each file's hash (--val-fraction)"
        if _has_folder(where, "val"):
            folders.append(("val", f"{where.path}/val"))
            rule = "train/ and val/"
    prefix = _prefix(where)
    items, labels, splits, keys, stats, rejected = [], [], [], [], [no_stats()], []
    names_seen, example = 0, ""
    for split, folder in folders:
        listed, unreadable = class_folders._readable(class_folders.list_image_stats(where.filesystem, folder))
        rejected += [(prefix + path, reason) for path, reason in unreadable]
        keep, kept_stats = [], []
        for path, size, mtime in listed:
            names_seen += 1
            name = path.rsplit("/", 1)[-1]
            example = example or name
            found = pattern.search(name)
            label = found.group(group) if found else None
            if not label:
                rejected.append((prefix + path, f"file name does not match --label-pattern '{pattern.pattern}'"))
                continue
            keep.append(path)
            labels.append(label)
            kept_stats.append((size, mtime))
        items += keep
        splits += [split] * len(keep)
        keys += [os.path.relpath(path, folder) for path in keep]
        stats.append(np.asarray(kept_stats, dtype=np.int64).reshape(-1, 2))
    if not items:
        what = f"any of the {names_seen:,} image file names" if names_seen else "anything: there are no images"
        shown = f" (e.g. {example!r})" if example else ""
        raise UsageError(f"--label-pattern '{pattern.pattern}' does not match {what} under {where.uri}{shown}")
    return Listing(
        FILE_NAMES,
        where,
        FileOpener(where.filesystem, prefix),
        items,
        labels,
        splits,
        np.concatenate(stats),
        keys,
        rejected=rejected,
        split_rule=rule,
    )


def _schema(filesystem: pafs.FileSystem, path: str) -> pa.Schema:
    try:
        return pq.read_schema(path, filesystem=filesystem)
    except (OSError, pa.ArrowException) as error:
        raise TlRayError(f"--data: cannot read {path} as Parquet: {location.describe(error)}") from error


def _image_column(schema: pa.Schema, options: SourceOptions) -> str | None:
    """The column holding encoded images: --image-column, else one named like an image, else the first of binary
    type or a struct with ``bytes`` (Hugging Face's Image)."""

    def holds_images(kind: pa.DataType) -> bool:
        if pa.types.is_struct(kind):
            return any(kind.field(i).name == "bytes" for i in range(kind.num_fields))
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)

    if options.image_column:
        return options.image_column if options.image_column in schema.names else None
    candidates = [name for name in schema.names if holds_images(schema.field(name).type)]
    named = [name for name in candidates if name.lower() in IMAGE_COLUMNS]
    return (named or candidates or [None])[0]


def class_label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The class names Hugging Face ``datasets`` records for an integer label column (a ``ClassLabel`` in the
    schema's ``huggingface`` metadata), in its order; None where there is none."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return None
    feature = features.get(column) if isinstance(features, dict) else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return [str(name) for name in feature["names"]]
    return None


def _label_texts(
    column: pa.ChunkedArray | pa.Array, name: str, shown: str, class_names: list[str] | None
) -> tuple[list[str | None], list[str] | None]:
    """Each row's class name (None: no label) and the source's class order (None: sort the names).

    Integers are class ids: named by ``class_names`` (a ClassLabel), else by their digits, in numeric order."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    if pa.types.is_floating(kind):
        example = next((value for value in column.to_pylist() if value is not None), None)
        raise UsageError(
            f"--data: label column {name!r} of {shown} holds floats (e.g. {example}); labels must be class names or"
            " integer class ids (a regression target is not a class)"
        )
    values = column.to_pylist()
    if pa.types.is_integer(kind):
        if class_names is not None:
            bad = [value for value in values if value is not None and not 0 <= value < len(class_names)]
            if bad:
                raise UsageError(
                    f"--data: label column {name!r} of {shown} holds {bad[0]}, outside its ClassLabel's"
                    f" {len(class_names)} names"
                )
            return [None if value is None else class_names[value] for value in values], class_names
        order = [str(value) for value in sorted({value for value in values if value is not None})]
        return [None if value is None else str(value) for value in values], order
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_boolean(kind):
        return [None if value in (None, "") else str(value) for value in values], None
    raise UsageError(f"--data: label column {name!r} of {shown} is {kind}; expected class names or integer ids")


def _missing_column(what: str, shown: str, column: str, flag: str, names: list[str]) -> UsageError:
    return UsageError(
        f"--data: {what} {shown} has no {column!r} column (its columns: {', '.join(names) or 'none'}); name yours"
        f" with {flag}"
    )


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


def _split_values(column: pa.ChunkedArray, name: str, shown: str) -> list[str]:
    splits = []
    for row, value in enumerate(column.to_pylist()):
        text = "" if value is None else str(value).strip().lower()
        if text and text not in _SPLIT_VALUES:
            raise UsageError(
                f"--data: split column {name!r} of {shown} has {value!r} (row {row + 1}); expected train or val"
                " (or leave it empty: held out by hash)"
            )
        splits.append(_SPLIT_VALUES.get(text, ""))
    return splits


def manifest(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """A table of path, label[, split] rows (CSV, TSV, JSON lines, Parquet): paths relative to the manifest's folder,
    absolute, or URIs. A row whose file is missing is left out and reported; the caches are keyed by each file's
    size and modification time, found by listing the folders the files are in (one LIST page per 1,000)."""
    table = _read_table(where)
    shown = where.uri
    names = table.column_names
    if options.path_column not in names:
        raise _missing_column("manifest", shown, options.path_column, "--path-column", names)
    if labelled and options.label_column not in names:
        raise _missing_column("manifest", shown, options.label_column, "--label-column", names)
    raw_paths = table.column(options.path_column).to_pylist()
    if options.label_column in names:
        texts, order = _label_texts(table.column(options.label_column), options.label_column, shown, None)
    else:
        texts, order = [""] * len(raw_paths), None
    splits = (
        _split_values(table.column(options.split_column), options.split_column, shown)
        if (options.split_column in names)
        else [""] * len(raw_paths)
    )
    folder = where.parent()
    prefix = _prefix(where)
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
    keep = ~missing
    rejected += [
        (_shown(item, prefix), f"file not found (named in {shown})")
        for item, gone in zip(items, missing, strict=True)
        if gone
    ]
    chosen = np.flatnonzero(keep).tolist()
    return Listing(
        MANIFEST,
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
    """A manifest's path as an item: a URI as written; a relative path under the manifest's folder."""
    if location.is_uri(raw):
        return raw
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
                stats[index] = class_folders._or_unknown(entry.size), class_folders._or_unknown(entry.mtime_ns)
    return stats, missing


def _hf_split(path: str) -> str | None:
    """The split a Hugging Face Parquet file's name (or its folder's) says, or None."""
    for part in reversed(path.split("/")[-2:]):
        found = _HF_SPLIT.match(part)
        if found:
            return _HF_SPLITS.get(found.group(1).lower(), "test")
    return None


def parquet_images(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """Parquet files holding the images (a file, a folder of them, or a glob): one item per row, ``FILE#ROW``.

    Hugging Face's split files are recognised by name (``train-*``; ``validation-*`` is the val split, else
    ``test-*``); without them every row is for training, a share held out by hash. Only the label column (and the
    split column, if any) is read to list; every row of a file is keyed by the file's size and modification time.
    """
    files = _parquet_files(where)
    if not files:
        raise TlRayError(f"{option}: {where.uri} holds no Parquet files")
    schema = _schema(where.filesystem, files[0])
    column = _image_column(schema, options)
    shown = where.uri
    if column is None:
        flag = "--image-column" if options.image_column else "--image-column (binary or {bytes, path})"
        raise _missing_column("Parquet", shown, options.image_column or "image", flag, schema.names)
    if labelled and options.label_column not in schema.names:
        raise _missing_column("Parquet", shown, options.label_column, "--label-column", schema.names)
    class_names = class_label_names(schema, options.label_column)
    named = {path: _hf_split(path) for path in files}
    notes = []
    if "train" in named.values() and {"val", "test"} & set(named.values()):
        val_kind = "val" if "val" in named.values() else "test"
        unused = [path for path, split in named.items() if split not in ("train", val_kind)]
        splits_of = {path: {"train": "train", val_kind: "val"}.get(split or "") for path, split in named.items()}
        rule = f"Hugging Face's split files: train-* for training, {'validation' if val_kind == 'val' else 'test'}-*"
        if unused:
            notes.append(f"{len(unused)} Parquet file(s) of other splits left out, e.g. {unused[0]}")
        files = [path for path in files if splits_of[path] is not None]
    else:
        splits_of = {path: "" for path in files}
        rule = "a held-out share of the rows by hash (--val-fraction)"
    read = [options.label_column] if options.label_column in schema.names else []
    has_split_column = options.split_column in schema.names
    if has_split_column:
        read.append(options.split_column)
        rule = f"the {options.split_column!r} column"
    prefix = _prefix(where)
    items, labels, splits, keys, stats, rejected = [], [], [], [], [], []
    order: list[str] | None = class_names
    for path in files:
        info = where.filesystem.get_file_info(path)
        try:
            table = pq.read_table(path, filesystem=where.filesystem, columns=read)
            rows = table.num_rows if read else pq.read_metadata(path, filesystem=where.filesystem).num_rows
        except (OSError, pa.ArrowException) as error:
            raise TlRayError(f"{option}: cannot read {prefix}{path}: {location.describe(error)}") from error
        if options.label_column in read:
            texts, file_order = _label_texts(
                table.column(options.label_column), options.label_column, prefix + path, class_names
            )
            if class_names is None and file_order is not None:
                order = sorted(set(order or []) | set(file_order), key=_numeric)
        else:
            texts = [""] * rows
        row_splits = (
            _split_values(table.column(options.split_column), options.split_column, prefix + path)
            if has_split_column
            else [splits_of[path]] * rows
        )
        relative = path[len(where.path) :].lstrip("/") if path.startswith(where.path) else path.rsplit("/", 1)[-1]
        for row, (label, split) in enumerate(zip(texts, row_splits, strict=True)):
            item = row_item(path, row)
            if labelled and label is None:
                rejected.append((prefix + item, "no label"))
                continue
            items.append(item)
            labels.append(label or "")
            splits.append(split)
            keys.append(row_item(relative or path.rsplit("/", 1)[-1], row))
            stats.append((class_folders._or_unknown(info.size), class_folders._or_unknown(info.mtime_ns)))
    return Listing(
        PARQUET,
        where,
        ParquetOpener(where.filesystem, prefix, column),
        items,
        labels,
        splits,
        np.asarray(stats, dtype=np.int64).reshape(-1, 2),
        keys,
        class_names=order,
        rejected=rejected,
        notes=notes,
        split_rule=rule,
    )


def _numeric(name: str) -> tuple[int, int | str]:
    """Integer ids (their digits as names) in numeric order."""
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


# ---------------------------------------------------------------- a listing as a run's layout


def held_out(keys: list[str], labels: np.ndarray, fraction: float) -> np.ndarray:
    """Which items the deterministic split holds out for validation (``class_folders._hash_split``'s rule): each by its
    key's hash, never a class's every item (its highest-scoring one stays for training)."""
    scores = np.asarray([class_folders._split_score(key) for key in keys], dtype=np.float64)
    held = scores < fraction
    if not len(keys):
        return held
    classes, compact = np.unique(labels, return_inverse=True)
    emptied = np.flatnonzero(np.bincount(compact, weights=held, minlength=len(classes)) == np.bincount(compact))
    for label in emptied:  # rare: a class of one or a few items
        members = np.flatnonzero(compact == label)
        held[members[scores[members].argmax()]] = False
    return held


def to_layout(listing: Listing, val_fraction: float, val_listing: Listing | None = None) -> Layout:
    """Classes and splits of a listing: its own splits, ``val_listing`` (--val-data), or a held-out share by hash.

    Class order: the source's own (a ClassLabel), else the sorted names of the training items (ImageFolder's
    rule); a validation class training lacks is refused, as is a class with no training item."""
    shown = listing.where.uri
    splits = np.asarray(listing.splits, dtype=object)
    training = splits != "val"
    if val_listing is not None and not training.all():
        listing.notes.append(f"{int((~training).sum())} val item(s) of --data left out: --val-data is the val set")
    train_labels = [label for label, used in zip(listing.labels, training, strict=True) if used]
    class_names = listing.class_names or sorted(set(train_labels))
    counts = collections.Counter(train_labels)
    empty = [name for name in class_names if not counts.get(name)]
    if len(counts) < 2:
        found = ", ".join(sorted(counts)[:10])
        raise TlRayError(f"--data: {shown} has {len(counts)} class(es) with training items ({found}); need at least 2")
    if empty:
        raise TlRayError(
            f"--data: class(es) {', '.join(empty)} of {shown} have no training item; the model could not learn them"
        )
    index = {name: label for label, name in enumerate(class_names)}
    labels = np.asarray([index.get(label, -1) for label in listing.labels], dtype=np.int64)
    source_val = val_listing or listing
    val_mask = np.zeros(len(listing.items), dtype=bool)
    if val_listing is not None:
        rule = f"--val-data {val_listing.where.uri}"
    elif not training.all():
        val_mask = ~training
        rule = listing.split_rule
    else:
        chosen = np.flatnonzero(training)
        val_mask[chosen] = held_out([listing.keys[i] for i in chosen], labels[chosen], val_fraction)
        rule = listing.split_rule
    train_mask = training & ~val_mask
    if val_listing is not None:
        val_index = np.asarray([index.get(label, -1) for label in val_listing.labels], dtype=np.int64)
        val_rows = np.arange(len(val_listing.items))
    else:
        val_index, val_rows = labels, np.flatnonzero(val_mask)
    unknown = sorted({source_val.labels[i] for i in val_rows if val_index[i] < 0})
    if unknown:
        raise TlRayError(f"--data: the val items have classes that training lacks: {', '.join(unknown[:10])}")
    train_rows = np.flatnonzero(train_mask)
    train = [(listing.items[i], int(labels[i])) for i in train_rows]
    val = [(source_val.items[i], int(val_index[i])) for i in val_rows]
    rejected = listing.rejected + (val_listing.rejected if val_listing is not None else [])
    where = listing.where
    return Layout(
        where.uri,
        where.filesystem,
        _prefix(where),
        class_names,
        train,
        val,
        rule,
        rejected,
        listing.stats[train_rows],
        source_val.stats[val_rows],
        opener=listing.opener,
        val_opener=source_val.opener,
        source=listing.source,
        notes=listing.notes + (val_listing.notes if val_listing is not None else []),
    )


def _class_folders_listing(where: location.Location) -> Listing:
    """Class folders (ROOT/train/<class>/, ROOT/val/<class>/) as a listing, for a run with --val-data."""
    train = class_dirs(where.join("train"))
    return Listing(
        CLASS_FOLDERS,
        where,
        train.opener,
        train.items,
        train.labels,
        ["train"] * len(train.items),
        train.stats,
        train.keys,
        rejected=train.rejected,
        notes=["ROOT/val/ left out: --val-data is the val set"] if _has_folder(where, "val") else [],
    )


def discover(
    root: str | location.Location,
    val_fraction: float = 0.2,
    options: SourceOptions | None = None,
    val_data: str | location.Location | None = None,
) -> Layout:
    """What a run trains and validates on: the source ``root`` is recognised as, and its splits (or ``val_data``'s
    items as the val split)."""
    options = options or SourceOptions()
    where = location.resolve(root, "--data")
    kind = recognise(where, options)
    val_listing = None
    if val_data is not None:
        val_where = location.resolve(val_data, "--val-data")
        val_listing = list_source(val_where, options, option="--val-data")
    if kind == CLASS_FOLDERS:
        check_shape(where)
        if val_listing is None:
            return class_folders.discover(where, val_fraction)
        return to_layout(_class_folders_listing(where), val_fraction, val_listing)
    return to_layout(list_source(where, options), val_fraction, val_listing)

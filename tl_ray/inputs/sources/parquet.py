"""The Parquet-images source: Parquet files whose rows hold encoded images (a file, a folder of them, or a glob),
as Hugging Face ``datasets`` publishes image sets: an ``Image`` column ({bytes, path}), a ``ClassLabel`` with the
class order, and split files (``train-*``, ``validation-*``). An item is ``FILE#ROW``; ``ParquetOpener`` reads it
with its row group, so the images are never copied out to files."""

from __future__ import annotations

import collections
import fnmatch
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tl_ray import location
from tl_ray.errors import TlRayError
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.layout import is_local, read_bytes
from tl_ray.inputs.sources.columns import label_texts, missing_column, numeric_order, split_values
from tl_ray.inputs.sources.listing import PARQUET_SUFFIX, Listing, list_entries, or_unknown, uri_prefix

NAME = "parquet images"
IMAGE_COLUMNS = ("image", "img", "picture", "photo")
# Hugging Face's split file names (train-00000-of-00004.parquet) or split folders (data/validation/x.parquet).
_HF_SPLIT = re.compile(r"^(train|training|validation|valid|val|dev|test|testing)(?=[-_.]|$)", re.IGNORECASE)
_HF_SPLITS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val"}


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
    """The item of row ``row`` of the Parquet file ``path``: ``FILE#ROW``, what predict writes and skips name."""
    return f"{path}#{row}"


def split_row(item: str) -> tuple[str, int]:
    """``row_item`` undone: (FILE, ROW); the last ``#`` splits, as a file name may hold one."""
    path, _, row = item.rpartition("#")
    return path, int(row)


# ---------------------------------------------------------------- which files


def _glob(text: str) -> bool:
    """Whether ``text`` has glob characters (``fnmatch``'s)."""
    return any(char in text for char in "*?[")


def is_glob(where: location.Location) -> bool:
    """A pattern of Parquet files (``data/train-*.parquet``): glob characters, and no file or folder of that name."""
    return _glob(where.path) and where.info("--data").type == pafs.FileType.NotFound


def parquet_files(where: location.Location) -> list[str]:
    """The Parquet files of a folder (recursively) or a glob, sorted."""
    if is_glob(where):
        first = min(index for index, char in enumerate(where.path) if char in "*?[")
        folder = where.path[: max(where.path.rfind("/", 0, first), 0)]
        entries = list_entries(where.filesystem, folder or "/", True)
        return sorted(
            entry.path
            for entry in entries
            if entry.type == pafs.FileType.File and fnmatch.fnmatchcase(entry.path, where.path)
        )
    if where.info("--data").type == pafs.FileType.File:
        return [where.path]
    entries = list_entries(where.filesystem, where.path, True)
    return sorted(
        entry.path
        for entry in entries
        if entry.type == pafs.FileType.File
        and entry.base_name.lower().endswith(PARQUET_SUFFIX)
        and not entry.base_name.startswith((".", "_"))
    )


# ---------------------------------------------------------------- their columns


def read_schema(filesystem: pafs.FileSystem, path: str) -> pa.Schema:
    """A Parquet file's schema (its footer alone): what tells images from a manifest, and names the columns."""
    try:
        return pq.read_schema(path, filesystem=filesystem)
    except (OSError, pa.ArrowException) as error:
        raise TlRayError(f"--data: cannot read {path} as Parquet: {location.describe(error)}") from error


def image_column(schema: pa.Schema, options: SourceOptions) -> str | None:
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


# ---------------------------------------------------------------- the listing


def _hf_split(path: str) -> str | None:
    """The split a Hugging Face Parquet file's name (or its folder's) says, or None."""
    for part in reversed(path.split("/")[-2:]):
        found = _HF_SPLIT.match(part)
        if found:
            return _HF_SPLITS.get(found.group(1).lower(), "test")
    return None


def list_items(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """Parquet files holding the images (a file, a folder of them, or a glob): one item per row, ``FILE#ROW``.

    Hugging Face's split files are recognised by name (``train-*``; ``validation-*`` is the val split, else
    ``test-*``); without them every row is for training, a share held out by hash. Only the label column (and the
    split column, if any) is read to list; every row of a file is keyed by the file's size and modification time.
    """
    files = parquet_files(where)
    if not files:
        raise TlRayError(f"{option}: {where.uri} holds no Parquet files")
    schema = read_schema(where.filesystem, files[0])
    column = image_column(schema, options)
    shown = where.uri
    if column is None:
        flag = "--image-column" if options.image_column else "--image-column (binary or {bytes, path})"
        raise missing_column("Parquet", shown, options.image_column or "image", flag, schema.names)
    if labelled and options.label_column not in schema.names:
        raise missing_column("Parquet", shown, options.label_column, "--label-column", schema.names)
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
    prefix = uri_prefix(where)
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
            texts, file_order = label_texts(
                table.column(options.label_column), options.label_column, prefix + path, class_names
            )
            if class_names is None and file_order is not None:
                order = sorted(set(order or []) | set(file_order), key=numeric_order)
        else:
            texts = [""] * rows
        row_splits = (
            split_values(table.column(options.split_column), options.split_column, prefix + path)
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
            stats.append((or_unknown(info.size), or_unknown(info.mtime_ns)))
    return Listing(
        NAME,
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

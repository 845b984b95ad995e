"""Where a dataset's images come from: the sources tl-ray reads, one module each, and the recogniser that picks one.

A **source** lists *items*, each with its class name and, where the source says, its split, and opens an item's
bytes. Everything downstream (decoding, skips, the decoded-image and feature caches, held images, streaming,
predict, evaluate) sees only that interface (``listing``), so adding a source is one file and one branch here:

- an **item** is a string: a file's path (or URI), or ``FILE#ROW`` for an image stored in a Parquet file's row;
  what predict writes, what skip reports name (through ``Opener.display``);
- an **opener** (``Opener``) reads an item's bytes in any process (it is pickled into Ray tasks);
- a **listing** (``Listing``) is what a source found: items, class names, splits, and each item's (size, mtime)
  as the listing returned them (for a Parquet row: its file's), which key the caches, so a changed file or row
  rebuilds them and a run over a built cache asks the data location nothing per item.

The sources, each a module with its ``NAME`` and ``list_items``: ``class_folders`` (ROOT/train/<class>/),
``file_names`` (--label-pattern), ``manifest`` (a CSV/TSV/JSON-lines/Parquet table of paths), ``imagefolder``
(Hugging Face's: split folders with a metadata.csv/.jsonl of file_name and label), ``parquet``
(Parquet files of images, Hugging Face's included), ``webdataset`` (tar shards, an item ``SHARD#KEY``) and
``images`` (predict's: an image or a folder of them).

``recognise`` tells which source --data is from its shape alone (and --label-pattern); ``list_source`` lists it;
``discover`` turns a listing into a run's ``Layout`` (classes, the train and val splits, the test split kept
apart, ``to_layout``); ``list_split`` is one split of a dataset (evaluate's --split). Class
folders keep ``class_folders.discover`` unchanged: ImageFolder's classes and order, the same files, the same
held-out split.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pyarrow.fs as pafs

from tl_ray import location
from tl_ray.errors import TlRayError
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.layout import Layout
from tl_ray.inputs.sources import class_folders, file_names, imagefolder, images, manifest, parquet, webdataset
from tl_ray.inputs.sources.class_folders import suggest_label_pattern
from tl_ray.inputs.sources.listing import (
    MANIFEST_SUFFIXES,
    PARQUET_SUFFIX,
    TEST_FOLDER,
    VAL_FOLDERS,
    Listing,
    Opener,
    Source,
    has_folder,
    list_images,
    split_score,
    uri_prefix,
    val_folder,
)
from tl_ray.inputs.sources.parquet import ParquetOpener, is_glob

__all__ = [
    "CLASS_FOLDERS",
    "FILE_NAMES",
    "IMAGEFOLDER",
    "IMAGES",
    "MANIFEST",
    "MANIFEST_SUFFIXES",
    "PARQUET",
    "PARQUET_SUFFIX",
    "WEBDATASET",
    "Listing",
    "Opener",
    "ParquetOpener",
    "Source",
    "discover",
    "held_out",
    "is_glob",
    "list_source",
    "list_split",
    "recognise",
    "suggest_label_pattern",
    "to_layout",
]

# Archives refused with a line saying to unpack them: a zip's members are compressed one by one behind a central
# directory at its end, so reading images in place would mean a seek per member on object storage, for data sets
# that are usually a few thousand files; a folder is what every tool writes and reads.
ARCHIVE_SUFFIXES = (".zip", ".7z", ".rar", ".tar.gz", ".tgz")

# What ``Listing.source`` and ``Layout.source`` say (inspect prints it).
CLASS_FOLDERS, FILE_NAMES, MANIFEST, PARQUET = class_folders.NAME, file_names.NAME, manifest.NAME, parquet.NAME
IMAGES, IMAGEFOLDER, WEBDATASET = images.NAME, imagefolder.NAME, webdataset.NAME


# ---------------------------------------------------------------- recognising --data


def recognise(
    where: location.Location, options: SourceOptions, option: str = "--data", labelled: bool = True
) -> Source:
    """Which source ``where`` is, from its shape alone (and --label-pattern): the source's module.

    ``labelled=False`` is predict's question, where an image or a folder of images is a source too (``images``):
    --data is that unless it is a table (``_is_table``), and a table is recognised as for a run. WebDataset shards
    (a ``.tar``, a folder, glob or brace pattern of them) are asked about first: a folder of them holds no images."""
    if webdataset.is_shards(where, option):
        return webdataset
    if not labelled and not _is_table(where, option):
        return images
    if is_glob(where):
        return parquet
    info = where.info(option)
    if info.type == pafs.FileType.NotFound:
        raise TlRayError(f"{option}: {where.uri} does not exist")
    name = where.base.lower()
    if info.type == pafs.FileType.File:
        if name.endswith(MANIFEST_SUFFIXES):
            return manifest
        if name.endswith(PARQUET_SUFFIX):
            has_images = parquet.image_column(parquet.read_schema(where.filesystem, where.path), options)
            return parquet if has_images else manifest
        if name.endswith(ARCHIVE_SUFFIXES):  # a choice: read in place only what can be read by ranges (tar shards)
            raise TlRayError(
                f"{option}: {where.uri} is a {name.rsplit('.', 1)[-1]} archive, which tl-ray does not read in place"
                f" (it reads folders, WebDataset .tar shards and tables); unpack it (unzip FILE -d DIR) and pass"
                f" {option} DIR"
            )
        raise TlRayError(
            f"{option}: {where.uri} is a file; expected a folder holding train/<class>/ image folders, a manifest"
            f" ({', '.join(MANIFEST_SUFFIXES)}, .parquet with path and label columns) or Parquet files of images"
        )
    if options.label_pattern:
        return file_names
    if imagefolder.is_imagefolder(where, option):
        return imagefolder
    return class_folders if has_folder(where, "train") or not parquet.parquet_files(where) else parquet


def _is_table(where: location.Location, option: str) -> bool:
    """Whether predict's --data is a table rather than images: a manifest or Parquet file by its name, a glob, or a
    folder with no images but Parquet files."""
    if is_glob(where) or where.base.lower().endswith((*MANIFEST_SUFFIXES, PARQUET_SUFFIX)):
        return True
    if where.info(option).type != pafs.FileType.Directory:
        return False
    return not list_images(where.filesystem, where.path) and bool(parquet.parquet_files(where))


def list_source(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """The listing of any source: a run's --val-data, evaluate's --data (class folders as DIR/<class>/), and with
    ``labelled=False`` predict's (an image, a folder of images, or a table whose labels are not needed)."""
    return recognise(where, options, option, labelled).list_items(where, options, labelled, option)


def list_split(where: location.Location, options: SourceOptions, split: str, option: str = "--data") -> Listing:
    """One split of a dataset (evaluate's --split): class folders' train/, val folder or test/ listed as DIR/<class>/;
    any other source's items of that split ("train", "val", "test"), refused when it has none."""
    source = recognise(where, options, option)
    if source is class_folders:
        name = {"train": "train", "val": val_folder(where, option), "test": TEST_FOLDER}[split]
        if name is None or not has_folder(where, name):
            folders = "/, ".join(VAL_FOLDERS) if split == "val" else split
            raise TlRayError(f"--split {split}: {where.uri} has no {folders}/ folder")
        return class_folders.list_items(where.join(name), options, option=option)
    listing = source.list_items(where, options, True, option)
    rows = [row for row, given in enumerate(listing.splits) if given == split]
    if not rows:
        found = ", ".join(sorted({given or "none (held out by hash)" for given in listing.splits})) or "no items"
        raise TlRayError(f"--split {split}: {where.uri} has no {split} items (its splits: {found})")
    return dataclasses.replace(
        listing,
        items=[listing.items[row] for row in rows],
        labels=[listing.labels[row] for row in rows],
        splits=[split] * len(rows),
        stats=listing.stats[rows],
        keys=[listing.keys[row] for row in rows],
    )


# ---------------------------------------------------------------- a listing as a run's layout


def held_out(keys: list[str], labels: np.ndarray, fraction: float) -> np.ndarray:
    """Which items the deterministic split holds out for validation, by the class folders' rule for every source:
    each by its key's hash (``listing.split_score``), never a class's every item (its highest-scoring one stays for
    training)."""
    scores = np.asarray([split_score(key) for key in keys], dtype=np.float64)
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
    is_val, is_test = splits == "val", splits == "test"  # a test item is kept apart: neither trained nor validated on
    training = ~is_val & ~is_test
    if val_listing is not None and is_val.any():
        listing.notes.append(f"{int(is_val.sum())} val item(s) of --data left out: --val-data is the val set")
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
    elif is_val.any():
        val_mask = is_val
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
        uri_prefix(where),
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
        test=[(listing.items[i], int(labels[i])) for i in np.flatnonzero(is_test)],
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
    source = recognise(where, options)
    val_listing = None
    if val_data is not None:
        val_where = location.resolve(val_data, "--val-data")
        val_listing = list_source(val_where, options, option="--val-data")
    if source is class_folders:
        class_folders.check_shape(where)
        if val_listing is None:
            layout = class_folders.discover(where, val_fraction)
        else:
            layout = to_layout(class_folders.with_val_data(where), val_fraction, val_listing)
    else:
        layout = to_layout(list_source(where, options), val_fraction, val_listing)
    return dataclasses.replace(layout, retry_seconds=options.retry_seconds)

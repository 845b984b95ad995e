"""The Hugging Face ``imagefolder`` source: split folders (train/, one of validation/, val/ or valid/, and test/),
each holding images and a ``metadata.csv``, ``metadata.jsonl`` or ``metadata.parquet`` whose ``file_name`` column
names each image relative to that folder and whose label column (``label``; --label-column) gives its class: the
layout ``datasets`` reads and writes (https://huggingface.co/docs/datasets/image_dataset#imagefolder) and the Hub is
full of. One such folder alone (``--data ROOT/train``) is a dataset too, held out by hash.

Each metadata file is read as a manifest (``manifest.list_items``: paths resolved, missing files reported, integer
labels in numeric order). Where a metadata file has no label column and its images sit in <class>/ folders, the
class is the folder's name, as ``datasets`` infers it. The test split is kept apart: never trained or validated on.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from tl_ray import location
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.sources import manifest
from tl_ray.inputs.sources.columns import numeric_order
from tl_ray.inputs.sources.listing import TEST_FOLDER, VAL_FOLDERS, Listing, file_info, has_folder, val_folder

NAME = "Hugging Face imagefolder"
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
PATH_COLUMN = "file_name"  # what ``datasets`` names each image by: fixed by its format, not an option
# A file_name's first folder that names a split (one metadata file for all of them, as ``datasets`` allows).
_SPLIT_NAMES = {"train": "train", TEST_FOLDER: "test", **{name: "val" for name in VAL_FOLDERS}}


def metadata_file(where: location.Location) -> str | None:
    """The name of the metadata file ``where`` holds itself, None without one."""
    for name in METADATA_FILES:
        if file_info(where.filesystem, f"{where.path}/{name}").type == pafs.FileType.File:
            return name
    return None


def is_imagefolder(where: location.Location, option: str = "--data") -> bool:
    """Whether ``where`` (a folder) is a Hugging Face imagefolder: a metadata file with a file_name column in it, or
    in its train/ (a metadata.csv of something else, beside class folders, leaves them class folders)."""
    for folder in (where, where.join("train")):
        name = metadata_file(folder) if folder is where or has_folder(where, "train") else None
        if name is not None and PATH_COLUMN in _columns(folder.join(name), option):
            return True
    return False


def list_items(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """The items of every split folder's metadata (or of ``where``'s own), each with its split: "train", "val",
    "test", or "" (``where``'s own metadata: a file_name under a split's folder says its split; else held out)."""
    if metadata_file(where) is not None:
        folders = [("", where)]
    else:
        val_name = val_folder(where, option)
        named = (("train", "train"), ("val", val_name), ("test", TEST_FOLDER))
        folders = [(split, where.join(name)) for split, name in named if name and has_folder(where, name)]
    parts, notes = [], []
    for split, folder in folders:
        name = metadata_file(folder)
        if name is None and split == "test":  # an unlabelled test set: nothing to score
            notes.append(f"{folder.uri} has no metadata file: left out")
            continue
        if name is None:
            raise TlRayError(
                f"{option}: {folder.uri} has no {' or '.join(METADATA_FILES)} (train/ has one); add one with"
                f" {PATH_COLUMN} and label columns, or remove the folder"
            )
        listing = _list_metadata(folder.join(name), options, labelled, option)
        prefix = f"{folder.name}/" if split else ""
        splits = [given or split or _split_of(key) for given, key in zip(listing.splits, listing.keys, strict=True)]
        parts.append(dataclasses.replace(listing, splits=splits, keys=[prefix + key for key in listing.keys]))
    items = [item for part in parts for item in part.items]
    splits = [split for part in parts for split in part.splits]
    tested = splits.count("test")
    if tested:
        test_folder = where.join(TEST_FOLDER).uri if len(folders) > 1 else f"{where.uri} --split test"
        notes.append(
            f"test: {tested:,} image(s) kept apart (never trained or validated on); score them with tl-ray evaluate"
            f" --data {test_folder}"
        )
    orders = [part.class_names for part in parts if part.class_names is not None and "train" in part.splits[:1]]
    orders = orders or [part.class_names for part in parts if part.class_names is not None]
    return Listing(
        NAME,
        where,
        parts[0].opener,
        items,
        [label for part in parts for label in part.labels],
        splits,
        np.concatenate([part.stats for part in parts]),
        [key for part in parts for key in part.keys],
        class_names=sorted(set().union(*orders), key=numeric_order) if orders else None,
        rejected=[entry for part in parts for entry in part.rejected],
        notes=notes,
        split_rule=_rule(splits, folders),
    )


def _rule(splits: list[str], folders: list[tuple[str, location.Location]]) -> str:
    if "val" in splits:
        names = [folder.name for split, folder in folders if split in ("train", "val")]
        return f"{' and '.join(f'{name}/' for name in names) or 'the file_name folders'} (Hugging Face imagefolder)"
    return "a held-out share of the training images by each file's hash (--val-fraction)"


def _split_of(key: str) -> str:
    """The split a file_name's first folder names (``train/cat/1.png``), "" for none."""
    first, _, rest = key.partition("/")
    return _SPLIT_NAMES.get(first.lower(), "") if rest else ""


def _list_metadata(meta: location.Location, options: SourceOptions, labelled: bool, option: str) -> Listing:
    """One metadata file as a manifest's listing; without a label column, classes from the <class>/ folders."""
    columns = _columns(meta, option)
    if PATH_COLUMN not in columns:
        raise UsageError(
            f"{option}: {meta.uri} has no {PATH_COLUMN!r} column (its columns: {', '.join(columns) or 'none'});"
            f" Hugging Face's imagefolder names each image, relative to the metadata's folder, in {PATH_COLUMN}"
        )
    from_folders = labelled and options.label_column not in columns
    read = dataclasses.replace(options, path_column=PATH_COLUMN)
    listing = manifest.list_items(meta, read, labelled and not from_folders, option)
    if not from_folders:
        return listing
    classes = [_class_folder(key) for key in listing.keys]
    depths = {key.count("/") for key in listing.keys}
    if not listing.keys or None in classes or len(depths) > 1 or len(set(classes)) < 2:
        raise UsageError(
            f"{option}: {meta.uri} has no {options.label_column!r} column (its columns: {', '.join(columns)}) and its"
            " images are not in <class>/ folders; name the label column with --label-column"
        )
    return dataclasses.replace(listing, labels=classes, class_names=None)


def _class_folder(key: str) -> str | None:
    """The folder an image sits in, its class when the metadata has no label (as ``datasets`` infers it); None for
    an image in the metadata's own folder or in a split's."""
    parts = key.split("/")
    if len(parts) < 2 or parts[-2].lower() in _SPLIT_NAMES:
        return None
    return parts[-2]


def _columns(meta: location.Location, option: str) -> list[str]:
    """A metadata file's column names, from its header alone (a CSV's first block, a JSON line, Parquet's schema)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if meta.base.endswith(".parquet"):
            return pq.read_schema(meta.path, filesystem=meta.filesystem).names
        with meta.filesystem.open_input_stream(meta.path) as stream:
            if meta.base.endswith(".jsonl"):
                first = stream.read(1 << 20).decode("utf-8", "replace").lstrip().split("\n", 1)[0]
                row = json.loads(first) if first.strip() else {}
                return list(row) if isinstance(row, dict) else []
            return pacsv.open_csv(stream).schema.names
    except (OSError, ValueError, pa.ArrowException) as error:
        raise TlRayError(f"{option}: cannot read {meta.uri}: {location.describe(error)}") from error

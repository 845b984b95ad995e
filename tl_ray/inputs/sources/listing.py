"""What every source shares: the interface (``Opener``, ``Listing``, ``Source``) and the folder-listing helpers.

Each source (``sources/<name>.py``) imports from here and from no other source, so a source's file reads alone and
a new one is one more file. The helpers list a folder the way torchvision's ImageFolder does (sorted, symlinks
followed, hidden files left out), with each file's (size, mtime) taken from the listing itself: the caches are keyed
by them, so a run over a built cache asks the data location nothing per file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow.fs as pafs

from tl_ray import location
from tl_ray.errors import TlRayError
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.layout import display_path, is_local

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# What a file's name says it is: a manifest (a table of paths), or Parquet (images, or a manifest: its columns say).
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
PARQUET_SUFFIX = ".parquet"
NOT_UTF8 = "file name is not valid UTF-8; rename the file"
# A dataset's split folders beside train/: the validation split's names, and the test split, which is kept apart
# (never trained or validated on: `tl-ray evaluate --split test` scores it).
VAL_FOLDERS = ("val", "valid", "validation")
TEST_FOLDER = "test"


class Opener(Protocol):
    """How a source's items are read: in the driver, in Ray Data's tasks and in predict's pipeline alike."""

    def read(self, item: str) -> bytes:
        """The item's encoded image; raises (any exception) when it cannot be read."""

    def display(self, item: str) -> str:
        """The item as the user sees it: a path or URI, or ``FILE#ROW``."""


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


class Source(Protocol):
    """A source's module (``sources/<name>.py``), what ``sources.recognise`` returns: its name, as a listing and a
    layout record it (``Listing.source``), and how it lists a --data it was recognised for."""

    NAME: str

    def list_items(
        self, where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
    ) -> Listing:
        """The items at ``where``; ``labelled=False`` (predict) lists items without a label too."""


# ---------------------------------------------------------------- locations


def uri_prefix(where: location.Location) -> str:
    """What turns a path of ``where``'s filesystem back into what the user passed: "" locally, "s3://" etc."""
    return "" if where.is_local else where.base.split("://", 1)[0] + "://"


def file_info(filesystem: pafs.FileSystem, path: str) -> pafs.FileInfo:
    """The file or folder at ``path`` (``NotFound`` included); an unreadable location is a one-line error."""
    try:
        return filesystem.get_file_info(path)
    except OSError as error:
        raise TlRayError(f"--data: cannot read {path}: {error}") from error


def list_entries(filesystem: pafs.FileSystem, path: str, recursive: bool) -> list[pafs.FileInfo]:
    """The entries of a folder (of every folder below it, ``recursive``), in the filesystem's order."""
    try:
        return filesystem.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except (OSError, UnicodeDecodeError) as error:
        raise TlRayError(f"--data: cannot list {path}: {error}") from error


def has_folder(where: location.Location, name: str) -> bool:
    """Whether ``where`` holds a folder ``name`` (``train``, ``val``): how the sources tell their shapes apart."""
    return file_info(where.filesystem, f"{where.path}/{name}").type == pafs.FileType.Directory


def folders_in(where: location.Location) -> set[str] | None:
    """The names of the folders in ``where``, from one LIST on object storage, for ``has_folders`` to answer every
    question about them (train/, the val folders, test/) without another request; None locally, where a stat per
    name is cheaper than listing a folder of many files."""
    if is_local(where.filesystem):
        return None
    entries = list_entries(where.filesystem, where.path, False)
    return {entry.base_name for entry in entries if entry.type == pafs.FileType.Directory}


def has_folders(where: location.Location, names: tuple[str, ...], folders: set[str] | None = None) -> list[str]:
    """Which of ``names`` are folders in ``where``: from ``folders`` (``folders_in(where)``) when given; else on
    object storage one LIST of it (asking name by name costs a HEAD and a LIST each), locally a stat each."""
    if folders is None:
        folders = folders_in(where)
    if folders is None:
        return [name for name in names if has_folder(where, name)]
    return [name for name in names if name in folders]


def val_folder(where: location.Location, option: str = "--data", folders: set[str] | None = None) -> str | None:
    """The one validation folder ``where`` holds beside train/ (val/, valid/ or validation/: Kaggle's, Hugging
    Face's and torchvision's names), None without one; two of them are refused, as which is meant is unknowable.
    ``folders``: ``where``'s folders, if already listed (``folders_in``)."""
    found = has_folders(where, VAL_FOLDERS, folders)
    if len(found) > 1:
        raise TlRayError(
            f"{option}: {where.uri} has both {found[0]}/ and {found[1]}/; keep one validation folder (or pass the"
            " one to use as --val-data)"
        )
    return found[0] if found else None


# ---------------------------------------------------------------- image files


def is_utf8(path: str) -> bool:
    """Whether Ray Data and Arrow can carry ``path`` (a Linux file name may be any bytes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_classes(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """Sorted sub-folder names (symlinks to folders count): the same classes and order as ImageFolder."""
    if not is_local(filesystem):
        entries = list_entries(filesystem, folder, False)
        return sorted(entry.base_name for entry in entries if entry.type == pafs.FileType.Directory)
    try:
        with os.scandir(folder) as entries:
            names = sorted(entry.name for entry in entries if entry.is_dir())
    except OSError as error:
        raise TlRayError(f"--data: cannot list {folder}: {error.strerror}") from error
    for name in names:
        if not is_utf8(name):
            where = display_path(os.path.join(folder, name))
            raise TlRayError(f"--data: folder name {where} is not valid UTF-8; rename it")
    return names


def _walk_local(folder: str) -> list[str]:
    """Every file under ``folder``, following folder symlinks (as ImageFolder does) but never round a loop."""
    files: list[str] = []

    def refuse(error: OSError) -> None:
        raise TlRayError(f"--data: cannot list {display_path(error.filename or folder)}: {error.strerror}")

    visited = {os.path.realpath(folder)}
    for current, subfolders, names in os.walk(folder, onerror=refuse, followlinks=True):
        here = os.path.realpath(current)
        keep = []
        for name in sorted(subfolders):
            target = os.path.realpath(os.path.join(current, name))
            # A link to this folder or one above it is a loop; one to a folder already listed, a duplicate.
            if target not in visited and not (here + os.sep).startswith(target + os.sep):
                visited.add(target)
                keep.append(name)
        subfolders[:] = keep
        files += [os.path.join(current, name) for name in names]
    return files


def _is_image(path: str) -> bool:
    name = os.path.basename(path)
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """Image files under ``folder``, recursively, sorted; hidden files (e.g. macOS ``._x.jpg``) left out."""
    if is_local(filesystem):
        paths = _walk_local(folder)
    else:
        paths = [entry.path for entry in list_entries(filesystem, folder, True) if entry.type == pafs.FileType.File]
    return sorted(path for path in paths if _is_image(path))


Listed = tuple[str, int, int]  # (path, size, mtime in ns); -1, -1 for a file gone or a dangling link


def list_image_stats(filesystem: pafs.FileSystem, folder: str) -> list[Listed]:
    """``list_images`` with each file's size and modification time, sorted by path.

    A remote listing returns them with the names (an S3 LIST page: 1,000 objects); locally, one ``stat`` per
    file. A file that cannot be stat'ed stays listed (decoding it reports why it is bad).
    """
    if not is_local(filesystem):
        return sorted(
            (entry.path, or_unknown(entry.size), or_unknown(entry.mtime_ns))
            for entry in list_entries(filesystem, folder, True)
            if entry.type == pafs.FileType.File and _is_image(entry.path)
        )
    listed = []
    for path in _walk_local(folder):
        if _is_image(path):
            try:
                status = os.stat(path)
                listed.append((path, status.st_size, status.st_mtime_ns))
            except OSError:
                listed.append((path, -1, -1))
    return sorted(listed)


def or_unknown(value: int | None) -> int:
    """A listed size or mtime, -1 where the filesystem gave none (a stats row's "unknown")."""
    return -1 if value is None else int(value)


def stats_columns(listed: list[Listed]) -> tuple[list[str], np.ndarray]:
    """(paths, int64 (n, 2) of sizes and mtimes): a million files' stats in 16 MB, not 120 MB of tuples."""
    stats = np.fromiter((value for _, size, mtime in listed for value in (size, mtime)), np.int64, 2 * len(listed))
    return [path for path, _, _ in listed], stats.reshape(-1, 2)


def readable_names(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(paths Ray Data and Arrow can carry, (display path, reason) for those they cannot)."""
    good = [path for path in paths if is_utf8(path)]
    rejected = [(display_path(path), NOT_UTF8) for path in paths if not is_utf8(path)]
    return good, rejected


def readable_stats(listed: list[Listed]) -> tuple[list[Listed], list[tuple[str, str]]]:
    """``readable_names`` of a listing with its stats."""
    good = [entry for entry in listed if is_utf8(entry[0])]
    rejected = [(display_path(path), NOT_UTF8) for path, _, _ in listed if not is_utf8(path)]
    return good, rejected


def split_score(key: str) -> float:
    """A stable number in [0, 1) per item key, so the held-out split never changes between runs or machines."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64

"""What a listed dataset is (``Layout``: classes, splits, each item's stats) and how an item that is a file is read
(``FileOpener``): the types every source and every pipeline share."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from tl_ray import location
from tl_ray.inputs import reading


def no_stats() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


@dataclass(frozen=True)
class Layout:
    """A dataset found on disk: the class mapping and the (path, label) lists of each split.

    ``train_stats`` and ``val_stats`` hold each listed file's (size, mtime in ns), row for row with ``train``
    and ``val``, as the listing returned them (-1 where it had none): the cache is keyed and validated by
    them, so a run over a built cache asks the data location nothing per file.
    """

    root: str
    filesystem: pafs.FileSystem
    uri_prefix: str  # "" for local paths, "s3://" etc. for remote ones: prefix + path is what users see
    class_names: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    val_source: str  # "folder" or "split"
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason): left out unread
    train_stats: np.ndarray = dataclasses.field(default_factory=no_stats)  # int64 (len(train), 2)
    val_stats: np.ndarray = dataclasses.field(default_factory=no_stats)  # int64 (len(val), 2)
    # How an item's bytes are read (``sources.Opener``): None, a file of ``filesystem`` (class folders). The paths
    # of ``train`` and ``val`` are items of their opener; ``val_opener`` (None: ``opener``) reads a --val-data set.
    opener: Any = None
    val_opener: Any = None
    source: str = "class folders"  # what --data was recognised as (sources.discover), for messages and inspect
    notes: list[str] = dataclasses.field(default_factory=list)  # what the listing decided that a user may want to know
    # How long a read of an item retries a storage failure that passes (--retry-seconds; ``reading.read_item``).
    retry_seconds: float = reading.RETRY_SECONDS
    # The test split (ROOT/test/, a source's "test" items): kept apart, never trained or validated on, listed for
    # inspect's counts (`tl-ray evaluate --split test` scores it). A label is -1 for a class training lacks.
    test: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.opener is None:
            object.__setattr__(self, "opener", FileOpener(self.filesystem, self.uri_prefix))
        if self.val_opener is None:
            object.__setattr__(self, "val_opener", self.opener)

    def opener_of(self, files: list[tuple[str, int]]) -> Any:
        """The opener that reads ``files``, a split of this layout (validation's may be stored elsewhere)."""
        return self.val_opener if files is self.val else self.opener

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.class_names)}

    def stats_of(self, files: list[tuple[str, int]]) -> np.ndarray:
        """(size, mtime in ns) of each of ``files`` (a split, or some of its files) as the listing found them."""
        for listed, stats in ((self.train, self.train_stats), (self.val, self.val_stats)):
            if files is listed and len(stats) == len(files):
                return stats
        known = {
            path: row
            for listed, stats in ((self.train, self.train_stats), (self.val, self.val_stats))
            for (path, _), row in zip(listed, stats, strict=False)
        }
        missing = [path for path, _ in files if path not in known]
        if missing:
            raise ValueError(f"{len(missing)} file(s) the listing did not return, e.g. {display_path(missing[0])}")
        return np.asarray([known[path] for path, _ in files], dtype=np.int64).reshape(-1, 2)


def resolve_filesystem(
    root: str | location.Location, option: str = "--data"
) -> tuple[pafs.FileSystem, str, str, location.Location]:
    """(filesystem, path inside it, prefix that turns such a path back into a URI, the location)."""
    where = location.resolve(root, option)
    prefix = "" if where.is_local else where.base.split("://", 1)[0] + "://"
    return where.filesystem, where.path, prefix, where


def is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem)


def display_path(path: str) -> str:
    """The path as it can be printed and stored: bytes of a non-UTF-8 file name shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    if is_local(filesystem):
        with open(path, "rb") as stream:
            return stream.read()
    with filesystem.open_input_file(path) as stream:
        return stream.read()


class FileOpener:
    """The opener of items that are files (``sources.Opener``): a path in ``filesystem``, or a URI of its own (a
    manifest may name files anywhere), resolved item by item."""

    def __init__(self, filesystem: pafs.FileSystem, uri_prefix: str = "") -> None:
        self.filesystem = filesystem
        self.uri_prefix = uri_prefix

    def read(self, item: str) -> bytes:
        if not location.is_uri(item):
            return read_bytes(self.filesystem, item)
        where = location.resolve(item, "--data")
        return read_bytes(where.filesystem, where.path)

    def display(self, item: str) -> str:
        """The item as the user sees it: the path, or its URI."""
        return item if location.is_uri(item) else self.uri_prefix + item

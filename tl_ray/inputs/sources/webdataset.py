"""The WebDataset source: tar shards whose members are grouped into samples by key (``KEY.jpg`` + ``KEY.cls``), as
the ``webdataset`` package writes them and LAION, DataComp and timm's ``wds/`` reader use. --data is a folder of
``.tar`` shards (recursively; or ``train/`` and ``val/`` folders of them), one shard, a glob (``shards/*.tar``) or a
brace pattern (``shard-{000000..000009}.tar``), locally or in object storage.

A sample is the consecutive members sharing a key (the member's name up to the first dot of its base name, folders
included, as ``webdataset`` groups them); its image is its jpg/jpeg/png/webp/... member; its label is the
``--label-column`` key (default ``label``) of its ``.json`` member, else its ``.cls`` (an integer class id), else its
``.txt`` (a class name). A sample with no image or no label is left out and reported; so is a shard that is not a tar.

Splits come from the shards' names where they say so (``train-000.tar``, ``imagenet-val-000.tar``, a ``train/`` or
``val/`` folder): the train shards for training and the validation ones (else the test ones) for validation, any
other shard left out; without both, every sample is for training and a share is held out by the hash of its shard's
relative path and key (``--val-fraction``).

The shards are never unpacked. The listing reads each shard's tar headers once (locally by seeking from header to
header; in object storage by one streamed read of the shard), and the label members; an item is
``SHARD#KEY#OFFSET#SIZE``, shown as ``SHARD#KEY``, and ``ShardOpener`` reads the image's bytes at that offset (one
ranged read). Every item is keyed in the caches by its shard's size and modification time.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from tl_ray import location
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.layout import is_local
from tl_ray.inputs.sources.columns import numeric_order
from tl_ray.inputs.sources.listing import (
    IMAGE_EXTENSIONS,
    Listing,
    list_entries,
    or_unknown,
    uri_prefix,
)

NAME = "webdataset"
TAR_SUFFIX = ".tar"
# An image member's extension (after the key's dot), in the order one is preferred when a sample holds several.
IMAGE_KINDS = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
# webdataset's split of a member name into key and extension: the key ends at the first dot of the base name.
_KEY_AND_KIND = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")
# A split word in a shard's (or its folder's) name: train-000.tar, imagenet-val-000123.tar, train/.
_SPLIT_WORD = re.compile(r"(?:^|[-_.])(train|training|validation|valid|val|dev|test|testing)(?=[-_.]|$)", re.IGNORECASE)
_SPLITS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val"}
_SHARD_AND_KEY = re.compile(r"^(.*\.tar)#(.*)$", re.IGNORECASE | re.DOTALL)
_BRACES = re.compile(r"\{([^{}]*)\}")
_PATTERN_CHARS = "*?[{"
MAX_LABEL_BYTES = 1 << 20  # a label member larger than this is not read (no label from it)
STREAM_BUFFER = 16 << 20  # a shard in object storage is listed by reads of this size (tarfile reads 10 KB)
LIST_THREADS = 8  # shards listed at once: reading a shard's headers is latency-bound in object storage


class ShardOpener:
    """Items ``SHARD#KEY#OFFSET#SIZE``: SIZE bytes at OFFSET of the tar file SHARD (a path in ``filesystem``), the
    image member of sample KEY. Each read is one ranged read (``read_at``, thread-safe); the last few shards opened
    stay open, so a task's block of items does not open (in object storage: HEAD) its shard per item."""

    KEEP_OPEN = 4
    sequential = False  # any order reads alike: one ranged read per item, so the cache build shuffles as for files

    def __init__(self, filesystem: pafs.FileSystem, uri_prefix: str) -> None:
        self.filesystem = filesystem
        self.uri_prefix = uri_prefix
        self._open: OrderedDict[str, pafs.NativeFile] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"filesystem": self.filesystem, "uri_prefix": self.uri_prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["filesystem"], state["uri_prefix"])

    def _shard(self, path: str) -> pafs.NativeFile:
        with self._lock:
            if path in self._open:
                self._open.move_to_end(path)
                return self._open[path]
        opened = self.filesystem.open_input_file(path)
        with self._lock:
            self._open[path] = opened
            while len(self._open) > self.KEEP_OPEN:  # not closed here: another thread may be reading it (inspect)
                self._open.popitem(last=False)
        return opened

    def read(self, item: str) -> bytes:
        path, _, offset, size = split_item(item)
        data = self._shard(path).read_at(size, offset)
        if len(data) != size:
            raise ValueError(f"the shard ends {size - len(data)} bytes before the member's end (changed since listed?)")
        return data

    def display(self, item: str) -> str:
        return self.uri_prefix + item.rsplit("#", 2)[0]


def sample_item(shard: str, key: str, offset: int, size: int) -> str:
    """The item of sample ``key`` of ``shard`` whose image member's data is ``size`` bytes at ``offset``."""
    return f"{shard}#{key}#{offset}#{size}"


def split_item(item: str) -> tuple[str, str, int, int]:
    """``sample_item`` undone: (SHARD, KEY, OFFSET, SIZE). OFFSET and SIZE are the last two ``#`` fields; SHARD
    ends at the last ``.tar#`` before them: a key's base name has no dot, so only a key whose folder part holds
    ``.tar#`` would be misread."""
    shown, offset, size = item.rsplit("#", 2)
    found = _SHARD_AND_KEY.match(shown)
    shard, key = found.groups() if found else (shown, "")
    return shard, key, int(offset), int(size)


# ---------------------------------------------------------------- which shards


def expand_braces(text: str) -> list[str]:
    """Bash's (and webdataset's) brace expansion: ``{000000..000003}`` (zero-padded as written) and ``{a,b}``."""
    found = _BRACES.search(text)
    if not found:
        return [text]
    head, body, tails = text[: found.start()], found.group(1), expand_braces(text[found.end() :])
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        padded = (first.startswith("0") and len(first) > 1) or (last.startswith("0") and len(last) > 1)
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [head + "{" + body + "}" + tail for tail in tails]
    return [head + choice + tail for choice in choices for tail in tails]


def _is_pattern(path: str) -> bool:
    return any(char in path for char in _PATTERN_CHARS)


def _names_pattern(where: location.Location, option: str) -> bool:
    """Whether --data is a glob or brace pattern: pattern characters, and no file or folder of that name."""
    return _is_pattern(where.path) and where.info(option).type == pafs.FileType.NotFound


def _is_tar(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(TAR_SUFFIX) and not base.startswith((".", "_"))


def is_shards(where: location.Location, option: str = "--data") -> bool:
    """Whether --data names WebDataset shards: a ``.tar`` file, a glob or brace pattern of ``.tar`` names (no file
    of that name), or a folder holding ``.tar`` files (or a ``train/`` folder of them; a folder with ``train/``
    whose ``train/`` holds none is class folders with an archive beside them)."""
    if _names_pattern(where, option):
        return _is_tar(expand_braces(where.path)[0])
    info = where.info(option)
    if info.type == pafs.FileType.File:
        return _is_tar(where.path)
    if info.type != pafs.FileType.Directory:
        return False
    entries = list_entries(where.filesystem, where.path, False)
    if any(entry.base_name == "train" and entry.type == pafs.FileType.Directory for entry in entries):
        entries = list_entries(where.filesystem, f"{where.path}/train", False)
    return any(entry.type == pafs.FileType.File and _is_tar(entry.path) for entry in entries)


def shard_files(where: location.Location, option: str = "--data") -> tuple[str, list[pafs.FileInfo], list[str]]:
    """(the folder shard keys are relative to, the shards sorted by path, the names a brace pattern gave that do
    not exist). A folder is listed recursively; a pattern lists the folder above its first wildcard once."""
    if not _names_pattern(where, option):
        info = where.info(option)
        if info.type == pafs.FileType.File:
            return where.path.rsplit("/", 1)[0], [info], []
        found = list_entries(where.filesystem, where.path, True)
        return where.path, sorted((e for e in found if e.type == pafs.FileType.File and _is_tar(e.path)), key=_path), []
    first = min(where.path.index(char) for char in _PATTERN_CHARS if char in where.path)
    folder = where.path[: max(where.path.rfind("/", 0, first), 0)]
    patterns = expand_braces(where.path)
    literal = {pattern for pattern in patterns if not _is_pattern(pattern)}
    globs = [pattern for pattern in patterns if _is_pattern(pattern)]
    listed = [
        entry for entry in list_entries(where.filesystem, folder or "/", True) if entry.type == pafs.FileType.File
    ]
    chosen = [
        entry
        for entry in listed
        if entry.path in literal or any(fnmatch.fnmatchcase(entry.path, glob) for glob in globs)
    ]
    present = {entry.path for entry in chosen}
    return folder, sorted(chosen, key=_path), sorted(literal - present)


def _path(info: pafs.FileInfo) -> str:
    return info.path


def _split_of(relative: str) -> str | None:
    """The split a shard's name (else its folder's) says: "train", "val", "test", or None."""
    parts = relative.split("/")
    for part in (parts[-1][: -len(TAR_SUFFIX)], *reversed(parts[:-1][-1:])):
        found = _SPLIT_WORD.search(part)
        if found:
            return _SPLITS.get(found.group(1).lower(), "test")
    return None


# ---------------------------------------------------------------- one shard's samples


LABEL_KINDS = ("json", "cls", "txt")  # the label members, in the order one is preferred


@dataclass
class Sample:
    """One key's members: where its image's data is, the label each label member gives, and why one gives none."""

    key: str
    kinds: list[str] = field(default_factory=list)
    image: tuple[int, int, str] | None = None  # (offset, size, kind)
    labels: dict[str, str] = field(default_factory=dict)  # label member's kind -> the label it gives
    problem: str = ""

    @property
    def label(self) -> str | None:
        """The label of the most preferred label member that gives one (``LABEL_KINDS``)."""
        return next((self.labels[kind] for kind in LABEL_KINDS if kind in self.labels), None)


def _label_of(kind: str, data: bytes, label_key: str) -> tuple[str | None, str]:
    """(the label a ``.json``, ``.cls`` or ``.txt`` member gives, or None; why not, where it is malformed)."""
    text = data.decode("utf-8", "replace").strip()
    if kind == "cls":
        return (str(int(text)), "") if _is_id(text) else (None, f".cls holds {text[:40]!r}, not a class id")
    if kind == "txt":
        return (text or None), ""
    try:
        value = json.loads(text).get(label_key) if text else None
    except (ValueError, AttributeError):
        return None, ".json is not a JSON object"
    if value is None or value == "":
        return None, ""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None, f".json's {label_key!r} is {value!r}: labels are class names or integer ids"
    return str(value), ""


def _add_member(samples: list[Sample], member: tarfile.TarInfo, tar: tarfile.TarFile, label_key: str | None) -> None:
    """Add a tar member to the samples: a new sample where its key differs from the last one's (webdataset's
    grouping); its image's place, or its label (``label_key`` None: not read, predict needs none)."""
    split = _KEY_AND_KIND.match(member.name) if member.isfile() else None
    if split is None or member.name.rsplit("/", 1)[-1].startswith("__"):
        return  # folders, names without an extension, webdataset's __meta__ members: no sample's
    key, kind = split.group(1), split.group(2).lower()
    if not samples or samples[-1].key != key:
        samples.append(Sample(key))
    sample = samples[-1]
    if kind in sample.kinds:
        return  # webdataset refuses a duplicate member; the first is kept
    sample.kinds.append(kind)
    if kind in IMAGE_KINDS:
        if sample.image is None or IMAGE_KINDS.index(kind) < IMAGE_KINDS.index(sample.image[2]):
            sample.image = (member.offset_data, member.size, kind)
    elif label_key is not None and kind in LABEL_KINDS and member.size <= MAX_LABEL_BYTES:
        stream = tar.extractfile(member)
        label, problem = _label_of(kind, stream.read() if stream else b"", label_key)
        if label is not None:
            sample.labels[kind] = label
        elif problem:
            sample.problem = problem


def read_shard(
    filesystem: pafs.FileSystem, path: str, label_key: str | None, size: int | None = None
) -> tuple[list[Sample], str]:
    """A shard's samples, and why the rest could not be read ("" when all could): locally by seeking from header to
    header; in object storage by streaming it once (a ranged read per header would cost a request per sample).
    ``size``, the shard's listed size, tells a truncated shard."""
    samples: list[Sample] = []
    try:
        if is_local(filesystem):
            stream, mode = open(path, "rb"), "r:"  # noqa: SIM115 (closed by the with below; buffered: 1.5x pyarrow's)
        else:
            stream, mode = filesystem.open_input_stream(path, buffer_size=STREAM_BUFFER), "r|"
        with stream, tarfile.open(fileobj=stream, mode=mode) as tar:
            for member in tar:
                _add_member(samples, member, tar, label_key)
        # tarfile reads the file's end as the archive's: a shard cut short (a failed upload) shows by lacking the
        # two zero blocks every tar writer ends an archive with.
        if size is not None and size < tar.offset + 2 * tarfile.BLOCKSIZE:
            whole = [sample for sample in samples if sample.image is None or sum(sample.image[:2]) <= size]
            return whole, f"truncated after {len(whole)} samples (no end-of-archive blocks)"
    except tarfile.TarError as error:
        reason = (
            f"not a tar archive ({error})"
            if not samples
            else f"corrupt or cut short after {len(samples)} samples ({error})"
        )
        return samples, reason
    except EOFError as error:
        return samples, f"truncated after {len(samples)} samples ({error})"
    return samples, ""


# ---------------------------------------------------------------- the listing


def list_items(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """The samples of WebDataset shards (see the module's docstring): one item per sample with an image."""
    root, shards, missing = shard_files(where, option)
    prefix = uri_prefix(where)
    rejected = [(prefix + path, "shard not found (named by the brace pattern)") for path in missing]
    if not shards:
        raise TlRayError(f"{option}: {where.uri} holds no WebDataset shards ({TAR_SUFFIX} files)")
    relative = {
        shard.path: shard.path[len(root) :].lstrip("/") if shard.path.startswith(root) else shard.path
        for shard in shards
    }
    named = {shard.path: _split_of(relative[shard.path]) for shard in shards}
    notes = []
    splits_of: dict[str, str | None] = {shard.path: "" for shard in shards}
    rule = "a held-out share of the samples by hash of shard and key (--val-fraction)"
    if labelled and "train" in named.values() and {"val", "test"} & set(named.values()):
        val_kind = "val" if "val" in named.values() else "test"
        splits_of = {path: {"train": "train", val_kind: "val"}.get(split or "") for path, split in named.items()}
        unused = [path for path, split in splits_of.items() if split is None]
        if unused:
            notes.append(f"{len(unused)} shard(s) of other splits left out, e.g. {prefix}{unused[0]}")
        rule = f"the shards' names: train for training, {'validation' if val_kind == 'val' else 'test'} for validation"
        shards = [shard for shard in shards if splits_of[shard.path] is not None]
    label_key = options.label_column if labelled else None
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        read = list(pool.map(lambda shard: _read_or_fail(where, shard, label_key, prefix, option), shards))
    items, labels, splits, keys, stats, unlabelled = [], [], [], [], [], 0
    for shard, (samples, problem) in zip(shards, read, strict=True):
        shown = prefix + shard.path
        if problem:
            rejected.append((shown, problem))
        seen: set[str] = set()
        for sample in samples:
            item_shown = f"{shown}#{sample.key}"
            if sample.key in seen:
                rejected.append((item_shown, "duplicate key: the shard holds this key twice"))
                continue
            seen.add(sample.key)
            if sample.image is None:
                rejected.append((item_shown, f"no image member (it has: {', '.join(sample.kinds)})"))
                continue
            if labelled and sample.label is None:
                unlabelled += 1
                rejected.append((item_shown, sample.problem or _no_label(sample, options.label_column)))
                continue
            offset, size, _ = sample.image
            items.append(sample_item(shard.path, sample.key, offset, size))
            labels.append(sample.label or "")
            splits.append(splits_of[shard.path] or "")
            keys.append(f"{relative[shard.path]}#{sample.key}")
            stats.append((or_unknown(shard.size), or_unknown(shard.mtime_ns)))
    if labelled and not items and unlabelled:
        raise UsageError(
            f"{option}: none of the {unlabelled} samples of {where.uri} has a label: a .cls (class id) or .txt (class"
            f" name) member, or a .json holding {options.label_column!r} (name its key with --label-column)"
        )
    order = sorted(set(labels), key=numeric_order) if labels and all(_is_id(label) for label in labels) else None
    return Listing(
        NAME,
        where,
        ShardOpener(where.filesystem, prefix),
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


def _read_or_fail(
    where: location.Location, shard: pafs.FileInfo, label_key: str | None, prefix: str, option: str
) -> tuple[list[Sample], str]:
    """``read_shard``; a storage failure (not a malformed shard) is one line naming the shard."""
    path, size = shard.path, shard.size
    try:
        return read_shard(where.filesystem, path, label_key, size)
    except OSError as error:  # gone since listed, unreachable, refused: not the shard's contents
        raise TlRayError(f"{option}: cannot read the shard {prefix}{path}: {location.describe(error)}") from error


def _is_id(label: str) -> bool:
    return label.lstrip("-").isdigit()


def _no_label(sample: Sample, label_key: str) -> str:
    return f"no label: no .cls or .txt member, nor a .json with {label_key!r} (it has: {', '.join(sample.kinds)})"

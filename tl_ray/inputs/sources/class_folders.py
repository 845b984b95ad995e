"""The class-folder source: ROOT/train/<class>/*.jpg (and ROOT/val/, valid/ or validation/, or a stable hash split
of train; ROOT/test/ kept apart), listed the way torchvision's ImageFolder lists it, with each file's size and mtime
from the listing itself.

``discover`` is a run's layout of ROOT, unchanged since before the other sources for a ROOT with train/ and val/ or
train/ alone: the same classes, files, split and cache keys. ``list_items`` lists DIR/<class>/ (evaluate's data,
--val-data); ``check_shape`` refuses the common wrong shapes of a class-folders --data in one line that says what
to pass instead.
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np
import pyarrow.fs as pafs

from tl_ray import location
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs.config import LABEL_PATTERN_HINT, SourceOptions
from tl_ray.inputs.layout import FileOpener, Layout, display_path, no_stats, resolve_filesystem
from tl_ray.inputs.sources.listing import (
    IMAGE_EXTENSIONS,
    MANIFEST_SUFFIXES,
    NOT_UTF8,
    TEST_FOLDER,
    Listing,
    file_info,
    find_classes,
    folders_in,
    has_folder,
    has_folders,
    list_entries,
    list_image_stats,
    list_images,
    readable_stats,
    split_score,
    stats_columns,
    uri_prefix,
    val_folder,
)

NAME = "class folders"


def discover(root: str | location.Location, val_fraction: float = 0.2) -> Layout:
    """Find classes and files under ROOT/train (and ROOT/val, or a hash split of train)."""
    filesystem, base, prefix, where = resolve_filesystem(root)
    root = where.uri
    info = file_info(filesystem, base)
    if info.type == pafs.FileType.NotFound:
        raise TlRayError(f"--data: {root} does not exist")
    if info.type != pafs.FileType.Directory:
        raise TlRayError(f"--data: {root} is a file; expected a folder holding train/<class>/ image folders")
    train_dir = f"{base}/train"
    folders = folders_in(where)  # on object storage one LIST of ROOT answers train/, the val folder and test/
    if not has_folders(where, ("train",), folders):
        raise TlRayError(f"--data: {root} has no train/ folder; expected {root}/train/<class>/*.jpg")
    class_names = find_classes(filesystem, train_dir)
    if len(class_names) < 2:
        raise TlRayError(
            f"--data: {root}/train has {len(class_names)} class folder(s) {class_names}; need at least 2 to classify"
        )
    per_class: dict[int, tuple[list[str], np.ndarray]] = {}
    rejected: list[tuple[str, str]] = []
    for label, name in enumerate(class_names):
        listed, unreadable = readable_stats(list_image_stats(filesystem, f"{train_dir}/{name}"))
        files, stats = stats_columns(listed)
        del listed
        rejected += unreadable
        if not files and unreadable:
            raise TlRayError(f"--data: {display_path(unreadable[0][0])}: {NOT_UTF8} (no other image in its class)")
        if not files:
            raise TlRayError(
                f"--data: class folder {prefix}{train_dir}/{name} has no images ({', '.join(IMAGE_EXTENSIONS)});"
                " add some or remove the folder"
            )
        per_class[label] = files, stats
    val_name = val_folder(where, folders=folders)
    if val_name is not None:
        val, val_stats = _folder_val(filesystem, f"{base}/{val_name}", class_names, f"{root}/{val_name}", rejected)
        train = [(path, label) for label, (files, _) in per_class.items() for path in files]
        train_stats = np.concatenate([stats for _, stats in per_class.values()])
        source = "folder" if val_name == "val" else f"train/ and {val_name}/ folders"
    else:
        train, val, train_stats, val_stats = _hash_split(per_class, train_dir, val_fraction)
        source = "split"
    rejected = [(prefix + p, r) for p, r in rejected]
    test, notes = [], []
    tested = kept_apart(where, folders)
    if tested is not None:
        index = {name: label for label, name in enumerate(class_names)}
        test = [(item, index.get(label, -1)) for item, label in zip(tested.items, tested.labels, strict=True)]
        notes = tested.notes
    return Layout(
        root,
        filesystem,
        prefix,
        class_names,
        train,
        val,
        source,
        rejected,
        train_stats,
        val_stats,
        notes=notes,
        test=test,
    )


def _folder_val(
    filesystem: pafs.FileSystem, val_dir: str, class_names: list[str], shown: str, rejected: list[tuple[str, str]]
) -> tuple[list[tuple[str, int]], np.ndarray]:
    val_classes = find_classes(filesystem, val_dir)
    unknown = sorted(set(val_classes) - set(class_names))
    if unknown:
        raise TlRayError(f"--data: {shown} has classes that train/ lacks: {', '.join(unknown)}")
    index = {name: label for label, name in enumerate(class_names)}
    val, stats = [], [no_stats()]
    for name in val_classes:
        listed, unreadable = readable_stats(list_image_stats(filesystem, f"{val_dir}/{name}"))
        rejected += unreadable
        files, class_stats = stats_columns(listed)
        val += [(path, index[name]) for path in files]
        stats.append(class_stats)
    if not val:
        raise TlRayError(f"--data: {shown} has no images; add some, or remove it to split train/ by --val-fraction")
    return val, np.concatenate(stats)


def _hash_split(
    per_class: dict[int, tuple[list[str], np.ndarray]], train_dir: str, val_fraction: float
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], np.ndarray, np.ndarray]:
    """(train, val) and their stats: each file held out by its path's hash."""
    train, val, train_stats, val_stats = [], [], [no_stats()], [no_stats()]
    for label, (files, stats) in per_class.items():
        scores = np.asarray([split_score(os.path.relpath(path, train_dir)) for path in files])
        held = scores < val_fraction
        if held.all():  # never leave a class with nothing to learn from: keep its highest-scoring file
            held[scores.argmax()] = False
        train += [(path, label) for path, out in zip(files, held, strict=True) if not out]
        val += [(path, label) for path, out in zip(files, held, strict=True) if out]
        train_stats.append(stats[~held])
        val_stats.append(stats[held])
    return train, val, np.concatenate(train_stats), np.concatenate(val_stats)


# ---------------------------------------------------------------- DIR/<class>/ as a listing


def list_items(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """DIR/<class>/ images (evaluate's and --val-data's class folders): labels from the folder names."""
    check_shape_dirs(where, option)
    filesystem = where.filesystem
    items, labels, stats, rejected = [], [], [no_stats()], []
    for name in find_classes(filesystem, where.path):
        listed, unreadable = readable_stats(list_image_stats(filesystem, f"{where.path}/{name}"))
        paths, class_stats = stats_columns(listed)
        items += paths
        labels += [name] * len(paths)
        stats.append(class_stats)
        rejected += unreadable
    prefix = uri_prefix(where)
    return Listing(
        NAME,
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


def with_val_data(where: location.Location) -> Listing:
    """Class folders (ROOT/train/<class>/, ROOT/val/<class>/, ROOT/test/<class>/) as a listing, for a run with
    --val-data: the val folder is left out, the test folder kept apart."""
    train = list_items(where.join("train"), SourceOptions())
    folders = folders_in(where)
    val_name = val_folder(where, folders=folders)
    test = kept_apart(where, folders) or Listing(NAME, where, train.opener, [], [], [], no_stats(), [])
    return Listing(
        NAME,
        where,
        train.opener,
        train.items + test.items,
        train.labels + test.labels,
        ["train"] * len(train.items) + ["test"] * len(test.items),
        np.concatenate([train.stats, test.stats]),
        train.keys + [f"{TEST_FOLDER}/{key}" for key in test.keys],
        rejected=train.rejected,
        notes=[f"ROOT/{val_name}/ left out: --val-data is the val set"] * (val_name is not None) + test.notes,
    )


def kept_apart(where: location.Location, folders: set[str] | None = None) -> Listing | None:
    """ROOT/test/<class>/ as a listing (None without a test/ folder): the test split, which a run keeps apart.
    ``folders``: ROOT's folders, if already listed (``listing.folders_in``)."""
    if not has_folders(where, (TEST_FOLDER,), folders):
        return None
    folder = where.join(TEST_FOLDER)
    if not find_classes(where.filesystem, folder.path):  # unlabelled test images (Kaggle's): nothing to score
        note = f"{TEST_FOLDER}/ holds no <class>/ image folders: left out (unlabelled)"
        return Listing(
            NAME, where, FileOpener(where.filesystem, uri_prefix(where)), [], [], [], no_stats(), [], notes=[note]
        )
    test = list_items(folder, SourceOptions())
    test.notes.append(
        f"{TEST_FOLDER}/: {len(test.items):,} image(s) kept apart (never trained or validated on); score them with"
        f" tl-ray evaluate --data {where.join(TEST_FOLDER).uri}"
    )
    return test


# ---------------------------------------------------------------- the wrong shapes, refused


def check_shape(where: location.Location, option: str = "--data") -> None:
    """The common wrong shapes of a class-folders --data, each refused in one line that says what to pass."""
    if has_folder(where, "train"):
        train = f"{where.path}/train"
        if not find_classes(where.filesystem, train):
            _refuse_flat(where.filesystem, train, where.join("train").uri, option)
        return
    entries = list_entries(where.filesystem, where.path, False)
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
    classes = find_classes(where.filesystem, where.path)
    if classes and where.name.lower() in ("train", "training"):
        raise TlRayError(
            f"{option}: {where.uri} is a train/ folder itself (its {len(classes)} sub-folders are the classes);"
            f" pass the folder above it: {option} {where.parent().uri}"
        )
    if not classes:
        _refuse_flat(where.filesystem, where.path, where.uri, option)


def check_shape_dirs(where: location.Location, option: str) -> None:
    """DIR/<class>/ (evaluate, --val-data): a folder with class folders in it, else refused in one line."""
    if where.info(option).type != pafs.FileType.Directory:
        raise TlRayError(f"{option}: {where.uri} is not a folder of <class>/ image folders")
    if not find_classes(where.filesystem, where.path):
        _refuse_flat(where.filesystem, where.path, where.uri, option)
        raise TlRayError(f"{option}: {where.uri} holds no <class>/ image folders")


def _refuse_flat(filesystem: pafs.FileSystem, folder: str, shown: str, option: str) -> None:
    """Images directly in ``folder``, no class folders: refused, saying where the labels may be. A --label-pattern
    is suggested only once checked on these names (two or more classes, several images each); a table beside the
    images is named, as it is likely what holds the labels."""
    images = list_images(filesystem, folder)
    if not images:
        return
    found = f"{option}: found {len(images):,} images directly in {shown} and no class folders"
    tables = sorted(
        entry.base_name
        for entry in list_entries(filesystem, folder, False)
        if entry.type == pafs.FileType.File and entry.base_name.lower().endswith(MANIFEST_SUFFIXES)
    )
    if tables:
        raise UsageError(
            f"{found}: are the labels in {tables[0]}? pass it: {option} {shown}/{tables[0]} (--path-column,"
            " --label-column name its columns)"
        )
    pattern = suggest_label_pattern(images)
    if pattern is None:
        raise UsageError(
            f"{found}, and their names hold no label: put each class's images in {shown}/<class>/, or list them in"
            " a manifest of path,label (--data FILE.csv)"
        )
    raise UsageError(f"{found}: are the labels in the file names? try --label-pattern '{pattern}'")


def suggest_label_pattern(paths: list[str]) -> str | None:
    r"""A --label-pattern for these files, checked on their names: the letters before the separator most of them
    have after their first word (``cat.0.jpg``: ``^(\w+)\.``, ``circle_0050.jpg``: ``^([A-Za-z]+)_``); None when
    it would not label them: fewer than two classes, or about one image per class (``0001.jpg``: each its own)."""
    names = [path.rsplit("/", 1)[-1] for path in paths[:1000]]
    separators = collections.Counter(found.group(1) for name in names if (found := re.match(r"[A-Za-z]+([._-])", name)))
    if not separators:
        return None
    separator = separators.most_common(1)[0][0]
    pattern = LABEL_PATTERN_HINT if separator == "." else f"^([A-Za-z]+){re.escape(separator)}"
    labels = [found.group(1) for name in names if (found := re.search(pattern, name))]
    classes = len(set(labels))
    if len(labels) < len(names) / 2 or classes < 2 or classes * 2 > len(labels):
        return None
    return pattern

"""The class-folder source: ROOT/train/<class>/*.jpg (and ROOT/val/, or a stable hash split of train), listed
the way torchvision's ImageFolder lists it, with each file's size and mtime from the listing itself."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow.fs as pafs

from tl_ray import location
from tl_ray.errors import TlRayError
from tl_ray.inputs.layout import Layout, display_path, is_local, no_stats, resolve_filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def _info(filesystem: pafs.FileSystem, path: str) -> pafs.FileInfo:
    try:
        return filesystem.get_file_info(path)
    except OSError as error:
        raise TlRayError(f"--data: cannot read {path}: {error}") from error


def _list(filesystem: pafs.FileSystem, path: str, recursive: bool) -> list[pafs.FileInfo]:
    try:
        return filesystem.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except (OSError, UnicodeDecodeError) as error:
        raise TlRayError(f"--data: cannot list {path}: {error}") from error


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_classes(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """Sorted sub-folder names (symlinks to folders count): the same classes and order as ImageFolder."""
    if not is_local(filesystem):
        entries = _list(filesystem, folder, False)
        return sorted(entry.base_name for entry in entries if entry.type == pafs.FileType.Directory)
    try:
        with os.scandir(folder) as entries:
            names = sorted(entry.name for entry in entries if entry.is_dir())
    except OSError as error:
        raise TlRayError(f"--data: cannot list {folder}: {error.strerror}") from error
    for name in names:
        if not _utf8(name):
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
        paths = [entry.path for entry in _list(filesystem, folder, True) if entry.type == pafs.FileType.File]
    return sorted(path for path in paths if _is_image(path))


Listed = tuple[str, int, int]  # (path, size, mtime in ns); -1, -1 for a file gone or a dangling link


def list_image_stats(filesystem: pafs.FileSystem, folder: str) -> list[Listed]:
    """``list_images`` with each file's size and modification time, sorted by path.

    A remote listing returns them with the names (an S3 LIST page: 1,000 objects); locally, one ``stat`` per
    file. A file that cannot be stat'ed stays listed (decoding it reports why it is bad).
    """
    if not is_local(filesystem):
        return sorted(
            (entry.path, _or_unknown(entry.size), _or_unknown(entry.mtime_ns))
            for entry in _list(filesystem, folder, True)
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


def _or_unknown(value: int | None) -> int:
    return -1 if value is None else int(value)


def _columns(listed: list[Listed]) -> tuple[list[str], np.ndarray]:
    """(paths, int64 (n, 2) of sizes and mtimes): a million files' stats in 16 MB, not 120 MB of tuples."""
    stats = np.fromiter((value for _, size, mtime in listed for value in (size, mtime)), np.int64, 2 * len(listed))
    return [path for path, _, _ in listed], stats.reshape(-1, 2)


NOT_UTF8 = "file name is not valid UTF-8; rename the file"


def readable_names(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(paths Ray Data and Arrow can carry, (display path, reason) for those they cannot)."""
    good = [path for path in paths if _utf8(path)]
    rejected = [(display_path(path), NOT_UTF8) for path in paths if not _utf8(path)]
    return good, rejected


def _split_score(relative_path: str) -> float:
    """A stable number in [0, 1) per file, so the split never changes between runs or machines."""
    digest = hashlib.sha1(relative_path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def discover(root: str | location.Location, val_fraction: float = 0.2) -> Layout:
    """Find classes and files under ROOT/train (and ROOT/val, or a hash split of train)."""
    filesystem, base, prefix, where = resolve_filesystem(root)
    root = where.uri
    info = _info(filesystem, base)
    if info.type == pafs.FileType.NotFound:
        raise TlRayError(f"--data: {root} does not exist")
    if info.type != pafs.FileType.Directory:
        raise TlRayError(f"--data: {root} is a file; expected a folder holding train/<class>/ image folders")
    train_dir = f"{base}/train"
    if _info(filesystem, train_dir).type != pafs.FileType.Directory:
        raise TlRayError(f"--data: {root} has no train/ folder; expected {root}/train/<class>/*.jpg")
    class_names = find_classes(filesystem, train_dir)
    if len(class_names) < 2:
        raise TlRayError(
            f"--data: {root}/train has {len(class_names)} class folder(s) {class_names}; need at least 2 to classify"
        )
    per_class: dict[int, tuple[list[str], np.ndarray]] = {}
    rejected: list[tuple[str, str]] = []
    for label, name in enumerate(class_names):
        listed, unreadable = _readable(list_image_stats(filesystem, f"{train_dir}/{name}"))
        files, stats = _columns(listed)
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
    val_dir = f"{base}/val"
    if _info(filesystem, val_dir).type == pafs.FileType.Directory:
        val, val_stats = _folder_val(filesystem, val_dir, class_names, root, rejected)
        train = [(path, label) for label, (files, _) in per_class.items() for path in files]
        train_stats = np.concatenate([stats for _, stats in per_class.values()])
        source = "folder"
    else:
        train, val, train_stats, val_stats = _hash_split(per_class, train_dir, val_fraction)
        source = "split"
    rejected = [(prefix + p, r) for p, r in rejected]
    return Layout(root, filesystem, prefix, class_names, train, val, source, rejected, train_stats, val_stats)


def _readable(listed: list[Listed]) -> tuple[list[Listed], list[tuple[str, str]]]:
    """``readable_names`` of a listing with its stats."""
    good = [entry for entry in listed if _utf8(entry[0])]
    rejected = [(display_path(path), NOT_UTF8) for path, _, _ in listed if not _utf8(path)]
    return good, rejected


def _folder_val(
    filesystem: pafs.FileSystem, val_dir: str, class_names: list[str], root: str, rejected: list[tuple[str, str]]
) -> tuple[list[tuple[str, int]], np.ndarray]:
    val_classes = find_classes(filesystem, val_dir)
    unknown = sorted(set(val_classes) - set(class_names))
    if unknown:
        raise TlRayError(f"--data: {root}/val has classes that train/ lacks: {', '.join(unknown)}")
    index = {name: label for label, name in enumerate(class_names)}
    val, stats = [], [no_stats()]
    for name in val_classes:
        listed, unreadable = _readable(list_image_stats(filesystem, f"{val_dir}/{name}"))
        rejected += unreadable
        files, class_stats = _columns(listed)
        val += [(path, index[name]) for path in files]
        stats.append(class_stats)
    if not val:
        raise TlRayError(f"--data: {root}/val has no images; add some, or remove it to split train/ by --val-fraction")
    return val, np.concatenate(stats)


def _hash_split(
    per_class: dict[int, tuple[list[str], np.ndarray]], train_dir: str, val_fraction: float
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], np.ndarray, np.ndarray]:
    """(train, val) and their stats: each file held out by its path's hash."""
    train, val, train_stats, val_stats = [], [], [no_stats()], [no_stats()]
    for label, (files, stats) in per_class.items():
        scores = np.asarray([_split_score(os.path.relpath(path, train_dir)) for path in files])
        held = scores < val_fraction
        if held.all():  # never leave a class with nothing to learn from: keep its highest-scoring file
            held[scores.argmax()] = False
        train += [(path, label) for path, out in zip(files, held, strict=True) if not out]
        val += [(path, label) for path, out in zip(files, held, strict=True) if out]
        train_stats.append(stats[~held])
        val_stats.append(stats[held])
    return train, val, np.concatenate(train_stats), np.concatenate(val_stats)

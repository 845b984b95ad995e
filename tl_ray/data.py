"""Where the images are, what their classes are, and the Ray Data pipelines that feed training.

The driver only ever holds the file list; decoding and augmentation run in Ray Data
tasks, streamed to the training workers. A file that cannot be read or decoded is
dropped from the stream and recorded (path and reason) in a small actor, so one bad
JPEG never stops a long run and never takes good images down with it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from ray.data import RandomSeedConfig
from torchvision.transforms import v2

from tl_ray import location, recipe
from tl_ray.errors import TlRayError

logger = logging.getLogger(__name__)

# torchvision's IMG_EXTENSIONS plus GIF (first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BLOCK_ROWS = 32  # files per Ray Data block: small blocks keep epochs well mixed and decode tasks short


def _no_stats() -> np.ndarray:
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
    train_stats: np.ndarray = dataclasses.field(default_factory=_no_stats)  # int64 (len(train), 2)
    val_stats: np.ndarray = dataclasses.field(default_factory=_no_stats)  # int64 (len(val), 2)
    # How an item's bytes are read (``sources.Opener``): None, a file of ``filesystem`` (class folders). The paths
    # of ``train`` and ``val`` are items of their opener; ``val_opener`` (None: ``opener``) reads a --val-data set.
    opener: Any = None
    val_opener: Any = None
    source: str = "class folders"  # what --data was recognised as (sources.discover), for messages and inspect
    notes: list[str] = dataclasses.field(default_factory=list)  # what the listing decided that a user may want to know

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


def _is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem)


def display_path(path: str) -> str:
    """The path as it can be printed and stored: bytes of a non-UTF-8 file name shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_classes(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """Sorted sub-folder names (symlinks to folders count): the same classes and order as ImageFolder."""
    if not _is_local(filesystem):
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
    if _is_local(filesystem):
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
    if not _is_local(filesystem):
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
    val, stats = [], [_no_stats()]
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
    train, val, train_stats, val_stats = [], [], [_no_stats()], [_no_stats()]
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


def load_rgb(data: bytes, min_short_side: int | None = None) -> Image.Image:
    """Decode any image PIL reads into upright 8-bit RGB.

    16-bit and float greyscale are rescaled rather than clipped (PIL's own
    ``convert("RGB")`` would turn most 16-bit images white); EXIF orientation is
    applied so phone photos are the right way up. With ``min_short_side``, a JPEG
    much larger than that is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (PIL's draft mode), never below ``min_short_side``: a 4000x3000 phone photo
    bound for a 256-pixel resize decodes about 10x faster.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if min_short_side and image.format == "JPEG" and min(image.size) >= 2 * min_short_side:
            factor = min_short_side / min(image.size)
            image.draft(None, (math.ceil(image.width * factor), math.ceil(image.height * factor)))
        image.load()
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block must not cost us a good image
        logger.debug("ignoring unreadable EXIF orientation")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255):
            pixels = pixels / 257.0  # 16-bit range onto 8 bits
        elif image.mode == "F" and pixels.max(initial=0) <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def resize_size(image_size: int, crop_fraction: float = recipe.EVAL_CROP_FRACTION) -> int:
    """The short side validation resizes to before its centre crop of ``image_size``."""
    return math.ceil(image_size / crop_fraction - 1e-6)  # a fraction read back as 224 / 232 must give 232, not 233


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """The first step of ``eval_transform``, alone: the decoded-image cache stores its output."""
    return v2.Resize(short_side, antialias=True)(image)


def train_transform(
    image_size: int, color_jitter: float = 0.0, crop_scale: tuple[float, float] = recipe.STANDARD_CROP_SCALE
) -> v2.Compose:
    """Augmentation on PIL images (PIL's resize is the fast one on CPU); uint8 CHW out.

    ``crop_scale``: the random crop's share of the image area. ImageNet recipes use 0.08-1; on the
    small datasets people fine-tune on, and on small images, crops that small often miss the object
    (fastai's fine-tuning default is 0.35; tl_ray.recipe picks by image size).
    """
    steps = [v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip()]
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    return v2.Compose([*steps, v2.PILToTensor()])


def augmentation(
    image_size: int, crop_scale: tuple[float, float] | None, color_jitter: float = 0.0, short_side: int | None = None
) -> v2.Compose:
    """Random crops of ``crop_scale`` and flips, or, with ``crop_scale`` None, the validation centre crop."""
    if crop_scale is None:
        return eval_transform(image_size, short_side)
    return train_transform(image_size, color_jitter, crop_scale)


def eval_transform(image_size: int, short_side: int | None = None) -> v2.Compose:
    """Deterministic resize (to ``short_side``, by default ``resize_size(image_size)``) + centre crop; predict
    and evaluate use exactly this, with the short side the checkpoint records."""
    short_side = short_side or resize_size(image_size)
    return v2.Compose([v2.Resize(short_side, antialias=True), v2.CenterCrop(image_size), v2.PILToTensor()])


def deal_rows(count: int, rank: int, world: int, training: bool, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    """The rows of a split held in memory that one worker takes in one epoch.

    Training: a new permutation each epoch (the same on every worker, from ``seed`` and
    ``epoch``, so a resumed run sees the orders it would have), dealt in equal shards as Ray
    Data's equal split does (DDP steps in lockstep). Validation: every row once, on one
    worker or another.
    """
    if not training:
        return torch.arange(rank, count, world)
    shard = count // world
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator)[rank * shard : (rank + 1) * shard]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> normalised float, done on the training device so the pipeline ships 4x fewer bytes."""
    return (images.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class SkipLog:
    """Files a run dropped, (path, reason), and each training file's label, to notice a class with nothing left to
    learn.

    Held by the driver, and copied to the workers, when every file is decoded before training starts (into the
    cache): the record is complete then, and needs no process of its own. ``SkippedFiles`` is the same record as
    an actor, for runs whose decode tasks find bad files while they train (``--cache none``).
    """

    def __init__(self, reasons: dict[str, str] | None = None, train_labels: dict[str, int] | None = None) -> None:
        self._reasons: dict[str, str] = dict(reasons or {})
        self._train_labels: dict[str, int] = dict(train_labels or {})

    def add(self, items: list[tuple[str, str]], train_labels: list[int] | None = None) -> None:
        """``train_labels``, given for training files, lets the run notice a class with nothing left to learn."""
        for path, reason in items:
            self._reasons.setdefault(path, reason)
        if train_labels is not None:
            self._train_labels.update((path, int(label)) for (path, _), label in zip(items, train_labels, strict=True))

    def get(self) -> dict[str, str]:
        return dict(self._reasons)

    def train_counts(self) -> dict[int, int]:
        """Skipped training files per class label."""
        return dict(collections.Counter(self._train_labels.values()))

    def state(self) -> tuple[dict[str, str], dict[str, int]]:
        """What ``SkippedFiles.remote(*log.state())`` starts from."""
        return dict(self._reasons), dict(self._train_labels)


@ray.remote(num_cpus=0)
class SkippedFiles(SkipLog):
    """A ``SkipLog`` that every decode task of a run adds to while the run trains."""


Skips = SkipLog | ray.actor.ActorHandle  # a SkipLog here, or a SkippedFiles actor's handle


def _call(skipped: Skips, method: str, *args: Any) -> Any:
    """``method`` of the skip log, here or on its actor."""
    if isinstance(skipped, SkipLog):
        return getattr(skipped, method)(*args)
    return ray.get(getattr(skipped, method).remote(*args))


def add_skips(skipped: Skips, items: list[tuple[str, str]], train_labels: list[int] | None = None) -> None:
    _call(skipped, "add", items, train_labels)


def skipped_files(skipped: Skips) -> dict[str, str]:
    return _call(skipped, "get")


def skipped_train_counts(skipped: Skips) -> dict[int, int]:
    return _call(skipped, "train_counts")


def release_skips(skipped: Skips) -> None:
    if not isinstance(skipped, SkipLog):
        ray.kill(skipped)


def task_pool(blocks: int) -> ray.data.TaskPoolStrategy:
    """At most one pipeline task per CPU of the cluster, and no more than the ``blocks`` there are to map
    (Ray warns of a pool larger than its inputs).

    Our tasks ask for half a CPU so they fit beside training workers that hold all but a
    fraction of one; left to that alone, Ray runs two per core, and image decoding packed
    like that ran 3x slower on a 2-core machine (bench/ingest.py: 98 vs 300 images/s).
    """
    return ray.data.TaskPoolStrategy(size=max(1, min(blocks, int(ray.cluster_resources().get("CPU", 1)))))


_ray_output = {"verbose": True, "started_here": False}  # the Python API shows Ray's output as Ray prints it


def quiet_ray(verbose: bool) -> None:
    """Whether Ray's own output reaches this process's console: its workers' and actors' logs (Ray Train's
    per-worker report dumps, Ray Data's execution plans), Ray Data's progress bars, Ray's INFO lines and
    Tune's status table. The CLI turns them off unless --verbose (it prints its own progress); errors still
    surface as exceptions. Call before Ray starts: its workers' output is chosen at ``ray.init``."""
    _ray_output["verbose"] = verbose
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("ray.data").setLevel(level)
    logging.getLogger("ray.data._internal.progress").setLevel(level if verbose else logging.ERROR)  # "bars disabled"
    # Ray 2.60 warns at every start that token authentication is on (its default, which we keep).
    logging.getLogger("ray._private.authentication").setLevel(level if verbose else logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:  # Tune's newer output engine prints its experiment banner even at verbose=0; the older is silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def ray_is_verbose() -> bool:
    return _ray_output["verbose"]


def ensure_ray() -> bool:
    """Connect to the cluster in RAY_ADDRESS, else start a new local one; True if tl-ray started Ray in this
    process (a cluster of its own, which no other node joins).

    Without RAY_ADDRESS, a new local instance rather than Ray's default of joining whatever
    cluster this machine last started: a stale or unrelated one would hang or mix runs.
    (``RAY_ADDRESS=auto`` joins a `ray start` cluster on this machine.)
    """
    if ray.is_initialized():
        return _ray_output["started_here"]
    verbose = _ray_output["verbose"]
    output = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **output)
        return False
    # Token authentication stays as Ray 2.60 sets it; the dashboard answers on loopback only.
    ray.init(address="local", dashboard_host="127.0.0.1", **output)
    _ray_output["started_here"] = True
    return True


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    if _is_local(filesystem):
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


def decode_item(opener: Any, item: str, transform: v2.Compose, min_short_side: int) -> np.ndarray:
    """One item of any source (``opener`` reads it) to a uint8 CHW array; raises on any way the item can be bad.

    ``min_short_side``: the transform's first resize target, which lets large JPEGs decode at a reduced scale.
    """
    return transform(load_rgb(opener.read(item), min_short_side)).numpy()


def describe_error(error: Exception) -> str:
    """The reason a file was skipped, in one line."""
    if isinstance(error, UnidentifiedImageError):  # its message only names an in-memory buffer
        return "not an image file PIL can identify"
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _decode_batch(
    batch: dict[str, np.ndarray],
    opener: Any,
    image_size: int,
    training: bool,
    crop_scale: tuple[float, float] | None,
    color_jitter: float,
    skipped: ray.actor.ActorHandle,
    short_side: int,
) -> dict[str, np.ndarray]:
    transform = augmentation(image_size, crop_scale if training else None, color_jitter, short_side)
    images, labels, bad, bad_labels = [], [], [], []
    for path, label in zip(batch["path"], batch["label"], strict=True):
        try:
            images.append(decode_item(opener, path, transform, short_side))
            labels.append(label)
        except Exception as error:  # every way a file can be bad: skip it, keep the batch
            reason = describe_error(error)
            bad.append((opener.display(path), reason))
            bad_labels.append(int(label))
            logger.warning("skipping %s: %s", opener.display(path), reason)
    if bad:
        ray.get(skipped.add.remote(bad, bad_labels if training else None))
    return {
        "image": np.stack(images) if images else np.zeros((0, 3, image_size, image_size), np.uint8),
        "label": np.asarray(labels, dtype=np.int64),
    }


def file_rows(rows: list[dict]) -> ray.data.Dataset:
    """One row per file, ``BLOCK_ROWS`` files to a block (at most 1000 blocks): what every decode pass reads."""
    return ray.data.from_items(rows, override_num_blocks=row_blocks(len(rows)))


def file_columns(columns: dict[str, list | np.ndarray]) -> ray.data.Dataset:
    """``file_rows`` from columns: a million files go to Ray as Arrow blocks, not a million row dicts."""
    table = pa.table(columns)
    count = table.num_rows
    blocks = row_blocks(count)
    size = math.ceil(count / blocks) if count else 0
    return ray.data.from_arrow([table.slice(start, size) for start in range(0, max(count, 1), max(size, 1))])


def row_blocks(count: int) -> int:
    """The blocks ``file_rows`` makes of ``count`` files."""
    return max(1, min(1000, math.ceil(count / BLOCK_ROWS)))


def image_dataset(
    files: list[tuple[str, int]],
    layout: Layout,
    image_size: int,
    training: bool,
    skipped: ray.actor.ActorHandle,
    color_jitter: float = 0.0,
    seed: int = 0,
    crop_scale: tuple[float, float] | None = recipe.STANDARD_CROP_SCALE,
    short_side: int | None = None,
) -> ray.data.Dataset:
    """A lazily decoded dataset of {"image": uint8 (3, S, S), "label": int64}.

    Training data (``training=True``) comes in a new order every epoch without an
    all-to-all shuffle (whose 1-CPU tasks would stall on a machine whose training
    workers hold all but a fraction of a CPU): the file list is shuffled once here,
    so every block mixes classes, and the block order is redrawn each epoch. The
    training loop's local shuffle buffer mixes rows across blocks. Skipped files of the
    training dataset are also counted per class. Training images are randomly cropped
    (``crop_scale`` of the area) and flipped, or with ``crop_scale`` None centre-cropped like
    validation images (resized to ``short_side``, by default ``resize_size(image_size)``, first).
    """
    rows = [{"path": path, "label": label} for path, label in files]
    if training and not getattr(layout.opener_of(files), "sequential", False):  # Parquet rows: see cache._build
        random.Random(seed).shuffle(rows)
    dataset = file_rows(rows)
    if training:
        dataset = dataset.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return dataset.map_batches(
        _decode_batch,
        batch_size=BLOCK_ROWS,
        # Half a CPU per decode task: a machine whose training workers hold all but one CPU (and a
        # sweep's trial driver a sliver of that) must still fit one, or ingest never starts.
        num_cpus=0.5,
        compute=task_pool(row_blocks(len(rows))),
        batch_format="numpy",
        fn_kwargs={
            "opener": layout.opener_of(files),
            "image_size": image_size,
            "training": training,
            "crop_scale": crop_scale,
            "color_jitter": color_jitter,
            "skipped": skipped,
            "short_side": short_side or resize_size(image_size),
        },
    )

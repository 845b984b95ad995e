"""The decoded-image cache: each image decoded and resized once, then reused by every epoch, run and sweep trial.

Decoding a JPEG costs more than everything else the pipeline does to it, and without
a cache a run decodes every file once per epoch (a sweep, once per epoch per trial).
The cache holds each file decoded (upright RGB) and resized so that its short side is
the validation resize size (``imaging.resize_size``: the weights' own crop fraction, by default
``ceil(image_size / 0.875)``), with the weights' own filter (``imaging.Resize``: bilinear, or timm's
bicubic, ...): validation is then a centre
crop of the cached pixels, exactly what predict computes from the file, and training's
random crops and flips run on the same uint8 pixels.

A split's cache lives in ``ROOT/<family>-<key>/``. The key covers every file's path, label,
and the size and modification time the listing returned with it (``Layout.train_stats``), the
resolution, its interpolation (when not bilinear: a cache built before there were others keeps its key) and the
stored format: a changed, added or removed file gives a new key (a rebuild), never
a stale cache, and a run over a built cache reads one manifest and asks the data location nothing
per file. The family names the dataset's split, size and interpolation: once a build completes, the older caches of
its family (complete ones, with a tl-ray manifest) are deleted. ``manifest.json``, written last,
names the Parquet files of the build that completed, their bytes and the files that could not be
decoded, so a later run reports them without trying them again. Concurrent builders (two sweep
trials, two runs) each write their own files; the last manifest wins, and every manifest is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from tl_ray import cluster, location, progress
from tl_ray.errors import TlRayError
from tl_ray.inputs import imaging, pipelines, reading, skiplog
from tl_ray.inputs.layout import Layout, resolve_filesystem

CACHE_VERSION = 3  # 2: keyed by the listing's stats, folders named by family, encoded formats; 3: JPEG 4:4:4
MANIFEST = "manifest.json"
# How "pixels" holds a cached image: raw RGB, or an image file of it (PIL's save options). Sizes and decode costs
# of each: BENCHMARKS.md, section 8 (bench/cache_format.py).
ENCODINGS: dict[str, dict] = {
    "raw": {},
    "png": {"format": "PNG", "compress_level": 1},
    # Chroma at every pixel (4:4:4), not PIL's default 4:2:0: at the cache's small sizes (37 px for 32 px crops)
    # colour averaged over 2x2 pixels blurs shapes told from their background by hue (the sample shapes at 100 a
    # class from scratch: 0.581 with 4:2:0 against 0.657 from the files; BENCHMARKS.md section 10).
    "jpeg": {"format": "JPEG", "quality": 90, "subsampling": 0},
}
# Training images as JPEG: 5.2x smaller than raw at 224 px (50 vs 260 KB), for ~1 ms more decoding per image
# and epoch when streamed (held in memory, once per run); crops and flips make its loss invisible to training.
# Validation raw: its centre crops stay exactly what predict computes from the file.
SPLIT_FORMATS = {"train": "jpeg", "val": "raw"}
DEFAULT_FORMAT = "raw"  # a split not named
BYTES_PER_PIXEL = {"raw": 3.0, "png": 2.1, "jpeg": 0.68}  # of the photos bench/cache_format.py measures
DEFAULT_FOLDER = ".tl-ray-cache"  # under --storage: shared storage on a cluster, so every node sees it
CACHE_SCHEMA = pa.schema(
    [("label", pa.int64()), ("height", pa.int32()), ("width", pa.int32()), ("pixels", pa.binary())]
)  # pixels: height x width x 3 uint8, row-major RGB


@dataclass(frozen=True)
class CachedSplit:
    """A built cache of one split: where its Parquet files are and what could not be decoded."""

    filesystem: pafs.FileSystem
    folder: str
    parquet_files: list[str]
    rows: int
    skipped: list[tuple[str, str, int]]  # (path as the user sees it, reason, label)
    built: bool  # True when this call decoded the images, False when an earlier build was reused
    resize: imaging.Resize  # the images' short side and filter: validation's resize, done once
    image_format: str = "raw"  # how "pixels" holds them: raw RGB bytes, or an encoded file (ENCODINGS)
    # (path, reason, label) of the files the storage failed to deliver: not bad, not cached; the next run retries
    unreadable: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)

    @property
    def short_side(self) -> int:
        return self.resize.short_side


def resolve_root(cache: str, storage: location.Location) -> location.Location | None:
    """Where caches go: ``--cache auto`` puts them under --storage, ``none`` turns caching off."""
    if cache == "none":
        return None
    if cache == "auto":
        return storage.join(DEFAULT_FOLDER)
    return location.resolve(cache, "--cache")


def _resize_key(resize: imaging.Resize) -> list:
    """The resize as the keys hold it: the short side, and the filter only when it is not bilinear, so that every
    cache built before the weights' interpolation was used (all bilinear) keeps its key and is reused."""
    return [resize.short_side] if resize.is_default else [resize.short_side, resize.interpolation]


def split_key(
    files: list[tuple[str, int]], stats: np.ndarray, layout: Layout, resize: imaging.Resize, image_format: str
) -> str:
    """A fingerprint of the split's files (path, label, and the size and mtime the listing returned), the cached
    resolution and filter (``_resize_key``) and format with its save options: validating a cache is reading the
    manifest this names, with no request per file, and a change to an encoding (JPEG's chroma, say) keys a new build
    without a version bump. A bicubic cache is never reused for a bilinear run, nor the reverse."""
    encoding = [image_format, ENCODINGS[image_format]]
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, *_resize_key(resize), encoding, layout.uri_prefix]).encode())
    if len(stats) != len(files):
        raise ValueError(f"{len(files)} files but {len(stats)} stats")
    for start in range(0, len(files), 10_000):  # a million stats as Python ints at once would be ~120 MB
        chunk = stats[start : start + 10_000].tolist()
        for (path, label), (size, mtime) in zip(files[start : start + 10_000], chunk, strict=True):
            digest.update(f"\0{path}\0{label}\0{size}\0{mtime}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def family_key(layout: Layout, split: str, resize: imaging.Resize) -> str:
    """What a newer build of the same dataset's split at the same size and filter supersedes: its caches share this
    prefix. A bicubic build does not delete the bilinear one (runs of torchvision and timm backbones alternate)."""
    named = [layout.uri_prefix + layout.root, split, *_resize_key(resize)]
    return hashlib.sha256(json.dumps(named).encode()).hexdigest()[:16]


def _read_json(filesystem: pafs.FileSystem, path: str) -> object:
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):
        return None


def read_manifest(filesystem: pafs.FileSystem, folder: str, version: int = CACHE_VERSION) -> dict | None:
    """The manifest of a complete build in ``folder``, or None (never built, interrupted, an older format, or a
    build that some files' storage failed: those are read again, never taken as bad)."""
    manifest = _read_json(filesystem, f"{folder}/{MANIFEST}")
    if not isinstance(manifest, dict) or manifest.get("version") != version or manifest.get("unreadable"):
        return None
    return manifest


def write_manifest(filesystem: pafs.FileSystem, folder: str, manifest: dict) -> None:
    """Atomically where the filesystem allows (local rename; an object store PUT is atomic by itself)."""
    payload = (json.dumps(manifest, indent=1) + "\n").encode()
    final = f"{folder}/{MANIFEST}"
    if not isinstance(filesystem, pafs.LocalFileSystem):
        location.write_bytes(filesystem, final, payload)
        return
    temporary = f"{final}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "wb") as stream:
        stream.write(payload)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, final)


def encode(image: Image.Image, image_format: str) -> bytes:
    """A resized image as the cache stores it."""
    if image_format == "raw":
        return image.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, **ENCODINGS[image_format])
    return buffer.getvalue()


def decode(pixels: bytes, height: int, width: int, image_format: str) -> Image.Image:
    """A cached image back as upright RGB (raw pixels: a view of ``pixels``, not a copy)."""
    if image_format == "raw":
        return Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)
    image = Image.open(io.BytesIO(pixels))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode_to_file(
    batch: dict[str, np.ndarray],
    opener: Any,
    resize: imaging.Resize,
    image_format: str,
    cache_filesystem: pafs.FileSystem,
    folder: str,
    retry_seconds: float,
) -> dict[str, np.ndarray]:
    """Decode a block of files and write the good ones as one Parquet file; return one summary row for the block.

    The task writes its own file (rather than handing pixels on to a Ray Data write) so a cache file is exactly
    one block of images, and only a summary (files, images, bytes, and the few files that failed) travels back
    to the driver: a million images are 1,000 rows, not a million. Read back, a cache file is one block again.
    A file its storage failed to deliver (``reading.StorageError``) is listed apart from the bad ones: it is not
    the image's fault, so it is not recorded as bad.
    """
    decoded: dict[str, list] = {"label": [], "height": [], "width": [], "pixels": []}
    bad, unreadable = [], []
    for path, label in zip(batch["path"], batch["label"], strict=True):
        try:
            data = reading.read_item(opener, path, retry_seconds)
        except reading.StorageError as error:
            unreadable.append([opener.display(path), str(error), int(label)])
            continue
        except Exception as error:  # the item's own fault (missing, not readable): a bad file, as ever
            bad.append([opener.display(path), imaging.describe_error(error), int(label)])
            continue
        try:
            image = imaging.load_rgb(data, resize.short_side)
            image = imaging.resize_short_side(image, resize)
            pixels = encode(image, image_format)
        except Exception as error:  # every way a file can be bad: record it, keep the block
            bad.append([opener.display(path), imaging.describe_error(error), int(label)])
            continue
        decoded["label"].append(int(label))
        decoded["height"].append(image.height)
        decoded["width"].append(image.width)
        decoded["pixels"].append(pixels)
    name, size = "", 0
    if decoded["pixels"]:
        # Named by its files (each attempt writes in a folder of its own): a rebuilt cache lists its images in
        # the same order, so a seeded run that holds them in memory deals the same images.
        name = hashlib.sha256("\n".join(batch["path"]).encode()).hexdigest()[:32] + ".parquet"
        sink = pa.BufferOutputStream()
        # Raw pixels barely compress and encoded ones are compressed already: snappy would only cost CPU, and so
        # would a dictionary of images that are all distinct.
        pq.write_table(pa.table(decoded, schema=CACHE_SCHEMA), sink, compression="none", use_dictionary=False)
        written = sink.getvalue()
        location.write_bytes(cache_filesystem, f"{folder}/{name}", written, retry_seconds)  # one PUT
        size = written.size
    return {
        "file": np.asarray([name], dtype=object),
        "files": np.asarray([len(batch["path"])], dtype=np.int64),
        "images": np.asarray([len(decoded["pixels"])], dtype=np.int64),
        "bytes": np.asarray([size], dtype=np.int64),
        "skipped": np.asarray([json.dumps(bad)], dtype=object),
        "unreadable": np.asarray([json.dumps(unreadable)], dtype=object),
    }


def estimate_bytes(images: int, short_side: int, image_format: str) -> int:
    """What a cache of ``images`` is expected to take (4:3 images; encoded sizes from bench/cache_format.py)."""
    return int(images * short_side * math.ceil(short_side * 4 / 3) * BYTES_PER_PIXEL[image_format])


def prepare(
    files: list[tuple[str, int]],
    layout: Layout,
    image_size: int,
    root: location.Location,
    resize: imaging.Resize | None = None,
    on_event: progress.OnEvent | None = None,
    split: str | None = None,
    image_format: str | None = None,
) -> CachedSplit:
    """The cache of one split for crops of ``image_size`` from images resized by ``resize`` (by default
    ``imaging.Resize.for_crop(image_size)``: bilinear): reused when one exists for exactly these files as the
    listing found them, else built (telling ``on_event`` where, how large, and how many files are done as they are).

    ``split`` ("train", "val") names what the files are: a build then supersedes the older caches of the same
    dataset's split at the same size, which are deleted once it is complete, and picks the stored format
    (``SPLIT_FORMATS``) unless ``image_format`` does. Without it, nothing is deleted. A read retries a storage failure
    that passes for the layout's ``retry_seconds`` (``reading.read_item``).
    """
    resize = resize or imaging.Resize.for_crop(image_size)
    image_format = image_format or SPLIT_FORMATS.get(split or "", DEFAULT_FORMAT)
    filesystem, base, prefix, _ = resolve_filesystem(root, "--cache")
    key = split_key(files, layout.stats_of(files), layout, resize, image_format)
    family = family_key(layout, split, resize) if split else None
    folder = f"{base}/{family}-{key}" if family else f"{base}/{key}"
    manifest = read_manifest(filesystem, folder)
    built = manifest is None
    if manifest is None:
        manifest = _build(files, layout, resize, image_format, filesystem, folder, prefix, family, on_event)
        if family:
            _remove_superseded(filesystem, base, family, folder, prefix, on_event)
    return CachedSplit(
        filesystem=filesystem,
        folder=folder,
        parquet_files=[f"{folder}/{name}" for name in manifest["files"]],
        rows=manifest["rows"],
        skipped=[(path, reason, label) for path, reason, label in manifest["skipped"]],
        built=built,
        resize=resize,
        image_format=manifest["format"],
        unreadable=[(path, reason, label) for path, reason, label in manifest.get("unreadable", [])],
    )


def _build(
    files: list[tuple[str, int]],
    layout: Layout,
    resize: imaging.Resize,
    image_format: str,
    filesystem: pafs.FileSystem,
    folder: str,
    prefix: str,
    family: str | None,
    on_event: progress.OnEvent | None,
) -> dict:
    location = prefix + folder
    _tell(
        on_event,
        progress.CacheState(
            "building", location, len(files), estimate_bytes(len(files), resize.short_side, image_format)
        ),
    )
    # Shuffled once, so every cached file mixes classes and an epoch's block order is all that must vary; except
    # where the source reads far faster in its own order (Parquet rows: a row costs its row group), whose blocks
    # keep it (held in memory, epochs are dealt from a permutation of every row all the same).
    opener = layout.opener_of(files)
    sequential = getattr(opener, "sequential", False)
    order = np.arange(len(files)) if sequential else np.random.default_rng(0).permutation(len(files))
    attempt = uuid.uuid4().hex[:12]
    attempt_folder = f"{folder}/{attempt}"
    try:
        filesystem.create_dir(attempt_folder, recursive=True)
    except OSError as error:
        raise TlRayError(f"--cache: cannot create {attempt_folder}: {error}") from error
    columns = {"path": [files[index][0] for index in order], "label": [files[index][1] for index in order]}
    decoded = pipelines.file_columns(columns).map_batches(
        _decode_to_file,
        # One file per block: 32 images, more above 32,000 (pipelines.MAX_BLOCKS), so that reading a cache of a
        # million images back is 1,000 blocks, not the 31,000 whose making and scheduling took longer than an epoch's
        # first step (bench/scale.py).
        batch_size=pipelines.rows_per_block(len(files)),
        num_cpus=0.5,  # fits beside a sweep's token-CPU trial drivers, as the uncached pipeline does
        compute=cluster.task_pool(pipelines.row_blocks(len(files))),
        batch_format="numpy",
        fn_kwargs={
            "opener": opener,
            "resize": resize,
            "image_format": image_format,
            "cache_filesystem": filesystem,
            "folder": attempt_folder,
            "retry_seconds": layout.retry_seconds,
        },
    )
    del columns
    names, skipped, unreadable, done, images, size = [], [], [], 0, 0, 0
    for summary in decoded.iter_rows():  # one per block of files
        if summary["file"]:
            names.append(f"{attempt}/{summary['file']}")
        skipped += json.loads(summary["skipped"])
        unreadable += json.loads(summary["unreadable"])
        done += int(summary["files"])
        images += int(summary["images"])
        size += int(summary["bytes"])
        _tell(on_event, progress.Task("decoding images into the cache", done, len(files)))
    manifest = {
        "version": CACHE_VERSION,
        "family": family,
        "short_side": resize.short_side,
        "interpolation": resize.interpolation,
        "format": image_format,
        "files": sorted(names),
        "rows": images,
        "bytes": size,
        "skipped": sorted(skipped),
        "unreadable": sorted(unreadable),  # a manifest with any is rebuilt by the next run (read_manifest)
    }
    write_manifest(filesystem, folder, manifest)
    _tell(on_event, progress.CacheState("built", location, images, size))
    return manifest


def _tell(on_event: progress.OnEvent | None, event: object) -> None:
    if on_event is not None:
        on_event(event)


def _remove_superseded(
    filesystem: pafs.FileSystem, base: str, family: str, keep: str, prefix: str, on_event: progress.OnEvent | None
) -> None:
    """Delete the complete caches of ``family`` other than ``keep``: only folders whose manifest says tl-ray wrote
    them for this family (a build still running has none yet, and is left alone)."""
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(base, recursive=False))
    except OSError:
        return
    for entry in entries:
        if entry.type != pafs.FileType.Directory or entry.path == keep or not entry.base_name.startswith(f"{family}-"):
            continue
        manifest = _read_json(filesystem, f"{entry.path}/{MANIFEST}")
        if not isinstance(manifest, dict) or manifest.get("family") != family:
            continue
        try:
            size = sum(
                info.size or 0 for info in filesystem.get_file_info(pafs.FileSelector(entry.path, recursive=True))
            )
            filesystem.delete_dir(entry.path)
        except OSError:  # another run removed it first, or it cannot be removed: it is only disk space
            continue
        _tell(on_event, progress.CacheState("removed", prefix + entry.path, int(manifest.get("rows", 0)), size))


def prepare_splits(
    layout: Layout,
    image_size: int,
    root: location.Location | None,
    skipped: skiplog.Skips,
    resize: imaging.Resize | None = None,
    on_event: progress.OnEvent | None = None,
) -> dict[str, CachedSplit | None]:
    """The built cache of "train" and "val" (None for a split with nothing cached, or with ``root`` None);
    the files they could not decode, or their storage could not deliver, are added to ``skipped``, training ones
    with their labels. More than ``reading.MAX_UNREADABLE_SHARE`` of a split undelivered stops the run
    (``RunError``)."""
    splits = {}
    for name, files in (("train", layout.train), ("val", layout.val)):
        split = prepare(files, layout, image_size, root, resize, on_event, name) if root is not None and files else None
        if split is not None:
            check_unreadable(split, name, len(files))
        if split is not None and (split.skipped or split.unreadable):
            lost = split.skipped + split.unreadable
            items = [(path, reason) for path, reason, _ in lost]
            labels = [label for _, _, label in lost] if name == "train" else None
            skiplog.add_skips(skipped, items, labels)
        splits[name] = split if split is not None and split.parquet_files else None
    return splits


def check_unreadable(split: CachedSplit, name: str, files: int) -> None:
    """Stop the run when its storage failed to deliver too much of a split (``reading.check_unreadable``)."""
    unreadable = [(path, reason) for path, reason, _ in split.unreadable]
    after = "nothing was cached as bad: rerun when the storage answers"
    reading.check_unreadable(unreadable, files, f"{name} images", after)

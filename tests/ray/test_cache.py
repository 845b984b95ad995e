"""The decoded-image cache: same pixels as decoding the file, reused until a file changes, bad files kept out.

Also JPEG draft-mode decoding, which the cache and the uncached pipelines share.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from tl_ray import progress
from tl_ray.cli import console
from tl_ray.inputs import cache, held, imaging, pipelines, skiplog, streaming
from tl_ray.inputs.sources import class_folders

pytestmark = pytest.mark.timeout(300)
SIZE = 32


def _photo(path: Path, seed: int, size=(90, 70)) -> None:
    """Noisy colour JPEG: resizing and cropping it gives distinct, comparable pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture()
def dataset_root(tmp_path) -> Path:
    root = tmp_path / "data"
    for index in range(50):
        split = "train" if index < 40 else "val"
        _photo(root / split / ("ab"[index % 2]) / f"{index:02d}.jpg", index, size=(90 + index, 70))
    (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _sizes(parquet_file: str) -> tuple[list[int], list[int]]:
    table = pq.read_table(parquet_file, columns=["height", "width"]).to_pydict()
    return table["height"], table["width"]


def _digests(images) -> list[str]:
    return sorted(hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images)


def test_cached_images_equal_decoding_the_files(dataset_root, tmp_path, ray_cluster):
    layout = class_folders.discover(str(dataset_root))
    root = str(tmp_path / "cache")
    skipped = skiplog.SkippedFiles.remote()
    splits = cache.prepare_splits(layout, SIZE, root, skipped)
    datasets = streaming.streaming_datasets(layout, splits, SIZE, skipped, seed=3)

    # Validation from the cache is a centre crop of the cached pixels: exactly what predict computes from the file.
    transform = imaging.eval_transform(SIZE)
    expected = [
        transform(imaging.load_rgb(Path(path).read_bytes(), imaging.resize_size(SIZE))).numpy()
        for path, _ in layout.val
    ]
    rows = datasets["val"].take_all()
    assert _digests(row["image"] for row in rows) == _digests(expected)
    uncached = pipelines.image_dataset(layout.val, layout, SIZE, False, skipped).take_all()
    assert _digests(row["image"] for row in uncached) == _digests(expected)

    # Training: every decodable file once per epoch, uint8 crops, the bad one left out and counted for its class.
    good_labels = sorted(label for path, label in layout.train if not path.endswith("broken.jpg"))
    for _ in range(2):
        batches = list(datasets["train"].iter_batches(batch_size=8, batch_format="numpy"))
        assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == good_labels
        assert {(str(b["image"].dtype), b["image"].shape[1:]) for b in batches} == {("uint8", (3, SIZE, SIZE))}
    broken = str(dataset_root / "train" / "b" / "broken.jpg")
    assert ray.get(skipped.get.remote()) == {broken: "not an image file PIL can identify"}
    assert ray.get(skipped.train_counts.remote()) == {1: 1}
    ray.kill(skipped)


def test_cache_is_reused_until_a_file_changes(dataset_root, tmp_path, ray_cluster):
    layout = class_folders.discover(str(dataset_root))
    root = str(tmp_path / "cache")
    first = cache.prepare(layout.train, layout, SIZE, root)
    assert first.built and first.rows == len(layout.train) - 1
    manifest = json.loads((Path(first.folder) / cache.MANIFEST).read_text())
    assert manifest["skipped"] == [[str(dataset_root / "train/b/broken.jpg"), "not an image file PIL can identify", 1]]
    assert all(Path(path).is_file() for path in first.parquet_files)

    again = cache.prepare(layout.train, layout, SIZE, root)
    assert (again.built, again.folder, again.parquet_files) == (False, first.folder, first.parquet_files)
    assert cache.prepare(layout.train, layout, SIZE + 16, root).folder != first.folder  # another resolution
    # Weights evaluated at another crop fraction (IMAGENET1K_V2: 232 for 224) resize to another short side.
    other = cache.prepare(layout.train, layout, SIZE, root, resize=imaging.Resize(SIZE + 1))
    assert other.folder != first.folder and other.short_side == SIZE + 1
    smallest = min(min(h, w) for f in other.parquet_files for h, w in zip(*_sizes(f), strict=True))
    assert smallest == SIZE + 1

    changed, _ = layout.train[0]
    before = os.stat(changed)
    _photo(Path(changed), seed=999)
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert not cache.prepare(layout.train, layout, SIZE, root).built  # checked against the listing, not the file
    layout = class_folders.discover(str(dataset_root))  # the next run lists the files again
    rebuilt = cache.prepare(layout.train, layout, SIZE, root)
    assert rebuilt.built and rebuilt.folder != first.folder

    # Another build of the same files lists the same images in the same order (seeded runs deal the same images).
    elsewhere = cache.prepare(layout.train, layout, SIZE, str(tmp_path / "other"))
    images, labels = held.load_images(elsewhere)
    first_images, first_labels = held.load_images(cache.prepare(layout.train, layout, SIZE, root))
    assert torch.equal(labels, first_labels)
    assert [image.tobytes() for image in images] == [image.tobytes() for image in first_images]

    # A half-written cache (no manifest: the build was killed) is never read; it is built again.
    (Path(rebuilt.folder) / cache.MANIFEST).unlink()
    assert cache.prepare(layout.train, layout, SIZE, root).built


def test_cache_none_and_auto_roots(tmp_path):
    from tl_ray import location

    runs = location.resolve(str(tmp_path / "runs") + "/", "--storage")
    assert cache.resolve_root("none", runs) is None
    assert cache.resolve_root("auto", runs).uri == str(tmp_path / "runs" / ".tl-ray-cache")
    remote = cache.resolve_root("s3://bucket/cache?endpoint_override=127.0.0.1:9&scheme=http", runs)
    assert (remote.path, remote.uri) == ("bucket/cache", "s3://bucket/cache?endpoint_override=127.0.0.1:9&scheme=http")
    assert cache.resolve_root("rel/dir", runs).uri == os.path.abspath("rel/dir")


def test_jpeg_draft_decodes_large_photos_at_reduced_scale(tmp_path):
    big = tmp_path / "big.jpg"
    _photo(big, seed=1, size=(800, 600))
    encoded = big.read_bytes()
    assert imaging.load_rgb(encoded).size == (800, 600)
    drafted = imaging.load_rgb(encoded, min_short_side=100)
    assert drafted.size == (200, 150)  # 1/4 scale: the largest DCT reduction that keeps the short side >= 100
    assert imaging.load_rgb(encoded, min_short_side=301).size == (800, 600)  # 1/2 would fall below 301
    full = np.asarray(imaging.resize_short_side(imaging.load_rgb(encoded), imaging.Resize(100)), dtype=float)
    reduced = np.asarray(imaging.resize_short_side(drafted, imaging.Resize(100)), dtype=float)
    assert full.shape == reduced.shape and np.abs(full - reduced).mean() < 12  # noise image: the worst case

    png = tmp_path / "big.png"
    Image.open(big).save(png)
    assert imaging.load_rgb(png.read_bytes(), min_short_side=100).size == (800, 600)  # only JPEG has draft mode


def test_images_held_in_memory_are_the_cached_pixels_dealt_like_an_equal_split(dataset_root, tmp_path, ray_cluster):
    layout = class_folders.discover(str(dataset_root))
    root = str(tmp_path / "cache")
    splits = cache.prepare_splits(layout, SIZE, root, skiplog.SkippedFiles.remote())
    assert held.fit_in_memory(splits) and not held.fit_in_memory({**splits, "val": None})

    # Validation: the same centre crops the streaming pipeline and predict compute.
    held_val = held.HeldImages(splits["val"], SIZE, training=False, crop_scale=None)
    streamed = streaming.streaming_datasets(layout, splits, SIZE, skiplog.SkippedFiles.remote())
    val_batches = [b for rank in range(2) for b in held_val.batches(4, rank, 2)]
    assert _digests(np.asarray(i) for b in val_batches for i in b["image"]) == _digests(
        row["image"] for row in streamed["val"].take_all()
    )

    # Training: per epoch, equal shards of distinct rows, random uint8 crops, each with its own label.
    held_train = held.HeldImages(splits["train"], SIZE, training=True, crop_scale=(0.6, 1.0))
    good = len(layout.train) - 1  # broken.jpg was skipped by the cache
    orders = []
    for epoch in (1, 2):
        shards = [list(held_train.batches(8, rank, 2, seed=0, epoch=epoch)) for rank in range(2)]
        labels = torch.cat([b["label"] for shard in shards for b in shard])
        assert [sum(len(b["label"]) for b in shard) for shard in shards] == [good // 2] * 2
        assert {(b["image"].dtype, tuple(b["image"].shape[1:])) for s in shards for b in s} == {
            (torch.uint8, (3, SIZE, SIZE))
        }
        assert sorted(labels.tolist()) != [] and set(labels.tolist()) <= {0, 1}
        orders.append(labels.tolist())
    assert [len(order) for order in orders] == [2 * (good // 2)] * 2
    first = [b["image"] for b in held_train.batches(8, 0, 2, seed=0, epoch=1)]
    again = [b["image"] for b in held_train.batches(8, 0, 2, seed=0, epoch=1)]
    later = [b["image"] for b in held_train.batches(8, 0, 2, seed=0, epoch=2)]
    # The same epoch crops the same (a resumed run sees the pixels it would have), another epoch anew.
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, later, strict=True)), "crops are redrawn every epoch"


def test_a_built_cache_is_validated_by_the_listing_alone(dataset_root, tmp_path, ray_cluster):
    """A rerun reads the manifest and nothing else: the image files could all be gone."""
    layout = class_folders.discover(str(dataset_root))
    root = str(tmp_path / "cache")
    built = cache.prepare_splits(layout, SIZE, root, skiplog.SkipLog())
    for path, _ in layout.train + layout.val:
        os.remove(path)
    again = cache.prepare_splits(layout, SIZE, root, skiplog.SkipLog())
    assert {name: (split.built, split.folder) for name, split in again.items()} == {
        name: (False, split.folder) for name, split in built.items()
    }
    assert held.load_images(again["val"])[1].tolist() == held.load_images(built["val"])[1].tolist()


def test_a_block_comes_back_to_the_driver_as_one_summary_row(dataset_root, tmp_path):
    layout = class_folders.discover(str(dataset_root))
    paths = [path for path, _ in layout.train[:5]] + [str(dataset_root / "train" / "b" / "broken.jpg")]
    folder = tmp_path / "attempt"
    folder.mkdir()
    batch = {"path": np.asarray(paths, dtype=object), "label": np.asarray([0] * 5 + [1])}
    summary = cache._decode_to_file(
        batch, layout.opener, imaging.Resize(SIZE + 4), "raw", layout.filesystem, str(folder), 1.0
    )
    assert {key: len(value) for key, value in summary.items()} == dict.fromkeys(summary, 1)
    [written] = list(folder.iterdir())
    assert (summary["file"][0], summary["files"][0], summary["images"][0]) == (written.name, 6, 5)
    assert summary["bytes"][0] == written.stat().st_size
    assert json.loads(summary["skipped"][0]) == [[paths[-1], "not an image file PIL can identify", 1]]
    assert pq.read_table(written).num_rows == 5


def test_a_build_reports_its_size_and_deletes_the_cache_it_supersedes(dataset_root, tmp_path, ray_cluster):
    root = tmp_path / "cache"
    events: list = []
    layout = class_folders.discover(str(dataset_root))
    first = cache.prepare_splits(layout, SIZE, str(root), skiplog.SkipLog(), on_event=events.append)
    other_size = cache.prepare(layout.train, layout, SIZE + 8, str(root), split="train")  # another size: kept
    unnamed = cache.prepare(layout.train[:10], layout, SIZE, str(root))  # no split named: never deleted
    states = [event for event in events if isinstance(event, progress.CacheState)]
    assert [(event.state, event.location) for event in states] == [
        ("building", first["train"].folder),
        ("built", first["train"].folder),
        ("building", first["val"].folder),
        ("built", first["val"].folder),
    ]
    for event, name in zip(states[1::2], ("train", "val"), strict=True):
        files = Path(first[name].folder).rglob("*.parquet")
        assert event.images == first[name].rows and event.bytes == sum(path.stat().st_size for path in files)
    assert states[0].images == len(layout.train) and states[0].bytes == cache.estimate_bytes(
        len(layout.train), imaging.resize_size(SIZE), "jpeg"
    )
    assert (first["train"].image_format, first["val"].image_format) == ("jpeg", "raw")

    changed, _ = layout.train[3]
    _photo(Path(changed), seed=1234)
    layout = class_folders.discover(str(dataset_root))
    events.clear()
    second = cache.prepare_splits(layout, SIZE, str(root), skiplog.SkipLog(), on_event=events.append)
    assert second["train"].built and not second["val"].built  # val's files did not change
    removed = [event for event in events if isinstance(event, progress.CacheState) and event.state == "removed"]
    assert [(event.location, event.images) for event in removed] == [(first["train"].folder, first["train"].rows)]
    assert not Path(first["train"].folder).exists() and removed[0].bytes > 0
    kept = {first["val"].folder, second["train"].folder, other_size.folder, unnamed.folder}
    assert {str(path.parent) for path in root.glob("*/manifest.json")} == kept
    assert "superseded" in console.cache_row(removed[0]) and first["train"].folder in console.cache_row(removed[0])


def test_requests_to_an_s3_data_location_one_get_per_image_to_build_none_per_image_after(
    s3_server, tmp_path, ray_cluster
):
    """Counted by the S3 server itself (moto, its request log): what a million-image dataset would pay per image."""
    s3_server.create_bucket("scale")
    bucket = s3_server.filesystem()
    images = {}
    for index in range(24):
        encoded = io.BytesIO()
        Image.fromarray(np.full((20 + index, 30, 3), index * 9, np.uint8)).save(encoded, format="PNG")
        images[f"/scale/data/train/{'ab'[index % 2]}/{index:02d}.png"] = encoded.getvalue()
    images["/scale/data/train/b/broken.png"] = b"not a png"
    for path, content in images.items():
        with bucket.open_output_stream(path.lstrip("/")) as stream:
            stream.write(content)
    uri, root = s3_server.uri("scale/data"), str(tmp_path / "cache")

    start = s3_server.mark()
    layout = class_folders.discover(uri, val_fraction=0.25)
    listed = s3_server.mark()
    splits = cache.prepare_splits(layout, SIZE, root, skiplog.SkipLog())
    built = s3_server.requests(since=listed)
    assert len(layout.train) + len(layout.val) == len(images) and splits["train"].rows + splits["val"].rows == 24
    gets = collections.Counter(r.path for r in built if r.method == "GET")
    heads = collections.Counter(r.path for r in built if r.method == "HEAD")
    assert gets == dict.fromkeys(images, 1)
    # pyarrow's Python API opens an object by path only, and its S3 client sends a HEAD for the size first (its
    # C++ OpenInputFile(FileInfo) would take the listing's size; Python exposes that for datasets alone).
    assert heads == dict.fromkeys(images, 1)
    assert {r.method for r in built} == {"GET", "HEAD"}  # nothing else: no listing, no writes (the cache is local)

    listing = s3_server.requests(since=start)[: listed - start]
    again = class_folders.discover(uri, val_fraction=0.25)
    rerun_listed = s3_server.mark()
    assert {
        name: split.built for name, split in cache.prepare_splits(again, SIZE, root, skiplog.SkipLog()).items()
    } == {
        "train": False,
        "val": False,
    }
    assert s3_server.requests(since=rerun_listed) == []  # a cache hit asks the data location nothing
    assert not [r for r in listing if r.path in images]  # listing: LISTs and HEADs of folders, no image
    assert len(listing) <= 2 * len(layout.class_names) + 8

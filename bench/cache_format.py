"""Cache format benchmark: what each way of storing the decoded-image cache costs, at 224 and 64 px.

For each format the cache can store (``tl_ray.cache.ENCODINGS``: raw RGB, PNG, JPEG quality 90) and each crop
size (the cache's short side is validation's resize: 256 for 224, 74 for 64), on the photo-like JPEGs of
bench/ingest.py: bytes per cached image (the Parquet files a real build writes), the decode cost of a cached
image alone and with the training crop + flip (one core, this process), and the images/s of a streamed epoch
through the pipeline a GPU run uses (``streaming.cached_dataset``, Ray Data).

    python bench/cache_format.py                   # 400 images
    python bench/cache_format.py --images 40       # smoke test

Prints a table and writes JSON (``--out``, default bench/results/cache_format.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import write_photos


def measure(root: Path, cache_root: Path, image_size: int, image_format: str, repeats: int) -> dict:
    import pyarrow.parquet as pq

    from tl_ray import recipe
    from tl_ray.inputs import cache, imaging, streaming
    from tl_ray.inputs.sources import class_folders

    layout = class_folders.discover(str(root), val_fraction=0.0)
    started = time.perf_counter()
    split = cache.prepare(layout.train, layout, image_size, str(cache_root), image_format=image_format)
    build_s = time.perf_counter() - started
    stored = sum(Path(path).stat().st_size for path in split.parquet_files)
    rows = [
        row for path in split.parquet_files for row in zip(*pq.read_table(path).to_pydict().values(), strict=True)
    ]  # (label, height, width, pixels)
    crop = imaging.augmentation(image_size, recipe.STANDARD_CROP_SCALE, 0.0, split.resize)
    started = time.perf_counter()
    for _ in range(repeats):
        for _, height, width, pixels in rows:
            cache.decode(pixels, height, width, image_format).load()
    decode_ms = (time.perf_counter() - started) / (repeats * len(rows)) * 1000
    started = time.perf_counter()
    for _ in range(repeats):
        for _, height, width, pixels in rows:
            crop(cache.decode(pixels, height, width, image_format))
    crop_ms = (time.perf_counter() - started) / (repeats * len(rows)) * 1000
    dataset = streaming.cached_dataset(split, image_size, training=True)
    epochs = []
    for _ in range(2):
        started, seen = time.perf_counter(), 0
        for batch in dataset.iter_torch_batches(batch_size=32):
            seen += len(batch["label"])
        epochs.append(seen / (time.perf_counter() - started))
    return {
        "image_size": image_size,
        "short_side": split.short_side,
        "format": image_format,
        "images": split.rows,
        "bytes_per_image": stored / split.rows,
        "build_s": build_s,
        "decode_ms": decode_ms,
        "decode_crop_ms": crop_ms,
        "epoch_images_per_s": epochs[-1],  # the second: Ray Data's workers started
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="bench/.data/photos", help="folder for the generated JPEGs (reused)")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the cached images per timing")
    parser.add_argument("--out", default="bench/results/cache_format.json")
    args = parser.parse_args(argv)

    from tl_ray import cluster
    from tl_ray.inputs import cache

    root = Path(args.data) / f"n{args.images}"
    write_photos(root, args.images)
    cache_root = Path(args.data) / "format-cache"
    shutil.rmtree(cache_root, ignore_errors=True)
    cluster.ensure_ray()
    rows = [
        measure(root, cache_root, size, image_format, args.repeats)
        for size in (224, 64)
        for image_format in cache.ENCODINGS
    ]
    shutil.rmtree(cache_root, ignore_errors=True)
    results = {
        "benchmark": "cache_format",
        "command": "python bench/cache_format.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "images": args.images,
        "rows": rows,
    }
    print(f"cache formats: {args.images} photo-like JPEGs (~500x375), {results['machine']}")
    print(f"{'px':>4} {'short':>5} {'format':<6} {'KB/image':>9} {'decode ms':>10} {'+crop ms':>9} {'epoch img/s':>12}")
    for row in rows:
        print(
            f"{row['image_size']:>4} {row['short_side']:>5} {row['format']:<6} {row['bytes_per_image'] / 1000:>9.1f}"
            f" {row['decode_ms']:>10.3f} {row['decode_crop_ms']:>9.3f} {row['epoch_images_per_s']:>12.1f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

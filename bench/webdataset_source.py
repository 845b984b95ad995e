"""Rough cost of the WebDataset source (issue 39): listing + decoded-image cache build of N small JPEGs in S shards
through ``sources.discover`` and ``cache.prepare``, against ``ray.data.read_webdataset`` reading (and decoding) the
same shards, and against tl-ray's own listing + cache build of the same JPEGs as class folders (loose files). All on
one local Ray; each measured twice (the first pays Ray Data's start-up), images/s printed.

    python bench/webdataset_source.py [--images 2000] [--shards 4] [--cpus 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_shards(folder: Path, images: int, shards: int) -> list[Path]:
    """``images`` 96x72 JPEGs of noise (3 classes, .cls), split over ``shards`` tars as webdataset writes them."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"shard-{number:06d}.tar" for number in range(shards)]
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(path, "w")) for path in paths]
        for index in range(images):
            buffer = io.BytesIO()
            noise = rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)
            Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
            for extension, data in (("jpg", buffer.getvalue()), ("cls", str(index % 3).encode())):
                info = tarfile.TarInfo(f"{index:08d}.{extension}")
                info.size = len(data)
                tars[index * shards // images].addfile(info, io.BytesIO(data))
    return paths


def as_class_folders(paths: list[Path], root: Path) -> Path:
    """The same JPEGs as loose files, ROOT/train/<class>/KEY.jpg: the baseline of a source that reads files."""
    for path in paths:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            labels = {
                m.name.split(".")[0]: tar.extractfile(m).read().decode() for m in members if m.name.endswith("cls")
            }
            for member in members:
                if member.name.endswith(".jpg"):
                    key = member.name.split(".")[0]
                    target = root / "train" / labels[key] / member.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
    return root


def tl_ray_source(folder: Path, cache_root: Path) -> dict[str, float]:
    from tl_ray.inputs import cache, sources

    start = time.perf_counter()
    layout = sources.discover(folder)
    listed = time.perf_counter()
    for split, files in (("train", layout.train), ("val", layout.val)):
        cache.prepare(files, layout, 32, str(cache_root), split=split)
    done = time.perf_counter()
    count = len(layout.train) + len(layout.val)
    total = done - start
    return {
        "images": count,
        "listing_s": round(listed - start, 3),
        "total_s": round(total, 2),
        "images_per_s": round(count / total),
    }


def ray_read_webdataset(paths: list[Path]) -> dict[str, float]:
    import ray

    start = time.perf_counter()
    count = ray.data.read_webdataset([str(path) for path in paths]).materialize().count()
    elapsed = time.perf_counter() - start
    return {"images": count, "total_s": round(elapsed, 2), "images_per_s": round(count / elapsed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory(prefix="wds-bench-") as scratch:
        folder = Path(scratch) / "shards"
        paths = write_shards(folder, args.images, args.shards)
        files = as_class_folders(paths, Path(scratch) / "files")
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            for attempt in (1, 2):
                ours = tl_ray_source(folder, Path(scratch) / f"cache{attempt}")
                theirs = ray_read_webdataset(paths)
                loose = tl_ray_source(files, Path(scratch) / f"files-cache{attempt}")
                row = {"attempt": attempt, "tl_ray_list_and_cache": ours, "ray_data_read_webdataset": theirs}
                row["tl_ray_same_images_as_class_folders"] = loose
                print(json.dumps(row))
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

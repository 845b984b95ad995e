"""The driver's memory for listing N objects of class folders in object storage, without an S3 server.

A ``pyarrow.fs.PyFileSystem`` answers ``class_folders.discover`` as S3 does (folders as prefixes, each class folder's
objects as one recursive listing of ``FileInfo``s with size and mtime), so the remote code path runs (not the local
``os.scandir`` one) at a million objects in seconds. Measured: the growth of this process's peak RSS (VmHWM) while
listing; with ``--trace``, the Python objects the layout keeps and the most held at once (tracemalloc, which itself
costs memory: RSS is not measured then).

    PYTHONPATH=. python bench/listing_memory.py 1000000 [--trace]
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

import pyarrow.fs as pafs

CLASSES = 100
NOT_THERE = ("val", "valid", "validation", "test")


def status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


class Bucket(pafs.FileSystemHandler):
    """data/train/classNNN/NNNNNNN.png, ``count`` objects in CLASSES folders; listing only."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bucket)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "bench-bucket"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        def kind(path: str) -> pafs.FileType:
            folder = path.count("/") <= 2 and path.rsplit("/", 1)[-1] not in NOT_THERE and "." not in path
            return pafs.FileType.Directory if folder else pafs.FileType.NotFound

        return [pafs.FileInfo(path, kind(path)) for path in paths]

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = selector.base_dir.rstrip("/")
        if base == "data":
            return [pafs.FileInfo("data/train", pafs.FileType.Directory)]
        if base == "data/train":
            return [pafs.FileInfo(f"data/train/class{c:03d}", pafs.FileType.Directory) for c in range(CLASSES)]
        first = int(base.rsplit("/", 1)[-1][len("class") :])
        return [
            pafs.FileInfo(f"{base}/{i:07d}.png", pafs.FileType.File, size=1000 + i, mtime_ns=1_700_000_000 * 10**9 + i)
            for i in range(first, self.count, CLASSES)
        ]

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("listing only")

    copy_file = create_dir = delete_dir = delete_dir_contents = delete_file = delete_root_dir_contents = _refuse
    move = open_append_stream = open_input_file = open_input_stream = open_output_stream = _refuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int)
    parser.add_argument("--trace", action="store_true", help="count Python objects (tracemalloc) instead of RSS")
    args = parser.parse_args()

    from tl_ray import location
    from tl_ray.inputs.sources import class_folders

    where = location.Location(pafs.PyFileSystem(Bucket(args.count)), "data", "bench://data")
    gc.collect()
    before = status_mb("VmRSS:")
    if args.trace:
        tracemalloc.start()
    started = time.perf_counter()
    layout = class_folders.discover(where, val_fraction=0.01)
    seconds = time.perf_counter() - started
    files = len(layout.train) + len(layout.val)
    if args.trace:
        held, peak = tracemalloc.get_traced_memory()
        top = tracemalloc.take_snapshot().statistics("lineno")[:5]
        print(f"{files:,} objects: Python objects kept {held / files:.0f} B each, at most {peak / files:.0f} B each")
        for line in top:
            print("  ", line)
    else:
        grown = status_mb("VmHWM:") - before
        print(f"{files:,} objects: peak RSS grew {grown:.1f} MB ({grown * 2**20 / files:.0f} B each), {seconds:.1f} s")


if __name__ == "__main__":
    main()

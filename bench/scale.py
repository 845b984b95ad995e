"""Scale benchmark: what a dataset of a million files costs before training starts.

A local dataset of ``--local`` files (default 1,000,000, 100 classes) of tiny PNGs (8x8, ~80 bytes: the
listing, the keys and the cache's bookkeeping are what scale with the file count, not the pixels), and
``--s3`` files (default 100,000) on a moto S3 server this script starts (127.0.0.1, a free port, stopped at
the end; moto holds objects in memory and logs every request, which is how they are counted). Reported:

- listing time (``class_folders.discover``) and the driver's RSS growth while it lists, in a fresh process;
- the cache build: time, driver peak RSS, bytes per cached image, requests per image (S3);
- a cache-hit rerun: requests to the data location before training would start (S3: ``discover`` +
  ``cache.prepare_splits``), and, locally, the time from the command (`tl-ray train`, a new process) to its
  first training step.

    python bench/scale.py                           # 1,000,000 local + 100,000 S3 (tens of minutes)
    python bench/scale.py --local 2000 --s3 300     # smoke test

Prints a table and writes JSON (``--out``, default bench/results/scale.json). The generated files live under
``--data`` (default bench/.data/scale, git-ignored) and are reused; ``--clean`` deletes them at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 100
IMAGE_SIZE = 32  # crops of the tiny images; the cache stores them at short side 37


def tiny_pngs(count: int = 16) -> list[bytes]:
    """A few distinct 8x8 PNGs, reused round-robin (decoding them is not what this measures)."""
    import numpy as np
    from PIL import Image

    encoded = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def relative_paths(count: int) -> list[str]:
    return [f"train/class{index % CLASSES:03d}/{index:07d}.png" for index in range(count)]


def write_local(root: Path, count: int) -> None:
    marker = root / ".complete"
    if marker.exists():
        return
    images = tiny_pngs()
    for folder in range(CLASSES):
        (root / "train" / f"class{folder:03d}").mkdir(parents=True, exist_ok=True)
    for index, relative in enumerate(relative_paths(count)):
        (root / relative).write_bytes(images[index % len(images)])
    marker.write_text(str(count))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak RSS since it started its program: /proc's VmHWM. Not ``getrusage``'s ru_maxrss, which
    Linux carries over an exec from the forked parent: a child of a large bench process reported the parent's
    size as its own peak (the "fixed ~306 MB" of BENCHMARKS "Issue 38 item 4")."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_listing(data_uri: str) -> dict:
    """In a fresh process: list the dataset as every run does; its time and the driver's RSS growth."""
    from tl_ray.inputs.sources import class_folders

    before = rss_mb()
    started = time.perf_counter()
    layout = class_folders.discover(data_uri, val_fraction=0.01)
    return {
        "listing_s": time.perf_counter() - started,
        "files": len(layout.train) + len(layout.val),
        "rss_before_mb": before,
        "rss_growth_mb": peak_rss_mb() - before,
    }


def child_cache(data_uri: str, cache_root: str) -> dict:
    """In a fresh process: list, then build (or reuse) the cache of both splits; the driver's peak RSS."""
    from tl_ray import cluster
    from tl_ray.inputs import cache, skiplog
    from tl_ray.inputs.sources import class_folders

    layout = class_folders.discover(data_uri, val_fraction=0.01)
    cluster.ensure_ray()
    listed = rss_mb()
    started = time.perf_counter()
    splits = cache.prepare_splits(layout, IMAGE_SIZE, cache_root, skiplog.SkipLog())
    seconds = time.perf_counter() - started
    built = [split for split in splits.values() if split is not None]
    stored = sum(json.loads((Path(split.folder) / cache.MANIFEST).read_text())["bytes"] for split in built)
    rows = sum(split.rows for split in built)
    return {
        "cache_s": seconds,
        "built": all(split.built for split in built),
        "images": rows,
        "bytes_per_image": stored / rows,
        "rss_listed_mb": listed,
        "rss_peak_mb": peak_rss_mb(),
    }


def child_first_step(data_uri: str, cache_root: str, storage: str, started: float) -> dict:
    """`tl-ray train` as the CLI runs it (``training.run`` with an ``on_event``), stopped (Ctrl-C) at its first
    training step."""
    from tl_ray import progress
    from tl_ray.training.config import TrainConfig
    from tl_ray.training.driver import run

    first: dict = {}

    def on_event(event: object) -> None:
        if isinstance(event, progress.Step) and not first:
            first["seconds"] = time.time() - started
            os.kill(os.getpid(), signal.SIGINT)

    try:
        config = TrainConfig(
            data=data_uri,
            arch="resnet18",
            weights="none",
            image_size=IMAGE_SIZE,
            epochs=1,
            batch_size=64,
            val_fraction=0.01,
            cache=cache_root,
            storage=storage,
            name="scale",
        )
        run(config, on_event=on_event)
    except (KeyboardInterrupt, SystemExit, Exception) as error:  # the Ctrl-C we sent, as Ray Train surfaces it
        if not first:
            raise RuntimeError(f"stopped before a training step: {error!r}") from error
    return {"first_step_s": first["seconds"]}


def in_child(part: str, timeout: float, *args: str) -> dict:
    """Run ``part`` of this script in a new Python process; its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--child", part, "--child-out", out.name, "--", *args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
        if done.returncode != 0 or not Path(out.name).stat().st_size:
            raise RuntimeError(f"{part} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


def bench_local(base: Path, count: int, timeout: float, first_step: bool = True) -> dict:
    root = base / f"local-{count}"
    started = time.perf_counter()
    write_local(root, count)
    result = {"files": count, "write_s": time.perf_counter() - started}
    cache_root = base / f"local-{count}-cache"
    shutil.rmtree(cache_root, ignore_errors=True)
    result["listing"] = in_child("listing", timeout, str(root))
    result["build"] = in_child("cache", timeout, str(root), str(cache_root))
    result["rerun"] = in_child("cache", timeout, str(root), str(cache_root))
    if first_step:
        with tempfile.TemporaryDirectory(dir=base) as storage:
            result["first_step"] = in_child(
                "first-step", timeout, str(root), str(cache_root), storage, str(time.time())
            )
    result["cache_bytes"] = sum(path.stat().st_size for path in cache_root.rglob("*") if path.is_file())
    shutil.rmtree(cache_root, ignore_errors=True)
    return result


def bench_s3(base: Path, count: int, timeout: float, build: bool = True) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import CREDENTIALS, S3Server

    os.environ.update({key: value for key, value in CREDENTIALS.items() if key not in os.environ})
    log_dir = Path(tempfile.mkdtemp(dir=base))
    server = S3Server(log_dir).start()
    try:
        server.create_bucket("scale")
        filesystem = server.filesystem()
        images = tiny_pngs()

        def put(indexed: tuple[int, str]) -> None:
            with filesystem.open_output_stream(f"scale/data/{indexed[1]}") as stream:
                stream.write(images[indexed[0] % len(images)])

        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, enumerate(relative_paths(count))))
        result: dict = {"files": count, "upload_s": time.perf_counter() - started}
        uri, cache_root = server.uri("scale/data"), str(base / f"s3-{count}-cache")
        shutil.rmtree(cache_root, ignore_errors=True)
        mark = server.mark()
        result["listing"] = in_child("listing", timeout, uri)
        result["listing"]["requests"] = len(server.requests(since=mark))
        result["listing"]["requests_per_1000_images"] = 1000 * result["listing"]["requests"] / count
        for name in ("build", "rerun") if build else ():
            mark = server.mark()
            result[name] = in_child("cache", timeout, uri, cache_root)
            requests = server.requests(since=mark)
            image_requests = [r for r in requests if r.path.endswith(".png")]
            result[name]["requests"] = len(requests)
            result[name]["image_gets"] = sum(r.method == "GET" for r in image_requests)
            result[name]["image_heads"] = sum(r.method == "HEAD" for r in image_requests)
            result[name]["requests_per_1000_images"] = 1000 * len(requests) / count
        shutil.rmtree(cache_root, ignore_errors=True)
        return result
    finally:
        server.stop()
        shutil.rmtree(log_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=int, default=1_000_000, help="files of the local dataset (0: skip)")
    parser.add_argument("--s3", type=int, default=100_000, help="files on the S3 server (0: skip)")
    parser.add_argument("--data", default="bench/.data/scale")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a measuring process may take")
    parser.add_argument(
        "--first-step", action=argparse.BooleanOptionalAction, default=True, help="time a rerun's first step"
    )
    parser.add_argument(
        "--s3-build",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build the S3 dataset's cache and rerun over it (without: upload and list only; a rerun's requests are"
        " the listing's, as the smaller runs show)",
    )
    parser.add_argument("--clean", action="store_true", help="delete the generated local dataset at the end")
    parser.add_argument("--out", default="bench/results/scale.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        parts = {"listing": child_listing, "cache": child_cache, "first-step": child_first_step}
        values = list(args.args)
        if args.child == "first-step":
            values[-1] = float(values[-1])
        Path(args.child_out).write_text(json.dumps(parts[args.child](*values)))
        return {}

    from tl_ray import cluster

    cluster.quiet_ray(False)
    base = Path(args.data).resolve()
    base.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "benchmark": "scale",
        "command": "python bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
    }
    if args.local:
        results["local"] = bench_local(base, args.local, args.timeout, args.first_step)
        if args.clean:
            shutil.rmtree(base / f"local-{args.local}", ignore_errors=True)
    if args.s3:
        results["s3"] = bench_s3(base, args.s3, args.timeout, args.s3_build)
    print(json.dumps(results, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

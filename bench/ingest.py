"""Ingest benchmark: images/s that tl-ray's Ray Data pipeline delivers vs ImageFolder + DataLoader.

Both sides read the same folder of photo-like JPEGs and produce the same thing: uint8
(3, S, S) crops after RandomResizedCrop(scale 0.25-1) and a horizontal flip, in batches,
normalised to float on arrival (tl-ray normalises on the training device). The first
epoch is reported as "cold" (process/worker start-up included), the rest as "warm".

tl-ray is measured four ways: decoding every epoch (``--cache none``); with the
decoded-image cache as a first run meets it (epoch 1 builds the cache: decode and
resize once, then crop from cached pixels); as every later run or sweep trial on
the same data meets it (the cache already built); and as a CPU worker meets a cache that
fits in memory (read once, cropped in the worker's own process, one core).

    python bench/ingest.py                      # 2000 images of ~500x375, 3 epochs, 224 px
    python bench/ingest.py --images 64 --epochs 2 --image-size 32   # smoke test
    python bench/ingest.py --host-cost          # host CPU per delivered image of each input path (issue 43)

``--host-cost`` (at most 20 minutes here) measures, for each input path over its warm epochs, the CPU seconds of
every process involved (this driver, and every process it started: Ray's raylet and workers, the DataLoader's
workers) per delivered image, and the device-side work (decode and crop, which the GPU path does on the worker's
device; on a CPU it runs in the consumer) timed apart. It writes ``bench/results/host_cost.json``: its
``gpu_path_host_core_ms_per_image`` is the host side of the path a GPU run takes by default (cached bytes streamed
undecoded to the worker: the ``device_feed`` row, a no-op consumer; the ``device`` row adds the decode and crop,
run on this CPU), ``warm_vs_dataloader`` that feed's delivery rate against the DataLoader's. ``ray_idle_cores``
is what Ray's processes burn doing nothing: a cost per second, which a consumer as slow as a CPU decoding JPEGs
spreads over few images.

Prints a table and writes JSON (``--out``, default bench/results/ingest.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def write_photos(root: Path, count: int, seed: int = 0) -> int:
    """~500x375 JPEGs with texture, gradients and noise (40-100 KB), in 4 class folders; bytes written."""
    rng = np.random.default_rng(seed)
    total = 0
    for index in range(count):
        folder = root / "train" / f"class{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:05d}.jpg"
        if not path.exists():
            height, width = int(rng.integers(340, 410)), int(rng.integers(460, 540))
            x = np.arange(width)[None, :, None]
            base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.sin(x / rng.uniform(8, 40) + rng.uniform(0, 6)))
            texture = rng.normal(0, 28, (-(-height // 4), -(-width // 4), 3)).repeat(4, 0).repeat(4, 1)
            pixels = np.clip(base + texture[:height, :width] + rng.normal(0, 10, (height, width, 3)), 0, 255)
            image = Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
            image.save(path, quality=85)
        total += path.stat().st_size
    return total


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def bench_tl_ray(root: Path, image_size: int, batch_size: int, epochs: int, cache_root: str | None) -> list[dict]:
    """Epochs of the pipeline `tl-ray train` feeds its workers; epoch 1 includes building the cache, if any."""
    import ray
    import torch

    from tl_ray import cluster
    from tl_ray.inputs import cache, imaging, skiplog, streaming
    from tl_ray.inputs.sources import class_folders

    cluster.ensure_ray()
    layout = class_folders.discover(str(root), val_fraction=0.0)
    layout = dataclasses.replace(layout, val=[])
    skipped = skiplog.SkippedFiles.remote()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rows = []
    started = time.perf_counter()
    splits = cache.prepare_splits(layout, image_size, cache_root, skipped)
    dataset = streaming.streaming_datasets(layout, splits, image_size, skipped)["train"]
    for epoch in range(1, epochs + 1):
        seen = 0
        for batch in dataset.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
            seen += len(imaging.normalize(batch["image"], mean, std))
        rows.append({"epoch": epoch, "images": seen, "seconds": time.perf_counter() - started})
        started = time.perf_counter()
    ray.kill(skipped)
    return rows


def bench_held(root: Path, image_size: int, batch_size: int, epochs: int, cache_root: str) -> list[dict]:
    """Epochs as a CPU worker of `tl-ray train` meets them when the cache fits in memory: read once, then
    crops and flips in the worker's own process (epoch 1 includes reading the built cache)."""
    import ray
    import torch

    from tl_ray import cluster, recipe
    from tl_ray.inputs import cache, imaging, skiplog
    from tl_ray.inputs.held import HeldImages
    from tl_ray.inputs.sources import class_folders

    cluster.ensure_ray()
    layout = class_folders.discover(str(root), val_fraction=0.0)
    skipped = skiplog.SkippedFiles.remote()
    [split] = [split for name, split in cache.prepare_splits(layout, image_size, cache_root, skipped).items() if split]
    ray.kill(skipped)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rows = []
    started = time.perf_counter()
    held = HeldImages(split, image_size, True, recipe.STANDARD_CROP_SCALE)
    for epoch in range(1, epochs + 1):
        seen = 0
        for batch in held.batches(batch_size, rank=0, world=1, epoch=epoch):
            seen += len(imaging.normalize(batch["image"], mean, std))
        rows.append({"epoch": epoch, "images": seen, "seconds": time.perf_counter() - started})
        started = time.perf_counter()
    return rows


def bench_dataloader(root: Path, image_size: int, batch_size: int, epochs: int) -> list[dict]:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True)
    transform = v2.Compose([crop, v2.RandomHorizontalFlip(), v2.PILToTensor()])
    dataset = ImageFolder(str(root / "train"), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=os.cpu_count() or 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225])
    rows = []
    for epoch in range(1, epochs + 1):
        started, seen = time.perf_counter(), 0
        for images, _ in loader:
            seen += len((images.float() / 255 - mean) / std.view(1, 3, 1, 1))
        rows.append({"epoch": epoch, "images": seen, "seconds": time.perf_counter() - started})
    return rows


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) spent so far by this process and every process it started, Ray's included (with
    the reaped children each of them waited for): from Linux's /proc, the machines these benchmarks run on."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, times = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended between the listing and the read
            continue
        # after the name: state, ppid, ..., utime (14th field of the whole line), stime, cutime, cstime
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = sum(int(value) for value in fields[11:15]) / ticks
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(pid, 0.0) for pid in tree)


def host_cost_epochs(deliver, epochs: int) -> dict:
    """``deliver(epoch)`` -> (images, device CPU seconds, device wall seconds) for each epoch; the warm epochs' host
    CPU per image (every process's CPU less the device-side work's), the device-side work per image (CPU time: on
    a CPU it runs on both cores), and the delivery rates, with and without the device-side work's wall time."""
    deliver(0)  # cold: start-up, caches read or built
    cpu_before, wall_before = tree_cpu_seconds(), time.perf_counter()
    images = device_cpu = device_wall = 0.0
    for epoch in range(1, epochs + 1):
        delivered, cpu, wall = deliver(epoch)
        images += delivered
        device_cpu += cpu
        device_wall += wall
    wall = time.perf_counter() - wall_before
    host = tree_cpu_seconds() - cpu_before - device_cpu
    return {
        "images": int(images),
        "host_core_ms_per_image": 1000 * host / images,
        "device_ms_per_image": 1000 * device_cpu / images,
        "images_per_s": images / wall,
        "host_images_per_s": images / (wall - device_wall),  # the delivery rate, the device-side work's time aside
    }


def idle_cores(seconds: float = 5.0) -> float:
    """The CPU this process tree burns doing nothing (Ray's raylet, GCS, dashboard, log monitor, idle workers), in
    cores: a fixed cost per second, which a slow consumer spreads over few images and a fast one over many."""
    before = tree_cpu_seconds()
    time.sleep(seconds)
    return (tree_cpu_seconds() - before) / seconds


def host_cost(root: Path, image_size: int, batch_size: int, epochs: int, cache_root: str) -> dict:
    """Each input path's host CPU per delivered image (issue 43), on warm epochs of a built cache."""
    import ray
    import torch

    from tl_ray import cluster, recipe
    from tl_ray.inputs import cache, device_input, plan, skiplog, streaming
    from tl_ray.inputs.held import HeldImages
    from tl_ray.inputs.sources import class_folders

    cluster.ensure_ray()
    layout = class_folders.discover(str(root), val_fraction=0.0)
    skipped = skiplog.SkippedFiles.remote()
    [split] = [split for name, split in cache.prepare_splits(layout, image_size, cache_root, skipped).items() if split]
    ray.kill(skipped)
    scale = recipe.STANDARD_CROP_SCALE

    streamed = streaming.cached_dataset(split, image_size, training=True, crop_scale=scale)

    def pil_in_ray_tasks(epoch: int) -> tuple[int, float, float]:
        batches = streamed.iter_torch_batches(batch_size=batch_size, prefetch_batches=2)
        return sum(len(b["image"]) for b in batches), 0.0, 0.0

    encoded = streaming.encoded_dataset(split, training=True)

    def encoded_batches():
        return plan.DeviceCropBatches.stored_batches(encoded, batch_size)

    def device_feed(epoch: int) -> tuple[int, float, float]:
        """The GPU path's host side alone: the cached bytes as the worker receives them, to a no-op consumer."""
        return sum(len(batch["pixels"]) for batch in encoded_batches()), 0.0, 0.0

    def on_device(epoch: int) -> tuple[int, float, float]:
        delivered, device_cpu, device_wall = 0, 0.0, 0.0
        generator = device_input.generator_for(0, epoch, 0)
        for batch in encoded_batches():
            began_cpu, began_wall = time.process_time(), time.perf_counter()
            images = device_input.decode(
                batch["pixels"], batch["height"], batch["width"], split.image_format, torch.device("cpu")
            )
            padded, heights, widths = device_input.pad(images)
            delivered += len(device_input.random_resized_crops(padded, heights, widths, image_size, scale, generator))
            device_cpu += time.process_time() - began_cpu
            device_wall += time.perf_counter() - began_wall
        return delivered, device_cpu, device_wall

    held = HeldImages(split, image_size, True, scale)

    def held_in_the_worker(epoch: int) -> tuple[int, float, float]:
        return sum(len(b["image"]) for b in held.batches(batch_size, rank=0, world=1, epoch=epoch)), 0.0, 0.0

    return {
        "ray_idle_cores": idle_cores(),
        "ray_data_pil": host_cost_epochs(pil_in_ray_tasks, epochs),
        "device_feed": host_cost_epochs(device_feed, epochs),
        "device": host_cost_epochs(on_device, epochs),
        "held": host_cost_epochs(held_in_the_worker, epochs),
    }


def dataloader_host_cost(root: Path, image_size: int, batch_size: int, epochs: int) -> dict:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True)
    transform = v2.Compose([crop, v2.RandomHorizontalFlip(), v2.PILToTensor()])
    loader = DataLoader(
        ImageFolder(str(root / "train"), transform=transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        persistent_workers=True,
    )
    return host_cost_epochs(lambda epoch: (sum(len(images) for images, _ in loader), 0.0, 0.0), epochs)


def summarise(rows: list[dict]) -> dict:
    warm = rows[1:] or rows
    return {
        "cold_images_per_s": _rate(rows[0]["images"], rows[0]["seconds"]),
        "warm_images_per_s": _rate(sum(r["images"] for r in warm), sum(r["seconds"] for r in warm)),
        "epochs": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="bench/.data/photos", help="folder for the generated JPEGs (reused)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="default bench/results/ingest.json (host_cost.json)")
    parser.add_argument("--host-cost", action="store_true", help="host CPU per delivered image of each input path")
    args = parser.parse_args(argv)
    if args.host_cost:
        return main_host_cost(args, argv)
    args.out = args.out or "bench/results/ingest.json"

    root = Path(args.data) / f"n{args.images}"
    data_bytes = write_photos(root, args.images)
    cache_root = Path(args.data) / "cache"
    shutil.rmtree(cache_root, ignore_errors=True)  # cold means cold: the cache is built inside epoch 1
    settings = (root, args.image_size, args.batch_size, args.epochs)
    sides = {
        "baseline": ("ImageFolder + DataLoader", lambda: bench_dataloader(*settings)),
        "tl_ray_no_cache": ("tl-ray --cache none", lambda: bench_tl_ray(*settings, None)),
        "tl_ray": ("tl-ray (decoded cache)", lambda: bench_tl_ray(*settings, str(cache_root))),
        "tl_ray_cache_built": ("tl-ray, cache already built", lambda: bench_tl_ray(*settings, str(cache_root))),
        "tl_ray_held": ("tl-ray held in memory (CPU)", lambda: bench_held(*settings, str(cache_root))),
    }
    results = {
        "benchmark": "ingest",
        "command": "python bench/ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "images": args.images,
        "mean_kb": data_bytes / args.images / 1024,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
    }
    for key, (_, measure) in sides.items():
        results[key] = summarise(measure())
    base = results["baseline"]
    for key in sides:
        results[key]["ratio_cold"] = results[key]["cold_images_per_s"] / base["cold_images_per_s"]
        results[key]["ratio_warm"] = results[key]["warm_images_per_s"] / base["warm_images_per_s"]
    results["ratio_cold"], results["ratio_warm"] = results["tl_ray"]["ratio_cold"], results["tl_ray"]["ratio_warm"]
    print(f"ingest: {args.images} JPEGs (~{results['mean_kb']:.0f} KB), {args.image_size} px, {results['machine']}")
    print(f"{'':30} {'cold img/s':>11} {'warm img/s':>11} {'cold ratio':>11} {'warm ratio':>11}")
    for key, (label, _) in sides.items():
        row = results[key]
        print(
            f"{label:30} {row['cold_images_per_s']:>11.1f} {row['warm_images_per_s']:>11.1f}"
            f" {row['ratio_cold']:>11.2f} {row['ratio_warm']:>11.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def main_host_cost(args: argparse.Namespace, argv: list[str] | None) -> dict:
    root = Path(args.data) / f"n{args.images}"
    write_photos(root, args.images)
    cache_root = str(Path(args.data) / "cache")
    settings = (root, args.image_size, args.batch_size, args.epochs)
    paths = {"dataloader": dataloader_host_cost(*settings), **host_cost(*settings, cache_root)}
    idle = paths.pop("ray_idle_cores")
    results = {
        "benchmark": "host_cost",
        "command": "python bench/ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "images": args.images,
        "image_size": args.image_size,
        "warm_epochs": args.epochs,
        "paths": paths,
        "ray_idle_cores": idle,
        # The GPU path's host side: the cached bytes streamed to the worker (its no-op consumer's run), the
        # decode and crop being the device's; and that feed's rate against the DataLoader's.
        "gpu_path_host_core_ms_per_image": paths["device_feed"]["host_core_ms_per_image"],
        "warm_vs_dataloader": paths["device_feed"]["images_per_s"] / paths["dataloader"]["images_per_s"],
    }
    print(f"host cost: {args.images} JPEGs, {args.image_size} px, {results['machine']}")
    print(f"Ray's processes idle: {idle:.3f} cores")
    print(f"{'path':14} {'host core-ms/img':>17} {'device ms/img':>14} {'img/s':>8} {'host-side img/s':>16}")
    for name, row in paths.items():
        print(
            f"{name:14} {row['host_core_ms_per_image']:>17.2f} {row['device_ms_per_image']:>14.2f}"
            f" {row['images_per_s']:>8.1f} {row['host_images_per_s']:>16.1f}"
        )
    out = Path(args.out or "bench/results/host_cost.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

"""Freeze-depth benchmark: training-step images/s for each freeze depth 0..5, without any feature cache.

Each case times exactly the step tl-ray's loop does (``tl_ray.training``): uint8 images
normalised on the device with ``tl_ray.inputs.imaging.normalize``, forward under autocast (CUDA
only) with channels_last (CUDA only), cross-entropy, backward, AdamW over the trainable
parameters, and ``loss.item()``, on a ``TransferResNet`` in train mode. The input is one
random uint8 batch, so the numbers are the model's cost alone, not ingest's.

As a reference, "naive 5" is depth 5 frozen the way a hand-written script does it: a plain
torchvision ResNet with ``requires_grad=False`` on the backbone, in train mode (so its
BatchNorms still compute batch statistics and update running ones), and no ``torch.no_grad``.

    python bench/freeze_depth.py       # resnet18 + resnet50, 112 px on CPU, batch 32
    python bench/freeze_depth.py --archs resnet18 --image-size 32 --batch-size 4 --steps 2 --warmup 1  # smoke test

Built for a shared machine: the cases of one arch take their steps in turns (round-robin),
so a burst of load elsewhere slows every depth alike, and images/s is the batch size over
the fastest timed step (warm-up steps excluded), as ``timeit`` reports its best run: load
elsewhere only ever makes a step slower, on a 2-core CPU by up to 10x (OpenMP threads
waiting for each other). The median is kept in the JSON too.
Prints a table and writes JSON (``--out``, default bench/results/freeze_depth.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_ray.backbones import NUM_STAGES
from tl_ray.inputs import imaging
from tl_ray.model import IMAGENET_MEAN, IMAGENET_STD, STAGE_MODULES, TransferResNet, create_resnet
from tl_ray.training.config import TrainConfig
from tl_ray.training.loop import amp_dtype_of
from tl_ray.training.schedule import make_optimizer

NUM_CLASSES = 10
TARGET_RATIO = 2.5  # issue 7: depth 5 >= 2.5x the images/s of depth 0, without the feature cache


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine(device: torch.device) -> str:
    """Where the numbers come from: platform, CPU count, torch version and, on CUDA, the GPU."""
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, torch {torch.__version__}{gpu}"


def naive_frozen(arch: str, freeze_depth: int) -> nn.Module:
    """A ResNet frozen as a typical hand-written script freezes it: ``requires_grad=False`` and nothing else."""
    net = create_resnet(arch, NUM_CLASSES)
    for names in STAGE_MODULES[:freeze_depth]:
        for name in names:
            getattr(net, name).requires_grad_(False)
    return net.train()


def build(arch: str, freezing: str, freeze_depth: int) -> nn.Module:
    if freezing == "naive":
        return naive_frozen(arch, freeze_depth)
    return TransferResNet(create_resnet(arch, NUM_CLASSES), freeze_depth).train()


def make_step(
    model: nn.Module,
    device: torch.device,
    *,
    batch_size: int,
    image_size: int,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    compile: bool = False,
) -> Callable[[], float]:
    """tl-ray's training step on ``model`` (in train mode), as a function that runs one step and returns its seconds."""
    torch.manual_seed(0)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile else model
    recipe = TrainConfig(data="-", weights="none").validate()  # the default recipe's optimizer and learning rate
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], recipe)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)
    pixels = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)

    def step() -> float:
        started = time.perf_counter()
        images = imaging.normalize(pixels, mean, std)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = forward(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # the loop reads the loss every step; this also waits for the GPU
        return time.perf_counter() - started

    return step


def rates(batch_size: int, seconds: list[float]) -> dict:
    return {
        "images_per_s": batch_size / min(seconds),
        "median_images_per_s": batch_size / statistics.median(seconds),
        "step_s": [round(s, 4) for s in seconds],
    }


def measure(model: nn.Module, device: torch.device, *, steps: int, warmup: int, **options: Any) -> dict:
    """One case on its own: images/s (best step), warm-up seconds and peak CUDA memory (None on CPU).

    ``options`` are ``make_step``'s. The warm-up steps (cuDNN autotuning, allocator
    growth, torch.compile's compilation) are timed separately as ``warmup_s``.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(model, device, **options)
    warmup_s = sum(step() for _ in range(warmup))
    seconds = [step() for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {**rates(options["batch_size"], seconds), "warmup_s": warmup_s, "peak_memory_mb": peak}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="resnet18,resnet50", help="comma-separated")
    parser.add_argument("--image-size", type=int, default=None, help="default: 112 on CPU, 224 on CUDA")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case (rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", default="bench/results/freeze_depth.json")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    image_size = args.image_size or (224 if device.type == "cuda" else 112)
    torch.set_num_threads(os.cpu_count() or 1)
    amp_dtype = amp_dtype_of(device)  # what tl-ray's loop uses: bf16/fp16 on CUDA, none on CPU
    channels_last = device.type == "cuda"
    settings = {
        "archs": args.archs.split(","),
        "image_size": image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": str(device),
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
        "channels_last": channels_last,
        "threads": torch.get_num_threads(),
    }
    options = {
        "batch_size": args.batch_size,
        "image_size": image_size,
        "amp_dtype": amp_dtype,
        "channels_last": channels_last,
    }
    rows, summary = [], {}
    for arch in settings["archs"]:
        cases = [("tl-ray", depth) for depth in range(NUM_STAGES + 1)] + [("naive", NUM_STAGES)]
        steps = [make_step(build(arch, freezing, depth), device, **options) for freezing, depth in cases]
        warmup_s = [sum(step() for _ in range(args.warmup)) for step in steps]
        seconds = [[] for _ in steps]
        for round_ in range(args.steps):  # round-robin: a burst of load elsewhere slows every case alike
            for times, step in zip(seconds, steps, strict=True):
                times.append(step())
            print(f"  {arch}: round {round_ + 1}/{args.steps}", flush=True)
        del steps  # frees the models
        depth0 = args.batch_size / min(seconds[0])
        for (freezing, depth), times, warm in zip(cases, seconds, warmup_s, strict=True):
            row = {"arch": arch, "freezing": freezing, "freeze_depth": depth, **rates(args.batch_size, times)}
            row |= {"warmup_s": warm, "vs_depth0": row["images_per_s"] / depth0}
            rows.append(row)
        depth5, naive = rows[-2], rows[-1]
        summary[arch] = {
            "depth5_over_depth0": depth5["vs_depth0"],
            "target": TARGET_RATIO,
            "target_met": depth5["vs_depth0"] >= TARGET_RATIO,
            "depth5_over_naive5": depth5["images_per_s"] / naive["images_per_s"],
        }

    results = {
        "benchmark": "freeze_depth",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(device),
        "settings": settings,
        "rows": rows,
        "summary": summary,
    }
    print(f"freeze depth: training-step images/s, {image_size} px, batch {args.batch_size}, {results['machine']}")
    print(f"{'arch':10} {'depth':>8} {'img/s':>9} {'vs depth 0':>11}")
    for row in rows:
        depth = f"{row['freeze_depth']}" if row["freezing"] == "tl-ray" else f"{row['freeze_depth']} naive"
        print(f"{row['arch']:10} {depth:>8} {row['images_per_s']:>9.1f} {row['vs_depth0']:>10.2f}x")
    for arch, item in summary.items():
        verdict = "met" if item["target_met"] else "MISSED"
        print(
            f"{arch}: depth 5 / depth 0 = {item['depth5_over_depth0']:.2f}x (target >= {TARGET_RATIO}x: {verdict}); "
            f"tl-ray depth 5 / naive depth 5 = {item['depth5_over_naive5']:.2f}x"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

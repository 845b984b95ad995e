"""GPU benchmark: training-step images/s and memory of fine-tuning and feature extraction, then tl-ray end to end.

Part 1 times tl-ray's training step (``freeze_depth.measure``: the same step, the same
``TransferResNet``, random uint8 input) at freeze depth 0 (fine-tuning) and 5 (feature
extraction), each in three variants: fp32; bf16 autocast + channels_last (what tl-ray's
loop runs on a bf16 GPU); and that + ``torch.compile``. A variant that fails (a compile
error, out of memory) is recorded with its error instead of ending the run.

Part 2 runs the whole of `tl-ray train` (``tl_ray.training.run``: Ray Data decoding and
augmenting generated photo-like JPEGs, Ray Train, validation, checkpoints) and puts each
epoch's training images/s next to part 1's step images/s for the variant tl-ray runs: a
ratio near 1 means ingest keeps the GPU fed, well below 1 means the GPU waits for data.

    bash bench/gpu.sh                 # ResNet50, 224 px, batch 256; fits in ~8 minutes on one H100/H200
    bash bench/gpu.sh --tiny          # CPU smoke test: resnet18, 32 px, batch 8, 24 JPEGs, no compile

Prints a table and writes JSON (``--out``, default bench/results/gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import ray
import torch
from freeze_depth import NUM_CLASSES, machine, measure, pick_device
from ingest import write_photos

from tl_ray.model import TransferResNet, create_resnet
from tl_ray.training.config import TrainConfig
from tl_ray.training.driver import run
from tl_ray.training.loop import amp_dtype_of

TARGETS = {0: 2500.0, 5: 7000.0}  # issue 7, images/s with bf16 on an H100/H200
PRESETS = {
    "full": {"arch": "resnet50", "image_size": 224, "batch_size": 256, "steps": 30, "warmup": 5},
    "tiny": {"arch": "resnet18", "image_size": 32, "batch_size": 8, "steps": 2, "warmup": 1},
}
PRESETS["full"] |= {"images": 4096, "epochs": 2, "e2e_depths": "0,5"}
PRESETS["tiny"] |= {"images": 24, "epochs": 1, "e2e_depths": "5"}
VARIANTS = {  # name: (autocast dtype, channels_last, torch.compile)
    "fp32": (None, False, False),
    "bf16+cl": (torch.bfloat16, True, False),
    "bf16+cl+compile": (torch.bfloat16, True, True),
}


def write_dataset(root: Path, count: int) -> float:
    """``count`` photo-like JPEGs in root/train/class*/, written by every CPU (one takes ~25 ms); seconds taken."""
    started = time.perf_counter()
    if len(list(root.glob("train/*/*.jpg"))) >= count:
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    parts = min(os.cpu_count() or 1, count)
    roots = [root / "parts" / str(part) for part in range(parts)]
    counts = [count // parts + (part < count % parts) for part in range(parts)]
    with ProcessPoolExecutor(parts) as pool:  # before any CUDA use: forked children never touch it
        list(pool.map(write_photos, roots, counts, range(parts)))
    for part_root in roots:
        for path in part_root.glob("train/*/*.jpg"):
            folder = root / "train" / path.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            path.rename(folder / f"{part_root.name}-{path.name}")
    shutil.rmtree(root / "parts")
    return time.perf_counter() - started


def step_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Part 1: each depth x variant on its own, so each row's peak memory is that case's alone."""
    rows = []
    for depth in (0, 5):
        for variant, (amp_dtype, channels_last, compile) in VARIANTS.items():
            if compile and args.no_compile:
                continue
            row = {"freeze_depth": depth, "variant": variant}
            try:
                row |= measure(
                    TransferResNet(create_resnet(args.arch, NUM_CLASSES), depth).train(),
                    device,
                    batch_size=args.batch_size,
                    image_size=args.image_size,
                    steps=args.steps,
                    warmup=args.warmup,
                    amp_dtype=amp_dtype,
                    channels_last=channels_last,
                    compile=compile,
                )
            except Exception as error:  # a variant that cannot run is a result, not the end of the benchmark
                row |= {"images_per_s": None, "error": f"{type(error).__name__}: {error}"[:2000]}
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            rate = f"{row['images_per_s']:.1f} img/s" if row["images_per_s"] else row["error"].splitlines()[0]
            print(f"  depth {depth} {variant}: {rate}", flush=True)
    return rows


def end_to_end_rows(args: argparse.Namespace, root: Path, steps: list[dict], device: torch.device) -> list[dict]:
    """Part 2: `tl-ray train` on the JPEGs at each depth in --e2e-depths, with its per-epoch images/s."""
    # The step variant tl-ray's loop runs here: bf16 + channels_last on a bf16 GPU, plain fp32 on CPU.
    amp_dtype = amp_dtype_of(device)
    same_as = "bf16+cl" if amp_dtype == torch.bfloat16 else "fp32" if amp_dtype is None else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="tl-ray-gpu-bench-") as storage:
        try:
            for depth in [int(d) for d in args.e2e_depths.split(",")]:
                config = TrainConfig(
                    data=str(root),
                    arch=args.arch,
                    weights="none",
                    freeze_depth=depth,
                    epochs=args.epochs,
                    image_size=args.image_size,
                    batch_size=args.batch_size,
                    storage=storage,
                    name=f"gpu-bench-depth{depth}",
                    cpus_per_worker=0.5 if args.tiny else None,
                )
                row = {"freeze_depth": depth, "step_variant": same_as}
                started = time.perf_counter()
                try:
                    result = run(config)
                except Exception as error:
                    row |= {"images_per_s": None, "error": f"{type(error).__name__}: {error}"[:2000]}
                    rows.append(row)
                    continue
                history = [
                    {key: item[key] for key in ("epoch", "images_per_s", "epoch_s", "train_images")}
                    for item in result.history
                ]
                step = next((r for r in steps if r["freeze_depth"] == depth and r["variant"] == same_as), {})
                step_rate = step.get("images_per_s")
                row |= {
                    "seconds": time.perf_counter() - started,
                    "history": history,
                    "images_per_s": history[-1]["images_per_s"],  # the last epoch: Ray Data is warm
                    "step_images_per_s": step_rate,
                    "fed_ratio": history[-1]["images_per_s"] / step_rate if step_rate else None,
                }
                rows.append(row)
                print(f"  end to end depth {depth}: {[round(h['images_per_s'], 1) for h in history]} img/s", flush=True)
        finally:
            ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: resnet18, 32 px, batch 8, 24 JPEGs")
    parser.add_argument("--arch", help="default resnet50 (tiny: resnet18)")
    parser.add_argument("--image-size", type=int, help="default 224 (tiny: 32)")
    parser.add_argument("--batch-size", type=int, help="default 256 (tiny: 8)")
    parser.add_argument("--steps", type=int, help="timed steps per case; default 30 (tiny: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps per case; default 5 (tiny: 1)")
    parser.add_argument("--images", type=int, help="generated JPEGs for the end-to-end part; default 4096 (tiny: 24)")
    parser.add_argument("--epochs", type=int, help="end-to-end epochs; default 2 (tiny: 1)")
    parser.add_argument("--e2e-depths", help="freeze depths run end to end; default 0,5 (tiny: 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (tiny skips it)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--data", default="bench/.data/photos", help="folder for the generated JPEGs (reused)")
    parser.add_argument("--out", default="bench/results/gpu.json")
    args = parser.parse_args(argv)
    for key, value in PRESETS["tiny" if args.tiny else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.no_compile = args.no_compile or args.tiny

    root = Path(args.data) / f"gpu-n{args.images}"
    generate_s = write_dataset(root, args.images)
    device = pick_device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "data")}
    settings |= {"device": str(device), "num_classes_steps": NUM_CLASSES, "generate_s": generate_s}
    print(f"gpu: {args.arch}, {args.image_size} px, batch {args.batch_size}, {machine(device)}", flush=True)
    steps = step_rows(args, device)
    e2e = end_to_end_rows(args, root, steps, device)

    targets = {}  # they are for an H100/H200: on anything else the numbers say nothing about them
    for depth, target in TARGETS.items() if device.type == "cuda" else ():
        rates = [r["images_per_s"] for r in steps if r["freeze_depth"] == depth and r["variant"] != "fp32"]
        best = max((rate for rate in rates if rate), default=None)
        targets[f"depth{depth}"] = {"target": target, "best_bf16": best, "met": best is not None and best >= target}
    results = {
        "benchmark": "gpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(device),
        "settings": settings,
        "steps": steps,
        "end_to_end": e2e,
        "targets": targets,
    }

    print(f"{'depth':>5} {'variant':16} {'img/s':>9} {'peak MiB':>9} {'warm-up s':>10}")
    for row in steps:
        if row["images_per_s"] is None:
            print(f"{row['freeze_depth']:>5} {row['variant']:16} failed: {row['error'].splitlines()[0][:80]}")
            continue
        memory = f"{row['peak_memory_mb']:.0f}" if row["peak_memory_mb"] is not None else "-"
        print(
            f"{row['freeze_depth']:>5} {row['variant']:16} {row['images_per_s']:>9.1f} {memory:>9} "
            f"{row['warmup_s']:>10.1f}"
        )
    for row in e2e:
        if row["images_per_s"] is None:
            print(f"{row['freeze_depth']:>5} {'tl-ray train':16} failed: {row['error'].splitlines()[0][:80]}")
            continue
        epochs = ", ".join(f"{h['images_per_s']:.1f}" for h in row["history"])
        ratio = f"{row['fed_ratio']:.3g}x of the step rate" if row["fed_ratio"] else "no step rate to compare"
        print(f"{row['freeze_depth']:>5} {'tl-ray train':16} {row['images_per_s']:>9.1f}  (epochs: {epochs}; {ratio})")
    for name, item in targets.items():
        best = f"{item['best_bf16']:.0f}" if item["best_bf16"] else "-"
        verdict = "met" if item["met"] else "MISSED"
        print(f"target {name}: >= {item['target']:.0f} img/s with bf16: best {best} ({verdict})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

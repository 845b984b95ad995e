"""Backbones benchmark: training steps/s of every family at freeze depths 0 and 5, without any feature cache.

The step is tl-ray's (``freeze_depth.make_step``: uint8 images normalised on the device,
forward, cross-entropy, backward, AdamW over the trainable parameters, ``loss.item()``)
on a ``TransferModel`` in train mode, fed one random uint8 batch: the model's cost alone.
Depth 0 is full fine-tuning; depth 5 is a head alone on a frozen backbone run under
``torch.no_grad`` (still a whole forward pass every step: the feature cache, which removes
it, is ``bench/feature_cache.py``'s subject).

    python bench/backbones.py      # torchvision's resnet18, convnext_tiny, efficientnet_b0, vit_b_16 and timm's
                                   # resnet18d, convnext_atto, mobilenetv3_small_050, vit_tiny; 64 px, batch 16, CPU
    python bench/backbones.py --archs resnet18,vit_b_16 --image-size 32 --batch-size 4 --steps 1 --warmup 1  # smoke
    python bench/backbones.py --accuracy    # and val_acc through `tl_ray.train` on learning.py's digits

``--accuracy`` adds, per arch, learning.py's digits rows with tl-ray alone (its reference
script is ResNet-only): the source task (digits 0-4) from ``--weights none``, then the
target task (digits 5-9, few images a class) transferred from that source model at depths
5 and 0. One seed, at ``--accuracy-size`` px.

As ``freeze_depth.py``, but across archs too: every case takes its steps in turns (round-robin)
and steps/s is over the fastest timed step (load elsewhere only ever slows a step); the median
is in the JSON too. Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import torch
from freeze_depth import machine, make_step, pick_device, rates

import tl_ray
from tl_ray import backbones
from tl_ray.model import TransferModel, create_model

NUM_CLASSES = 10
DEFAULT_ARCHS = "resnet18,convnext_tiny,efficientnet_b0,vit_b_16"
DEFAULT_ARCHS += ",resnet18d,convnext_atto,mobilenetv3_small_050,vit_tiny_patch16_224"  # timm's, by name (issue 40)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=DEFAULT_ARCHS, help="comma-separated")
    parser.add_argument("--depths", default="0,5", help="comma-separated freeze depths")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per case (rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--accuracy", action="store_true", help="also train on the digits (minutes per arch)")
    parser.add_argument("--accuracy-size", type=int, default=32)
    parser.add_argument("--source-epochs", type=int, default=6)
    parser.add_argument("--target-epochs", type=int, default=6)
    parser.add_argument("--data", default="bench/.data/learning")
    parser.add_argument("--out", default="bench/results/backbones.json")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    archs, depths = args.archs.split(","), [int(d) for d in args.depths.split(",")]
    options = {"batch_size": args.batch_size, "image_size": args.image_size}
    cases = [(arch, depth) for arch in archs for depth in depths]
    models, steps = {}, []
    for arch, depth in cases:
        torch.manual_seed(0)
        models[arch, depth] = TransferModel(create_model(arch, NUM_CLASSES, args.image_size), depth).train()
        steps.append(make_step(models[arch, depth], device, **options))
    parameters = {arch: sum(p.numel() for p in models[arch, depths[0]].parameters()) for arch in archs}
    for step in steps:
        for _ in range(args.warmup):
            step()
    seconds = [[] for _ in steps]
    for _ in range(args.steps):  # round-robin over every case: a burst of load elsewhere slows them alike
        for times, step in zip(seconds, steps, strict=True):
            times.append(step())
    del steps, models
    rows = []
    for (arch, depth), times in zip(cases, seconds, strict=True):
        measured = rates(args.batch_size, times)
        rows.append(
            {
                "arch": arch,
                "family": backbones.family(arch).name,
                "parameters_m": round(parameters[arch] / 1e6, 1),
                "feature_dim": backbones.family(arch).archs[arch].feature_dim,
                "freeze_depth": depth,
                "steps_per_s": measured["images_per_s"] / args.batch_size,
                "median_steps_per_s": measured["median_images_per_s"] / args.batch_size,
                **measured,
            }
        )
    accuracy = accuracy_rows(archs, args) if args.accuracy else []
    results = {
        "benchmark": "backbones",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(device),
        "settings": {**options, "archs": archs, "depths": depths, "steps": args.steps, "warmup": args.warmup},
        "rows": rows,
        "accuracy": accuracy,
    }
    print(f"backbones: training steps/s, {args.image_size} px, batch {args.batch_size}, {results['machine']}")
    print("| arch | params (M) | features | depth | steps/s | images/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['arch']} | {row['parameters_m']} | {row['feature_dim']} | {row['freeze_depth']} |"
            f" {row['steps_per_s']:.2f} | {row['images_per_s']:.1f} |"
        )
    if accuracy:
        print(f"\nval_acc on the digits, {args.accuracy_size} px, tl-ray's defaults, 1 seed")
        print("| arch | source from scratch | target d5 (from source) | target d0 (from source) |")
        print("|---|---:|---:|---:|")
        for row in accuracy:
            print(f"| {row['arch']} | {row['source']:.3f} | {row['target_d5']:.3f} | {row['target_d0']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def accuracy_rows(archs: list[str], args: argparse.Namespace) -> list[dict]:
    """Per arch: val_acc of the digits source from scratch, and of the target transferred from it at depths 5, 0."""
    import tempfile

    from learning import prepare

    root = prepare("digits", Path(args.data), per_class=200)  # learning.py's default: 10 target images a class
    common = {"image_size": args.accuracy_size, "keep_checkpoints": 1, "seed": 0}
    found = []
    with tempfile.TemporaryDirectory(prefix="tl-ray-backbones-") as storage:
        for arch in archs:
            run = {"arch": arch, "storage": storage, **common}
            source = tl_ray.train(
                data=str(root / "source"),
                weights="none",
                epochs=args.source_epochs,
                batch_size=32,
                name=f"{arch}-source",
                **run,
            )
            row = {"arch": arch, "source": source.metrics["val_acc"]}
            for depth in (5, 0):
                target = tl_ray.train(
                    data=str(root / "target"),
                    weights=source.best_checkpoint,
                    freeze_depth=depth,
                    epochs=args.target_epochs,
                    batch_size=16,
                    name=f"{arch}-target-d{depth}",
                    **run,
                )
                row[f"target_d{depth}"] = target.metrics["val_acc"]
            found.append(row)
    return found


if __name__ == "__main__":
    main()

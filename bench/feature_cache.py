"""Feature-cache benchmark: depth-5 `--augment none` epochs with the feature cache vs the same run without it.

Feature extraction (`--freeze-depth 5`) on centre crops (`--augment none`) trains only the
head on backbone outputs that never change. tl-ray computes them once (the feature cache)
and holds them in each worker's memory; without the cache the backbone runs over every
image every epoch, which is what a plain script does. Both runs are the real `tl-ray
train` on the same generated photo-like JPEGs with the decoded-image cache already built;
"without" turns the feature cache off in this process (``features.applies``) and nothing
else. Warm epochs are epochs 2 on (epoch 1 of the cached run computes the features).

    python bench/feature_cache.py              # resnet50, 112 px, 1,200 images, 3 epochs: ~6 min on 2 CPUs
    python bench/feature_cache.py --images 48 --arch resnet18 --image-size 32 --epochs 2   # smoke test

Prints a table and writes JSON (``--out``, default bench/results/feature_cache.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from ingest import write_photos

from tl_ray import cluster
from tl_ray.inputs import features
from tl_ray.training.config import TrainConfig
from tl_ray.training.driver import run


def train(root: Path, args: argparse.Namespace, storage: str, name: str) -> dict:
    config = TrainConfig(
        data=str(root),
        arch=args.arch,
        weights="none",
        freeze_depth=5,
        augment="none",
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        val_fraction=0.1,
        storage=storage,
        name=name,
        keep_checkpoints=1,
    )
    started = time.perf_counter()
    result = run(config)
    wall = time.perf_counter() - started
    warm = result.history[1:] or result.history
    return {
        "wall_s": wall,
        "epoch_s": [row["epoch_s"] for row in result.history],
        "warm_epoch_s": sum(row["epoch_s"] for row in warm) / len(warm),
        "val_acc": [row["val_acc"] for row in result.history],
        "train_images": result.history[-1]["train_images"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="bench/.data/photos", help="folder for the generated JPEGs (reused)")
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/results/feature_cache.json")
    args = parser.parse_args(argv)

    root = Path(args.data) / f"n{args.images}"
    write_photos(root, args.images)
    cluster.ensure_ray()
    results = {
        "benchmark": "feature_cache",
        "command": "python bench/feature_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, torch {torch.__version__}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data")},
    }
    with tempfile.TemporaryDirectory() as storage:
        applies = features.applies
        features.applies = lambda *_: False  # the run as it is without the feature cache; runs first, so the
        try:  # decoded-image cache it builds is warm for both
            results["without"] = train(root, args, storage, "without")
        finally:
            features.applies = applies
        results["with"] = train(root, args, storage, "with")
    results["warm_epoch_speedup"] = results["without"]["warm_epoch_s"] / results["with"]["warm_epoch_s"]
    results["wall_speedup"] = results["without"]["wall_s"] / results["with"]["wall_s"]
    print(
        f"feature cache: {args.arch}, {args.image_size} px, {results['with']['train_images']} training images,"
        f" {args.epochs} epochs, {results['machine']}"
    )
    print(f"{'':22} {'warm epoch s':>13} {'run wall s':>11} {'epochs s':>30}")
    for key in ("without", "with"):
        row = results[key]
        epochs = " ".join(f"{s:.2f}" for s in row["epoch_s"])
        print(f"{key + ' feature cache':22} {row['warm_epoch_s']:>13.2f} {row['wall_s']:>11.1f} {epochs:>30}")
    print(f"warm epochs {results['warm_epoch_speedup']:.1f}x faster, whole run {results['wall_speedup']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

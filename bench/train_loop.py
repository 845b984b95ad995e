"""Training-loop benchmark: steady-state images/s of `tl-ray train` vs a plain single-process PyTorch loop.

Both train the same model (resnet18 by default, no pretrained weights needed) at the same
freeze depth, batch size, image size and number of torch threads, on the same generated
photo-like JPEGs, with the same augmentation (RandomResizedCrop + flip, normalised). The
plain loop is what a user would write: ImageFolder + DataLoader (one loader process per
CPU left over from the model, as tl-ray leaves to Ray Data) + a hand-written step. tl-ray
runs its real `train` (Ray Train worker, Ray Data pipeline, decoded-image cache,
checkpoints, validation). Epoch 1 is start-up (and the cache build); the steady state is
the mean over the later epochs of the images/s the training loop saw. The ratio
tl-ray / plain is the cost (or gain) of running under Ray.

    python bench/train_loop.py                                   # 2x ~3-4 min on 2 CPUs
    python bench/train_loop.py --images 48 --epochs 2 --image-size 32 --depths 5   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from ingest import write_photos

from tl_ray import data, model
from tl_ray.config import TrainConfig
from tl_ray.train import make_optimizer


def plain_loop(root: Path, arch: str, depth: int, image_size: int, batch_size: int, epochs: int, threads: int):
    """The hand-written baseline: images/s of each epoch."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dataset = ImageFolder(str(root / "train"), transform=data.train_transform(image_size))
    loader_processes = max(1, (os.cpu_count() or 1) - threads)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=loader_processes, drop_last=True)
    net = model.TransferResNet(model.create_resnet(arch, len(dataset.classes)), depth)
    recipe = TrainConfig(data=str(root), weights="none", freeze_depth=depth).validate()
    optimizer = make_optimizer(net.parameter_groups(recipe.lr, recipe.weight_decay), recipe)
    criterion = torch.nn.CrossEntropyLoss()
    mean, std = torch.tensor(model.IMAGENET_MEAN), torch.tensor(model.IMAGENET_STD)
    rates = []
    for _ in range(epochs):
        net.train()
        started, seen = time.perf_counter(), 0
        for images, labels in loader:
            loss = criterion(net(data.normalize(images, mean, std)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - started))
    return rates


def tl_ray_train(root: Path, arch: str, depth: int, image_size: int, batch_size: int, epochs: int, storage: str):
    """`tl-ray train` through its Python API: the per-epoch images/s its loop reported, and the worker's threads."""
    from tl_ray.train import run

    config = TrainConfig(
        data=str(root),
        arch=arch,
        weights="none",
        freeze_depth=depth,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        val_fraction=0.1,
        storage=storage,
        name=f"depth{depth}",
        keep_checkpoints=1,
    )
    result = run(config)
    return [row["images_per_s"] for row in result.history]


def steady(rates: list[float]) -> float:
    later = rates[1:] or rates
    return sum(later) / len(later)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="bench/.data/photos", help="folder for the generated JPEGs (reused)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--depths", default="0,5")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/results/train_loop.json")
    args = parser.parse_args(argv)

    root = Path(args.data) / f"n{args.images}"
    write_photos(root, args.images)
    cpus = os.cpu_count() or 1
    # The threads tl-ray gives one worker on this machine (train._resources: all CPUs but one, at most 8).
    threads = max(1, int(min(8.0, max(cpus - 1.0, cpus / 2.0))))
    results = {
        "benchmark": "train_loop",
        "command": "python bench/train_loop.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {cpus} CPUs, {platform.platform()}, torch {torch.__version__}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data")} | {"torch_threads": threads},
        "rows": [],
    }
    depths = [int(depth) for depth in args.depths.split(",")]
    # Every plain loop before Ray starts: DataLoader forks its workers, and a fork of a Ray driver is unsafe.
    plain = {d: plain_loop(root, args.arch, d, args.image_size, args.batch_size, args.epochs, threads) for d in depths}
    data.ensure_ray()
    with tempfile.TemporaryDirectory() as storage:
        for depth in depths:
            ours = tl_ray_train(root, args.arch, depth, args.image_size, args.batch_size, args.epochs, storage)
            results["rows"].append(
                {
                    "freeze_depth": depth,
                    "plain_epochs_images_per_s": plain[depth],
                    "tl_ray_epochs_images_per_s": ours,
                    "plain_steady_images_per_s": steady(plain[depth]),
                    "tl_ray_steady_images_per_s": steady(ours),
                    "ratio": steady(ours) / steady(plain[depth]),
                }
            )
    print(f"training loop: {args.arch}, {args.image_size} px, batch {args.batch_size}, {results['machine']}")
    print(f"{'freeze depth':>12} {'plain img/s':>12} {'tl-ray img/s':>13} {'tl-ray / plain':>15}")
    for row in results["rows"]:
        print(
            f"{row['freeze_depth']:>12} {row['plain_steady_images_per_s']:>12.1f}"
            f" {row['tl_ray_steady_images_per_s']:>13.1f} {row['ratio']:>15.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

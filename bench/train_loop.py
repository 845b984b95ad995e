"""Training-loop benchmark: steady-state images/s of `tl-ray train` vs the plain PyTorch script a user writes.

Both train the same model (resnet18 by default, no pretrained weights needed) at the same
freeze depth, batch size and image size, on the same generated photo-like JPEGs, with the
same augmentation (RandomResizedCrop + flip, normalised). The plain script is ImageFolder
+ DataLoader + a hand-written step, in two settings:

- defaults: what a user writes: DataLoader(num_workers=<cores>), torch's default threads;
  compared with `tl-ray train` under its own defaults (its one worker sizes its threads
  to the cores; the decoded-image cache leaves Ray Data little to do);
- thread-matched: the plain script with the torch threads tl-ray's worker uses and one
  loader process per core left over.

tl-ray runs its real `train` (Ray Train worker, Ray Data pipeline, decoded-image cache,
checkpoints, validation). Epoch 1 is start-up (and the cache build); the steady state is
the mean over the later epochs of the images/s the training loop saw. The fixed cost of a
warm epoch is the time its loop waited for the first batches (``data_wait_s``: the
pipeline's start-up, plus any time it could not keep up). The ratio tl-ray / plain is the
cost (or gain) of running under Ray.

    python bench/train_loop.py                                   # ~12 min on 2 CPUs
    python bench/train_loop.py --images 48 --epochs 2 --image-sizes 32 --depths 5   # smoke test
    python bench/train_loop.py --sample 200 --depths 0 --image-sizes 64 --epochs 4  # on the sample shapes
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

from tl_ray import cluster, model, write_sample_data
from tl_ray.cluster import torch_threads
from tl_ray.inputs import imaging
from tl_ray.training.config import TrainConfig
from tl_ray.training.schedule import make_optimizer

DEFAULT_THREADS = torch.get_num_threads()  # before anything changes it: what a user's script gets


def plain_loop(
    root: Path,
    arch: str,
    depth: int,
    image_size: int,
    batch_size: int,
    epochs: int,
    threads: int,
    loader_processes: int,
):
    """The hand-written baseline: images/s of each epoch."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dataset = ImageFolder(str(root / "train"), transform=imaging.train_transform(image_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=loader_processes, drop_last=True)
    net = model.TransferResNet(model.create_resnet(arch, len(dataset.classes)), depth)
    # The rate and decay tl-ray's recipe gives this depth and training-set size, so both sides take the same steps.
    recipe = TrainConfig(data=str(root), weights="none", freeze_depth=depth).for_training_set(len(dataset))
    optimizer = make_optimizer(net.parameter_groups(recipe.lr, recipe.weight_decay), recipe)
    criterion = torch.nn.CrossEntropyLoss()
    mean, std = torch.tensor(model.IMAGENET_MEAN), torch.tensor(model.IMAGENET_STD)
    rates = []
    for _ in range(epochs):
        net.train()
        started, seen = time.perf_counter(), 0
        for images, labels in loader:
            loss = criterion(net(imaging.normalize(images, mean, std)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - started))
    return rates


def tl_ray_train(root: Path, arch: str, depth: int, image_size: int, batch_size: int, epochs: int, storage: str):
    """`tl-ray train` through its Python API, under its defaults: its per-epoch metrics."""
    from tl_ray.training.driver import run

    config = TrainConfig(
        data=str(root),
        arch=arch,
        weights="none",
        freeze_depth=depth,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        **({} if (root / "val").is_dir() else {"val_fraction": 0.1}),  # a val/ folder is the validation set
        storage=storage,
        name=f"depth{depth}-{image_size}px",
        keep_checkpoints=1,
    )
    return run(config).history


def steady(rates: list[float]) -> float:
    later = rates[1:] or rates
    return sum(later) / len(later)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="bench/.data/photos", help="folder for the generated JPEGs (reused)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument(
        "--sample",
        type=int,
        metavar="PER_CLASS",
        help="train on `tl-ray sample-data --per-class PER_CLASS`'s source (its train/ and val/) instead of photos",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--depths", default="0,5")
    parser.add_argument("--image-sizes", default="64,112")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="bench/results/train_loop.json")
    args = parser.parse_args(argv)

    if args.sample:
        root = Path(args.data).parent / f"sample{args.sample}" / "source"
        if not root.exists():
            write_sample_data(str(root.parent), per_class=args.sample)
    else:
        root = Path(args.data) / f"n{args.images}"
        write_photos(root, args.images)
    cpus = os.cpu_count() or 1
    ours_threads = torch_threads(cpus, 1, decoding_every_epoch=False)  # what tl-ray's one worker uses here
    settings = {
        "defaults": (DEFAULT_THREADS, cpus),
        "thread-matched": (ours_threads, max(1, cpus - ours_threads)),
    }
    results = {
        "benchmark": "train_loop",
        "command": "python bench/train_loop.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {cpus} CPUs, {platform.platform()}, torch {torch.__version__}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data")}
        | {"plain (torch threads, loader processes)": settings},
        "rows": [],
    }
    depths = [int(depth) for depth in args.depths.split(",")]
    sizes = [int(size) for size in args.image_sizes.split(",")]
    cases = [(size, depth) for size in sizes for depth in depths]
    # Every plain loop before Ray starts: DataLoader forks its workers, and a fork of a Ray driver is unsafe.
    plain = {
        (case, name): plain_loop(root, args.arch, case[1], case[0], args.batch_size, args.epochs, *setting)
        for case in cases
        for name, setting in settings.items()
    }
    cluster.ensure_ray()
    with tempfile.TemporaryDirectory() as storage:
        for size, depth in cases:
            history = tl_ray_train(root, args.arch, depth, size, args.batch_size, args.epochs, storage)
            ours = [row["images_per_s"] for row in history]
            warm = history[1:] or history
            row = {
                "image_size": size,
                "freeze_depth": depth,
                "tl_ray_epochs_images_per_s": ours,
                "tl_ray_steady_images_per_s": steady(ours),
                "tl_ray_torch_threads": history[-1]["torch_threads"],
                "tl_ray_warm_epoch_s": [row["epoch_s"] for row in warm],
                "tl_ray_warm_data_wait_s": [row["data_wait_s"] for row in warm],
            }
            for name in settings:
                rates = plain[((size, depth), name)]
                row[f"plain_{name}_epochs_images_per_s"] = rates
                row[f"plain_{name}_steady_images_per_s"] = steady(rates)
                row[f"ratio_vs_{name}"] = steady(ours) / steady(rates)
            results["rows"].append(row)
    print(f"training loop: {args.arch}, batch {args.batch_size}, {results['machine']}")
    print(
        f"{'px':>4} {'depth':>5} {'plain defaults':>15} {'plain matched':>14} {'tl-ray':>8}"
        f" {'vs defaults':>12} {'vs matched':>11} {'warm-epoch wait s':>18}"
    )
    for row in results["rows"]:
        wait = sum(row["tl_ray_warm_data_wait_s"]) / len(row["tl_ray_warm_data_wait_s"])
        print(
            f"{row['image_size']:>4} {row['freeze_depth']:>5} {row['plain_defaults_steady_images_per_s']:>15.1f}"
            f" {row['plain_thread-matched_steady_images_per_s']:>14.1f} {row['tl_ray_steady_images_per_s']:>8.1f}"
            f" {row['ratio_vs_defaults']:>12.2f} {row['ratio_vs_thread-matched']:>11.2f} {wait:>18.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

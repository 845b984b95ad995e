"""Learning benchmark: tl-ray's accuracy against a plain-PyTorch reference recipe, row by row.

Each row trains the same model (resnet18) on the same images at the same size, batch and
number of epochs, once with `tl-ray train` under its defaults (the recipe in
``tl_ray/recipe.py``; only the options that define the row are passed) and once with the
reference: the best plain-PyTorch script a practitioner would write, in this file, in one
process, with no tl-ray code in its loop. Its recipe follows the torchvision reference and
fastai's fine-tuning defaults: AdamW with per-row learning rates (1e-3 from random weights,
1e-2 for a head alone, 1e-3 head with 1e-4 backbone for discriminative fine-tuning),
weight decay 0.05 except on BatchNorm and biases, 5% linear warm-up then cosine decay per
step, RandomResizedCrop(scale 0.35-1) + flip, frozen stages' BatchNorm in eval mode, and
validation on the resize + centre crop tl-ray also uses.

Datasets (both written to disk once, then read by both sides):

- ``sample``: `tl-ray sample-data` (synthetic shapes): source = 4 shapes, 150 train / 50 val
  per class; target = 3 other shapes, 20 train / 50 val per class.
- ``digits``: scikit-learn's handwritten digits (1,797 real 8x8 scans, UCI; shipped inside
  the package, no download): source = digits 0-4 (75% train), target = digits 5-9 with 10
  training images per class, every other image for validation.

Rows per dataset: the source task from scratch; the target task from scratch; the target
task transferred from the source model (tl-ray's own seed-0 source checkpoint, loaded by
both sides, so transfer rows compare fine-tuning recipes, not source models) at freeze
depths 0 and 3 with each strategy (plain, discriminative, probe) and at depth 5. Every row
runs ``--seeds`` seeds; the table shows mean and spread (min-max) and tl-ray minus reference.

    python bench/learning.py         # both datasets, 3 seeds per target row (~45 min on 2 CPUs)
    python bench/learning.py --datasets digits --seeds 1 --source-epochs 1 --target-epochs 1 --rows d5  # smoke

``--crops auto,device --no-reference`` trains a tl-ray column per crop path instead (issue 43 item 3): ``device`` is
the GPU path's batched crop (the cached bytes decoded, padded and cut by ``roi_align`` in the worker) forced on this
CPU by ``bench/regimes.py``'s bench-only switch, beside tl-ray's CPU default (PIL's crops, held in memory). The
transfer rows of both columns start from the same source checkpoint (the default column's seed 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regimes  # (bench/regimes.py: its bench-only crops switch)

import tl_ray
from tl_ray.checkpoint import read_model_state
from tl_ray.inputs import imaging
from tl_ray.model import IMAGENET_MEAN, IMAGENET_STD, STAGE_MODULES

REFERENCE_CROP_SCALE = (0.35, 1.0)  # fastai's fine-tuning default
REFERENCE_WEIGHT_DECAY = 0.05
REFERENCE_WARMUP_SHARE = 0.05


@dataclass(frozen=True)
class Row:
    name: str
    task: str  # "source" or "target"
    start: str  # "none" or "source"
    depth: int
    strategy: str  # tl-ray's --strategy; the reference mirrors it


def rows() -> list[Row]:
    result = [
        Row("source, from scratch", "source", "none", 0, "plain"),
        Row("target, from scratch", "target", "none", 0, "plain"),
    ]
    for depth in (0, 3):
        for strategy in ("plain", "discriminative", "probe"):
            result.append(Row(f"target, transfer d{depth} {strategy}", "target", "source", depth, strategy))
    result.append(Row("target, transfer d5 (head only)", "target", "source", 5, "plain"))
    return result


# ----------------------------------------------------------------------------- datasets


def write_digits(root: Path, few: int) -> None:
    """scikit-learn's digits as image folders: source 0-4, target 5-9 with ``few`` training images per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target, strict=True):
        label = int(label)
        index = seen.get(label, 0)
        seen[label] = index + 1
        if label < 5:
            task, split = "source", "val" if index % 4 == 0 else "train"
        else:
            task, split = "target", "train" if index < few else "val"
        folder = root / task / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255.0 / 16.0)).astype("uint8")
        Image.fromarray(pixels, mode="L").save(folder / f"{label}_{index:04d}.png")


def prepare(name: str, root: Path, per_class: int) -> Path:
    folder = root / name
    if not (folder / "target").exists():
        if name == "sample":
            tl_ray.write_sample_data(folder, per_class=per_class, seed=0)
        else:
            write_digits(folder, few=max(2, per_class // 20))
    return folder


# ----------------------------------------------------------------------------- the reference recipe


def load_split(root: Path, split: str, image_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Images decoded once and resized as for validation (short side image_size / 0.875), uint8 CHW."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    resize = v2.Resize(imaging.resize_size(image_size), antialias=True)
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).iterdir()):
            images.append(v2.functional.pil_to_tensor(resize(Image.open(path).convert("RGB"))))
            labels.append(label)
    return images, torch.tensor(labels)


def reference_lrs(row: Row) -> tuple[float, float]:
    """(head, backbone) learning rates of the reference for a row."""
    if row.start == "none":
        return 1e-3, 1e-3
    if row.depth == 5:
        return 1e-2, 0.0
    if row.strategy == "plain":
        return 1e-3, 1e-3
    return 1e-3, 1e-4  # discriminative and probe: the backbone at a tenth


def reference_train(
    row: Row,
    root: Path,
    init: dict[str, torch.Tensor] | None,
    *,
    image_size: int,
    batch_size: int,
    epochs: int,
    seed: int,
) -> float:
    """The plain-PyTorch script: best val_acc over its epochs (tl-ray reports the same)."""
    torch.manual_seed(seed)
    train_x, train_y = load_split(root, "train", image_size)
    val_x, val_y = load_split(root, "val", image_size)
    num_classes = int(train_y.max()) + 1
    net = torchvision.models.resnet18(num_classes=num_classes)
    if init is not None:
        net.load_state_dict({k: v for k, v in init.items() if not k.startswith("fc.")}, strict=False)
    head_lr, backbone_lr = reference_lrs(row)
    stages = [getattr(net, name) for names in STAGE_MODULES for name in names]
    frozen_names = [name for names in STAGE_MODULES[: row.depth] for name in names]
    frozen = [getattr(net, name) for name in frozen_names]
    for module in frozen:
        module.requires_grad_(False)
    trainable_backbone = [m for m in stages if m not in frozen]
    groups = []
    for modules, lr in (([net.fc], head_lr), (trainable_backbone, backbone_lr)):
        params = [p for m in modules for p in m.parameters()]
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": REFERENCE_WEIGHT_DECAY})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
    head_epochs = max(1, min(epochs - 1, round(epochs / 5))) if row.strategy == "probe" and row.depth < 5 else 0
    steps_per_epoch = max(1, len(train_x) // batch_size + (len(train_x) % batch_size >= 2))
    base = [group["lr"] for group in optimizer.param_groups]
    crop = v2.Compose(
        [v2.RandomResizedCrop(image_size, scale=REFERENCE_CROP_SCALE, antialias=True), v2.RandomHorizontalFlip()]
    )
    centre = v2.CenterCrop(image_size)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    val_images = ((torch.stack([centre(x) for x in val_x]).float() / 255) - mean) / std
    best, step = 0.0, 0
    for epoch in range(epochs):
        in_head_phase = epoch < head_epochs
        phase_epochs = head_epochs if in_head_phase else epochs - head_epochs
        phase_start = 0 if in_head_phase else head_epochs * steps_per_epoch
        net.train()
        for module in frozen:
            module.eval()
        if in_head_phase:  # linear probe: the backbone is frozen, BatchNorm included
            for module in trainable_backbone:
                module.eval()
        order = torch.randperm(len(train_x))
        for start in range(0, len(train_x), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:
                continue
            phase_steps = phase_epochs * steps_per_epoch
            warmup = REFERENCE_WARMUP_SHARE * phase_steps
            t = step - phase_start
            factor = (
                (t + 1) / (warmup + 1)
                if t < warmup
                else 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, phase_steps - warmup)))
            )
            for group, lr in zip(optimizer.param_groups, base, strict=True):
                group["lr"] = lr * factor
            images = ((torch.stack([crop(train_x[i]) for i in index]).float() / 255) - mean) / std
            loss = nn.functional.cross_entropy(net(images), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if in_head_phase:
                for module in trainable_backbone:
                    for p in module.parameters():
                        p.grad = None
            optimizer.step()
            step += 1
        net.eval()
        with torch.no_grad():
            correct = sum(
                int((net(val_images[i : i + 256]).argmax(1) == val_y[i : i + 256]).sum())
                for i in range(0, len(val_y), 256)
            )
        best = max(best, correct / len(val_y))
    return best


# ----------------------------------------------------------------------------- tl-ray


def tl_ray_train(
    row: Row,
    root: Path,
    source_checkpoint: str | None,
    storage: str,
    *,
    image_size: int,
    batch_size: int,
    epochs: int,
    seed: int,
    name: str,
):
    result = tl_ray.train(
        data=str(root),
        arch="resnet18",
        weights="none" if row.start == "none" else source_checkpoint,
        freeze_depth=row.depth,
        strategy=row.strategy,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        storage=storage,
        name=name,
        keep_checkpoints=1,
    )
    return result.metrics["val_acc"], result.best_checkpoint


# ----------------------------------------------------------------------------- the table


def column_name(crop: str) -> str:
    """A tl-ray column's name: "tl-ray" for tl-ray's own choice of crops, "tl-ray crops=device" for the forced one."""
    return "tl-ray" if crop == "auto" else f"tl-ray crops={crop}"


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def write_report(args: argparse.Namespace, results: list[dict], started: float) -> dict:
    """--out: the settings and the rows measured so far."""
    report = {
        "benchmark": "learning",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}",
        "settings": vars(args),
        "rows": results,
        "wall_seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="sample,digits")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per target row")
    parser.add_argument(
        "--source-seeds", type=int, default=1, help="seeds of the source rows (they reach ~1.0; seed 0 is transferred)"
    )
    parser.add_argument("--image-size", default="sample=48,digits=32", help="crop size per dataset")
    parser.add_argument("--batch-size", type=int, default=16, help="batch of the target rows (20 or 10 images a class)")
    parser.add_argument("--source-batch-size", type=int, default=32)
    parser.add_argument("--source-epochs", type=int, default=12)
    parser.add_argument("--target-epochs", type=int, default=15)
    parser.add_argument(
        "--per-class", type=int, default=200, help="sample-data --per-class; digits: target train = this / 20"
    )
    parser.add_argument("--rows", default="", help="only rows whose name contains one of these comma-separated words")
    parser.add_argument(
        "--crops", default="auto", help="tl-ray columns, comma-separated: auto (tl-ray's choice), device (forced)"
    )
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="leave out the reference")
    parser.add_argument("--data", default="bench/.data/learning")
    parser.add_argument("--out", default="bench/results/learning.json")
    args = parser.parse_args(argv)
    crops = args.crops.split(",")
    columns = [column_name(crop) for crop in crops] + (["reference"] if args.reference else [])
    torch.set_num_threads(os.cpu_count() or 1)
    wanted = [w for w in args.rows.split(",") if w]
    chosen = [row for row in rows() if not wanted or any(w in row.name for w in wanted) or row.task == "source"]
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        sizes = dict(item.split("=") for item in args.image_size.split(","))
        for dataset in args.datasets.split(","):
            root = prepare(dataset, Path(args.data), args.per_class)
            image_size = int(sizes[dataset])
            source_checkpoint = None
            for row in chosen:
                epochs = args.source_epochs if row.task == "source" else args.target_epochs
                task_root = root / row.task
                measured: dict[str, list[float]] = {column: [] for column in columns}
                for seed in range(args.source_seeds if row.task == "source" else args.seeds):
                    batch_size = args.source_batch_size if row.task == "source" else args.batch_size
                    options = {"image_size": image_size, "batch_size": batch_size, "epochs": epochs, "seed": seed}
                    for crop in crops:
                        run_name = f"{dataset}-{len(results)}-{seed}-{crop}"
                        with regimes.crops_taken(crop):
                            acc, checkpoint = tl_ray_train(
                                row, task_root, source_checkpoint, storage, name=run_name, **options
                            )
                        if row.task == "source" and seed == 0 and crop == crops[0]:
                            source_checkpoint = checkpoint
                        measured[column_name(crop)].append(acc)
                    if args.reference:
                        init = None if row.start == "none" else read_model_state(source_checkpoint)
                        measured["reference"].append(reference_train(row, task_root, init, **options))
                    scores = "  ".join(f"{column} {values[-1]:.3f}" for column, values in measured.items())
                    print(f"{dataset:7} {row.name:36} seed {seed}: {scores}", flush=True)
                compared = columns[-1] if len(columns) > 1 else columns[0]  # the reference, or the last crop path
                difference = statistics.mean(measured[columns[0]]) - statistics.mean(measured[compared])
                results.append(
                    {
                        "dataset": dataset,
                        "row": row.name,
                        "image_size": image_size,
                        "epochs": epochs,
                        **measured,
                        "difference": difference,
                        "difference_of": f"{columns[0]} - {compared}",
                    }
                )
                write_report(args, results, started)  # after every row: a run stopped early keeps what it measured
    print()
    difference_of = f"{columns[0]} - {columns[-1]}"
    print(f"| dataset | row | epochs | {' | '.join(columns)} | {difference_of} |")
    print("|---" * (len(columns) + 4) + "|")
    for r in results:
        cells = [r["dataset"], r["row"], r["epochs"], *(spread(r[column]) for column in columns)]
        print("| " + " | ".join(map(str, cells)) + f" | {r['difference']:+.3f} |")
    return write_report(args, results, started)


if __name__ == "__main__":
    main()

"""Regimes benchmark (issue 22): tl-ray's defaults against the best of a plain-PyTorch grid, regime by regime.

Transfer learning is for the user with little data, so tl-ray's defaults must hold from 5 to
100+ images a class, from random weights and from a related checkpoint, at every freeze
depth. Each regime (dataset x training images per class x start x freeze depth) is trained

- by tl-ray, ``tl_ray.train(...)`` given only what defines the regime (data, arch, weights,
  freeze depth, epochs, image size, seed) and nothing else: the defaults are under test,
  batch size and learning rate included;
- by a plain-PyTorch script (in this file, one process, no tl-ray code in its loop) over the
  grid a careful user would try: AdamW lr {3e-4, 1e-3, 3e-3} (weight decay 0.05) and SGD
  nesterov momentum 0.9 lr {1e-2, 3e-2, 1e-1} (weight decay 5e-4), batch {16, 32}; cosine
  decay per step, no warm-up, RandomResizedCrop(scale 0.6-1) of the original image + flip,
  validation on the whole image resized (what a torchvision ``ImageFolder`` script does);
  frozen stages' BatchNorm in eval mode. One grid point, AdamW 1e-3 batch 16, is exactly the
  issue's "40-line script" and has its own column.

Every side scores its best epoch (tl-ray reports and keeps the best). Seed 0 runs the whole
grid; seeds 1-2 run only its top ``--top`` points and the 40-line script's (the grid's full
width only where its points disagree), and "grid best" is the best mean over those.

Datasets (written once to ``--data`` as ROOT/train/<class>, ROOT/val/<class> image folders,
nothing downloaded; each has a source task, whose tl-ray model is the transfer start, and
a related target task whose training set is cut to each size, with one fixed validation set):

- ``digits``: scikit-learn's handwritten digits (real 8x8 scans shipped in the package):
  source digits 0-4, target digits 5-9 (75 validation images a class).
- ``glyphs``: capital letters rendered from the installed font files (each font one sample,
  small random scale/shift/rotation), source K-T, target A-E; validation fonts are other
  font families than training ones. Needs Debian font packages for enough fonts::

      apt-get install -y fonts-noto-core fonts-urw-base35 fonts-texgyre fonts-liberation \
          fonts-freefont-ttf fonts-cantarell fonts-crosextra-carlito fonts-crosextra-caladea \
          fonts-aenigma fonts-roboto-unhinted fonts-open-sans fonts-lato fonts-linuxlibertine \
          fonts-ebgaramond fonts-sil-gentium fonts-sil-charis fonts-sil-andika fonts-comic-neue \
          fonts-go fonts-hack fonts-dustin

- ``icons``: icon-theme PNGs (32 px) by category, real designed pictures: target Oxygen's
  actions/apps/mimetypes/status (40 a class validation; its smallest class gives at most 41
  training icons, so no 100-a-class size), source Adwaita's actions/devices/mimetypes/places/
  status. ``apt-get install -y oxygen-icon-theme adwaita-icon-theme``.
- ``sample``: `tl-ray sample-data` (synthetic shapes): source 4 shapes, target 3 others.

Results (every run, keyed by what defines it) go to ``--out``; a rerun reuses every reference
run it finds there, so after a change to tl-ray's defaults only the tl-ray column trains
again (``--only-tl-ray`` makes that explicit; tl-ray runs are reused only for the same
tl-ray commit with a clean tl_ray/ tree).

    python bench/regimes.py            # everything (see BENCHMARKS.md for its time)
    python bench/regimes.py --quick    # digits, 10 a class, 2 rows, 4 grid points, 4 epochs: minutes

Looking for the cause of a gap: ``--candidates all --candidates-at POINT`` trains the script at one
grid point with each of tl-ray's pipeline differences (``CANDIDATES``: its validation crop, its
JPEG training cache, its warm-up, ...; ``tl-ray-pipeline`` all at once), and
``--tl-ray-options lr=0.003,batch_size=16,cache=none`` trains tl-ray itself with options set
(stored apart from the defaults' column), so tl-ray at the grid's point is one A/B away.
``--tl-ray-options arch=convnext_atto`` (any arch tl-ray takes, timm's by name) trains the tl-ray column on
that arch beside the resnet18 grid; its transfer rows start from that arch's own source model, trained once
under the same rule (issue 40's row: a small timm CNN and ViT under the defaults). ``--tl-ray-options crops=device``
cuts tl-ray's training crops with the GPU path's batched crop on this CPU (issue 43: its learning, without a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision.transforms import v2

import tl_ray
from tl_ray import recipe
from tl_ray.checkpoint import MODEL_FILE, read_model_state
from tl_ray.inputs import cache, imaging
from tl_ray.model import IMAGENET_MEAN, IMAGENET_STD, STAGE_MODULES

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
REFERENCE_ARCH = "resnet18"  # the reference grid's, and tl-ray's unless --tl-ray-options names another arch
SIZES = (5, 10, 30, 100)
# Epochs per training-set size (images a class): short runs see few steps, so small sets get more epochs.
EPOCHS = {5: 15, 10: 12, 30: 10, 100: 8}
SOURCE_EPOCHS = 8
CROP_SCALE = (0.6, 1.0)  # the 40-line script's, and tl-ray's below 128 px
ADAMW_WEIGHT_DECAY = 0.05
SGD_WEIGHT_DECAY = 5e-4
SCRIPT_POINT = "adamw-0.001-b16"  # the 40-line script
# tl-ray's freeze stages (tl_ray.model.STAGE_MODULES) with the stem's parameter-free modules, in forward order.
FORWARD_STAGES = ((*STAGE_MODULES[0], "relu", "maxpool"), *STAGE_MODULES[1:])


@dataclass(frozen=True)
class Regime:
    """Where training starts and what it freezes: the rows of the table for each dataset and size."""

    start: str  # "none" (random weights) or "source" (the tl-ray source checkpoint)
    depth: int

    @property
    def name(self) -> str:
        return f"{self.start} d{self.depth}"


REGIMES = (Regime("none", 0), Regime("source", 0), Regime("source", 3), Regime("source", 5))


@dataclass(frozen=True)
class GridPoint:
    """One plain-PyTorch configuration a careful user would try."""

    optimizer: str  # "adamw" or "sgd"
    lr: float
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}-{self.lr:g}-b{self.batch_size}"


GRID = tuple(
    GridPoint(optimizer, lr, batch)
    for optimizer, lrs in (("adamw", (3e-4, 1e-3, 3e-3)), ("sgd", (1e-2, 3e-2, 1e-1)))
    for lr in lrs
    for batch in (16, 32)
)


# The JPEG training cache's chroma (cache.ENCODINGS): runs stored while it averaged colour over 2x2 pixels (4:2:0,
# PIL's default) are named without this tag, those since (4:4:4) with it, so neither is reused for the other.
JPEG_TAG = "444" if cache.ENCODINGS["jpeg"].get("subsampling") == 0 else ""


@dataclass(frozen=True)
class Variant:
    """The reference's data pipeline and schedule: the default one, or one of the issue's candidate causes."""

    eval_crop: float | None = None  # None: the whole image resized; else centre crop of this share of a resized image
    crop_scale: tuple[float, float] = CROP_SCALE
    warmup_share: float = 0.0
    crop_from_resized: bool = False  # random crops from the image resized like tl-ray's cache (short side size/0.875)
    jpeg_cache: bool = False  # training crops from tl-ray's cached image: PIL-resized, then a JPEG (cache.ENCODINGS)
    pil_crops: bool = False  # crops and flips of PIL images (tl-ray's imaging.train_transform), not of tensors
    decay_norm: bool = True  # False: no weight decay on BatchNorm weights and biases (tl-ray's parameter groups)

    @property
    def name(self) -> str:
        if self == TL_RAY_PIPELINE:
            return "tl-ray-pipeline" + JPEG_TAG
        parts = []
        if self.eval_crop is not None:
            parts.append(f"evalcrop{self.eval_crop:g}")
        if self.crop_scale != CROP_SCALE:
            parts.append(f"rrc{self.crop_scale[0]:g}")
        if self.warmup_share:
            parts.append(f"warmup{self.warmup_share:g}")
        if self.crop_from_resized:
            parts.append("cropfromresized")
        if self.jpeg_cache:
            parts.append("jpegcache" + JPEG_TAG)
        if self.pil_crops:
            parts.append("pilcrops")
        if not self.decay_norm:
            parts.append("nodecaynorm")
        return "+".join(parts) or "default"


# Every difference between the script and tl-ray's pipeline that the script can take on, at once: where this scores
# as the default does, the gap to tl-ray is in none of them.
TL_RAY_PIPELINE = Variant(
    eval_crop=0.875, warmup_share=0.05, crop_from_resized=True, jpeg_cache=True, pil_crops=True, decay_norm=False
)


# The candidates for tl-ray's remaining gap, each alone, A/B against the default pipeline.
CANDIDATES = (
    Variant(eval_crop=0.875),
    Variant(crop_from_resized=True),
    Variant(eval_crop=0.875, crop_from_resized=True),  # tl-ray's training and validation crops
    Variant(warmup_share=0.05),
    Variant(crop_scale=(0.35, 1.0)),
    Variant(jpeg_cache=True),
    Variant(pil_crops=True),
    Variant(decay_norm=False),
    TL_RAY_PIPELINE,
    dataclasses.replace(TL_RAY_PIPELINE, jpeg_cache=False),
)


# ----------------------------------------------------------------------------- datasets


def save_gray(pixels: Image.Image, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pixels.save(folder / name)


def write_digits(root: Path) -> None:
    """scikit-learn's digits: source 0-4 (every fourth image for validation); target 5-9, 75 a class validation."""
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
            task, split = "target", "val" if index < 75 else "pool"
        pixels = Image.fromarray((image * (255.0 / 16.0)).astype("uint8"), mode="L")
        save_gray(pixels, root / task / split / str(label), f"{label}_{index:04d}.png")


GLYPH_SOURCE = "KLMNOPQRST"
GLYPH_TARGET = "ABCDE"
GLYPH_CANVAS = 40


def font_files() -> list[tuple[str, Path]]:
    """(family, path) of every installed font with all the letters, one per family and style."""
    from fontTools.ttLib import TTFont

    found: dict[tuple[str, str], Path] = {}
    for path in sorted(Path("/usr/share/fonts").rglob("*")):
        if path.suffix.lower() not in (".ttf", ".otf"):
            continue
        try:
            font = TTFont(str(path), fontNumber=0, lazy=True)
            cmap = font.getBestCmap() or {}
            names = font["name"]
            family = names.getDebugName(16) or names.getDebugName(1) or path.stem
            style = names.getDebugName(17) or names.getDebugName(2) or ""
        except Exception:  # a font fontTools cannot read is not worth a sample
            continue
        if all(ord(letter) in cmap for letter in GLYPH_SOURCE + GLYPH_TARGET):
            found.setdefault((family, style), path)
    return [(family, path) for (family, _), path in sorted(found.items())]


def render_glyph(path: Path, letter: str, rng: random.Random) -> Image.Image | None:
    """One letter, white on black, scaled to 60-80% of the canvas, shifted and rotated a little (None: no ink)."""
    font = ImageFont.truetype(str(path), 64)
    left, top, right, bottom = font.getbbox(letter)
    if right - left < 2 or bottom - top < 2:
        return None
    big = Image.new("L", (right - left + 8, bottom - top + 8))
    ImageDraw.Draw(big).text((4 - left, 4 - top), letter, fill=255, font=font)
    big = big.rotate(rng.uniform(-6, 6), resample=Image.BILINEAR, expand=True)
    box = big.getbbox()
    if box is None:
        return None
    big = big.crop(box)
    scale = rng.uniform(0.6, 0.8) * GLYPH_CANVAS / max(big.size)
    glyph = big.resize((max(1, round(big.width * scale)), max(1, round(big.height * scale))), Image.LANCZOS)
    canvas = Image.new("L", (GLYPH_CANVAS, GLYPH_CANVAS))
    x = (GLYPH_CANVAS - glyph.width) // 2 + rng.randint(-2, 2)
    y = (GLYPH_CANVAS - glyph.height) // 2 + rng.randint(-2, 2)
    canvas.paste(glyph, (x, y))
    return canvas


def write_glyphs(root: Path, val_fonts: int = 80, source_fonts: int = 150) -> None:
    """Letters by font: a font family is either training or validation, never both (no style of it leaks)."""
    fonts = font_files()
    if len(fonts) < 150:
        raise SystemExit(
            f"glyphs: only {len(fonts)} fonts with letters {GLYPH_SOURCE + GLYPH_TARGET}; see the docstring"
        )
    rng = random.Random(0)
    counts: dict[tuple[str, str], int] = {}
    for family, path in fonts:
        in_val = hashlib.sha1(family.encode()).digest()[0] < 77  # ~30% of the families
        images = {letter: render_glyph(path, letter, rng) for letter in GLYPH_SOURCE + GLYPH_TARGET}
        arrays = [image.tobytes() for image in images.values() if image is not None]
        if len(arrays) < len(images) or len(set(arrays)) < len(arrays):
            continue  # a letter without ink, or one drawing for two letters: a symbol font
        for letter, image in images.items():
            task = "source" if letter in GLYPH_SOURCE else "target"
            split = "val" if in_val else ("train" if task == "source" else "pool")
            cap = {"val": val_fonts, "train": source_fonts}.get(split)
            if cap is not None and counts.get((letter, split), 0) >= cap:
                continue  # enough: the source model needs no more, and validation this many to resolve ~0.03
            counts[(letter, split)] = counts.get((letter, split), 0) + 1
            save_gray(image, root / task / split / letter, f"{path.stem}.png")


ICON_THEMES = Path("/usr/share/icons")
ICON_TARGET = ("actions", "apps", "mimetypes", "status")  # Oxygen's four largest categories
ICON_SOURCE = ("actions", "devices", "mimetypes", "places", "status")  # Adwaita's
ICON_VAL = 40


def icon_files(folder: Path) -> list[Path]:
    """A category's 32 px PNGs, each drawing once (themes link one file under several names)."""
    seen, files = set(), []
    for path in sorted(folder.glob("*.png")):
        if path.is_symlink():
            continue
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            files.append(path)
    return files


def save_icon(path: Path, folder: Path) -> None:
    """An icon flattened onto white (both sides read RGB; transparent pixels must not turn into noise)."""
    icon = Image.open(path).convert("RGBA")
    flat = Image.new("RGBA", icon.size, (255, 255, 255, 255))
    flat.alpha_composite(icon)
    folder.mkdir(parents=True, exist_ok=True)
    flat.convert("RGB").save(folder / path.name)


def write_icons(root: Path) -> None:
    """Icons by category: the target task from the Oxygen theme, the source task from Adwaita's (another design)."""
    oxygen, adwaita = ICON_THEMES / "oxygen" / "base" / "32x32", ICON_THEMES / "Adwaita" / "32x32"
    if not oxygen.exists() or not adwaita.exists():
        raise SystemExit("icons: apt-get install -y oxygen-icon-theme adwaita-icon-theme")
    for category in ICON_TARGET:
        files = icon_files(oxygen / category)
        random.Random(category).shuffle(files)
        for index, path in enumerate(files):
            save_icon(path, root / "target" / ("val" if index < ICON_VAL else "pool") / category)
    for category in ICON_SOURCE:
        for index, path in enumerate(icon_files(adwaita / category)):
            save_icon(path, root / "source" / ("val" if index % 4 == 0 else "train") / category)


def write_sample(root: Path) -> None:
    """tl-ray's sample shapes: its source task as `tl-ray sample-data` writes it, a target pool of 100 a class."""
    from tl_ray import sample

    tl_ray.write_sample_data(root / "written", per_class=200, seed=0)
    (root / "written" / "source").rename(root / "source")
    # The sample's own target has 20 training images a class; the same shapes drawn for the larger sizes.
    sample._write_task(root / "target", sample.TARGET_CLASSES, 100, 60, random.Random(1))
    (root / "target" / "train").rename(root / "target" / "pool")


WRITERS: dict[str, Callable[[Path], None]] = {
    "digits": write_digits,
    "glyphs": write_glyphs,
    "icons": write_icons,
    "sample": write_sample,
}


def prepare(dataset: str, data_root: Path, sizes: tuple[int, ...]) -> Path:
    """The dataset's folders, written once: source/, target/pool (all training candidates) and one target-N per size."""
    root = data_root / dataset
    if not (root / "target" / "pool").exists():
        WRITERS[dataset](root)
    for size in sizes:
        folder = root / f"target-{size}"
        if folder.exists():
            continue
        for class_dir in sorted((root / "target" / "pool").iterdir()):
            files = sorted(class_dir.iterdir())
            random.Random(f"{dataset}/{class_dir.name}").shuffle(files)  # nested: size 5 is in size 10, ...
            (folder / "train" / class_dir.name).mkdir(parents=True)
            for path in files[:size]:
                (folder / "train" / class_dir.name / path.name).write_bytes(path.read_bytes())
        (folder / "val").symlink_to((root / "target" / "val").resolve())
    return root


def pool_size(root: Path) -> int:
    """Training images of the target task's smallest class: the largest size the dataset can give."""
    return min(len(list(class_dir.iterdir())) for class_dir in (root / "target" / "pool").iterdir())


# ----------------------------------------------------------------------------- the plain-PyTorch reference


def load_images(root: Path, split: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every image of a split decoded once as it is on disk (RGB uint8 CHW), with its class index."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).iterdir()):
            images.append(v2.functional.pil_to_tensor(Image.open(path).convert("RGB")))
            labels.append(label)
    return images, torch.tensor(labels)


def eval_images(images: list[torch.Tensor], variant: Variant) -> torch.Tensor:
    """Validation input: the whole image resized (an ImageFolder script), or tl-ray's resize + centre crop."""
    if variant.eval_crop is None:
        resize = v2.Resize((IMAGE_SIZE, IMAGE_SIZE), antialias=True)
        return torch.stack([resize(x) for x in images])
    short_side = imaging.resize_size(IMAGE_SIZE, variant.eval_crop)
    transform = v2.Compose([v2.Resize(short_side, antialias=True), v2.CenterCrop(IMAGE_SIZE)])
    return torch.stack([transform(x) for x in images])


def as_tensor(image: torch.Tensor | Image.Image) -> torch.Tensor:
    return v2.functional.pil_to_tensor(image) if isinstance(image, Image.Image) else image


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def reference_train(
    task_root: Path,
    init: dict[str, torch.Tensor] | None,
    regime: Regime,
    point: GridPoint,
    *,
    epochs: int,
    seed: int,
    variant: Variant = Variant(),
) -> list[float]:
    """The plain-PyTorch script at one grid point: val_acc after each epoch (its best epoch is its score).

    Frozen stages run once under no_grad for the validation set (their BatchNorm is in eval mode,
    so their output is fixed): at depth 3 and 5 most of each epoch's evaluation is then skipped.
    """
    torch.manual_seed(seed)
    generator = random.Random(seed)
    train_x, train_y = load_images(task_root, "train")
    val_x, val_y = load_images(task_root, "val")
    short_side = imaging.resize_size(IMAGE_SIZE)  # the short side tl-ray caches training images at
    if variant.jpeg_cache:
        train_x = [
            cache.decode(
                cache.encode(
                    imaging.resize_short_side(v2.functional.to_pil_image(x), imaging.Resize(short_side)), "jpeg"
                ),
                0,
                0,
                "jpeg",
            )
            for x in train_x
        ]
    elif variant.crop_from_resized:
        train_x = [v2.functional.resize(x, short_side, antialias=True) for x in train_x]
    if variant.pil_crops:
        train_x = [x if isinstance(x, Image.Image) else v2.functional.to_pil_image(x) for x in train_x]
    elif variant.jpeg_cache:
        train_x = [v2.functional.pil_to_tensor(x) for x in train_x]
    net = torchvision.models.resnet18(num_classes=int(train_y.max()) + 1)
    if init is not None:
        net.load_state_dict({k: v for k, v in init.items() if not k.startswith("fc.")}, strict=False)
    frozen_names = [name for names in FORWARD_STAGES[: regime.depth] for name in names]
    trunk = nn.Sequential(*(getattr(net, name) for name in frozen_names))  # empty at depth 0: identity
    rest_names = [name for names in FORWARD_STAGES[regime.depth :] for name in names]
    rest = nn.Sequential(*(getattr(net, name) for name in rest_names), net.avgpool, nn.Flatten(), net.fc)
    trunk.requires_grad_(False)
    trunk.eval()
    decay = ADAMW_WEIGHT_DECAY if point.optimizer == "adamw" else SGD_WEIGHT_DECAY
    params = [
        {"params": [p for p in rest.parameters() if variant.decay_norm or p.ndim > 1], "weight_decay": decay},
        {"params": [p for p in rest.parameters() if not variant.decay_norm and p.ndim <= 1], "weight_decay": 0.0},
    ]
    if point.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=point.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=point.lr, momentum=0.9, nesterov=True)
    batches_per_epoch = max(1, math.ceil(len(train_x) / point.batch_size))
    total_steps = epochs * batches_per_epoch
    warmup_steps = variant.warmup_share * total_steps
    crop = v2.Compose(
        [v2.RandomResizedCrop(IMAGE_SIZE, scale=variant.crop_scale, antialias=True), v2.RandomHorizontalFlip()]
    )
    with torch.no_grad():
        val_features = torch.cat([trunk(normalise(batch)) for batch in eval_images(val_x, variant).split(256)])
    history, step = [], 0
    for _ in range(epochs):
        rest.train()
        order = list(range(len(train_x)))
        generator.shuffle(order)
        for start in range(0, len(order), point.batch_size):
            index = order[start : start + point.batch_size]
            if len(index) < 2:  # BatchNorm needs two samples (DataLoader's drop_last would drop it too)
                continue
            if step < warmup_steps:
                factor = (step + 1) / (warmup_steps + 1)
            else:
                factor = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1.0, total_steps - warmup_steps)))
            for group in optimizer.param_groups:
                group["lr"] = point.lr * factor
            images = normalise(torch.stack([as_tensor(crop(train_x[i])) for i in index]))
            with torch.no_grad():
                features = trunk(images)
            loss = nn.functional.cross_entropy(rest(features), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        rest.eval()
        with torch.no_grad():
            correct = sum(
                int((rest(f).argmax(1) == y).sum())
                for f, y in zip(val_features.split(256), val_y.split(256), strict=True)
            )
        history.append(correct / len(val_y))
    return history


# ----------------------------------------------------------------------------- tl-ray


def tl_ray_commit() -> str:
    """The last commit that changed tl_ray/ (bench-only commits keep tl-ray runs reusable); "-dirty" when tl_ray/
    has uncommitted changes (then nothing is reused)."""
    package = Path(tl_ray.__file__).resolve().parent
    run = lambda *args: subprocess.run(["git", *args], cwd=package, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = run("log", "-1", "--format=%h", "--abbrev=10", "--", ".") or "unknown"  # the last change to tl_ray/
    return commit + ("-dirty" if run("status", "--porcelain", "--", ".") else "")


def tl_ray_train(
    task_root: Path, weights: str, depth: int, *, epochs: int, seed: int, storage: str, name: str, **chosen
):
    """tl-ray with only what defines the regime: every other option is its default (``chosen``: but these; the arch
    is resnet18 unless ``chosen`` names another)."""
    chosen.setdefault("arch", REFERENCE_ARCH)
    return tl_ray.train(
        data=str(task_root),
        weights=weights,
        freeze_depth=depth,
        epochs=epochs,
        image_size=IMAGE_SIZE,
        seed=seed,
        storage=storage,
        name=name,
        keep_checkpoints=1,
        **chosen,
    )


def arch_suffix(arch: str) -> str:
    """What names another arch's source model apart from resnet18's (whose names predate the suffix)."""
    return "" if arch == REFERENCE_ARCH else "-" + arch.replace("/", "-")


def source_checkpoint(root: Path, dataset: str, source_epochs: int, arch: str = REFERENCE_ARCH) -> str:
    """tl-ray's model of the source task (trained once, from random weights), the start of every transfer row; a
    tl-ray column on another arch (``--tl-ray-options arch=NAME``) transfers from that arch's own source model."""
    import fcntl

    storage = root / "source-runs"
    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / f"checkpoint-{source_epochs}ep{arch_suffix(arch)}.txt"
    with open(storage / f"source-{source_epochs}ep{arch_suffix(arch)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process filling the same results trains it once, not twice
        if marker.exists() and Path(marker.read_text()).exists():
            return marker.read_text()
        return train_source(root, dataset, source_epochs, storage, marker, arch)


def train_source(root: Path, dataset: str, source_epochs: int, storage: Path, marker: Path, arch: str) -> str:
    name = f"source-{source_epochs}{arch_suffix(arch)}"
    result = tl_ray_train(
        root / "source", "none", 0, epochs=source_epochs, seed=0, storage=str(storage), name=name, arch=arch
    )
    print(f"{dataset}: {arch} source model val_acc {result.metrics['val_acc']:.3f}", flush=True)
    marker.write_text(str(result.best_checkpoint))
    (storage / f"source-{source_epochs}ep{arch_suffix(arch)}-val_acc.txt").write_text(
        f"{result.metrics['val_acc']:.4f}\n"
    )
    return str(result.best_checkpoint)


@functools.lru_cache
def source_tag(root: Path, source_epochs: int, trained: str | bool = False, arch: str = REFERENCE_ARCH) -> str:
    """The transfer rows' start in the run keys: the source model's epochs and a digest of its weights, so that runs
    from another source model (retrained after its folder was lost, or under other defaults) are never mixed with
    these. ``trained``: the checkpoint (source_checkpoint's); without it (--table) the marker names it, if any."""
    marker = root / "source-runs" / f"checkpoint-{source_epochs}ep{arch_suffix(arch)}.txt"
    checkpoint = trained or (marker.read_text() if marker.exists() else "")
    if not checkpoint or not (Path(checkpoint) / MODEL_FILE).exists():
        return f"source{source_epochs}ep{arch_suffix(arch)}-untrained"
    digest = hashlib.sha256((Path(checkpoint) / MODEL_FILE).read_bytes()).hexdigest()[:10]
    return f"source{source_epochs}ep{arch_suffix(arch)}-{digest}"


# ----------------------------------------------------------------------------- runs, cached by what defines them


class Store:
    """Every run's result in one JSON file, keyed by what defines it, saved after each run (a stop loses one run).

    Several processes may fill one file (``--datasets`` split across them): each save takes a lock,
    reads what the others wrote, and adds its own runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reference: dict[str, list[float]] = {}
        self.tl_ray: dict[str, dict] = {}
        self.extra: dict = {}
        self._merge()

    def _merge(self) -> None:
        loaded = json.loads(self.path.read_text()) if self.path.exists() and self.path.stat().st_size else {}
        self.reference = {**loaded.get("reference_runs", {}), **self.reference}
        self.tl_ray = {**loaded.get("tl_ray_runs", {}), **self.tl_ray}

    def save(self, **extra) -> None:
        import fcntl

        self.extra.update(extra)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:12]
        with open(Path(tempfile.gettempdir()) / f"tl-ray-regimes-{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge()
            loaded = json.loads(self.path.read_text()) if self.path.exists() and self.path.stat().st_size else {}
            body = {k: v for k, v in loaded.items() if k not in ("reference_runs", "tl_ray_runs")}
            rows = {**body.get("rows", {}), **self.extra.get("rows", {})}  # one entry per dataset/size/regime
            body.update(self.extra)
            body["rows"] = rows
            body.update({"reference_runs": self.reference, "tl_ray_runs": self.tl_ray})
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(body, indent=1) + "\n")
            temporary.replace(self.path)


def reference_key(
    dataset: str,
    size: int,
    regime: Regime,
    point: GridPoint,
    variant: Variant,
    seed: int,
    epochs: int,
    source: str,
) -> str:
    start = regime.start if regime.start == "none" else source
    return f"{dataset}|n{size}|{start}|d{regime.depth}|{point.name}|{variant.name}|seed{seed}|ep{epochs}"


def tl_ray_key(
    commit: str,
    dataset: str,
    size: int,
    regime: Regime,
    seed: int,
    epochs: int,
    source: str,
    lr: str = "",
    options: str = "",
) -> str:
    """``lr``: "auto" for the --lr auto column (its key ends in |lr-auto), "" for the defaults'; ``options``:
    --tl-ray-options (its key ends in |opts-OPTIONS)."""
    start = regime.start if regime.start == "none" else source
    key = f"{commit}|{dataset}|n{size}|{start}|d{regime.depth}|seed{seed}|ep{epochs}" + (f"|lr-{lr}" if lr else "")
    return key + (f"|opts-{options}" if options else "")


def options_arch(options: str) -> str:
    """The arch a tl-ray column trains (--tl-ray-options arch=NAME; resnet18 otherwise): its transfer rows start
    from that arch's source model."""
    return str(parse_options(options).get("arch", REFERENCE_ARCH))


@contextlib.contextmanager
def crops_taken(crops: str):
    """``--tl-ray-options crops=device``: the run's crops cut by the GPU path's batched crop (``device_input``:
    decoded, padded, cut by roi_align, the boxes drawn as RandomResizedCrop draws them) on this CPU, where tl-ray
    itself chooses PIL's; a bench-only switch, not a tl-ray option, so the device crop's learning can be measured
    without a GPU (issue 43 item 3). The decision is the driver's (``plan.crops_on_device``), made in this process."""
    if crops == "auto":
        yield
        return
    if crops != "device":
        raise SystemExit(f"--tl-ray-options crops={crops}: auto or device")
    from tl_ray.inputs import plan

    chosen = plan.crops_on_device
    plan.crops_on_device = lambda splits, use_gpu, per_image: chosen(splits, True, per_image)
    try:
        yield
    finally:
        plan.crops_on_device = chosen


def parse_options(text: str) -> dict[str, int | float | str]:
    """--tl-ray-options "lr=0.003,batch_size=16,cache=none" as tl_ray.train keywords (numbers as numbers)."""
    options: dict[str, int | float | str] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        for kind in (int, float, str):
            try:
                options[name] = kind(value)
                break
            except ValueError:
                continue
    return options


@dataclass
class Cell:
    """One (dataset, size, regime): where it trains and what is known."""

    dataset: str
    size: int
    regime: Regime
    task_root: Path
    epochs: int
    init: Callable[[], dict[str, torch.Tensor] | None]
    weights: Callable[..., str]  # (arch="resnet18"): the transfer rows' start, that arch's source checkpoint
    source: Callable[..., str]  # (arch="resnet18"): the transfer rows' start in the run keys (source_tag)


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def run_reference(store: Store, cell: Cell, point: GridPoint, seed: int, variant: Variant = Variant()) -> float:
    key = reference_key(cell.dataset, cell.size, cell.regime, point, variant, seed, cell.epochs, cell.source())
    if key not in store.reference:
        began = time.perf_counter()
        store.reference[key] = reference_train(
            cell.task_root, cell.init(), cell.regime, point, epochs=cell.epochs, seed=seed, variant=variant
        )
        store.save()
        print(f"  {key}: {max(store.reference[key]):.3f} ({time.perf_counter() - began:.0f} s)", flush=True)
    return max(store.reference[key])


def grid_scores(store: Store, cell: Cell, seeds: int, top: int, grid: tuple[GridPoint, ...]) -> dict[str, list[float]]:
    """Seed 0 over the whole grid, then the other seeds on its top points and the 40-line script's."""
    first = {point.name: run_reference(store, cell, point, 0) for point in grid}
    ranked = sorted(grid, key=lambda point: -first[point.name])
    chosen = ranked[:top] + [point for point in grid if point.name == SCRIPT_POINT and point not in ranked[:top]]
    scores = {name: [value] for name, value in first.items()}
    for seed in range(1, seeds):
        for point in chosen:
            scores[point.name].append(run_reference(store, cell, point, seed))
    return scores


def run_tl_ray(
    store: Store, cell: Cell, seed: int, commit: str, storage: str, lr: str = "", options: str = ""
) -> float:
    """tl-ray's defaults on a cell (``lr`` "auto": with --lr auto, the one option changed; ``options``: these
    tl_ray.train options changed, an A/B of tl-ray against itself)."""
    arch = options_arch(options)
    key = tl_ray_key(commit, cell.dataset, cell.size, cell.regime, seed, cell.epochs, cell.source(arch), lr, options)
    # Runs stored before the peak rate was recorded are run again: which rate a run trained at is half its result.
    if key not in store.tl_ray or "peak_lr" not in store.tl_ray[key] or commit.endswith("-dirty"):
        began = time.perf_counter()
        name = (
            f"{cell.dataset}-n{cell.size}-{cell.regime.start}-d{cell.regime.depth}-s{seed}"
            + (f"-lr{lr}" if lr else "")
            + (f"-opts{hashlib.sha1(options.encode()).hexdigest()[:8]}" if options else "")
        )
        chosen = parse_options(options)
        with crops_taken(str(chosen.pop("crops", "auto"))):
            result = tl_ray_train(
                cell.task_root,
                cell.weights(arch),
                cell.regime.depth,
                epochs=cell.epochs,
                seed=seed,
                storage=storage,
                name=name,
                **({"lr": lr} if lr else {}),
                **chosen,
            )
        store.tl_ray[key] = {
            "val_acc": result.metrics["val_acc"],
            "seconds": time.perf_counter() - began,
            "peak_lr": result.metrics["peak_lr"],  # the rate trained at: the recipe's, found, or selected
            "batch_size": result.metrics.get("batch_size"),  # the batch trained at (select may halve the rule's)
        }
        if lr:  # the curve it found its rate on (other rules can be read off it)
            store.tl_ray[key]["lr_range_test"] = result.lr_range_test
        if result.lr_selection:  # --lr select (left out on a small set): every candidate's epochs
            store.tl_ray[key]["lr_selection"] = result.lr_selection
        store.save()
        print(f"  tl-ray {key}: {result.metrics['val_acc']:.3f} ({time.perf_counter() - began:.0f} s)", flush=True)
    return store.tl_ray[key]["val_acc"]


def stored_scores(store: Store, cell: Cell, variant: Variant = Variant()) -> dict[str, list[float]]:
    """Best-epoch val_acc of every stored reference run of a cell, per grid point, in seed order."""
    scores: dict[str, list[float]] = {}
    for point in GRID:
        for seed in itertools.count():
            key = reference_key(cell.dataset, cell.size, cell.regime, point, variant, seed, cell.epochs, cell.source())
            if key not in store.reference:
                break
            scores.setdefault(point.name, []).append(max(store.reference[key]))
    return scores


def best_point(scores: dict[str, list[float]]) -> str | None:
    """The grid point with the best mean among those run on the most seeds (seed 0 alone ranks all of them)."""
    most = max(map(len, scores.values()), default=0)
    full = {name: values for name, values in scores.items() if len(values) == most}
    return max(full, key=lambda name: mean(full[name])) if full else None


def tl_ray_runs(store: Store, cell: Cell, commit: str, lr: str = "", options: str = "") -> list[dict]:
    """The stored tl-ray runs of a cell at ``commit``, in seed order."""
    runs = []
    for seed in itertools.count():
        source = cell.source(options_arch(options))
        key = tl_ray_key(commit, cell.dataset, cell.size, cell.regime, seed, cell.epochs, source, lr, options)
        if key not in store.tl_ray:
            break
        runs.append(store.tl_ray[key])
    return runs


def summary(store: Store, cell: Cell, commit: str, auto_commit: str = "") -> dict:
    """A table row from whatever is stored for the cell: the grid, its candidates, tl-ray's defaults at ``commit``
    and tl-ray with --lr auto at ``auto_commit``."""
    scores = stored_scores(store, cell)
    best = best_point(scores)
    runs = tl_ray_runs(store, cell, commit)
    tl = [run["val_acc"] for run in runs]
    # --lr select's candidate at the recipe's rate is, bit for bit, the run the rate alone would be: what the
    # choice added, on the same seeds at the same commit.
    centre = recipe.SELECT_FACTORS.index(1.0)
    selected = [run["lr_selection"] for run in runs if run.get("lr_selection")]
    auto = tl_ray_runs(store, cell, auto_commit, "auto") if auto_commit else []
    candidates = {}  # the candidate causes, A/B at a grid point ("VARIANT@POINT"): its values, and the default's
    for variant in CANDIDATES:
        for point, values in stored_scores(store, cell, variant).items():
            default = scores.get(point, [])[: len(values)]
            candidates[f"{variant.name}@{point}"] = {"values": values, "default": default}
    return {
        "dataset": cell.dataset,
        "size": cell.size,
        "start": cell.regime.start,
        "depth": cell.regime.depth,
        "epochs": cell.epochs,
        "tl_ray": tl,
        "tl_ray_peaks": [run.get("peak_lr") for run in runs],
        "tl_ray_batches": [run.get("batch_size") for run in runs],
        "tl_ray_recipe_rate": [max(row["val_acc"] for row in chosen["epochs"][centre]) for chosen in selected],
        "tl_ray_lr_auto": [run["val_acc"] for run in auto],
        "lr_auto_peaks": [run["peak_lr"] for run in auto],
        "grid_best_point": best,
        "grid_best": scores.get(best, []) if best else [],
        "script": scores.get(SCRIPT_POINT, []),
        "grid_seed0": {name: values[0] for name, values in scores.items()},
        "candidates": candidates,
    }


def cells(args: argparse.Namespace) -> Iterator[Cell]:
    data_root = Path(args.data)
    for dataset in args.datasets.split(","):
        root = prepare(dataset, data_root, tuple(args.sizes))
        largest = pool_size(root)
        checkpoints: dict[str, str] = {}

        def weights(arch: str = REFERENCE_ARCH, root: Path = root, dataset: str = dataset, trained=checkpoints) -> str:
            if arch not in trained:
                trained[arch] = source_checkpoint(root, dataset, args.source_epochs, arch)
            return trained[arch]

        def source(arch: str = REFERENCE_ARCH, root: Path = root, weights: Callable[..., str] = weights) -> str:
            return source_tag(root, args.source_epochs, trained=not args.table and weights(arch), arch=arch)

        def init(start: str, weights: Callable[[], str] = weights) -> dict[str, torch.Tensor] | None:
            return None if start == "none" else read_model_state(weights())

        for size in args.sizes:
            if size > largest:
                print(
                    f"{dataset}: {size} a class skipped, its smallest class has {largest} training images", flush=True
                )
                continue
            for regime in args.regimes:
                yield Cell(
                    dataset,
                    size,
                    regime,
                    root / f"target-{size}",
                    args.epochs.get(size, EPOCHS.get(size, 10)),
                    lambda start=regime.start, init=init: init(start),
                    lambda arch=REFERENCE_ARCH, regime=regime, weights=weights: (
                        "none" if regime.start == "none" else weights(arch)
                    ),
                    lambda arch=REFERENCE_ARCH, regime=regime, source=source: (
                        "none" if regime.start == "none" else source(arch)
                    ),
                )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,glyphs,icons,sample")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="training images a class")
    parser.add_argument("--regimes", default="none-0,source-0,source-3,source-5", help="START-DEPTH, comma-separated")
    parser.add_argument("--epochs", default="", help="SIZE=EPOCHS overrides, e.g. 10=12,100=8")
    parser.add_argument("--source-epochs", type=int, default=SOURCE_EPOCHS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="tl-ray's first seed (--seeds is one past its last): a split of one row's seeds over processes",
    )
    parser.add_argument("--top", type=int, default=3, help="grid points (best on seed 0) rerun on the other seeds")
    parser.add_argument(
        "--grid", default="", help="only these grid points (names like adamw-0.001-b16), comma-separated"
    )
    parser.add_argument(
        "--candidates",
        default="",
        help="also A/B the issue's candidate causes (variant names, or 'all') at --candidates-at",
    )
    parser.add_argument(
        "--candidates-at",
        default=SCRIPT_POINT,
        choices=[point.name for point in GRID],
        help="the grid point the candidates run at (the 40-line script's)",
    )
    parser.add_argument(
        "--only-tl-ray", action="store_true", help="train only the tl-ray column; the grid must be stored"
    )
    parser.add_argument("--no-tl-ray", action="store_true", help="only the reference grid (the defaults' evidence)")
    parser.add_argument("--table", action="store_true", help="train nothing: the table of what --out holds")
    parser.add_argument("--tl-ray-commit", default="", help="the tl-ray column of this stored commit (default: HEAD's)")
    parser.add_argument(
        "--lr-auto",
        action="store_true",
        help="also train tl-ray with --lr auto (at HEAD's tl-ray commit; its own column), the defaults otherwise",
    )
    parser.add_argument("--lr-auto-commit", default="", help="the --lr auto column of this stored commit")
    parser.add_argument(
        "--tl-ray-options",
        default="",
        help="train tl-ray with these options instead of its defaults (an A/B of tl-ray against itself, stored"
        " apart: e.g. lr=0.003,batch_size=16,cache=none), on --seeds seeds",
    )
    parser.add_argument(
        "--quick", action="store_true", help="digits, 10 a class, none-0 and source-3, 4 points, 4 epochs"
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (per process)")
    parser.add_argument("--data", default="bench/.data/regimes")
    parser.add_argument("--out", default="bench/results/regimes.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.sizes, args.regimes, args.seeds, args.top = "digits", "10", "none-0,source-3", 2, 1
        args.grid = args.grid or "adamw-0.0003-b16,adamw-0.001-b16,sgd-0.03-b16,sgd-0.03-b32"
        args.epochs, args.source_epochs = args.epochs or "10=4", 4
    args.sizes = [int(size) for size in args.sizes.split(",")]
    args.regimes = [Regime(start, int(depth)) for start, depth in (r.rsplit("-", 1) for r in args.regimes.split(","))]
    args.epochs = {int(k): int(v) for k, v in (item.split("=") for item in args.epochs.split(",") if item)}
    wanted = [name for name in args.grid.split(",") if name]
    args.grid_points = tuple(point for point in GRID if not wanted or point.name in wanted)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    store = Store(Path(args.out))
    head = tl_ray_commit()
    commit = args.tl_ray_commit or head
    auto_commit = args.lr_auto_commit or head
    started = time.perf_counter()
    table, cells_seen = [], []
    with tempfile.TemporaryDirectory() as storage:
        for cell in cells(args):
            print(f"{cell.dataset} n{cell.size} {cell.regime.name} ({cell.epochs} epochs)", flush=True)
            if not args.only_tl_ray and not args.table:
                grid_scores(store, cell, args.seeds, args.top, args.grid_points)
                if args.candidates:
                    point = next(point for point in GRID if point.name == args.candidates_at)
                    wanted = args.candidates.split(",")
                    for variant in (v for v in CANDIDATES if "all" in wanted or v.name in wanted):
                        for seed in range(args.seeds):
                            run_reference(store, cell, point, seed, variant)
            if not args.no_tl_ray and not args.table:
                for seed in range(args.first_seed, args.seeds):
                    if args.tl_ray_options:
                        run_tl_ray(store, cell, seed, head, storage, options=args.tl_ray_options)
                    elif not args.tl_ray_commit:  # a stored commit's column is read, never retrained
                        run_tl_ray(store, cell, seed, commit, storage)
                    if args.lr_auto and not args.lr_auto_commit:
                        run_tl_ray(store, cell, seed, auto_commit, storage, "auto")
            row = summary(store, cell, commit, auto_commit)
            if args.tl_ray_options:
                values = [run["val_acc"] for run in tl_ray_runs(store, cell, head, options=args.tl_ray_options)]
                print(f"  tl-ray with {args.tl_ray_options}: {spread(values)}", flush=True)
            table.append(row)
            cells_seen.append(cell)
            store.save(rows={f"{row['dataset']}|n{row['size']}|{row['start']}|d{row['depth']}": row for row in table})
            print("  -> " + markdown([row]).splitlines()[-1], flush=True)
    print()
    print(markdown(table))
    print()
    print(grid_markdown(store, cells_seen))
    report = {
        "benchmark": "regimes",
        "tl_ray_commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("regimes", "grid_points")},
        "wall_seconds": time.perf_counter() - started,
    }
    store.save(**report)
    return report


def grid_markdown(store: Store, cells: list[Cell]) -> str:
    """Each cell's grid, best first (mean over the seeds run, their count): how flat it is near the top."""
    lines = [
        "| dataset | size/class | start | depth | grid points, best first: mean (seeds) |",
        "|---|---|---|---|---|",
    ]
    for cell in cells:
        scores = stored_scores(store, cell)
        ranked = sorted(scores.items(), key=lambda item: (-len(item[1]), -mean(item[1])))
        text = ", ".join(f"{name} {mean(values):.3f} ({len(values)})" for name, values in ranked)
        lines.append(f"| {cell.dataset} | {cell.size} | {cell.regime.start} | {cell.regime.depth} | {text} |")
    return "\n".join(lines)


def chosen_points(row: dict) -> str:
    """The rate (and, where recorded, the batch) each tl-ray seed trained at: "1e-03 b16, 3e-03 b32"."""
    peaks, batches = row.get("tl_ray_peaks", []), row.get("tl_ray_batches", [])
    batches = [*batches, *[None] * (len(peaks) - len(batches))]
    shown = [
        f"{peak:.0e}" + (f" b{batch}" if batch else "") for peak, batch in zip(peaks, batches, strict=True) if peak
    ]
    return ", ".join(shown) or "-"


def markdown(table: list[dict]) -> str:
    lines = [
        "| dataset | size/class | start | depth | epochs | tl-ray default | its rates | its recipe-rate candidate"
        " | tl-ray --lr auto (peak) | grid best (point) | 40-line script | tl-ray - best | target met? |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        tl, best, script = row["tl_ray"], row["grid_best"], row["script"]
        auto, peaks = row.get("tl_ray_lr_auto", []), row.get("lr_auto_peaks", [])
        gap = mean(tl) - mean(best) if tl and best else float("nan")
        met = (
            "-"
            if math.isnan(gap)
            else ("yes" if gap >= -0.03 and (not script or mean(tl) >= mean(script)) else "**no**")
        )
        cells = [
            row["dataset"],
            row["size"],
            row["start"],
            row["depth"],
            row["epochs"],
            spread(tl) if tl else "-",
            chosen_points(row),
            spread(row["tl_ray_recipe_rate"]) if row.get("tl_ray_recipe_rate") else "-",
            f"{spread(auto)} ({', '.join(f'{peak:.1e}' for peak in peaks)})" if auto else "-",
            f"{spread(best)} ({row['grid_best_point']})" if best else "-",
            spread(script) if script else "-",
            "-" if math.isnan(gap) else f"{gap:+.3f}",
            met,
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Synthetic shape datasets, so the whole product can be shown and tested offline.

Two related tasks share one visual vocabulary (filled geometric shapes on noisy,
coloured backgrounds) but not their classes: a model trained on ``source`` has
learnt edges, corners and curvature that transfer to ``target``. Colours, sizes,
positions, rotations and backgrounds are random, so only the outline identifies
the class: a model must learn shape, not a pixel value.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from tl_ray.errors import UsageError
from tl_ray.options import check_options, check_required, option

SOURCE_CLASSES = ("circle", "square", "star", "triangle")
TARGET_CLASSES = ("cross", "diamond", "hexagon")
VAL_SHARE = 0.25
MIN_PER_CLASS = 4  # a class's train and val images: see sample_sizes
# Shapes stand roughly upright: their edge orientations then tell them apart, which even
# a from-scratch ResNet picks up within a few hundred steps (fully random rotations take
# thousands), so the offline demo learns in minutes on a CPU.
MAX_TILT = math.radians(12)


def _polygon(cx: float, cy: float, radius: float, corners: int, angle: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / corners),
            cy + radius * math.sin(angle + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def _star(cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.42
        a = angle + math.pi * k / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _cross(cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    arm = radius * 0.33
    outline = [(-arm, -radius), (arm, -radius), (arm, -arm), (radius, -arm), (radius, arm), (arm, arm)]
    outline += [(arm, radius), (-arm, radius), (-arm, arm), (-radius, arm), (-radius, -arm), (-arm, -arm)]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, colour: tuple, rng: random.Random
) -> None:
    angle = -math.pi / 2 + rng.uniform(-1, 1) * MAX_TILT  # upright, slightly tilted
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=colour)
    elif shape == "star":
        draw.polygon(_star(cx, cy, radius, angle), fill=colour)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, radius, angle), fill=colour)
    elif shape == "diamond":
        # A rhombus, not a square: its aspect ratio is what tells it apart.
        pts = [(0, -radius), (radius * 0.55, 0), (0, radius), (-radius * 0.55, 0)]
        cos, sin = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in pts], fill=colour)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, radius, 6, angle), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _distinct_colour(rng: random.Random, avoid: tuple[int, int, int]) -> tuple[int, int, int]:
    while True:
        colour = tuple(rng.randrange(256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(colour, avoid, strict=True)) > 200:
            return colour


def render(shape: str, rng: random.Random) -> Image.Image:
    """One image: random size (48-400 px, aspect 4:5 to 5:4), background, clutter, shape and noise.

    The shape lies inside the central square, so the centre crop used for
    validation always sees it.
    """
    width = rng.randint(48, 400)
    height = min(400, max(48, round(width * rng.uniform(0.8, 1.25))))
    background = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(rng.randint(0, 1)):  # thin clutter lines, so edges alone do not give the class away
        x0, y0, x1, y1 = (rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0, height))
        draw.line((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)), width=max(1, side // 60))
    radius = side * rng.uniform(0.28, 0.45)
    cx = width / 2 + rng.uniform(-1, 1) * (side / 2 - radius)
    cy = height / 2 + rng.uniform(-1, 1) * (side / 2 - radius)
    _draw_shape(draw, shape, cx, cy, radius, _distinct_colour(rng, background), rng)
    noise = Image.effect_noise((width, height), rng.uniform(10, 40)).convert("RGB")
    image = Image.blend(image, noise, rng.uniform(0.03, 0.12))
    if rng.random() < 0.1:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image


def _write_task(root: Path, classes: tuple[str, ...], train: int, val: int, rng: random.Random) -> int:
    for shape in classes:
        for index in range(train + val):
            folder = root / ("val" if index < val else "train") / shape
            folder.mkdir(parents=True, exist_ok=True)
            render(shape, rng).save(folder / f"{shape}_{index:04d}.jpg", quality=rng.randint(70, 95))
    return len(classes) * (train + val)


def sample_sizes(per_class: int) -> dict[str, tuple[int, int]]:
    """(train, val) images per class of each task.

    ``source`` holds ``per_class`` per class, a quarter for validation. ``target`` has few labels
    to learn from (a tenth as many: transfer is meant to pay off where labels are scarce) but a
    validation set as large as the source's, so that the freeze-depth comparison it scores is
    finer than the differences it shows (one image is 1/150 of val_acc at the default 200).
    """
    val = max(1, round(per_class * VAL_SHARE))
    return {"source": (per_class - val, val), "target": (max(2, per_class // 10), val)}


@dataclass
class SampleDataConfig:
    """`tl-ray sample-data`: where the sample datasets go and how many images they hold."""

    out: str | None = option(
        None, "folder to write OUT/source/ and OUT/target/ into", required="a folder to write into", positional=True
    )
    per_class: int = option(
        200,
        "images per class of source/; target/ gets a tenth as many training images",
    )
    seed: int = option(0, "random seed")

    def validate(self) -> SampleDataConfig:
        check_options(self)
        check_required(self)
        if self.per_class < MIN_PER_CLASS:
            raise UsageError(
                f"--per-class must be at least {MIN_PER_CLASS} (every class needs train and val images); got"
                f" {self.per_class}"
            )
        return self


def write_sample_data(config: SampleDataConfig) -> dict[str, int]:
    """Write ``out/source`` (4 shapes) and ``out/target`` (3 other shapes, few training labels); see ``sample_sizes``.

    Returns the number of images written per task.
    """
    config = config.validate()
    out = Path(config.out)
    rng = random.Random(config.seed)
    sizes = sample_sizes(config.per_class)
    return {
        "source": _write_task(out / "source", SOURCE_CLASSES, *sizes["source"], rng),
        "target": _write_task(out / "target", TARGET_CLASSES, *sizes["target"], rng),
    }

"""Bytes to pixels: decoding any image PIL reads into upright RGB, and the crops, flips and resizes that turn it
into a training or validation image (torchvision ``transforms.v2``)."""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_modes_mapping

from tl_ray import recipe
from tl_ray.inputs import reading

logger = logging.getLogger(__name__)


def load_rgb(data: bytes, min_short_side: int | None = None) -> Image.Image:
    """Decode any image PIL reads into upright 8-bit RGB.

    16-bit and float greyscale are rescaled rather than clipped (PIL's own
    ``convert("RGB")`` would turn most 16-bit images white); EXIF orientation is
    applied so phone photos are the right way up. With ``min_short_side``, a JPEG
    much larger than that is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (PIL's draft mode), never below ``min_short_side``: a 4000x3000 phone photo
    bound for a 256-pixel resize decodes about 10x faster.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if min_short_side and image.format == "JPEG" and min(image.size) >= 2 * min_short_side:
            factor = min_short_side / min(image.size)
            image.draft(None, (math.ceil(image.width * factor), math.ceil(image.height * factor)))
        image.load()
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block must not cost us a good image
        logger.debug("ignoring unreadable EXIF orientation")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255):
            pixels = pixels / 257.0  # 16-bit range onto 8 bits
        elif image.mode == "F" and pixels.max(initial=0) <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def resize_size(image_size: int, crop_fraction: float = recipe.EVAL_CROP_FRACTION) -> int:
    """The short side validation resizes to before its centre crop of ``image_size``."""
    return math.ceil(image_size / crop_fraction - 1e-6)  # a fraction read back as 224 / 232 must give 232, not 233


DEFAULT_INTERPOLATION = "bilinear"  # torchvision's weights' resize, and tl-ray's for every arch before timm
INTERPOLATIONS = tuple(mode.value for mode in v2.InterpolationMode)  # nearest, bilinear, bicubic, box, lanczos, ...


def interpolation_name(name: str | None, where: str = "the weights' preprocessing config") -> str:
    """A resize filter's name as torchvision's ``InterpolationMode`` spells it; None or "" is bilinear. A name it has
    no mode for (a third-party config's "random", a typo in a hand-edited meta.json) resizes bilinearly with a logged
    warning naming ``where`` it came from: an odd config never stops a run or a prediction."""
    if not name:
        return DEFAULT_INTERPOLATION
    spelled = str(name).strip().lower()
    if spelled in INTERPOLATIONS:
        return spelled
    logger.warning(
        "%s names the resize interpolation %r, which torchvision has no mode for: resizing bilinearly", where, name
    )
    return DEFAULT_INTERPOLATION


@dataclass(frozen=True)
class Resize:
    """How validation, predict and the decoded-image cache resize an image before its centre crop: the short side,
    and the filter the weights were trained with (timm's ``pretrained_cfg`` interpolation; torchvision's weights:
    bilinear). Made once where the weights are known (the driver, or a checkpoint's meta.json: ``from_meta``) and
    handed down whole, so no step resizes with one half of it. Training's random crops resize with the same
    ``interpolation`` (``train_transform``), as timm's transforms do."""

    short_side: int
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:  # names from outside pass through interpolation_name first
            raise ValueError(f"unknown interpolation {self.interpolation!r}; one of {', '.join(INTERPOLATIONS)}")

    @property
    def mode(self) -> v2.InterpolationMode:
        return v2.InterpolationMode(self.interpolation)

    @property
    def pil_filter(self) -> str:
        """PIL's name for the filter (``Image.Resampling``), which torchvision's resize of a PIL image uses: what a
        deployer resizing with PIL passes to reproduce predict's pixels."""
        return Image.Resampling(pil_modes_mapping[self.mode]).name

    @property
    def is_default(self) -> bool:
        """Bilinear: what every cache and checkpoint before timm's weights was made with (no key records it)."""
        return self.interpolation == DEFAULT_INTERPOLATION

    def transform(self) -> v2.Resize:
        return v2.Resize(self.short_side, interpolation=self.mode, antialias=True)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.transform()(image)

    @classmethod
    def for_crop(
        cls, image_size: int, crop_fraction: float = recipe.EVAL_CROP_FRACTION, interpolation: str | None = None
    ) -> Resize:
        """The resize before a centre crop of ``image_size`` that keeps ``crop_fraction`` of the short side."""
        return cls(resize_size(image_size, crop_fraction), interpolation_name(interpolation))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Resize:
        """The resize a checkpoint records (meta.json's ``resize_size`` and ``interpolation``; a checkpoint without
        them: ``resize_size(image_size)``, bilinear), as predict, evaluate, the audit and export redo it."""
        short_side = meta.get("resize_size") or resize_size(meta["image_size"])
        return cls(int(short_side), interpolation_name(meta.get("interpolation"), "the checkpoint's meta.json"))


def resize_short_side(image: Image.Image, resize: Resize) -> Image.Image:
    """The first step of ``eval_transform``, alone: the decoded-image cache stores its output."""
    return resize(image)


POLICIES = recipe.AUGMENT_POLICIES
ERASE_SCALE = (0.02, 1 / 3)  # the erased box's share of the crop (timm's --reprob and torchvision's default)
ERASE_RATIO = (0.3, 3.3)  # and its aspect ratio


@dataclass(frozen=True)
class Policies:
    """What a training crop gets beyond its crop, flip and jitter: an automatic augmentation ``policy``
    (``POLICIES``, "none": no policy) on the cropped image, then random erasing with probability ``erasing``.
    ``mean``/``std``: the normalisation the model's weights expect; the policy's blank pixels are the mean colour
    and the erased box the noise timm's erasing draws after normalisation (``PixelErasing``)."""

    policy: str = "none"
    erasing: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def fill(self) -> list[int]:
        return [round(channel * 255) for channel in self.mean]

    @property
    def any(self) -> bool:
        """Whether a crop gets anything from these (a policy or erasing), beyond its crop and flip."""
        return self.policy != "none" or self.erasing > 0


NO_POLICIES = Policies()


class PixelErasing(v2.RandomErasing):
    """torchvision's RandomErasing on a uint8 crop, its box filled as timm's ``--reprob`` (mode "pixel") fills it
    after normalisation: per-pixel N(0, 1) in normalised units, which is ``mean + std * N(0, 1)`` in pixels
    (clipped to 0-255). The crops stay uint8 (the pipeline ships 4x fewer bytes), and the erasing is seeded with
    the crop."""

    def __init__(self, p: float, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(p=p, scale=ERASE_SCALE, ratio=ERASE_RATIO, value="random")
        self.pixel_mean = torch.tensor(mean).view(-1, 1, 1)
        self.pixel_std = torch.tensor(std).view(-1, 1, 1)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params = super().make_params(flat_inputs)
        if params["v"] is not None:  # normalised noise back to the pixels it stands for
            pixels = (self.pixel_mean + self.pixel_std * params["v"]) * 255.0
            params["v"] = pixels.round_().clamp_(0, 255).to(torch.uint8)
        return params


def policy_transform(policies: Policies) -> list[v2.Transform]:
    """The automatic augmentation of a cropped PIL image (none, TrivialAugmentWide or RandAugment)."""
    if policies.policy == "trivial":
        return [v2.TrivialAugmentWide(fill=policies.fill)]
    if policies.policy == "randaugment":
        return [v2.RandAugment(num_ops=2, magnitude=9, fill=policies.fill)]
    return []


def train_transform(
    image_size: int,
    color_jitter: float = 0.0,
    crop_scale: tuple[float, float] = recipe.STANDARD_CROP_SCALE,
    policies: Policies = NO_POLICIES,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> v2.Compose:
    """Augmentation on PIL images (PIL's resize is the fast one on CPU); uint8 CHW out.

    ``crop_scale``: the random crop's share of the image area. ImageNet recipes use 0.08-1; on the
    small datasets people fine-tune on, and on small images, crops that small often miss the object
    (fastai's fine-tuning default is 0.35; tl_ray.recipe picks by image size). The chain is timm's: crop, flip,
    colour jitter, the policy on the cropped image, to a tensor, random erasing last (``PixelErasing``).
    ``interpolation``: the crop's resize filter, the weights' own (``Resize.interpolation``), as timm's
    ``transforms_imagenet_train`` resizes with its config's.
    """
    mode = v2.InterpolationMode(interpolation)
    steps = [v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=mode, antialias=True)]
    steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [*policy_transform(policies), v2.PILToTensor()]
    if policies.erasing > 0:
        steps.append(PixelErasing(policies.erasing, policies.mean, policies.std))
    return v2.Compose(steps)


def augmentation(
    image_size: int,
    crop_scale: tuple[float, float] | None,
    color_jitter: float = 0.0,
    resize: Resize | None = None,
    policies: Policies = NO_POLICIES,
) -> v2.Compose:
    """Random crops of ``crop_scale`` and flips (and ``policies``), or, with ``crop_scale`` None, the validation
    centre crop (no jitter, policy or erasing: ``--augment none`` trains on validation's crops). ``resize``:
    validation's (by default ``Resize.for_crop(image_size)``); the random crops resize with its interpolation."""
    resize = resize or Resize.for_crop(image_size)
    if crop_scale is None:
        return eval_transform(image_size, resize)
    return train_transform(image_size, color_jitter, crop_scale, policies, resize.interpolation)


def seeded_crops(transform: v2.Compose, images: list[Image.Image], seeds: list[int]) -> torch.Tensor:
    """``transform`` of each image with torch's random numbers seeded by its seed (every draw of torchvision's
    transforms comes from torch's global generator), the caller's random state left as it was: a held image's
    crop, policy and erasing are a function of (run seed, epoch, row), so a resumed run crops as the first did."""
    with torch.random.fork_rng(devices=[]):
        crops = []
        for image, seed in zip(images, seeds, strict=True):
            torch.default_generator.manual_seed(seed)  # the CPU generator the transforms draw from (not CUDA's)
            crops.append(transform(image))
    return torch.stack(crops)


def eval_transform(image_size: int, resize: Resize | None = None) -> v2.Compose:
    """Deterministic resize (``resize``, by default ``Resize.for_crop(image_size)``: bilinear) + centre crop;
    predict and evaluate use exactly this, with the resize the checkpoint records (``Resize.from_meta``)."""
    resize = resize or Resize.for_crop(image_size)
    return v2.Compose([resize.transform(), v2.CenterCrop(image_size), v2.PILToTensor()])


THUMBNAIL_SIDE = 32
THUMBNAIL_BYTES = 3 * THUMBNAIL_SIDE * THUMBNAIL_SIDE  # one thumbnail's row: three colour planes


def thumbnail(image: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """A decoded image (C, H, W uint8, as the model sees it) as a ``side``-pixel square in colour, flattened
    (uint8, ``THUMBNAIL_BYTES``: 3 KB an image whatever its size): what the audit compares two images' pixels by.
    Colour, not grey: two colours of one brightness (a red shape on a blue ground) are one grey, and on tl-ray's
    sample shapes grey thumbnails left some images nearly flat, their copies correlating 0.4-0.9 with them
    (BENCHMARKS.md)."""
    colour = torch.as_tensor(image, dtype=torch.float32)[None]
    small = torch.nn.functional.interpolate(colour, size=(side, side), mode="area")
    return small.round().clamp(0, 255).to(torch.uint8).flatten().numpy()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> normalised float, done on the training device so the pipeline ships 4x fewer bytes."""
    return (images.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def decode_item(opener: Any, item: str, transform: v2.Compose, min_short_side: int, retry_seconds: float) -> np.ndarray:
    """One item of any source (``opener`` reads it) to a uint8 CHW array; raises on any way the item can be bad,
    and ``reading.StorageError`` when its storage did not deliver it within ``retry_seconds`` of retries: the
    caller keeps that apart from a bad item.

    ``min_short_side``: the transform's first resize target, which lets large JPEGs decode at a reduced scale.
    """
    return transform(load_rgb(reading.read_item(opener, item, retry_seconds), min_short_side)).numpy()


def describe_error(error: Exception) -> str:
    """The reason a file was skipped, in one line."""
    if isinstance(error, UnidentifiedImageError):  # its message only names an in-memory buffer
        return "not an image file PIL can identify"
    return f"{type(error).__name__}: {error}".splitlines()[0]

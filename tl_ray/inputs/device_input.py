"""A training batch decoded, cropped and flipped on the worker's device, whole batches at a time (issue 43).

Why: the per-image crop (PIL on a Python thread, ``imaging.train_transform``) costs a few core-milliseconds an
image at 224 px, so a GPU node's cores cannot feed its GPU that way. Here the boxes of a whole batch are drawn by a
few tensor operations, with the distribution of ``torchvision.transforms.v2.RandomResizedCrop.get_params`` (the same
attempts, bounds, rounding and centre-crop fallback; the draws come from one seeded generator per worker and
epoch, so a resumed or re-sharded epoch draws the same boxes), and every box is cut and resized by one
``torchvision.ops.roi_align`` call: bilinear, averaging ``ceil(box / output)`` samples a pixel along each axis, an
area filter where the crop shrinks (close to the antialiased resize, see the tests' stated tolerance) and exactly
bilinear where it grows. Flips are a mask. Images of different sizes travel padded to one shape with their true
heights and widths beside them (``pad``): boxes are drawn inside each image's own extent.

The filter is bilinear whatever the weights' interpolation (``imaging.Resize``): for weights trained bicubic the
training crops here differ in filter from PIL's (an augmentation's detail: timm's train.py itself draws bilinear or
bicubic at random), while validation's crops, exact cuts of the cache that was resized with the weights' filter,
do not (``plan.crops_on_device``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.io import decode_jpeg
from torchvision.ops import roi_align

from tl_ray.seeds import Stream, stream_seed

# RandomResizedCrop's default aspect ratios, and the number of tries before its centre-crop fallback.
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10


def generator_for(seed: int, epoch: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator a worker draws an epoch's boxes and flips from: a function of (seed, epoch, rank) alone, so a
    resumed epoch draws what the interrupted one drew."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(Stream.DEVICE_CROP, seed, epoch, rank))
    return generator


def draw_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = RATIO,
) -> torch.Tensor:
    """(top, left, height, width) of one random crop per image, int64 [N, 4], drawn as ``get_params`` draws them:
    up to ten tries of an area share in ``scale`` and a log-uniform aspect in ``ratio``, the first that fits kept
    at a uniform position; none fitting, the largest centre crop whose aspect is within ``ratio``."""
    count = len(heights)
    heights = heights.to(torch.float64)
    widths = widths.to(torch.float64)
    area = (heights * widths)[:, None]
    draws = torch.rand(count, ATTEMPTS, 2, generator=generator, dtype=torch.float64, device=generator.device)
    target = area * (scale[0] + (scale[1] - scale[0]) * draws[..., 0].to(heights.device))
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * draws[..., 1].to(heights.device))
    box_w = torch.round(torch.sqrt(target * aspect))
    box_h = torch.round(torch.sqrt(target / aspect))
    fits = (box_w > 0) & (box_w <= widths[:, None]) & (box_h > 0) & (box_h <= heights[:, None])
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)

    # The fallback: the whole image, cut to the nearest allowed aspect.
    image_ratio = widths / heights
    fallback_w = torch.where(image_ratio > ratio[1], torch.round(heights * ratio[1]), widths)
    fallback_h = torch.where(image_ratio < ratio[0], torch.round(widths / ratio[0]), heights)
    box_w = torch.where(found, box_w.gather(1, first).squeeze(1), fallback_w)
    box_h = torch.where(found, box_h.gather(1, first).squeeze(1), fallback_h)

    position = torch.rand(count, 2, generator=generator, dtype=torch.float64, device=generator.device)
    position = position.to(heights.device)
    top = torch.where(found, torch.floor(position[:, 0] * (heights - box_h + 1)), torch.floor((heights - box_h) / 2))
    left = torch.where(found, torch.floor(position[:, 1] * (widths - box_w + 1)), torch.floor((widths - box_w) / 2))
    return torch.stack([top, left, box_h, box_w], dim=1).to(torch.int64)


def draw_flips(count: int, generator: torch.Generator, probability: float = 0.5) -> torch.Tensor:
    """Which images of the batch are flipped left-right (RandomHorizontalFlip's 0.5), bool [N]."""
    return torch.rand(count, generator=generator, device=generator.device) < probability


def crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's box resized to ``size`` x ``size`` and flipped where ``flips`` says: uint8 [N, C, H, W] in (on
    any device, padded images allowed), uint8 [N, C, size, size] out, on the same device."""
    boxes = boxes.to(images.device, torch.float32)
    index = torch.arange(len(images), device=images.device, dtype=torch.float32)[:, None]
    top, left, height, width = boxes.unbind(dim=1)
    # roi_align's boxes are (index, x1, y1, x2, y2) in pixel-edge coordinates: aligned=True puts pixel k's centre
    # at k + 0.5, as PIL and torch's resize do.
    regions = torch.cat([index, torch.stack([left, top, left + width, top + height], dim=1)], dim=1)
    pixels = roi_align(images.float(), regions, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if flips is not None:
        pixels = torch.where(flips.to(images.device)[:, None, None, None], pixels.flip(-1), pixels)
    return pixels.round_().clamp_(0, 255).to(torch.uint8)


def pad(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of different sizes (uint8 CHW) as one batch padded at the bottom and right, with each one's height
    and width: the fixed shape a batched crop (and a copy to the device) takes. The padding repeats each image's
    last row and column: a box at the image's edge samples up to half a pixel beyond it, and there a resize
    repeats the edge (as at the tensor's own border), never blends in a padding colour."""
    heights = torch.tensor([image.shape[1] for image in images])
    widths = torch.tensor([image.shape[2] for image in images])
    shape = (len(images), images[0].shape[0], int(heights.max()), int(widths.max()))
    batch = torch.empty(shape, dtype=torch.uint8, device=images[0].device)
    for slot, image in enumerate(images):
        height, width = image.shape[1:]
        batch[slot, :, :height, :width] = image
        batch[slot, :, :height, width:] = image[:, :, -1:]
        batch[slot, :, height:, :] = batch[slot, :, height - 1 : height, :]
    return batch, heights, widths


def random_resized_crops(
    images: torch.Tensor,
    heights: torch.Tensor,
    widths: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """The training crop of a padded batch: boxes and flips drawn from ``generator``, cut on the batch's device."""
    boxes = draw_boxes(heights, widths, scale, generator)
    return crop(images, boxes, size, draw_flips(len(images), generator))


def decode(
    pixels: Sequence[bytes], heights: np.ndarray, widths: np.ndarray, image_format: str, device: torch.device
) -> list[torch.Tensor]:
    """Cached images (``cache.encode``'s bytes) as uint8 CHW tensors on ``device``: JPEGs decoded there in one call
    (nvJPEG on a GPU, libjpeg-turbo on a CPU), raw pixels viewed and copied over. PNG-cached images are decoded by
    PIL's path, not this one."""
    buffers = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in pixels]
    if image_format == "jpeg":
        return list(decode_jpeg(buffers, device=device))
    if image_format != "raw":
        raise ValueError(f"no device decoding for cached {image_format!r} images")
    return [
        buffer.view(int(height), int(width), 3).permute(2, 0, 1).to(device, non_blocking=True)
        for buffer, height, width in zip(buffers, heights, widths, strict=True)
    ]


def centre_boxes(heights: torch.Tensor, widths: torch.Tensor, size: int) -> torch.Tensor:
    """Validation's centre crop of each image (``v2.CenterCrop``'s offsets: half the margin, rounded to even), as
    boxes: cut at ``size`` they are the pixels themselves, not resampled."""
    top = torch.round((heights - size).double() / 2).to(torch.int64)
    left = torch.round((widths - size).double() / 2).to(torch.int64)
    full = torch.full_like(top, size)
    return torch.stack([top, left, full, full], dim=1)

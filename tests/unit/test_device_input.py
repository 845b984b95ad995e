"""The batched crop of issue 43 against torchvision's: the boxes' distribution on 10,000 draws, one fixed box's
pixels against ``transforms.v2.functional.resized_crop``, flips, padding, and the same crops after a resume."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp
from torchvision import transforms
from torchvision.transforms.v2 import functional as F

from tl_ray.inputs import device_input

DRAWS = 10_000


def _torchvision_boxes(height: int, width: int, scale: tuple[float, float]) -> torch.Tensor:
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    return torch.tensor(
        [transforms.RandomResizedCrop.get_params(image, list(scale), list(device_input.RATIO)) for _ in range(DRAWS)]
    )


@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [
        (240, 320, (0.35, 1.0)),  # a landscape photo at the recipe's fine-tuning crops
        (300, 200, (0.08, 1.0)),  # a portrait one at ImageNet's
        (40, 400, (0.5, 1.0)),  # a strip: most tries fail and the centre-crop fallback draws often
    ],
)
def test_boxes_are_drawn_as_random_resized_crop_draws_them(height, width, scale):
    ours = device_input.draw_boxes(
        torch.full((DRAWS,), height), torch.full((DRAWS,), width), scale, torch.Generator().manual_seed(1)
    )
    theirs = _torchvision_boxes(height, width, scale)
    assert (ours[:, 2] > 0).all() and (ours[:, 3] > 0).all()
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    assert (ours[:, :2] >= 0).all()
    # top, left, height, width, and the area share: each marginal the same distribution (two-sample KS test)
    for column in range(4):
        assert ks_2samp(ours[:, column].numpy(), theirs[:, column].numpy()).pvalue > 1e-3, column
    areas = (ours[:, 2] * ours[:, 3]).numpy(), (theirs[:, 2] * theirs[:, 3]).numpy()
    assert ks_2samp(*areas).pvalue > 1e-3


def _smooth_image(height: int = 240, width: int = 320) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 6, height), torch.linspace(0, 8, width), indexing="ij")
    channels = [(torch.sin(x) * 0.5 + 0.5), (torch.cos(y) * 0.5 + 0.5), (x + y) / 14]
    return (torch.stack(channels) * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize(
    "box",
    [(10, 20, 40, 50), (0, 0, 240, 320), (30, 40, 150, 150), (5, 5, 200, 120)],
    ids=["enlarged", "whole", "shrunk-2.3x", "shrunk-3x-wide"],
)
def test_one_box_equals_torchvisions_resized_crop_within_a_grey_level(box):
    """On a photo-like (smooth) image the batched crop is within one grey level of ``resized_crop(antialias=True)``
    at every pixel, enlarging or shrinking. (On white noise, shrinking differs by a few levels on average: an
    area filter against the antialiased triangle filter; enlarging differs only at the box's border, where
    roi_align interpolates with the pixels just outside it and resized_crop repeats the border.)"""
    image = _smooth_image()
    top, left, height, width = box
    expected = F.resized_crop(image, top, left, height, width, [64, 64], antialias=True)
    cropped = device_input.crop(image[None], torch.tensor([box]), 64)[0]
    assert cropped.dtype == torch.uint8 and cropped.shape == (3, 64, 64)
    assert (cropped.int() - expected.int()).abs().max() <= 1


def test_flips_mirror_the_crop():
    images = torch.stack([_smooth_image(), _smooth_image().flip(1)])
    boxes = torch.tensor([[10, 20, 100, 120], [0, 0, 240, 320]])
    plain = device_input.crop(images, boxes, 32)
    flipped = device_input.crop(images, boxes, 32, torch.tensor([True, False]))
    assert torch.equal(flipped[0], plain[0].flip(-1)) and torch.equal(flipped[1], plain[1])


def test_padding_changes_no_crop():
    """Images of several sizes padded to one shape: every crop, its box at an edge or not, is the crop of that image
    alone (the padding never blends in)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(50, 80), (120, 40), (64, 64), (33, 90)]
    alone = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    images, heights, widths = device_input.pad(alone)
    assert images.shape == (4, 3, 120, 90) and heights.tolist() == [50, 120, 64, 33]
    at_an_edge = 0
    for _ in range(10):
        boxes = device_input.draw_boxes(heights, widths, (0.08, 1.0), generator)
        at_an_edge += int(((boxes[:, 0] + boxes[:, 2] == heights) | (boxes[:, 1] + boxes[:, 3] == widths)).sum())
        crops = device_input.crop(images, boxes, 24)
        for index, image in enumerate(alone):
            assert torch.equal(crops[index], device_input.crop(image[None], boxes[index : index + 1], 24)[0])
    assert at_an_edge > 0  # the case that matters: boxes at the bottom or right edge, next to the padding


def test_a_resumed_epoch_draws_the_crops_the_interrupted_one_drew():
    images, heights, widths = device_input.pad([_smooth_image(), _smooth_image(200, 150)])

    def epoch_crops(epoch: int, rank: int) -> torch.Tensor:
        generator = device_input.generator_for(seed=7, epoch=epoch, rank=rank)
        return device_input.random_resized_crops(images, heights, widths, 32, (0.35, 1), generator)

    assert torch.equal(epoch_crops(3, 0), epoch_crops(3, 0))
    assert not torch.equal(epoch_crops(3, 0), epoch_crops(4, 0))
    assert not torch.equal(epoch_crops(3, 0), epoch_crops(3, 1))


def test_reading_tasks_take_several_cache_files_and_a_small_split_still_several_tasks():
    """A reading task costs the host about as much for one file as for sixteen (bench/ingest.py --host-cost): the
    device path's and the feature stream's tasks take about READ_ROWS_PER_TASK rows, a small split at least
    MIN_READ_TASKS tasks, and never a task with nothing."""
    from tl_ray.inputs.streaming import MIN_READ_TASKS, READ_ROWS_PER_TASK, files_per_task

    assert files_per_task(1000, 32_000) == READ_ROWS_PER_TASK // 32  # a cache of 32-row files: 16 a task
    assert files_per_task(63, 2000) == 16  # 2000 images in 63 files (31 a file): 4 tasks
    assert files_per_task(8, 256) == 2 and math.ceil(8 / files_per_task(8, 256)) == MIN_READ_TASKS  # small: 4 tasks
    assert files_per_task(1, 5) == 1 and files_per_task(0, 0) == 1  # one file, and an empty split
    assert files_per_task(40, 40 * 1000) == 1  # files of 1000 rows already hold a task's worth

"""--augment trivial|randaugment and --random-erasing: the chain of transforms, its seeding on the held path (the
same run seed and epoch give the same pixels, on any worker count and after a resume), the erased box's area, and
what the config records. Real images, a real cache file, no Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tl_ray import recipe
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs import imaging, pipelines
from tl_ray.inputs.cache import CachedSplit
from tl_ray.inputs.held import HeldImages
from tl_ray.options import merge
from tl_ray.training.config import TrainConfig
from tl_ray.training.state import check_resumable, strategy_meta

SIZE = 24
SHORT_SIDE = 28


def _textured(seed: int, size: int = SHORT_SIDE) -> Image.Image:
    """A noisy image with a bright square: every geometric or colour operation changes some of its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[4:12, 6:14] = 250
    return Image.fromarray(pixels)


@pytest.fixture
def cached_split(tmp_path) -> CachedSplit:
    """A split of 12 images as the decoded-image cache stores them (raw RGB at the short side)."""
    images = [_textured(seed) for seed in range(12)]
    table = pa.table(
        {
            "pixels": [image.tobytes() for image in images],
            "height": [SHORT_SIDE] * 12,
            "width": [SHORT_SIDE] * 12,
            "label": [index % 3 for index in range(12)],
        }
    )
    path = str(tmp_path / "part-0.parquet")
    pq.write_table(table, path)
    return CachedSplit(pafs.LocalFileSystem(), str(tmp_path), [path], 12, [], True, imaging.Resize(SHORT_SIDE))


POLICIES = imaging.Policies("trivial", 0.5)


def _epoch(split: CachedSplit, seed: int, epoch: int, world: int = 1, policies=POLICIES) -> dict[int, torch.Tensor]:
    """Every row's training crop in one epoch, by row (the rows each of ``world`` workers dealt itself)."""
    held = HeldImages(split, SIZE, True, recipe.LIGHT_CROP_SCALE, 0.0, policies)
    crops: dict[int, torch.Tensor] = {}
    for rank in range(world):
        shard = pipelines.deal_rows(12, rank, world, True, seed, epoch)
        images = torch.cat([batch["image"] for batch in held.batches(5, rank, world, seed, epoch)])
        crops.update(zip(shard.tolist(), images, strict=True))
    return crops


def test_the_same_seed_and_epoch_give_the_same_augmented_pixels_on_any_worker_count(cached_split):
    torch.manual_seed(123)  # the worker's own random state must neither matter nor be consumed
    before = torch.get_rng_state()
    first = _epoch(cached_split, seed=5, epoch=3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # a resumed worker's random state is wherever its set-up left it
    again = _epoch(cached_split, seed=5, epoch=3)
    two_workers = _epoch(cached_split, seed=5, epoch=3, world=2)
    assert sorted(first) == list(range(12)) and all(torch.equal(first[row], again[row]) for row in range(12))
    assert all(torch.equal(first[row], two_workers[row]) for row in range(12))
    next_epoch = _epoch(cached_split, seed=5, epoch=4)
    other_seed = _epoch(cached_split, seed=6, epoch=3)
    assert sum(not torch.equal(first[row], next_epoch[row]) for row in range(12)) == 12
    assert sum(not torch.equal(first[row], other_seed[row]) for row in range(12)) == 12


@pytest.mark.parametrize("policy", recipe.AUGMENT_POLICIES)
def test_a_policy_changes_the_pixels_of_the_same_crops(policy):
    images = [_textured(seed) for seed in range(10)]
    seeds = list(range(100, 110))
    plain = imaging.seeded_crops(imaging.train_transform(SIZE, crop_scale=(1.0, 1.0)), images, seeds)
    policies = imaging.Policies(policy)
    augmented = imaging.seeded_crops(imaging.train_transform(SIZE, 0.0, (1.0, 1.0), policies), images, seeds)
    assert augmented.shape == plain.shape == (10, 3, SIZE, SIZE) and augmented.dtype == torch.uint8
    changed = [not torch.equal(a, b) for a, b in zip(augmented, plain, strict=True)]
    assert sum(changed) >= 7  # a policy may draw its identity (or a no-op magnitude) for an image now and then


def test_erasing_fills_a_box_of_2_to_33_percent_of_the_crop_with_the_noise_of_normalised_units():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.1)
    erase = imaging.PixelErasing(1.0, mean, std)
    image = torch.full((3, 64, 64), 7, dtype=torch.uint8)  # no pixel of the fill is likely to be 7 in every channel
    shares, fills = [], []
    for seed in range(40):
        torch.manual_seed(seed)
        erased = erase(image.clone())
        changed = (erased != 7).any(dim=0).nonzero()
        top, left = changed.min(dim=0).values.tolist()
        bottom, right = changed.max(dim=0).values.tolist()
        box = erased[:, top : bottom + 1, left : right + 1]
        shares.append(box.shape[1] * box.shape[2] / 64**2)
        fills.append(box.float().flatten(1))
        assert (erased[:, :top] == 7).all() and (erased[:, bottom + 1 :] == 7).all()  # nothing outside the box
    # The box's sides are rounded to whole pixels: its share is within a pixel's rounding of 2-33%.
    assert min(shares) >= 0.02 * 0.85 and max(shares) <= imaging.ERASE_SCALE[1] * 1.1
    assert max(shares) - min(shares) > 0.1  # the area varies
    values = torch.cat(fills, dim=1)
    for channel in range(3):  # mean + std x N(0, 1), in pixels
        assert values[channel].mean().item() == pytest.approx(mean[channel] * 255, abs=6)
        assert values[channel].std().item() == pytest.approx(std[channel] * 255, rel=0.15)
    torch.manual_seed(0)
    assert torch.equal(imaging.PixelErasing(0.0, mean, std)(image.clone()), image)


def test_policies_and_erasing_go_on_the_crops_after_the_colour_jitter_and_erasing_comes_last():
    steps = imaging.train_transform(SIZE, 0.2, (0.6, 1.0), imaging.Policies("randaugment", 0.25)).transforms
    names = [type(step).__name__ for step in steps]
    assert names == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ColorJitter",
        "RandAugment",
        "PILToTensor",
        "PixelErasing",
    ]
    # --augment none trains on validation's centre crops: no policy, no erasing (as no colour jitter).
    centre = imaging.augmentation(
        SIZE, None, 0.2, imaging.Resize(SHORT_SIDE), imaging.Policies("trivial", 0.5)
    ).transforms
    assert [type(step).__name__ for step in centre] == ["Resize", "CenterCrop", "PILToTensor"]


def _config(**options) -> TrainConfig:
    return merge(TrainConfig, None, {"data": "/d", "freeze_depth": 3, "weights": "none", **options}).validate()


def test_a_policy_trains_on_autos_crops_and_is_recorded_and_checked_on_resume():
    config = _config(augment="trivial", random_erasing=0.25)
    assert config.crop_scale() == recipe.crop_scale(config.image_size) and config.augment_policy() == "trivial"
    recorded = strategy_meta(config)
    assert (recorded["augment"], recorded["random_erasing"]) == ("trivial", 0.25)
    plain = _config()
    assert "augment" not in strategy_meta(plain) and "random_erasing" not in strategy_meta(plain)
    meta = {"arch": config.arch, "freeze_depth": 3, "class_names": ["a", "b"], "strategy": recorded}
    meta["monitor"] = "val_acc"
    check_resumable(meta, config, ["a", "b"], None)
    with pytest.raises(TlRayError, match="strategy"):
        check_resumable(meta, _config(augment="randaugment", random_erasing=0.25), ["a", "b"], None)
    with pytest.raises(TlRayError, match="strategy"):
        check_resumable(meta, _config(augment="trivial"), ["a", "b"], None)


def test_random_erasing_takes_a_probability():
    with pytest.raises(UsageError, match="--random-erasing"):
        _config(random_erasing=1.5)

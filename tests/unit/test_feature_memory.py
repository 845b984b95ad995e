"""Whether a run's cached features are held in each worker's memory is decided by their real width: a timm
backbone's pooled features may be 192 wide (ViT-Tiny) or 3072 (ConvNeXt-XL), not the widest torchvision arch's 2048."""

from __future__ import annotations

import pyarrow.fs as pafs

from tl_ray.inputs import features


def _split(rows: int, width: int) -> features.FeatureSplit:
    return features.FeatureSplit(pafs.LocalFileSystem(), [], rows, built=False, width=width)


def test_the_memory_bound_counts_each_splits_own_width():
    budget_rows = features.IN_MEMORY_BYTES // (4 * 2048)  # rows of 2048 float32 features the budget holds
    assert features.fit_in_memory({"train": _split(budget_rows, 2048), "val": None})
    assert not features.fit_in_memory({"train": _split(budget_rows, 3072), "val": None})  # a wider backbone
    assert features.fit_in_memory({"train": _split(budget_rows * 10, 192), "val": None})  # a narrower one
    halves = {"train": _split(budget_rows // 2, 2048), "val": _split(budget_rows // 2 + 1, 2048)}
    assert not features.fit_in_memory(halves)  # both splits share the budget

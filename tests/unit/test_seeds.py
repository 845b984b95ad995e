"""The run's random streams: a function of (stream, seed, coordinates) alone, distinct across all of them."""

from __future__ import annotations

import itertools

import pytest
import torch

from tl_ray.seeds import ARITY, Stream, stream_seed


def test_a_stream_seed_is_a_function_of_its_key_and_fits_torchs_generators():
    first = stream_seed(Stream.MIX, 7, 2, 1, 30)
    assert first == stream_seed(Stream.MIX, 7, 2, 1, 30)  # a resumed run derives the same seed
    assert 0 <= first < 1 << 63
    torch.Generator().manual_seed(first)  # takes it as it is


def test_no_two_keys_of_a_small_grid_share_a_seed():
    """Every stream at seeds 0-3, epochs 0-9 and 0-4 of each other coordinate: all distinct. A linear mix such as
    seed * 1_000_003 + epoch fails this where a coordinate reaches the multiplier; the old row mix
    ((seed * P + epoch) * Q + row) gave (seed, epoch, Q) and (seed, epoch + 1, 0) one seed."""
    seen: dict[int, tuple] = {}
    for stream in Stream:
        extra = ARITY[stream] - 1
        for seed, epoch, *rest in itertools.product(range(4), range(10), *([range(5)] * extra)):
            key = (stream, seed, epoch, *rest)
            value = stream_seed(stream, seed, epoch, *rest)
            assert value not in seen, (key, seen.get(value))
            seen[value] = key
    assert len(seen) == sum(4 * 10 * 5 ** (ARITY[stream] - 1) for stream in Stream)


def test_a_stream_takes_exactly_its_coordinates():
    """Zero-padding makes [tag, seed, epoch] and [tag, seed, epoch, 0] one key: a fixed arity per stream rules out
    two call sites keying one stream differently."""
    with pytest.raises(ValueError, match="MIX is keyed by 3 coordinates after the seed, not 2"):
        stream_seed(Stream.MIX, 0, 1, 2)

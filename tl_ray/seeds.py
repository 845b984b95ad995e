"""The run's random streams, each a function of what it is for and of the run's seed: one derivation for all of
them, so a resumed run draws what the interrupted one drew, on any worker count, and no two streams share numbers.

A stream is keyed by its ``Stream`` tag, the run's seed and its own coordinates (epoch, rank, row or batch),
hashed by numpy's ``SeedSequence``: nearby keys give unrelated streams, where a linear mix such as ``seed * P +
epoch`` maps (seed, epoch + P) and (seed + 1, epoch) to one seed. The tag comes first and each stream has a fixed
number of coordinates (``SeedSequence`` pads with zeros, so [1, 2] and [1, 2, 0] are one key).
"""

from __future__ import annotations

import enum

import numpy as np


class Stream(enum.IntEnum):
    """What a stream is drawn for, and its coordinates after the run's seed."""

    DEAL = 1  # (epoch): the held training rows' order, the same on every worker (pipelines.deal_rows)
    HELD_CROP = 2  # (epoch, row): one held image's crop, flip, policy and erasing (held.HeldImages)
    DEVICE_CROP = 3  # (epoch, rank): a worker's boxes and flips for its device-cropped batches (device_input)
    MIX = 4  # (epoch, rank, batch): a batch's MixUp/CutMix draws (training.mixing.Mixer)


ARITY = {Stream.DEAL: 1, Stream.HELD_CROP: 2, Stream.DEVICE_CROP: 2, Stream.MIX: 3}


def stream_seed(stream: Stream, seed: int, *key: int) -> int:
    """A 63-bit seed (torch's generators take it as it is) for ``stream`` of the run seeded ``seed`` at ``key``."""
    if len(key) != ARITY[stream]:
        raise ValueError(f"{stream.name} is keyed by {ARITY[stream]} coordinates after the seed, not {len(key)}")
    state = np.random.SeedSequence([int(stream), int(seed), *(int(part) for part in key)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1

"""Duplicates and leaks: the same image twice in a split, or in two (a leak, which inflates every number a val or
test split reports).

Exact duplicates are items whose bytes have one SHA-256; near duplicates (a resized, re-encoded copy) are pairs
whose whitened, L2-normalised pooled features (``whitened``) have a cosine similarity at or above the threshold,
and, given a pixel threshold above 0 (``config.DUPLICATE_PIXEL_THRESHOLD``), whose thumbnails (32 px colour,
``imaging.thumbnail``, ``smoothed``) correlate at or above it. The features find the candidates; the pixels tell a
copy from a look-alike: a model trained to tell classes apart maps two different drawings
of one class close together (on rendered letters, half of the pairs the features alone report are two fonts, not
one image twice), while a copy's pixels agree with its original's (BENCHMARKS.md, "Data audit"). All pairs are
compared, in square blocks of the similarity matrix (``BLOCK`` rows by ``BLOCK`` columns, upper triangle only) on
the device, so memory holds the features and one block: 1M items of 512 features are 2 GB and a 4096x4096 block
64 MB, where the whole matrix would be 4 TB.
"""

from __future__ import annotations

import collections

import numpy as np
import pandas as pd
import torch

from tl_ray.errors import TlRayError

BLOCK = 4096
# Whitening's floor, a share of the largest eigenvalue: directions with less variance than this are not blown up
# into noise; raised by features/items when there are fewer items than features (most directions then have no
# variance). Measured with the threshold (BENCHMARKS.md, "Data audit"): 1e-2 at 0.95 found 94-100% of the copies
# from 100 items to 1,800; a fixed 1e-3 at 0.9 lost half of them below 300.
WHITEN_FLOOR = 1e-2
# The thumbnails' blur before their correlation (``smoothed``), in thumbnail pixels. Measured with the pixel
# threshold (BENCHMARKS.md, "Colour thumbnails"): at 0.7 and 0.98, 600 re-encoded copies of the sample shapes all
# pass (unblurred: 1.7% below) and the rendered letters' look-alike fonts stay out (3 false pairs of 39).
SMOOTHING_SIGMA = 0.7
MAX_PAIRS = 1_000_000  # beyond this a threshold finds families, not copies: refused, not written
SPLIT_ORDER = {"train": 0, "": 0, "val": 1, "test": 2}
COLUMNS = ["a", "b", "similarity", "pixel_similarity", "kind", "exact"]


def normalised(features: np.ndarray, device: torch.device) -> torch.Tensor:
    """The features centred on their mean, then L2-normalised. Pooled features after a ReLU are all positive, so
    any two images have a high raw cosine (0.7 and up on a trained ResNet's); centred, unrelated images score near
    0 and a copy still near 1, which leaves the threshold room."""
    x = torch.tensor(features, dtype=torch.float32, device=device)
    return torch.nn.functional.normalize(x - x.mean(0, keepdim=True), dim=1)


def whitened(features: np.ndarray, device: torch.device) -> torch.Tensor:
    """The features centred, whitened (PCA: each principal direction scaled to unit variance, floored at
    ``WHITEN_FLOOR`` of the largest) and L2-normalised. A checkpoint trained on the data collapses each class
    towards one point, so in its raw feature space any two images of a class have a cosine near 1 (0.95 and up on
    the digits: thousands of pairs); whitening gives the directions along which images of a class differ their
    weight back, and a copy is then the one image that stays close. The covariance is D x D whatever N."""
    x = torch.tensor(features, dtype=torch.float32, device=device)
    if len(x) < 2:
        return torch.nn.functional.normalize(x, dim=1)
    x = x - x.mean(0, keepdim=True)
    values, vectors = torch.linalg.eigh((x.T @ x).double() / len(x))
    floor = WHITEN_FLOOR * max(1.0, x.shape[1] / len(x))  # fewer items than features: fewer directions to trust
    scale = (values.clamp_min(0) + floor * values.max().clamp_min(1e-12)).rsqrt()
    return torch.nn.functional.normalize(x @ (vectors * scale).float(), dim=1)


def near_pairs(
    features: np.ndarray, threshold: float, device: torch.device, block: int = BLOCK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) of every pair i < j whose cosine similarity is at least ``threshold``, found block by
    block, in the ``whitened`` space."""
    x = whitened(features, device)
    found_i, found_j, found_s = [], [], []
    total = 0
    for start in range(0, len(x), block):
        rows = x[start : start + block]
        for other in range(start, len(x), block):
            similarity = rows @ x[other : other + block].T
            if other == start:  # the diagonal block: only its upper triangle, past the diagonal
                similarity = similarity.triu(1) - torch.ones_like(similarity).tril() * 2
            hit_i, hit_j = torch.nonzero(similarity >= threshold, as_tuple=True)
            total += len(hit_i)
            if total > MAX_PAIRS:
                raise TlRayError(
                    f"--duplicate-threshold {threshold}: more than {MAX_PAIRS:,} pairs reach it; these are look-alike"
                    " families, not copies: raise it"
                )
            found_s.append(similarity[hit_i, hit_j].cpu().numpy())
            found_i.append((hit_i + start).cpu().numpy())
            found_j.append((hit_j + other).cpu().numpy())
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)


def smoothed(thumbnails: np.ndarray, sigma: float = SMOOTHING_SIGMA) -> torch.Tensor:
    """Thumbnails (N, 3 x side x side uint8) as (N, 3, side, side) floats blurred by a Gaussian of ``sigma`` pixels
    (0: not blurred): a resize and a JPEG re-encoding change an image's finest detail pixel by pixel, which on a
    small, noisy image is much of what its thumbnail holds; the blur leaves the shapes a copy shares."""
    x = torch.as_tensor(thumbnails, dtype=torch.float32)
    side = round((x.shape[1] / 3) ** 0.5)
    x = x.reshape(-1, 3, side, side)
    if sigma <= 0:
        return x
    radius = int(np.ceil(3 * sigma))
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32).square() / (2 * sigma**2))
    taps = (taps / taps.sum()).repeat(3, 1, 1, 1)  # one filter a channel (groups=3)
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = torch.nn.functional.conv2d(x, taps.view(3, 1, 1, -1), groups=3)
    return torch.nn.functional.conv2d(x, taps.view(3, 1, -1, 1), groups=3)


def pixel_similarity(
    thumbnails: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    chunk: int = 65_536,
    sigma: float = SMOOTHING_SIGMA,
) -> np.ndarray:
    """The correlation of each pair's ``smoothed`` thumbnails (each colour channel centred, the three together
    scaled to unit length: a change of brightness or contrast keeps it; two different pictures lose it; a flat
    thumbnail correlates 0 with any). Only the pairs' rows are converted, ``chunk`` pairs at a time: 1M thumbnails
    are 3 GB as bytes, 12 as floats."""

    def unit(rows: np.ndarray) -> torch.Tensor:
        x = smoothed(rows, sigma)
        x = (x - x.mean((2, 3), keepdim=True)).flatten(1)
        return torch.nn.functional.normalize(x, dim=1)

    scores = [
        (unit(thumbnails[first[start : start + chunk]]) * unit(thumbnails[second[start : start + chunk]])).sum(1)
        for start in range(0, len(first), chunk)
    ]
    return torch.cat(scores).numpy() if scores else np.zeros(0, np.float32)


def exact_pairs(digests: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of items with the same bytes: each of a group's items with its first."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for index, digest in enumerate(digests):
        if digest:
            groups[digest].append(index)
    return [(members[0], other) for members in groups.values() for other in members[1:]]


def kind_of(split_a: str, split_b: str) -> str:
    """'within train' for a pair in one split, 'leak train/val' for a pair across two ('within data' unsplit)."""
    if split_a == split_b:
        return f"within {split_a or 'data'}"
    return f"leak {split_a or 'data'}/{split_b or 'data'}"


def find(
    paths: np.ndarray,
    splits: np.ndarray,
    features: np.ndarray,
    digests: np.ndarray,
    thumbnails: np.ndarray,
    threshold: float,
    pixel_threshold: float,
    device: torch.device,
    block: int = BLOCK,
) -> pd.DataFrame:
    """duplicates.csv's rows, most similar first: a and b (a in the earlier split: train, val, test), their
    features' similarity and their thumbnails', the kind (within a split, or a leak across two) and whether their
    bytes are the same (exact duplicates are reported whatever their thumbnails say)."""
    first, second, similarity = near_pairs(features, threshold, device, block)
    pixels = pixel_similarity(thumbnails, first, second)
    kept = pixels >= pixel_threshold if pixel_threshold > 0 else np.ones(len(first), dtype=bool)
    pairs = {
        (int(i), int(j)): (float(s), float(agree))
        for i, j, s, agree in zip(first[kept], second[kept], similarity[kept], pixels[kept], strict=True)
    }
    unseen = [(min(i, j), max(i, j)) for i, j in exact_pairs(digests)]
    unseen = np.asarray([key for key in unseen if key not in pairs], dtype=np.int64).reshape(-1, 2)
    if len(unseen):
        x = whitened(features, device)
        agreement = pixel_similarity(thumbnails, unseen[:, 0], unseen[:, 1])
        for (i, j), agree in zip(unseen.tolist(), agreement, strict=True):
            pairs[(i, j)] = (float(x[i] @ x[j]), float(agree))
    rows = []
    for (i, j), (value, agree) in pairs.items():
        if SPLIT_ORDER.get(splits[j], 0) < SPLIT_ORDER.get(splits[i], 0):
            i, j = j, i
        exact = bool(digests[i]) and digests[i] == digests[j]
        row = (paths[i], paths[j], round(min(value, 1.0), 6), round(agree, 6), kind_of(splits[i], splits[j]))
        rows.append((*row, exact))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values(["similarity", "a", "b"], ascending=[False, True, True], ignore_index=True)

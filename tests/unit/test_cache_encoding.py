"""The decoded-image cache's encodings keep what training needs to see at the cache's small sizes."""

import io

import numpy as np
import pytest
from PIL import Image

from tl_ray.inputs import cache, imaging, sources


def colour_only_stripes(size: int = 37) -> np.ndarray:
    """Pink and green one-pixel stripes of (nearly) the same luma: detail that lives in colour alone, at the
    scale of a 32 px crop's cached image (its short side, 37 px), like a shape told from its background by hue."""
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = (90, 160, 110)
    pixels[:, ::2] = (200, 100, 150)
    return pixels


@pytest.mark.parametrize("image_format", sorted(cache.ENCODINGS))
def test_colour_detail_survives_the_cache(image_format: str) -> None:
    # JPEG's default 4:2:0 chroma subsampling averages colour over 2x2 pixels: these stripes came back 34 grey levels
    # off on average, and tl-ray learnt the sample shapes at 100 a class 0.08 worse than from the files
    # (BENCHMARKS.md, section 10, "The JPEG cache's chroma").
    pixels = colour_only_stripes()
    image = Image.fromarray(pixels)
    decoded = cache.decode(cache.encode(image, image_format), image.height, image.width, image_format)
    error = np.abs(np.asarray(decoded, dtype=np.float64) - pixels).mean()
    assert error < 3.0, f"{image_format}: mean error {error:.1f} grey levels"


def test_training_cache_stays_jpeg_and_smaller_than_raw() -> None:
    """Full chroma keeps the training split JPEG, and smaller than raw (3.6-5.2x on photos: section 8)."""
    assert cache.SPLIT_FORMATS["train"] == "jpeg"
    pixels = colour_only_stripes()
    image = Image.fromarray(pixels)
    jpeg, raw = cache.encode(image, "jpeg"), cache.encode(image, "raw")
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    assert len(jpeg) < len(raw)


def test_an_encodings_save_options_key_a_new_build(tmp_path, monkeypatch) -> None:
    """The chroma fix needed a CACHE_VERSION bump by hand: the key now holds the format's save options, so a cache
    written under other options is never read as this one."""
    for label in ("a", "b"):
        folder = tmp_path / "train" / label
        folder.mkdir(parents=True)
        Image.fromarray(colour_only_stripes()).save(folder / "0.png")
    layout = sources.discover(tmp_path)
    files = layout.train

    def key(image_format: str) -> str:
        return cache.split_key(files, layout.stats_of(files), layout, imaging.Resize(37), image_format)

    jpeg, raw = key("jpeg"), key("raw")
    assert key("jpeg") == jpeg  # the same files and options: the same build
    monkeypatch.setitem(cache.ENCODINGS, "jpeg", {**cache.ENCODINGS["jpeg"], "subsampling": 2})
    assert key("jpeg") != jpeg
    assert key("raw") == raw  # another format's options are not in its key

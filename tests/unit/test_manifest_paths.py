"""A manifest's paths: written on Windows (backslashes) they are read with ``/``; when none of its files exists the
listing says so in one line, naming how many and the first, instead of "0 classes with training items"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_ray.errors import TlRayError
from tl_ray.inputs import sources


def _images(root: Path, classes=("red", "blue"), per_class: int = 3) -> list[tuple[str, str]]:
    rows = []
    for colour in classes:
        (root / "images" / colour).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.full((8, 8, 3), index * 40, dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / colour / f"{index:03d}.png")
            rows.append((f"images\\{colour}\\{index:03d}.png", colour))
    return rows


def _manifest(root: Path, rows: list[tuple[str, str]]) -> Path:
    path = root / "labels.csv"
    path.write_text("path,label\n" + "".join(f"{name},{label}\n" for name, label in rows))
    return path


def test_backslash_paths_are_read_as_folders(tmp_path):
    layout = sources.discover(str(_manifest(tmp_path, _images(tmp_path))), val_fraction=0.0)
    assert layout.class_names == ["blue", "red"]
    assert len(layout.train) == 6
    assert not layout.rejected
    listed = sorted(Path(item).relative_to(tmp_path).as_posix() for item, _ in layout.train)
    assert listed[0] == "images/blue/000.png"


def test_a_manifest_whose_files_are_all_missing_says_how_many_and_the_first(tmp_path):
    rows = [(f"photos/{index}.jpg", "cat" if index % 2 else "dog") for index in range(5)]
    with pytest.raises(TlRayError) as raised:
        sources.discover(str(_manifest(tmp_path, rows)), val_fraction=0.0)
    message = str(raised.value)
    assert "\n" not in message
    assert "none of the 5 files" in message
    assert f"{tmp_path}/photos/0.jpg" in message
    assert "relative to the manifest's folder" in message


def test_a_few_missing_files_are_skipped_and_reported(tmp_path):
    rows = [*_images(tmp_path), ("images/red/gone.png", "red")]
    layout = sources.discover(str(_manifest(tmp_path, rows)), val_fraction=0.0)
    assert len(layout.train) == 6
    assert [(Path(path).name, reason.split(" (")[0]) for path, reason in layout.rejected] == [
        ("gone.png", "file not found")
    ]

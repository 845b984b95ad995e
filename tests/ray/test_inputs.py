"""Layout discovery, class mapping, the split, decoding every image mode, and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import encode
from PIL import Image
from torchvision.datasets import ImageFolder

from tl_ray.errors import TlRayError
from tl_ray.inputs import imaging, pipelines, skiplog
from tl_ray.inputs.sources import class_folders


def _image(path: Path, size=(40, 30), colour=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _tree(root: Path, layout: dict[str, int], split: str = "train") -> Path:
    for name, count in layout.items():
        for index in range(count):
            _image(root / split / name / f"img_{index}.jpg")
    return root


def test_class_mapping_equals_imagefolder(tmp_path):
    root = _tree(tmp_path, {"Zebra": 2, "apple": 2, "10": 1, "9": 1, "cat dog": 1, "émile": 1})
    layout = class_folders.discover(str(root))
    assert layout.class_to_idx == ImageFolder(str(root / "train")).class_to_idx


def test_hash_split_is_deterministic_disjoint_and_complete(tmp_path):
    root = _tree(tmp_path, {"a": 60, "b": 60, "c": 1})
    first, second = class_folders.discover(str(root), 0.25), class_folders.discover(str(root), 0.25)
    assert (first.train, first.val) == (second.train, second.val)
    train_paths, val_paths = {p for p, _ in first.train}, {p for p, _ in first.val}
    assert not train_paths & val_paths
    assert train_paths | val_paths == {str(p) for p in (root / "train").rglob("*.jpg")}
    assert 0.1 < len(val_paths) / 121 < 0.4
    assert {label for _, label in first.train} == {0, 1, 2}  # the one-image class keeps its image for training
    for path, label in first.train + first.val:
        assert Path(path).parent.name == first.class_names[label]
    assert class_folders.discover(str(root), 0.5).val != first.val


def test_val_folder_uses_train_mapping_by_name(tmp_path):
    root = _tree(tmp_path, {"a": 2, "b": 2, "c": 2})
    _tree(root, {"c": 1, "b": 1}, split="val")
    layout = class_folders.discover(str(root))
    assert layout.val_source == "folder"
    assert sorted((Path(p).parent.name, label) for p, label in layout.val) == [("b", 1), ("c", 2)]
    assert len(layout.train) == 6


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: _image(root, fmt="PNG"), "is a file; expected a folder"),
        (lambda root: _tree(root, {"a": 1}, split="val"), "has no train/ folder"),
        (lambda root: _tree(root, {"only": 3}), r"has 1 class folder\(s\) \['only'\]; need at least 2"),
        (lambda root: (_tree(root, {"a": 2, "b": 1}), (root / "train" / "empty").mkdir()), "empty has no images"),
        (lambda root: (_tree(root, {"a": 2, "b": 2}), _tree(root, {"a": 1, "z": 1}, "val")), "lacks: z"),
        (lambda root: (_tree(root, {"a": 2, "b": 2}), (root / "val").mkdir()), "val has no images"),
    ],
)
def test_layout_errors_are_clear(tmp_path, build, message):
    root = tmp_path / "ds"
    build(root)
    with pytest.raises(TlRayError, match=message):
        class_folders.discover(str(root))


def test_non_images_and_hidden_files_are_ignored(tmp_path):
    root = _tree(tmp_path, {"a": 2, "b": 2})
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / "._img_0.jpg").write_bytes(b"macOS resource fork")
    _image(root / "train" / "a" / "nested" / "deep.png", fmt="PNG")
    files = {Path(p).name for p, _ in class_folders.discover(str(root)).train + class_folders.discover(str(root)).val}
    assert files == {"img_0.jpg", "img_1.jpg", "deep.png"}


GRADIENT = np.tile(np.linspace(0, 255, 64), (48, 1))


@pytest.mark.parametrize(
    ("encoded", "expected_mean"),
    [
        (encode(Image.fromarray(GRADIENT.astype(np.uint8), "L"), "PNG"), 127.5),
        (encode(Image.fromarray(GRADIENT.astype(np.uint8), "L").convert("P"), "PNG"), 127.5),
        (encode(Image.fromarray((GRADIENT * 257).astype(np.uint16)), "PNG"), 127.5),  # 16-bit: not clipped to white
        (encode(Image.fromarray(GRADIENT.astype(np.float32) / 255.0, "F"), "TIFF"), 127.5),
        (encode(Image.new("RGBA", (64, 48), (100, 100, 100, 0)), "PNG"), 100),
        (encode(Image.new("LA", (64, 48), (100, 255)), "PNG"), 100),
        (encode(Image.new("CMYK", (64, 48), (0, 0, 0, 155)), "JPEG"), 100),
        (encode(Image.new("1", (64, 48), 1), "BMP"), 255),
        (encode(Image.new("RGB", (64, 48), (100, 100, 100)), "WEBP", lossless=True), 100),
        (encode(Image.new("P", (64, 48), 3), "GIF"), None),
    ],
    ids=["L", "P", "I;16", "F", "RGBA", "LA", "CMYK", "1-bit", "webp", "gif"],
)
def test_every_image_mode_decodes_to_rgb(encoded, expected_mean):
    image = imaging.load_rgb(encoded)
    assert image.mode == "RGB" and image.size == (64, 48)
    if expected_mean is not None:
        assert abs(np.asarray(image, dtype=np.float64).mean() - expected_mean) < 3


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert imaging.load_rgb(encode(image, "JPEG", exif=exif)).size == (20, 40)


def test_transforms_give_uint8_crops_and_eval_is_deterministic():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    train_out = imaging.train_transform(32, color_jitter=0.3)(image)
    assert train_out.shape == (3, 32, 32) and train_out.dtype == torch.uint8
    evaluate = imaging.eval_transform(32)
    assert torch.equal(evaluate(image), evaluate(image))
    normalised = imaging.normalize(evaluate(image)[None], torch.tensor([0.5] * 3), torch.tensor([0.25] * 3))
    assert normalised.dtype == torch.float32 and normalised.min() >= -2.01 and normalised.max() <= 2.01


def _bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good_jpeg = encode(Image.new("RGB", (50, 50), (1, 2, 3)), "JPEG")
    bad = {
        "truncated": folder / "truncated.jpg",
        "zero-byte": folder / "zero.jpg",
        "text": folder / "text.jpg",
    }
    bad["truncated"].write_bytes(good_jpeg[: len(good_jpeg) // 2])
    bad["zero-byte"].write_bytes(b"")
    bad["text"].write_text("hello, I am not a picture")
    return bad


def test_bad_files_are_skipped_and_reported_while_good_ones_survive(tmp_path, ray_cluster):
    root = _tree(tmp_path / "ds", {"a": 3, "b": 3})
    bad = _bad_files(root / "train" / "a")
    _image(root / "train" / "b" / "png_named.jpg", fmt="PNG")  # wrong extension, still a good image
    _image(root / "train" / "b" / "tiny.png", size=(1, 1), fmt="PNG")
    layout = class_folders.discover(str(root), val_fraction=0.01)
    files = layout.train + layout.val
    skipped = skiplog.SkippedFiles.remote()
    rows = pipelines.image_dataset(files, layout, 24, training=False, skipped=skipped).take_all()

    assert len(rows) == len(files) - len(bad) == 8
    assert all(row["image"].shape == (3, 24, 24) and row["image"].dtype == np.uint8 for row in rows)
    labels = sorted(int(row["label"]) for row in rows)
    assert labels == [0, 0, 0, 1, 1, 1, 1, 1]
    reasons = ray_cluster.get(skipped.get.remote())
    assert set(reasons) == {str(path) for path in bad.values()}
    assert "truncated" in reasons[str(bad["truncated"])].lower() or "OSError" in reasons[str(bad["truncated"])]
    assert reasons[str(bad["text"])] == "not an image file PIL can identify"


def test_training_pipeline_augments_and_shuffles(tmp_path, ray_cluster):
    root = _tree(tmp_path / "ds", {"a": 50, "b": 50})
    layout = class_folders.discover(str(root), val_fraction=0.01)
    dataset = pipelines.image_dataset(layout.train, layout, 16, training=True, skipped=skiplog.SkippedFiles.remote())
    epochs = [[int(row["label"]) for row in dataset.take_all()] for _ in range(3)]
    assert all(sorted(labels) == sorted(label for _, label in layout.train) for labels in epochs)
    assert len({tuple(labels) for labels in epochs}) > 1, "a new order every epoch"
    first_block = epochs[0][: pipelines.BLOCK_ROWS]
    assert 0 < sum(first_block) < len(first_block), "every block mixes classes"
    # --augment's policy and --random-erasing travel into the decode tasks (--cache none) with the crops.
    policies = imaging.Policies("randaugment", 1.0)
    files, skipped = layout.train[:8], skiplog.SkippedFiles.remote()
    augmented = pipelines.image_dataset(files, layout, 16, True, skipped, policies=policies).take_all()
    assert {(str(row["image"].dtype), row["image"].shape) for row in augmented} == {("uint8", (3, 16, 16))}
    assert len(augmented) == 8


def test_the_listing_carries_each_files_size_and_mtime(tmp_path):
    """Row for row with train and val (hash split and val folder): what the cache is keyed and validated by."""
    root = _tree(tmp_path / "split", {"a": 30, "b": 30})
    (root / "train" / "a" / "dangling.jpg").symlink_to(root / "missing.jpg")  # listed, cannot be stat'ed
    folder = _tree(_tree(tmp_path / "folder", {"a": 3, "b": 2}), {"a": 2, "b": 1}, split="val")
    for layout in (class_folders.discover(str(root), 0.3), class_folders.discover(str(folder))):
        for files, stats in ((layout.train, layout.train_stats), (layout.val, layout.val_stats)):
            assert stats.dtype == np.int64 and stats.shape == (len(files), 2) and len(files)
            for (path, _), (size, mtime) in zip(files, stats.tolist(), strict=True):
                if path.endswith("dangling.jpg"):
                    assert (size, mtime) == (-1, -1)
                else:
                    assert (size, mtime) == (Path(path).stat().st_size, Path(path).stat().st_mtime_ns)
        assert np.array_equal(layout.stats_of(layout.train), layout.train_stats)
        some = [layout.val[0], layout.train[-1]]  # any of the listed files, in any order
        assert layout.stats_of(some).tolist() == [layout.val_stats[0].tolist(), layout.train_stats[-1].tolist()]
        with pytest.raises(ValueError, match="did not return"):
            layout.stats_of([(str(tmp_path / "elsewhere.jpg"), 0)])

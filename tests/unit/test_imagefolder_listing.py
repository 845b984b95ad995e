"""Hugging Face ``imagefolder`` datasets (split folders with a metadata file of file_name and label, written here as
https://huggingface.co/docs/datasets/image_dataset#imagefolder documents them), the validation and test split folders
beside train/, and the flat-folder hint: real files, no Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

import tl_ray
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs import sources
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.sources import class_folders

COLOURS = {"cat": (200, 30, 30), "dog": (30, 30, 200), "eel": (30, 200, 30)}


def _image(path: Path, name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), COLOURS.get(name, (90, 90, 90))).save(path)


def _split(folder: Path, labels: list, kind: str = "csv", column: str = "label") -> list[str]:
    """A split folder as ``datasets`` reads it: images, and metadata.csv or metadata.jsonl naming them."""
    names = []
    for index, label in enumerate(labels):
        name = f"{index:04d}.png"
        _image(folder / name, {0: "cat", 1: "dog", 2: "eel"}.get(label, label))
        names.append(name)
    if kind == "csv":
        rows = [f"file_name,{column}"] + [f"{name},{label}" for name, label in zip(names, labels, strict=True)]
        (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    else:
        lines = [json.dumps({"file_name": name, column: label}) for name, label in zip(names, labels, strict=True)]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return [str(folder / name) for name in names]


def _imagefolder(root: Path, splits: dict[str, int], kind: str = "csv") -> dict[str, list[str]]:
    return {split: _split(root / split, ["cat", "dog"] * (count // 2), kind) for split, count in splits.items()}


def test_train_validation_and_test_folders_are_the_three_splits(tmp_path):
    root = tmp_path / "hf"
    written = _imagefolder(root, {"train": 12, "validation": 4, "test": 6})
    layout = sources.discover(root)
    assert layout.source == sources.IMAGEFOLDER and layout.class_names == ["cat", "dog"]
    assert [path for path, _ in layout.train] == written["train"]
    assert [path for path, _ in layout.val] == written["validation"]
    assert [path for path, _ in layout.test] == written["test"]
    assert [label for _, label in layout.train] == [0, 1] * 6
    assert layout.val_source == "train/ and validation/ (Hugging Face imagefolder)"
    assert layout.train_stats.shape == (12, 2) and (layout.train_stats[:, 0] > 0).all()
    assert any(f"evaluate --data {root}/test" in note for note in layout.notes)
    found = tl_ray.inspect(str(root))
    assert found.source == sources.IMAGEFOLDER
    assert found.counts == {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 2}, "test": {"cat": 3, "dog": 3}}


def test_jsonl_integer_labels_keep_numeric_order_and_val_is_named_val(tmp_path):
    root = tmp_path / "hf"
    _split(root / "train", [10, 9, 2] * 3, kind="jsonl")
    _split(root / "val", [2, 9, 10], kind="jsonl")
    layout = sources.discover(root)
    assert layout.class_names == ["2", "9", "10"] and layout.val_source.startswith("train/ and val/")
    assert [label for _, label in layout.val] == [0, 1, 2] and not layout.test


def test_one_folder_with_metadata_is_held_out_by_hash(tmp_path):
    root = tmp_path / "hf"
    written = _imagefolder(root, {"train": 40, "test": 4})
    first, again = sources.discover(root / "train", 0.25), sources.discover(root / "train", 0.25)
    assert (first.train, first.val) == (again.train, again.val) and first.source == sources.IMAGEFOLDER
    assert sorted(path for path, _ in first.train + first.val) == written["train"] and 3 < len(first.val) < 20
    assert not first.test
    whole = sources.discover(root, 0.25)  # train/ and test/: val held out of train/ alone, test/ kept apart
    assert sorted(path for path, _ in whole.train + whole.val) == written["train"] and len(whole.test) == 4
    assert whole.val_source == "a held-out share of the training images by each file's hash (--val-fraction)"


def test_a_root_metadata_names_its_splits_by_folder(tmp_path):
    root = tmp_path / "hf"
    rows = ["file_name,label"]
    for split, count in (("train", 6), ("validation", 2), ("test", 2)):
        for index in range(count):
            name = ("cat", "dog")[index % 2]
            _image(root / split / f"{index}.png", name)
            rows.append(f"{split}/{index}.png,{name}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    layout = sources.discover(root)
    assert (len(layout.train), len(layout.val), len(layout.test)) == (6, 2, 2)
    assert all("/validation/" in path for path, _ in layout.val) and all("/test/" in p for p, _ in layout.test)


def test_classes_from_folders_when_the_metadata_has_no_label(tmp_path):
    root = tmp_path / "hf"
    for split, count in (("train", 4), ("validation", 1)):
        rows = ["file_name,caption"]
        for name in ("cat", "eel"):
            for index in range(count):
                _image(root / split / name / f"{index}.png", name)
                rows.append(f"{name}/{index}.png,a {name}")
        (root / split / "metadata.csv").write_text("\n".join(rows) + "\n")
    layout = sources.discover(root)
    assert layout.class_names == ["cat", "eel"] and len(layout.train) == 8
    assert [(Path(path).parent.name, label) for path, label in layout.val] == [("cat", 0), ("eel", 1)]


def test_label_column_option_and_missing_files(tmp_path):
    root = tmp_path / "hf"
    _split(root / "train", ["cat", "dog"] * 3, column="species")
    with pytest.raises(UsageError) as found:
        sources.discover(root)
    assert str(found.value) == (
        f"--data: {root}/train/metadata.csv has no 'label' column (its columns: file_name, species) and its images"
        " are not in <class>/ folders; name the label column with --label-column"
    )
    with open(root / "train" / "metadata.csv", "a") as metadata:
        metadata.write("gone.png,cat\n")
    layout = sources.discover(root, options=SourceOptions(label_column="species"))
    assert len(layout.train) + len(layout.val) == 6
    assert layout.rejected == [(f"{root}/train/gone.png", f"file not found (named in {root}/train/metadata.csv)")]


def test_imagefolder_refusals(tmp_path):
    root = tmp_path / "hf"
    _imagefolder(root, {"train": 4, "validation": 2, "val": 2})
    with pytest.raises(TlRayError, match=re.escape(f"--data: {root} has both val/ and validation/; keep one")):
        sources.discover(root)
    (root / "val" / "metadata.csv").unlink()
    (root / "validation" / "metadata.csv").rename(root / "validation" / "labels.csv")
    (root / "val").rename(root / "valid")
    with pytest.raises(TlRayError, match="has both valid/ and validation/"):
        sources.discover(root)
    for image in (root / "valid").iterdir():
        image.unlink()
    (root / "valid").rmdir()
    with pytest.raises(TlRayError) as found:
        sources.discover(root)
    assert str(found.value) == (
        f"--data: {root}/validation has no metadata.csv or metadata.jsonl or metadata.parquet (train/ has one); add"
        " one with file_name and label columns, or remove the folder"
    )
    (root / "validation" / "metadata.csv").write_text("path,label\n0000.png,cat\n")
    with pytest.raises(UsageError) as found:
        sources.discover(root)
    assert str(found.value) == (
        f"--data: {root}/validation/metadata.csv has no 'file_name' column (its columns: path, label); Hugging Face's"
        " imagefolder names each image, relative to the metadata's folder, in file_name"
    )
    (root / "train" / "metadata.csv").write_text("path,label\n0000.png,cat\n")  # not HF's: a manifest to pass
    with pytest.raises(TlRayError, match=r"has no train/ folder but holds the manifest metadata.csv: pass it itself"):
        sources.discover(root / "train")


def test_class_folders_take_validation_and_keep_test_apart(tmp_path):
    root = tmp_path / "ds"
    for split, count in (("train", 5), ("validation", 2), ("test", 3)):
        for name in ("cat", "dog"):
            for index in range(count):
                _image(root / split / name / f"{index}.png", name)
    layout = sources.discover(root)
    assert layout.source == sources.CLASS_FOLDERS and len(layout.train) == 10
    assert {Path(path).parts[-3] for path, _ in layout.val} == {"validation"} and len(layout.val) == 4
    assert layout.val_source == "train/ and validation/ folders" and len(layout.test) == 6
    assert not {path for path, _ in layout.test} & {path for path, _ in layout.train + layout.val}
    found = tl_ray.inspect(str(root))
    assert found.counts["test"] == {"cat": 3, "dog": 3} and found.val_rule == "train/ and validation/ folders"
    (root / "valid").mkdir()
    with pytest.raises(TlRayError, match="has both valid/ and validation/"):
        sources.discover(root)
    (root / "valid").rmdir()
    with_val = sources.discover(root, val_data=root / "validation")
    assert len(with_val.val) == 4 and len(with_val.test) == 6 and len(with_val.train) == 10
    assert any("ROOT/validation/ left out" in note for note in with_val.notes)
    test = sources.list_split(sources.location.resolve(root, "--data"), SourceOptions(), "test")
    assert sorted(test.labels) == ["cat"] * 3 + ["dog"] * 3 and all("/test/" in item for item in test.items)


def test_class_folders_without_split_folders_are_unchanged(tmp_path):
    root = tmp_path / "ds"
    for name in ("cat", "dog"):
        for index in range(10):
            _image(root / "train" / name / f"{index}.png", name)
    before = sources.discover(root, 0.3)
    _image(root / "test" / "0.png", "cat")  # an unlabelled test/ (Kaggle's): left out, said so
    after = sources.discover(root, 0.3)
    assert (after.train, after.val, after.val_source) == (before.train, before.val, "split") and not after.test
    assert np.array_equal(after.train_stats, before.train_stats)
    assert after.notes == ["test/ holds no <class>/ image folders: left out (unlabelled)"] and not before.notes
    assert class_folders.discover(root, 0.3).train == before.train
    (root / "metadata.csv").write_text("species,notes\ncat,felis\n")  # a table of something else: still class folders
    (root / "train" / "metadata.jsonl").write_text('{"camera": "x"}\n')
    beside = sources.discover(root, 0.3)
    assert (beside.source, beside.train, beside.val) == (sources.CLASS_FOLDERS, before.train, before.val)


def test_list_split_of_an_imagefolder_and_its_refusals(tmp_path):
    root = tmp_path / "hf"
    written = _imagefolder(root, {"train": 4, "validation": 2, "test": 2})
    where = sources.location.resolve(root, "--data")
    assert sources.list_split(where, SourceOptions(), "test").items == written["test"]
    assert sources.list_split(where, SourceOptions(), "val").items == written["validation"]
    one = sources.location.resolve(root / "train", "--data")
    with pytest.raises(TlRayError) as found:
        sources.list_split(one, SourceOptions(), "test")
    assert str(found.value) == f"--split test: {root}/train has no test items (its splits: none (held out by hash))"
    plain = tmp_path / "plain"
    for name in ("cat", "dog"):
        _image(plain / "train" / name / "0.png", name)
    plain_where = sources.location.resolve(plain, "--data")
    with pytest.raises(TlRayError, match=re.escape(f"--split val: {plain} has no val/, valid/, validation/ folder")):
        sources.list_split(plain_where, SourceOptions(), "val")
    with pytest.raises(TlRayError, match=re.escape(f"--split test: {plain} has no test/ folder")):
        sources.list_split(plain_where, SourceOptions(), "test")


def test_the_flat_folder_hint_suggests_only_a_pattern_that_labels(tmp_path):
    numbered = tmp_path / "numbered" / "train"
    for index in range(72):
        _image(numbered / f"{index:04d}.png", "cat")
    with pytest.raises(UsageError) as found:
        sources.discover(numbered.parent)
    assert str(found.value) == (
        f"--data: found 72 images directly in {numbered} and no class folders, and their names hold no label: put"
        f" each class's images in {numbered}/<class>/, or list them in a manifest of path,label (--data FILE.csv)"
    )
    assert sources.suggest_label_pattern([f"img_{i}.jpg" for i in range(9)]) is None  # one class
    assert sources.suggest_label_pattern([f"{w}.jpg" for w in ("ant", "bee", "cow", "doe")]) is None  # one each
    assert sources.suggest_label_pattern([f"{w}.{i}.jpg" for w in ("cat", "dog") for i in range(3)]) == r"^(\w+)\."
    (numbered / "labels.csv").write_text("path,label\n0000.png,cat\n")
    with pytest.raises(UsageError) as found:
        sources.discover(numbered.parent)
    assert str(found.value) == (
        f"--data: found 72 images directly in {numbered} and no class folders: are the labels in labels.csv? pass"
        f" it: --data {numbered}/labels.csv (--path-column, --label-column name its columns)"
    )


def test_an_imagefolder_in_object_storage(s3_server, tmp_path):
    """Recognised and listed by folder-level requests (each split's metadata, a LIST per folder), none per image."""
    local = tmp_path / "hf"
    _imagefolder(local, {"train": 20, "validation": 4, "test": 4}, kind="jsonl")
    s3_server.create_bucket("imagefolder")
    pafs.copy_files(str(local), "imagefolder/ds", destination_filesystem=s3_server.filesystem())
    since = s3_server.mark()
    layout = sources.discover(s3_server.uri("imagefolder/ds"))
    requests = s3_server.requests(since)
    assert not [request for request in requests if request.path.endswith(".png")]  # folders listed, images not asked
    read = [request.path for request in requests if request.method == "GET" and "metadata" in request.path]
    # Each metadata file's header (its columns), then its rows; train/'s header twice more, as discover recognises
    # the source and list_source again.
    assert read == [
        f"/imagefolder/ds/{split}/metadata.jsonl" for split in ["train"] * 4 + ["validation"] * 2 + ["test"] * 2
    ]
    assert layout.source == sources.IMAGEFOLDER and (len(layout.train), len(layout.val), len(layout.test)) == (20, 4, 4)
    assert layout.val[0][0] == "imagefolder/ds/validation/0000.png" and (layout.val_stats[:, 0] > 0).all()
    assert layout.opener.read(layout.train[1][0]) == (local / "train" / "0001.png").read_bytes()


def test_labels_in_file_names_take_a_validation_folder(tmp_path):
    root = tmp_path / "kaggle"
    for split, count in (("train", 3), ("validation", 1)):
        for name in ("cat", "dog"):
            for index in range(count):
                _image(root / split / f"{name}.{index}.png", name)
    layout = sources.discover(root, options=SourceOptions(label_pattern=r"^(\w+)\."))
    assert (len(layout.train), len(layout.val), layout.val_source) == (6, 2, "train/ and validation/")

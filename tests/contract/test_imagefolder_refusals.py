"""Hugging Face imagefolder datasets and split folders a user may get wrong: each refused by the CLI in one line that
names the file or folder and what to do (exit 2, no traceback), before anything trains or starts Ray."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tl_ray import checkpoint, cli, model
from tl_ray.inputs import imaging


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / name)


def _split(folder: Path, header: str = "file_name,label", count: int = 4) -> Path:
    """A split folder as ``datasets`` documents it: 0000.png... and a metadata.csv naming them."""
    names = [f"{index:04d}.png" for index in range(count)]
    _images(folder, names)
    rows = [header] + [f"{name},{('cat', 'dog')[index % 2]}" for index, name in enumerate(names)]
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def _checkpoint(path: Path) -> str:
    meta = {
        "arch": "resnet18", "num_classes": 2, "class_names": ["cat", "dog"], "freeze_depth": 0, "image_size": 32,
        "resize_size": imaging.resize_size(32), "mean": [0.5] * 3, "std": [0.25] * 3, "weights": "none", "epoch": 1,
        "metrics": {}, "tl_ray_version": "test",
    }  # fmt: skip
    checkpoint.save_checkpoint(str(path), model.create_resnet("resnet18", 2).state_dict(), meta)
    return str(path)


def _two_val_folders(tmp: Path) -> list[str]:
    _split(tmp / "hf" / "train")
    _split(tmp / "hf" / "val")
    _split(tmp / "hf" / "validation")
    return ["inspect", "--data", str(tmp / "hf")]


def _class_folders_with_valid_and_val(tmp: Path) -> list[str]:
    for split in ("train", "valid", "val"):
        for name in ("cat", "dog"):
            _images(tmp / "ds" / split / name, ["0.png"])
    return ["train", "--data", str(tmp / "ds"), "--arch", "resnet18", "--weights", "none", "--epochs", "1"]


def _validation_without_metadata(tmp: Path) -> list[str]:
    _split(tmp / "hf" / "train")
    _images(tmp / "hf" / "validation", ["0.png"])
    return ["inspect", "--data", str(tmp / "hf")]


def _no_file_name_column(tmp: Path) -> list[str]:
    _split(tmp / "hf" / "train")
    _split(tmp / "hf" / "validation", header="image,label")
    return ["inspect", "--data", str(tmp / "hf")]


def _no_label_and_no_class_folders(tmp: Path) -> list[str]:
    _split(tmp / "hf" / "train", header="file_name,caption")
    return ["inspect", "--data", str(tmp / "hf" / "train")]


def _numbered_flat_folder(tmp: Path) -> list[str]:
    _images(tmp / "flat" / "train", [f"{index:04d}.png" for index in range(72)])
    return ["inspect", "--data", str(tmp / "flat")]


def _flat_folder_beside_a_table(tmp: Path) -> list[str]:
    _images(tmp / "flat" / "train", [f"{index:04d}.png" for index in range(6)])
    (tmp / "flat" / "train" / "labels.csv").write_text("image,class\n0000.png,cat\n")
    return ["inspect", "--data", str(tmp / "flat")]


def _evaluate_a_split_it_lacks(tmp: Path) -> list[str]:
    _split(tmp / "hf" / "train")
    return ["evaluate", "--checkpoint", _checkpoint(tmp / "ckpt"), "--data", str(tmp / "hf"), "--split", "test"]


def _evaluate_a_split_not_a_split(tmp: Path) -> list[str]:
    return ["evaluate", "--checkpoint", str(tmp), "--data", str(tmp), "--split", "holdout"]


# name -> (build(tmp_path) -> argv, the exact error line)
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "two validation folders beside train/": (
        _two_val_folders,
        "--data: {tmp}/hf has both val/ and validation/; keep one validation folder (or pass the one to use as"
        " --val-data)",
    ),
    "class folders with valid/ and val/": (
        _class_folders_with_valid_and_val,
        "--data: {tmp}/ds has both val/ and valid/; keep one validation folder (or pass the one to use as --val-data)",
    ),
    "a validation folder without metadata": (
        _validation_without_metadata,
        "--data: {tmp}/hf/validation has no metadata.csv or metadata.jsonl or metadata.parquet (train/ has one);"
        " add one with file_name and label columns, or remove the folder",
    ),
    "metadata without a file_name column": (
        _no_file_name_column,
        "--data: {tmp}/hf/validation/metadata.csv has no 'file_name' column (its columns: image, label); Hugging"
        " Face's imagefolder names each image, relative to the metadata's folder, in file_name",
    ),
    "metadata without labels, images not in class folders": (
        _no_label_and_no_class_folders,
        "--data: {tmp}/hf/train/metadata.csv has no 'label' column (its columns: file_name, caption) and its images"
        " are not in <class>/ folders; name the label column with --label-column",
    ),
    "numbered images in a flat folder: no pattern suggested": (
        _numbered_flat_folder,
        "--data: found 72 images directly in {tmp}/flat/train and no class folders, and their names hold no label:"
        " put each class's images in {tmp}/flat/train/<class>/, or list them in a manifest of path,label"
        " (--data FILE.csv)",
    ),
    "a flat folder beside a table: the table named": (
        _flat_folder_beside_a_table,
        "--data: found 6 images directly in {tmp}/flat/train and no class folders: are the labels in labels.csv?"
        " pass it: --data {tmp}/flat/train/labels.csv (--path-column, --label-column name its columns)",
    ),
    "evaluate --split of a split the data lacks": (
        _evaluate_a_split_it_lacks,
        "--split test: {tmp}/hf has no test items (its splits: train)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_imagefolder_and_split_folder_refusals_are_one_line(case, tmp_path, capsys):
    build, expected = CASES[case]
    argv = build(tmp_path)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"tl-ray: error: {expected.format(tmp=tmp_path)}\n"


def test_evaluate_split_takes_only_the_split_names(tmp_path, capsys):
    assert cli.main(_evaluate_a_split_not_a_split(tmp_path)) == 2
    assert capsys.readouterr().err == "tl-ray: error: --split must be one of train, val, test; got 'holdout'\n"

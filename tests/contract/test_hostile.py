"""Hostile and broken inputs: each is skipped with its reason or refused with one clear line.

Files a dataset may hold are tried through the decode step every pipeline uses; the
listing cases through `discover`; options and files a user may get wrong through the
CLI, asserting the exact line printed. Datasets whose bad files leave nothing to learn
run a real (tiny) training and must stop with a clear error, not train on nothing.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from helpers import encode, payload
from PIL import Image

from tl_ray import checkpoint, cli, model
from tl_ray.inputs import imaging
from tl_ray.inputs.layout import FileOpener, Layout
from tl_ray.inputs.skiplog import labels_without_images
from tl_ray.inputs.sources import class_folders
from tl_ray.training.config import TrainConfig
from tl_ray.training.driver import describe_lost_classes

SIZE = 32


def _photo(size=(64, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def _self_link(folder: Path, name: str, _: bytes) -> Path:
    path = folder / name
    path.symlink_to(path)
    return path


def _unreadable(folder: Path, name: str, content: bytes) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root reads any file; permissions cannot make one unreadable here")
    path = _write(folder, name, content)
    path.chmod(0)
    return path


JPEG = encode(_photo(), "JPEG")
# (file name, how to create it, content, expected reason, or None where the image must decode)
FILES = {
    "truncated JPEG": ("cut.jpg", _write, JPEG[: len(JPEG) // 2], "OSError: image file is truncated"),
    "zero-byte file": ("empty.jpg", _write, b"", "not an image file PIL can identify"),
    "text named .jpg": ("notes.jpg", _write, b"these are my notes", "not an image file PIL can identify"),
    "wrong extension": ("really_a_png.jpg", _write, encode(_photo(), "PNG"), None),
    "decompression bomb": (
        "bomb.png",
        _write,
        encode(Image.new("1", (20000, 20000)), "PNG"),  # 48 KB on disk, 400 megapixels declared
        "DecompressionBombError: Image size (400000000 pixels) exceeds limit",
    ),
    "1x1 image": ("dot.png", _write, encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), None),
    "16-bit PNG": ("deep.png", _write, encode(Image.fromarray(np.full((8, 8), 40000, np.uint16)), "PNG"), None),
    "CMYK JPEG": ("print.jpg", _write, encode(Image.new("CMYK", (16, 16), (0, 0, 0, 100)), "JPEG"), None),
    "animated GIF": ("moving.gif", _write, _animated_gif(), None),
    "unreadable permissions": ("locked.jpg", _unreadable, JPEG, "PermissionError: [Errno 13] Permission denied"),
    "symlink loop": ("self.jpg", _self_link, b"", "OSError: [Errno 40] Too many levels of symbolic links"),
    "spaces and unicode in the path": ("été photo №1.jpg", _write, JPEG, None),
}


@pytest.mark.parametrize("case", list(FILES))
def test_hostile_file_is_decoded_or_skipped_with_its_reason(case, tmp_path):
    name, create, content, reason = FILES[case]
    folder = tmp_path / "odd folder ü"
    folder.mkdir()
    path = create(folder, name, content)
    transform = imaging.eval_transform(SIZE)
    if reason is None:
        image = imaging.decode_item(
            FileOpener(pafs.LocalFileSystem()), str(path), transform, imaging.resize_size(SIZE), 1.0
        )
        assert image.shape == (3, SIZE, SIZE) and image.dtype == np.uint8
        if case == "animated GIF":
            assert image.reshape(3, -1).mean(1).tolist() == [255.0, 0.0, 0.0], "the first frame"
        return
    with pytest.raises(Exception) as raised:  # every way a file can be bad
        imaging.decode_item(FileOpener(pafs.LocalFileSystem()), str(path), transform, imaging.resize_size(SIZE), 1.0)
    assert imaging.describe_error(raised.value).startswith(reason)


def _two_classes(root: Path, per_class: int = 2) -> Path:
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        for index in range(per_class):
            (root / "train" / name / f"{index}.jpg").write_bytes(JPEG)
    return root


def test_a_folder_symlink_loop_neither_hangs_nor_duplicates_images(tmp_path):
    root = _two_classes(tmp_path / "ds")
    (root / "train" / "a" / "up").symlink_to(root / "train")  # a/up/a/up/... and a/up/b/...
    (root / "train" / "b" / "again").symlink_to(root / "train" / "b")
    layout = class_folders.discover(str(root), val_fraction=0.0)
    assert sorted(os.path.relpath(path, root) for path, _ in layout.train) == [
        "train/a/0.jpg", "train/a/1.jpg", "train/b/0.jpg", "train/b/1.jpg",
    ]  # fmt: skip


def test_non_utf8_file_names_are_reported_not_fatal(tmp_path):
    root = _two_classes(tmp_path / "ds")
    odd = os.path.join(os.fsencode(root / "train" / "a"), b"caf\xe9.jpg")
    with open(odd, "wb") as stream:
        stream.write(JPEG)
    layout = class_folders.discover(str(root), val_fraction=0.0)
    assert len(layout.train) == 4
    assert layout.rejected == [(f"{root}/train/a/caf\\xe9.jpg", "file name is not valid UTF-8; rename the file")]


def _state_dict_file(path: Path) -> str:
    torch.save(model.create_resnet("resnet18", 2).state_dict(), path)
    return str(path)


def _checkpoint(path: Path, class_names: list[str]) -> str:
    meta = {
        "arch": "resnet18", "num_classes": len(class_names), "class_names": class_names, "freeze_depth": 0,
        "image_size": SIZE, "resize_size": imaging.resize_size(SIZE), "mean": [0.5] * 3, "std": [0.25] * 3,
        "weights": "none", "epoch": 1, "metrics": {}, "tl_ray_version": "test",
    }  # fmt: skip
    checkpoint.save_checkpoint(str(path), model.create_resnet("resnet18", len(class_names)).state_dict(), meta)
    return str(path)


def _train(root: Path, weights: str) -> list[str]:
    return ["train", "--data", str(root), "--arch", "resnet18", "--weights", weights, "--epochs", "1", "--lr", "1e-3"]


def _saved(path: Path, obj: object) -> str:
    torch.save(obj, path)
    return str(path)


def _yaml(path: Path, text: str) -> list[str]:
    path.write_text(text)
    return ["train", "--config", str(path)]


def _evaluate(checkpoint_dir: str, folder: Path) -> list[str]:
    return ["evaluate", "--checkpoint", checkpoint_dir, "--data", str(folder)]


# name -> (build(tmp_path, dataset) -> argv, the exact error line)
CLI_CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "weights file that is not a state dict": (
        lambda tmp, ds: _train(ds, _saved(tmp / "list.pth", [1, 2, 3])),
        "tl-ray: error: --weights: {tmp}/list.pth holds list, not a state dict of tensors",
    ),
    "pickled object that would run code": (
        lambda tmp, ds: _train(ds, _saved(tmp / "evil.pth", {"x": payload(tmp / "pwned")})),
        "tl-ray: error: --weights: {tmp}/evil.pth is not a loadable state dict: it holds objects other than tensors, "
        "and tl-ray never unpickles those (weights_only=True)",
    ),
    "checkpoint folder without meta.json": (
        lambda tmp, ds: (
            (tmp / "ckpt").mkdir(),
            torch.save(model.create_resnet("resnet18", 2).state_dict(), tmp / "ckpt" / "model.pt"),
            ["predict", "--checkpoint", str(tmp / "ckpt"), "--data", str(ds), "--out", str(tmp / "p.csv")],
        )[2],
        "tl-ray: error: checkpoint {tmp}/ckpt has no meta.json: not a (complete) tl-ray checkpoint",
    ),
    "checkpoint whose classes do not match evaluate's data": (
        lambda tmp, ds: _evaluate(_checkpoint(tmp / "c", ["cat", "dog"]), ds / "train"),
        "tl-ray: error: --data: classes a, b in {ds}/train are not among the checkpoint's classes (cat, dog)",
    ),
    "--data pointing at a file": (
        lambda tmp, ds: _train(ds / "train" / "a" / "0.jpg", "none"),
        "tl-ray: error: --data: {ds}/train/a/0.jpg is a file; expected a folder holding train/<class>/ image folders,"
        " a manifest (.csv, .tsv, .jsonl, .ndjson, .parquet with path and label columns) or Parquet files of images",
    ),
    "--data pointing at a zip of class folders": (
        lambda tmp, ds: (
            shutil.make_archive(str(tmp / "ds"), "zip", ds),
            _train(tmp / "ds.zip", "none"),
        )[1],
        "tl-ray: error: --data: {tmp}/ds.zip is a zip archive, which tl-ray does not read in place (it reads folders,"
        " WebDataset .tar shards and tables); unpack it (unzip FILE -d DIR) and pass --data DIR",
    ),
    "YAML config with an unknown key": (
        lambda tmp, ds: _yaml(tmp / "c.yaml", "learning_rate: 0.1\n"),
        "tl-ray: error: --config: {tmp}/c.yaml has unknown keys: learning_rate; known: "
        + ", ".join(sorted(field.name for field in dataclasses.fields(TrainConfig))),
    ),
    "YAML config with a wrong type": (
        lambda tmp, ds: _yaml(tmp / "c.yaml", "epochs: three\n"),
        "tl-ray: error: {tmp}/c.yaml: epochs must be int; got 'three'",
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_hostile_option_or_file_is_one_clear_line(case, tmp_path, capsys):
    build, expected = CLI_CASES[case]
    dataset = _two_classes(tmp_path / "ds")
    argv = build(tmp_path, dataset)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == expected.format(tmp=tmp_path, ds=dataset)
    assert not (tmp_path / "pwned").exists(), "unpickling ran code"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_class_whose_files_are_all_bad_stops_training_with_a_clear_error(tmp_path, capsys, ray_cluster):
    root = tmp_path / "ds"
    for split, name, count in (("train", "a", 4), ("val", "a", 2), ("val", "b", 1)):
        (root / split / name).mkdir(parents=True)
        for index in range(count):
            (root / split / name / f"{index}.jpg").write_bytes(encode(_photo((40, 40)), "JPEG"))
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / "0.jpg").write_bytes(b"")
    (root / "train" / "b" / "1.jpg").write_text("not a picture")
    argv = ["train", "--data", str(root), "--arch", "resnet18", "--weights", "none", "--image-size", str(SIZE)]
    argv += ["--epochs", "3", "--batch-size", "2", "--lr", "1e-3", "--storage", str(tmp_path / "runs"), "--name", "r"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after Ray's own log lines
        "tl-ray: error: --data: no training image of class b could be decoded, so the model could not learn it "
        f"(e.g. {root}/train/b/0.jpg: not an image file PIL can identify); fix or remove those files"
    )
    assert not list((tmp_path / "runs" / "r").glob("checkpoint_epoch*")), "no checkpoint of a model missing a class"


def test_a_dataset_of_only_bad_files_is_one_clear_error():
    files = [("ds/a/0.jpg", 0), ("ds/b/0.jpg", 1)]
    layout = Layout("ds", pafs.LocalFileSystem(), "", ["a", "b"], files, [], "split")
    skipped = {"ds/a/0.jpg": "not an image file PIL can identify", "ds/b/0.jpg": "OSError: image file is truncated"}
    lost = labels_without_images([1, 1], {0: 1, 1: 1})
    assert lost == [0, 1]
    assert describe_lost_classes(layout, lost, skipped) == (
        "--data: none of the 2 training images could be decoded "
        "(e.g. ds/a/0.jpg: not an image file PIL can identify); fix or remove those files"
    )
    assert labels_without_images([1, 1], {0: 1}) == [0]


def test_a_run_without_validation_images_stops_before_training(tmp_path, capsys):
    """Labels in the file names, two images a class, a hash split that holds out none: nothing to validate on. One
    line, exit 2, before Ray starts or anything is written; never a "best val_acc 0.000" chosen on no images."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, name in enumerate(("cat", "dog", "cow", "cat", "dog", "cow")):
        (flat / f"{name}.{index}.jpg").write_bytes(encode(_photo((40, 40)), "JPEG"))
    argv = ["train", "--data", str(flat), "--label-pattern", r"^(\w+)\.", "--weights", "none", "--arch", "resnet18"]
    argv += ["--val-fraction", "0.01"]
    assert cli.main([*argv, "--storage", str(tmp_path / "runs"), "--name", "r"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tl-ray: error: --data: {flat} has no validation images (validation split: a held-out share of {flat} by"
        " each file's hash (--val-fraction)); add some (a val/ folder, a split column, --val-data) or raise"
        " --val-fraction"
    )
    assert not (tmp_path / "runs" / "r").exists()


def test_a_run_whose_every_class_holds_one_image_stops_before_training(tmp_path, capsys):
    """A label per file (the flat-folder hint followed on a Hugging Face imagefolder's train/, whose names are not
    labels): as many classes as images. One line naming the cause, exit 2, nothing written."""
    flat = tmp_path / "flat"
    for split in ("train", "val"):
        (flat / split).mkdir(parents=True)
        for name in ("img0001", "img0002", "img0003"):
            (flat / split / f"{name}.jpg").write_bytes(encode(_photo((40, 40)), "JPEG"))
    argv = ["train", "--data", str(flat), "--label-pattern", r"^(\w+)\.", "--weights", "none", "--arch", "resnet18"]
    assert cli.main([*argv, "--storage", str(tmp_path / "runs"), "--name", "r"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tl-ray: error: --data: each of the 3 classes of {flat} (labels from file names) holds one training image:"
        " nothing a model could learn a class from. Labels that name each file (a --label-pattern or a label column"
        " matching whole names) do this: check the classes with tl-ray inspect"
    )
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_validation_split_whose_files_are_all_bad_stops_before_training(tmp_path, capsys, ray_cluster):
    root = tmp_path / "ds"
    for name in "ab":
        (root / "train" / name).mkdir(parents=True)
        (root / "val" / name).mkdir(parents=True)
        for index in range(3):
            (root / "train" / name / f"{index}.jpg").write_bytes(encode(_photo((40, 40)), "JPEG"))
        (root / "val" / name / "0.jpg").write_text("not a picture")
    argv = ["train", "--data", str(root), "--arch", "resnet18", "--weights", "none", "--image-size", str(SIZE)]
    argv += ["--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--storage", str(tmp_path / "runs"), "--name", "r"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tl-ray: error: --data: {root} has no validation images after skipping the files that could not be decoded"
        " (see above) (validation split: folder); add some (a val/ folder, a split column, --val-data) or raise"
        " --val-fraction"
    )
    assert not list((tmp_path / "runs" / "r").glob("checkpoint_epoch*"))

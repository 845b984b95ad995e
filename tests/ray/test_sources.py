"""Every source's listing, class order and errors (no Ray), and one run through them all on Ray: train from the
Parquet the real Hugging Face ``datasets`` writes, evaluate from a manifest, predict Parquet rows."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tl_ray
from tl_ray import cli
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inference import predict as inference
from tl_ray.inputs import cache, imaging, sources
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.sources import class_folders

COLOURS = {"zebra": (230, 30, 30), "ant": (30, 30, 230), "moose": (30, 200, 30)}


def _png(colour, size=(24, 18)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _flat(folder: Path, counts: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in counts.items():
        for index in range(count):
            (folder / f"{name}.{index}.png").write_bytes(_png(COLOURS.get(name, (90, 90, 90))))
    return folder


def _hf_parquet(folder: Path, splits: dict[str, int], names=("zebra", "ant", "moose"), broken_row: int | None = None):
    """Hugging Face split files written by ``datasets`` itself: an Image column and a ClassLabel (names unsorted)."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    for split, count in splits.items():
        labels = [index % len(names) for index in range(count)]
        images = [{"bytes": _png(COLOURS[names[label]]), "path": None} for label in labels]
        if broken_row is not None and split == "train":
            images[broken_row] = {"bytes": b"not an image at all", "path": None}
        dataset = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


# ---------------------------------------------------------------- file names


def test_labels_from_file_names_train_and_val_folders(tmp_path):
    root = tmp_path / "kaggle"
    _flat(root / "train", {"dog": 3, "cat": 4})
    _flat(root / "val", {"cat": 1, "dog": 1})
    (root / "train" / "README.png").write_bytes(_png((0, 0, 0)))
    layout = sources.discover(root, options=SourceOptions(label_pattern=r"^(?P<label>[a-z]+)\.\d+"))
    assert layout.source == sources.FILE_NAMES and layout.class_names == ["cat", "dog"]
    assert len(layout.train) == 7 and len(layout.val) == 2 and layout.val_source == "train/ and val/"
    for path, label in layout.train + layout.val:
        assert Path(path).name.startswith(layout.class_names[label])
    assert layout.rejected == [
        (str(root / "train" / "README.png"), r"file name does not match --label-pattern '^(?P<label>[a-z]+)\.\d+'")
    ]
    assert layout.train_stats.shape == (7, 2) and (layout.train_stats[:, 0] > 0).all()


def test_labels_from_file_names_of_one_folder_are_split_by_hash(tmp_path):
    root = _flat(tmp_path / "flat", {"cat": 30, "dog": 30})
    options = SourceOptions(label_pattern=r"^(\w+)\.")
    first, again = sources.discover(root, 0.25, options), sources.discover(root, 0.25, options)
    assert (first.train, first.val) == (again.train, again.val)
    assert 5 < len(first.val) < 25 and len(first.train) + len(first.val) == 60
    assert not {p for p, _ in first.train} & {p for p, _ in first.val}


def test_flat_folder_errors_say_what_to_pass(tmp_path, capsys):
    root = tmp_path / "kaggle"
    _flat(root / "train", {"cat": 2, "dog": 2})
    with pytest.raises(UsageError) as found:
        sources.discover(root)
    assert str(found.value) == (
        f"--data: found 4 images directly in {root}/train and no class folders: are the labels in the file names?"
        r" try --label-pattern '^(\w+)\.'"
    )
    shapes = ["a/circle_0050.jpg", "a/star_0001.jpg", "a/circle_0051.jpg", "a/star_0002.jpg", "b/x.png"]
    assert sources.suggest_label_pattern(shapes) == "^([A-Za-z]+)_"
    assert sources.suggest_label_pattern(["Cat-1.jpg", "dog-2.jpg", "Cat-3.jpg", "dog-4.jpg"]) == r"^([A-Za-z]+)\-"
    assert sources.suggest_label_pattern(["0001.jpg", "0002.jpg"]) is None  # no label in the names: none suggested
    with pytest.raises(UsageError, match=re.escape(r"--label-pattern '^x(\d)' does not match any of the 4 image file")):
        sources.discover(root, options=SourceOptions(label_pattern=r"^x(\d)"))
    assert cli.main(["inspect", "--data", str(root)]) == 2
    assert capsys.readouterr().err == f"tl-ray: error: {found.value}\n"
    with pytest.raises(UsageError, match="has no group"):
        sources.discover(root, options=SourceOptions(label_pattern=r"^\w+"))
    with pytest.raises(UsageError, match="is not a regular expression"):
        sources.discover(root, options=SourceOptions(label_pattern="(["))


def test_data_pointing_at_train_itself(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "ds" / "train" / name).mkdir(parents=True)
        (tmp_path / "ds" / "train" / name / "0.png").write_bytes(_png((1, 2, 3)))
    train = tmp_path / "ds" / "train"
    with pytest.raises(TlRayError) as found:
        sources.discover(train)
    assert str(found.value) == (
        f"--data: {train} is a train/ folder itself (its 2 sub-folders are the classes); pass the folder above it:"
        f" --data {tmp_path / 'ds'}"
    )


def test_class_folders_are_listed_as_before(tmp_path):
    root = tmp_path / "ds [v2]"  # glob characters in a real folder's name: still that folder
    for split, name, count in (("train", "b", 5), ("train", "A", 4), ("val", "b", 1)):
        _flat(root / split / name, {"x": count})
    old, new = class_folders.discover(root), sources.discover(root)
    assert (new.class_names, new.train, new.val, new.val_source) == (old.class_names, old.train, old.val, "folder")
    assert np.array_equal(new.train_stats, old.train_stats) and new.source == sources.CLASS_FOLDERS


# ---------------------------------------------------------------- manifests


def _manifest(tmp_path: Path) -> Path:
    folder = tmp_path / "labelled"
    (folder / "imgs").mkdir(parents=True)
    rows = ["file\ttag\tsplit"]
    for index in range(8):
        name = ("moose", "ant")[index % 2]
        (folder / "imgs" / f"{index}.png").write_bytes(_png(COLOURS[name]))
        rows.append(f"imgs/{index}.png\t{name}\t{'val' if index >= 6 else 'train'}")
    rows.append("imgs/gone.png\tant\ttrain")
    (folder / "labels.tsv").write_text("\n".join(rows) + "\n")
    return folder / "labels.tsv"


def test_manifest_with_named_columns_split_and_a_missing_file(tmp_path):
    manifest = _manifest(tmp_path)
    options = SourceOptions(path_column="file", label_column="tag")
    layout = sources.discover(manifest, options=options)
    assert layout.source == sources.MANIFEST and layout.class_names == ["ant", "moose"]  # sorted names
    assert [Path(p).name for p, _ in layout.train] == [f"{i}.png" for i in range(6)]
    assert [Path(p).name for p, _ in layout.val] == ["6.png", "7.png"]
    assert layout.rejected == [(str(manifest.parent / "imgs" / "gone.png"), f"file not found (named in {manifest})")]
    assert layout.opener.read(layout.train[0][0]) == (manifest.parent / "imgs" / "0.png").read_bytes()


def test_manifest_errors_and_formats(tmp_path):
    manifest = _manifest(tmp_path)
    with pytest.raises(UsageError) as found:
        sources.discover(manifest)
    assert str(found.value) == (
        f"--data: manifest {manifest} has no 'path' column (its columns: file, tag, split); name yours with"
        " --path-column"
    )
    with pytest.raises(TlRayError, match=r"has no train/ folder but holds the manifest labels.tsv: pass it itself"):
        sources.discover(manifest.parent)
    floats = tmp_path / "labelled" / "scores.csv"
    floats.write_text("path,label\nimgs/0.png,0.5\nimgs/1.png,1.0\n")
    with pytest.raises(UsageError, match=r"label column 'label' of .*scores.csv holds floats \(e.g. 0.5\)"):
        sources.discover(floats)
    ids = tmp_path / "labelled" / "ids.jsonl"
    ids.write_text("".join(json.dumps({"path": f"imgs/{i}.png", "label": [10, 9, 2][i % 3]}) + "\n" for i in range(8)))
    assert sources.discover(ids).class_names == ["2", "9", "10"]  # integer ids in numeric order


def test_a_changed_row_or_file_changes_the_cache_key(tmp_path):
    manifest = tmp_path / "labelled" / "m.csv"
    _manifest(tmp_path)
    lines = ["path,label"] + [f"imgs/{i}.png,{'ab'[i % 2]}" for i in range(8)]
    manifest.write_text("\n".join(lines) + "\n")

    def key() -> tuple[str, str]:
        layout = sources.discover(manifest)
        return tuple(
            cache.split_key(files, layout.stats_of(files), layout, imaging.Resize(36), "raw")
            for files in (layout.train, layout.val)
        )

    first = key()
    manifest.write_text("\n".join([*lines[:-1], "imgs/7.png,a"]) + "\n")  # a row relabelled
    second = key()
    image = tmp_path / "labelled" / "imgs" / "0.png"
    image.write_bytes(_png((1, 1, 1), (30, 20)))
    os.utime(image, ns=(10**18, 10**18))
    assert len({first, second, key()}) == 3


# ---------------------------------------------------------------- Parquet images


def test_hugging_face_parquet_split_files_and_class_label_order(tmp_path):
    root = _hf_parquet(tmp_path / "hf", {"train": 9, "validation": 3, "test": 3})
    layout = sources.discover(root)
    assert layout.source == sources.PARQUET and layout.class_names == ["zebra", "ant", "moose"]  # ClassLabel's order
    assert (len(layout.train), len(layout.val)) == (9, 3) and "validation-*" in layout.val_source
    assert layout.train[4] == (f"{root}/data/train-00000-of-00001.parquet#4", 1)
    assert any("test-00000-of-00001.parquet" in note for note in layout.notes)
    image = imaging.load_rgb(layout.opener.read(layout.train[4][0]))
    assert image.getpixel((0, 0)) == COLOURS["ant"]
    size = (root / "data" / "train-00000-of-00001.parquet").stat().st_size
    assert (layout.train_stats[:, 0] == size).all()  # a row is keyed by its file: a changed file rebuilds
    glob = sources.discover(f"{root}/data/train-*.parquet", 0.3)  # train files alone: held out by hash
    assert len(glob.train) + len(glob.val) == 9 and glob.class_names == ["zebra", "ant", "moose"]


def test_plain_parquet_of_binary_images_and_text_labels(tmp_path):
    names = ["moose", "ant", "zebra", "ant"]
    table = pa.table({"jpg": [_png(COLOURS[n]) for n in names], "species": names, "split": ["train"] * 3 + ["val"]})
    pq.write_table(table, tmp_path / "images.parquet")
    with pytest.raises(UsageError, match=r"has no 'label' column \(its columns: jpg, species, split\)"):
        sources.discover(tmp_path / "images.parquet")
    layout = sources.discover(tmp_path / "images.parquet", options=SourceOptions(label_column="species"))
    assert layout.class_names == ["ant", "moose", "zebra"] and [label for _, label in layout.val] == [0]
    assert imaging.load_rgb(layout.val_opener.read(layout.val[0][0])).getpixel((1, 1)) == COLOURS["ant"]


def test_val_data_from_another_source(tmp_path):
    root = _hf_parquet(tmp_path / "hf", {"train": 6})
    manifest = tmp_path / "val.csv"
    (tmp_path / "v").mkdir()
    for name in ("moose", "zebra"):
        (tmp_path / "v" / f"{name}.png").write_bytes(_png(COLOURS[name]))
    manifest.write_text("path,label\nv/moose.png,moose\nv/zebra.png,zebra\n")
    layout = sources.discover(root, val_data=manifest)
    assert len(layout.train) == 6 and [(Path(p).name, label) for p, label in layout.val] == [
        ("moose.png", 2),
        ("zebra.png", 0),
    ]
    assert layout.opener_of(layout.val) is layout.val_opener and layout.val_source == f"--val-data {manifest}"
    manifest.write_text("path,label\nv/moose.png,elk\n")
    with pytest.raises(TlRayError, match="the val items have classes that training lacks: elk"):
        sources.discover(root, val_data=manifest)


def test_inspect_and_predict_inputs_without_ray(tmp_path):
    root = _hf_parquet(tmp_path / "hf", {"train": 6, "validation": 3}, broken_row=2)
    found = tl_ray.inspect(str(root), decode=True)
    assert found.counts == {"train": {"zebra": 2, "ant": 2, "moose": 2}, "val": {"zebra": 1, "ant": 1, "moose": 1}}
    assert found.skipped == [(f"{root}/data/train-00000-of-00001.parquet#2", "not an image file PIL can identify")]
    assert found.sizes["width"] == [24] * 8 and found.imbalance == 1.0
    opener, items, rejected = inference._input_items(f"{root}/data/validation-*.parquet", SourceOptions())
    assert items == [f"{root}/data/validation-00000-of-00001.parquet#{row}" for row in range(3)] and not rejected
    assert opener.display(items[0]) == items[0] and opener.read(items[0])[:4] == b"\x89PNG"


# ---------------------------------------------------------------- on Ray: train, evaluate, predict


def test_train_from_hugging_face_parquet_then_evaluate_a_manifest(tmp_path, ray_cluster, capsys):
    root = _hf_parquet(tmp_path / "hf", {"train": 12, "validation": 6}, broken_row=3)
    storage = tmp_path / "runs"
    argv = ["train", "--data", str(root), "--arch", "resnet18", "--weights", "none", "--image-size", "32"]
    argv += ["--lr", "1e-3"]  # the sources are under test, not --lr select (4 trainings on a set this small)
    assert cli.main([*argv, "--epochs", "1", "--storage", str(storage), "--name", "hf", "--num-workers", "1"]) == 0
    result = json.loads((storage / "hf" / "result.json").read_text())
    train_file = f"{root}/data/train-00000-of-00001.parquet"
    assert [item["path"] for item in result["skipped_files"]] == [f"{train_file}#3"]
    meta = json.loads((Path(result["best_checkpoint"]) / "meta.json").read_text())
    assert meta["class_names"] == ["zebra", "ant", "moose"]

    folder = tmp_path / "eval"
    (folder / "imgs").mkdir(parents=True)
    lines = ["path,label"]
    for index, name in enumerate(["moose", "ant", "zebra", "moose"]):
        (folder / "imgs" / f"{index}.png").write_bytes(_png(COLOURS[name]))
        lines.append(f"imgs/{index}.png,{name}")
    (folder / "bad.png").write_bytes(b"broken")
    lines += ["bad.png,ant", "imgs/missing.png,ant"]
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "metrics"
    args = ["evaluate", "--checkpoint", result["best_checkpoint"], "--data", str(folder / "m.csv"), "--out", str(out)]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 4 and sum(row["support"] for row in metrics["per_class"].values()) == 4
    assert sorted(Path(row["path"]).name for row in metrics["undecodable"]) == ["bad.png", "missing.png"]

    # A flat folder labelled by --label-pattern trains, validated on the manifest (--val-data): classes by name.
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("zebra", "ant", "moose"):
        for index in range(4):
            (flat / f"{name}.{index}.png").write_bytes(_png(COLOURS[name]))
    (flat / "notes.png").write_bytes(_png(COLOURS["ant"]))  # no label in its name: skipped, reported
    flat_argv = [
        *argv[:2],
        str(flat),
        *argv[3:],
        "--label-pattern",
        r"^([a-z]+)\.\d",
        "--val-data",
        str(folder / "m.csv"),
    ]
    assert cli.main([*flat_argv, "--epochs", "1", "--storage", str(storage), "--name", "flat"]) == 0
    flat_result = json.loads((storage / "flat" / "result.json").read_text())
    assert json.loads((Path(flat_result["best_checkpoint"]) / "meta.json").read_text())["class_names"] == [
        "ant",
        "moose",
        "zebra",
    ]
    assert flat_result["history"][-1]["train_images"] == 12 and flat_result["history"][-1]["val_images"] == 4
    skipped = {Path(item["path"]).name for item in flat_result["skipped_files"]}
    assert {"notes.png", "bad.png", "missing.png"} <= skipped, skipped

    rows = tl_ray.predict(result["best_checkpoint"], f"{root}/data/validation-*.parquet")
    assert rows["path"].tolist() == [f"{root}/data/validation-00000-of-00001.parquet#{row}" for row in range(6)]
    assert (rows["error"] == "").all() and set(rows["predicted"]) <= set(meta["class_names"])
    shutil.rmtree(storage, ignore_errors=True)


def test_a_manifest_and_hugging_face_parquet_in_object_storage(s3_server, tmp_path):
    """Relative paths resolve against the manifest's folder in the bucket; stats come from one LIST per folder."""
    s3_server.create_bucket("sources")
    local = _manifest(tmp_path).parent
    _hf_parquet(local / "hf", {"train": 6, "validation": 3})
    bucket = s3_server.filesystem()
    pafs.copy_files(str(local), "sources/ds", destination_filesystem=bucket)
    options = SourceOptions(path_column="file", label_column="tag")
    since = s3_server.mark()
    layout = sources.discover(s3_server.uri("sources/ds/labels.tsv"), options=options)
    assert len(s3_server.requests(since)) < 10  # the manifest, and one listing of imgs/: never a request per file
    assert layout.class_names == ["ant", "moose"] and layout.train[0][0] == "sources/ds/imgs/0.png"
    assert layout.rejected == [("s3://sources/ds/imgs/gone.png", f"file not found (named in {layout.root})")]
    assert (layout.train_stats[:, 0] > 0).all()
    assert layout.opener.read(layout.train[0][0]) == (local / "imgs" / "0.png").read_bytes()
    hf = sources.discover(s3_server.uri("sources/ds/hf"))
    assert hf.class_names == ["zebra", "ant", "moose"] and (len(hf.train), len(hf.val)) == (6, 3)
    assert hf.opener.display(hf.val[0][0]) == "s3://sources/ds/hf/data/validation-00000-of-00001.parquet#0"
    assert imaging.load_rgb(hf.opener.read(hf.val[1][0])).getpixel((0, 0)) == COLOURS["ant"]

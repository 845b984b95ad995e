"""The WebDataset source without Ray: shards written with tarfile exactly as the ``webdataset`` package lays them out
(each sample's members ``KEY.jpg``, ``KEY.cls`` ... one after another), recognised in every shape --data takes,
labelled, split, with bad shards and samples reported, and read back by offset."""

from __future__ import annotations

import json
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARD_COLOURS, cls_samples, jpeg, write_shard

import tl_ray
from tl_ray import location
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inference import predict as inference
from tl_ray.inputs import cache, imaging, sources
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.sources import class_folders, webdataset


@pytest.fixture
def shards(tmp_path) -> Path:
    folder = tmp_path / "shards"
    for number in range(3):
        write_shard(folder / f"shard-{number:06d}.tar", cls_samples(number * 10, 10))
    return folder


# ---------------------------------------------------------------- recognising --data


def test_every_shape_of_data_is_recognised(shards, tmp_path):
    options = SourceOptions()
    shapes = [shards, shards / "shard-000001.tar", f"{shards}/*.tar", f"{shards}/shard-{{000000..000002}}.tar"]
    for data in shapes:
        where = location.resolve(data, "--data")
        assert sources.recognise(where, options) is webdataset, data
        assert sources.recognise(where, options, labelled=False) is webdataset, data  # predict's question
    sizes = {data: len(sources.list_source(location.resolve(data, "--data"), options).items) for data in shapes}
    assert list(sizes.values()) == [30, 10, 30, 30]
    assert len(sources.list_source(location.resolve(f"{shards}/shard-00000[02].tar", "--data"), options).items) == 20
    bracketed = shards.rename(tmp_path / "shards [v2]")  # pattern characters in a real folder's name: that folder
    assert len(sources.list_source(location.resolve(bracketed, "--data"), options).items) == 30
    # Class folders with an archive beside train/ stay class folders.
    root = tmp_path / "folders"
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        (root / "train" / name / "0.jpg").write_bytes(jpeg(SHARD_COLOURS[0]))
    write_shard(root / "backup.tar", cls_samples(0, 2))
    assert sources.recognise(location.resolve(root, "--data"), options) is class_folders


def test_brace_expansion_as_webdataset_writes_shard_names():
    assert webdataset.expand_braces("s-{000008..000011}.tar") == [f"s-{n:06d}.tar" for n in range(8, 12)]
    assert webdataset.expand_braces("{a,b}/x-{1..3}.tar") == [f"{d}/x-{n}.tar" for d in "ab" for n in (1, 2, 3)]
    assert webdataset.expand_braces("plain{}.tar") == ["plain{}.tar"]
    uri = "s3://bucket/wds/shard-{000000..000009}.tar?endpoint_override=127.0.0.1:9&scheme=http"
    where = location.resolve(uri, "--data")  # braces are no URI characters: pyarrow gets them encoded, and back
    assert (where.path, where.uri) == ("bucket/wds/shard-{000000..000009}.tar", uri)


def test_a_brace_pattern_reports_the_shards_it_names_that_do_not_exist(shards):
    layout = sources.discover(f"{shards}/shard-{{000001..000004}}.tar")
    assert len(layout.train) + len(layout.val) == 20
    assert layout.rejected == [
        (f"{shards}/shard-00000{n}.tar", "shard not found (named by the brace pattern)") for n in (3, 4)
    ]


# ---------------------------------------------------------------- labels


def test_class_ids_from_cls_in_numeric_order_and_items_read_by_offset(tmp_path):
    shard = tmp_path / "ids.tar"
    samples = [
        (f"k{index}", {"jpg": jpeg(SHARD_COLOURS[index % 3]), "cls": f"{[2, 10, 9][index % 3]}\n".encode()})
        for index in range(12)
    ]
    write_shard(shard, samples)
    listing = sources.list_source(location.resolve(shard, "--data"), SourceOptions())
    assert listing.source == sources.WEBDATASET and listing.class_names == ["2", "9", "10"]
    assert listing.labels[:3] == ["2", "10", "9"]
    assert [listing.opener.display(item) for item in listing.items[:2]] == [f"{shard}#k0", f"{shard}#k1"]
    assert listing.keys[:2] == ["ids.tar#k0", "ids.tar#k1"]
    with tarfile.open(shard) as tar:  # the bytes the opener returns are exactly the member's
        expected = {member.name: tar.extractfile(member).read() for member in tar if member.name.endswith(".jpg")}
    opener = pickle.loads(pickle.dumps(listing.opener))  # as it travels into a Ray task
    for index, item in enumerate(listing.items):
        assert opener.read(item) == expected[f"k{index}.jpg"]
    assert imaging.load_rgb(opener.read(listing.items[4])).getpixel((5, 5)) == pytest.approx(SHARD_COLOURS[1], abs=3)
    assert (listing.stats == [shard.stat().st_size, shard.stat().st_mtime_ns]).all()  # keyed by the shard


def test_class_names_from_txt_and_from_a_json_key(tmp_path):
    names = ["tench", "goldfish", "tench", "shark"]
    txt = write_shard(
        tmp_path / "txt" / "a.tar",
        [(f"x{i}", {"jpg": jpeg(SHARD_COLOURS[0]), "txt": n.encode()}) for i, n in enumerate(names)],
    )
    listing = sources.list_source(location.resolve(txt, "--data"), SourceOptions())
    assert listing.labels == names and listing.class_names is None  # names: sorted by to_layout
    described = [
        (f"y{i}", {"jpg": jpeg(SHARD_COLOURS[0]), "json": json.dumps({"species": n, "label": 7}).encode(), "cls": b"3"})
        for i, n in enumerate(names)
    ]
    folder = tmp_path / "json"
    write_shard(folder / "b.tar", described)
    by_key = sources.list_source(location.resolve(folder, "--data"), SourceOptions(label_column="species"))
    assert by_key.labels == names
    default = sources.list_source(location.resolve(folder, "--data"), SourceOptions())
    assert default.labels == ["7"] * 4  # the .json's "label" before the .cls


def test_samples_without_image_or_label_and_shards_that_are_not_tars_are_reported(shards):
    bad = shards / "shard-000003.tar"
    write_shard(
        bad,
        [
            ("only-label", {"cls": b"1"}),
            ("no-label", {"jpg": jpeg(SHARD_COLOURS[0]), "json": b'{"caption": "a fish"}'}),
            ("bad-id", {"png": jpeg(SHARD_COLOURS[0]), "cls": b"one"}),
            *cls_samples(40, 2),
        ],
    )
    (shards / "shard-000004.tar").write_bytes(b"this is not a tar archive at all" * 40)
    layout = sources.discover(shards)
    assert len(layout.train) + len(layout.val) == 32
    assert [item for item, _ in layout.rejected[:3]] == [f"{bad}#{key}" for key in ("only-label", "no-label", "bad-id")]
    assert [reason for _, reason in layout.rejected[:3]] == [
        "no image member (it has: cls)",
        "no label: no .cls or .txt member, nor a .json with 'label' (it has: jpg, json)",
        ".cls holds 'one', not a class id",
    ]
    assert layout.rejected[3][0] == f"{shards}/shard-000004.tar" and layout.rejected[3][1].startswith("not a tar")


def test_shards_without_labels_are_one_line_for_training_and_fine_for_predict(tmp_path):
    folder = tmp_path / "laion"
    captions = [(f"{i:09d}", {"jpg": jpeg(SHARD_COLOURS[0]), "json": b'{"caption": "x"}'}) for i in range(3)]
    write_shard(folder / "00000.tar", captions)
    with pytest.raises(UsageError) as found:
        sources.discover(folder)
    assert str(found.value) == (
        f"--data: none of the 3 samples of {folder} has a label: a .cls (class id) or .txt (class name) member, or a"
        " .json holding 'label' (name its key with --label-column)"
    )
    opener, items, rejected = inference._input_items(str(folder), SourceOptions())
    assert [opener.display(item) for item in items] == [f"{folder}/00000.tar#{i:09d}" for i in range(3)]
    assert not rejected and opener.read(items[2])[:2] == b"\xff\xd8"
    with pytest.raises(TlRayError, match=r"holds no WebDataset shards \(\.tar files\)"):
        sources.discover(f"{tmp_path}/nothing-*.tar")


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize(
    ("names", "rule"),
    [
        (["train-000.tar", "train-001.tar", "val-000.tar"], "validation"),
        (["imagenet-train-000000.tar", "imagenet-train-000001.tar", "imagenet-validation-000000.tar"], "validation"),
        (["train/000.tar", "train/001.tar", "val/000.tar"], "validation"),
        (["train-000.tar", "train-001.tar", "test-000.tar"], "test"),
    ],
)
def test_splits_from_shard_names(tmp_path, names, rule):
    for number, name in enumerate(names):
        write_shard(tmp_path / "ds" / name, cls_samples(number * 10, 10))
    layout = sources.discover(tmp_path / "ds")
    assert (len(layout.train), len(layout.val)) == (20, 10)
    assert {path.rsplit("#", 3)[0] for path, _ in layout.val} == {str(tmp_path / "ds" / names[2])}
    assert layout.val_source == f"the shards' names: train for training, {rule} for validation"


def test_other_splits_are_left_out_and_unnamed_shards_are_held_out_by_hash(tmp_path, shards):
    for name in ("train-0.tar", "val-0.tar", "test-0.tar"):
        write_shard(tmp_path / "named" / name, cls_samples(0, 6))
    layout = sources.discover(tmp_path / "named")
    assert (len(layout.train), len(layout.val)) == (6, 6)
    assert layout.notes == [f"1 shard(s) of other splits left out, e.g. {tmp_path}/named/test-0.tar"]
    first, again = sources.discover(shards, 0.3), sources.discover(shards, 0.3)
    assert (first.train, first.val) == (again.train, again.val) and 3 < len(first.val) < 20
    assert not {p for p, _ in first.train} & {p for p, _ in first.val}
    assert first.val_source == "a held-out share of the samples by hash of shard and key (--val-fraction)"


def test_the_cache_key_follows_the_shard(shards):
    def key() -> str:
        layout = sources.discover(shards)
        return cache.split_key(layout.train, layout.stats_of(layout.train), layout, imaging.Resize(36), "raw")

    first = key()
    assert key() == first
    write_shard(shards / "shard-000001.tar", cls_samples(10, 10, classes=2)[::-1])  # rewritten: new mtime/offsets
    os.utime(shards / "shard-000001.tar", ns=(10**18, 10**18))
    assert key() != first


def test_inspect_decodes_every_sample(shards):
    write_shard(shards / "shard-000003.tar", [("broken", {"jpg": b"not a jpeg", "cls": b"0"}), *cls_samples(40, 1)])
    found = tl_ray.inspect(str(shards), decode=True)
    assert found.source == "webdataset" and found.class_names == ["0", "1"]
    assert sum(found.counts["train"].values()) + sum(found.counts["val"].values()) == 32  # listed; broken skipped
    assert found.skipped == [(f"{shards}/shard-000003.tar#broken", "not an image file PIL can identify")]
    assert set(found.sizes["width"]) == {20}


def test_a_shard_changed_since_listing_is_a_bad_item_not_a_crash(shards):
    layout = sources.discover(shards)
    item = layout.train[-1][0]
    (shards / item.rsplit("#", 3)[0].rsplit("/", 1)[-1]).write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape("bytes before the member's end")):
        webdataset.ShardOpener(layout.filesystem, "").read(item)
    assert np.asarray(layout.train_stats).shape == (len(layout.train), 2)


def test_a_truncated_shard_is_reported_and_its_whole_samples_kept(shards):
    shard = shards / "shard-000002.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2 + 100])  # an upload cut short: half the samples, a partial header
    listing = sources.list_source(location.resolve(shards, "--data"), SourceOptions())
    kept = [item for item in listing.items if item.startswith(str(shard))]
    assert listing.rejected[0][0] == str(shard) and listing.rejected[0][1].startswith(f"truncated after {len(kept)}")
    assert 0 < len(kept) < 10 and len(listing.items) == 20 + len(kept)
    assert all(listing.opener.read(item)[:2] == b"\xff\xd8" for item in kept)

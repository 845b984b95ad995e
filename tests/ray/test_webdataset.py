"""WebDataset shards end to end: train on Ray from a folder of train-/val- shards (a broken sample skipped and
reported), then predict, evaluate and inspect on the shards; and shards read from a bucket of the S3 server."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.fs as pafs
from helpers import SHARD_COLOURS, cls_samples, write_shard

import tl_ray
from tl_ray import cli
from tl_ray.inputs import cache, imaging, sources


def _dataset(folder: Path) -> Path:
    """train-000000.tar and train-000001.tar (12 samples each, 3 classes; one broken JPEG), val-000000.tar (6)."""
    write_shard(folder / "train-000000.tar", [*cls_samples(0, 11, 3), ("broken", {"jpg": b"no jpeg", "cls": b"1"})])
    write_shard(folder / "train-000001.tar", cls_samples(11, 12, 3))
    write_shard(folder / "val-000000.tar", cls_samples(100, 6, 3))
    return folder


def test_train_on_shards_then_predict_evaluate_and_inspect_them(tmp_path, ray_cluster, capsys):
    shards = _dataset(tmp_path / "wds")
    storage = tmp_path / "runs"
    argv = ["train", "--data", str(shards), "--arch", "resnet18", "--weights", "none", "--image-size", "32"]
    argv += ["--lr", "1e-3", "--epochs", "1", "--batch-size", "8", "--num-workers", "1"]
    assert cli.main([*argv, "--storage", str(storage), "--name", "wds"]) == 0
    result = json.loads((storage / "wds" / "result.json").read_text())
    assert [item["path"] for item in result["skipped_files"]] == [f"{shards}/train-000000.tar#broken"]
    assert result["history"][-1]["train_images"] == 23 and result["history"][-1]["val_images"] == 6
    checkpoint = result["best_checkpoint"]
    assert json.loads((Path(checkpoint) / "meta.json").read_text())["class_names"] == ["0", "1", "2"]

    rows = tl_ray.predict(checkpoint, f"{shards}/val-{{000000..000000}}.tar")
    assert rows["path"].tolist() == [f"{shards}/val-000000.tar#{index:06d}" for index in range(100, 106)]
    assert (rows["error"] == "").all() and set(rows["predicted"]) <= {"0", "1", "2"}

    out = tmp_path / "metrics"
    args = ["evaluate", "--checkpoint", checkpoint, "--data", str(shards / "val-000000.tar"), "--out", str(out)]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6 and {name: row["support"] for name, row in metrics["per_class"].items()} == {
        "0": 2,
        "1": 2,
        "2": 2,
    }

    capsys.readouterr()
    assert cli.main(["inspect", "--data", f"{shards}/*.tar", "--decode"]) == 0
    printed = capsys.readouterr().out
    assert "webdataset" in printed and "train-000000.tar#broken" in printed, printed
    shutil.rmtree(storage, ignore_errors=True)


def test_shards_in_object_storage(s3_server, tmp_path, ray_cluster):
    """Listed with one LIST and one streamed GET per shard; each item read back by a ranged GET of its shard, in
    this process and in the cache build's Ray tasks."""
    s3_server.create_bucket("wds")
    local = _dataset(tmp_path / "wds")
    pafs.copy_files(str(local), "wds/ds", destination_filesystem=s3_server.filesystem())
    since = s3_server.mark()
    layout = sources.discover(s3_server.uri("wds/ds/train-{000000..000001}.tar"), 0.25)
    per_shard = [
        request for request in s3_server.requests(since) if request.path.endswith(("000000.tar", "000001.tar"))
    ]
    assert len(per_shard) == 2 + 2  # a HEAD and one buffered GET of each (24 samples): never a request per sample
    assert layout.source == sources.WEBDATASET and len(layout.train) + len(layout.val) == 24
    item = layout.train[0][0]
    assert layout.opener.display(item).startswith("s3://wds/ds/train-00000")
    shard, key = layout.opener.display(item).removeprefix("s3://wds/ds/").split("#")
    with tarfile.open(local / shard) as tar:
        assert layout.opener.read(item) == tar.extractfile(f"{key}.jpg").read()
    colour = imaging.load_rgb(layout.opener.read(item)).getpixel((4, 4))
    assert min(sum(abs(a - b) for a, b in zip(colour, expected, strict=True)) for expected in SHARD_COLOURS) < 12
    since = s3_server.mark()
    built = cache.prepare(layout.train, layout, 32, str(tmp_path / "cache"), split="train")
    assert built.rows == len(layout.train) - 1 and [path for path, _, _ in built.skipped] == [
        s3_server.uri("wds/ds/train-000000.tar").split("?")[0] + "#broken"
    ]
    reads = [request for request in s3_server.requests(since) if request.method == "GET"]
    assert len(reads) == len(layout.train) and {request.status for request in reads} == {206}  # one range each
    folder = sources.discover(s3_server.uri("wds/ds"))
    assert (len(folder.train), len(folder.val)) == (24, 6) and "shards' names" in folder.val_source

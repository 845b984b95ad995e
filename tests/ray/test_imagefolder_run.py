"""A Hugging Face imagefolder (train/, validation/, test/, each with a metadata.csv of file_name,label) trained on a
real Ray: validation/ is the val set, test/ is never read by the run, and `tl-ray evaluate --split test` scores it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tl_ray import cli

COLOURS = {"cat": (220, 40, 40), "dog": (40, 40, 220)}


def _split(folder: Path, count: int, broken: str | None = None) -> None:
    """Images 0000.png... and a metadata.csv as ``datasets`` documents it; ``broken`` a listed file that is no image."""
    folder.mkdir(parents=True)
    rows = ["file_name,label"]
    for index in range(count):
        name = ("cat", "dog")[index % 2]
        Image.new("RGB", (36, 28), COLOURS[name]).save(folder / f"{index:04d}.png")
        rows.append(f"{index:04d}.png,{name}")
    if broken:
        (folder / broken).write_bytes(b"not an image")
        rows.append(f"{broken},cat")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.timeout(600)
def test_train_on_an_imagefolder_then_evaluate_its_test_split(tmp_path, ray_cluster):
    root = tmp_path / "hf"
    _split(root / "train", 12)
    _split(root / "validation", 6, broken="val-broken.png")
    _split(root / "test", 4, broken="test-broken.png")  # read by the run, it would be skipped and reported
    storage = tmp_path / "runs"
    argv = ["train", "--data", str(root), "--arch", "resnet18", "--weights", "none", "--image-size", "32"]
    argv += ["--lr", "1e-3", "--epochs", "1", "--storage", str(storage), "--name", "hf", "--num-workers", "1"]
    assert cli.main(argv) == 0
    result = json.loads((storage / "hf" / "result.json").read_text())
    assert (result["history"][-1]["train_images"], result["history"][-1]["val_images"]) == (12, 6)
    assert [item["path"] for item in result["skipped_files"]] == [str(root / "validation" / "val-broken.png")]
    meta = json.loads((Path(result["best_checkpoint"]) / "meta.json").read_text())
    assert meta["class_names"] == ["cat", "dog"]

    out = tmp_path / "test-metrics"
    evaluate = ["evaluate", "--checkpoint", result["best_checkpoint"], "--data", str(root), "--split", "test"]
    assert cli.main([*evaluate, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 4 and sum(row["support"] for row in metrics["per_class"].values()) == 4
    assert [row["path"] for row in metrics["undecodable"]] == [str(root / "test" / "test-broken.png")]
    folder = tmp_path / "folder-metrics"  # the test folder itself: the same images scored
    assert cli.main([*evaluate[:3], "--data", str(root / "test"), "--out", str(folder)]) == 0
    again = json.loads((folder / "metrics.json").read_text())
    assert (again["images"], again["confusion"]) == (metrics["images"], metrics["confusion"])
    shutil.rmtree(storage, ignore_errors=True)

"""End to end on real Ray: sample data -> `tl-ray train` -> checkpoint -> predictions, resume, transfer.

These share one Ray cluster and run in order (each builds on the previous run), so
the module costs three small training runs in all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tl_ray
from tl_ray import cli, data
from tl_ray.checkpoint import read_meta, read_model_state

pytestmark = pytest.mark.timeout(900)


def test_train_learns_and_leaves_a_loadable_checkpoint(source_run, source_data, checkpoint_accuracy):
    _, _, result, printed = source_run
    assert "best val_acc" in printed and "skipped files    2" in printed and "broken.jpg: " in printed

    assert [row["epoch"] for row in result["history"]] == [1, 2, 3]
    assert result["metrics"]["val_acc"] == max(row["val_acc"] for row in result["history"])
    assert result["metrics"]["val_acc"] >= 0.4, "4 classes: chance is 0.25"
    assert result["history"][-1]["val_images"] == 200 and result["history"][-1]["train_images"] == 600

    skipped = {Path(item["path"]).name: item["reason"] for item in result["skipped_files"]}
    assert set(skipped) == {"broken.jpg", "readme.jpg"}
    assert skipped["readme.jpg"] == "not an image file PIL can identify"

    _, meta = tl_ray.load_checkpoint(result["best_checkpoint"])
    assert meta["class_names"] == ["circle", "square", "star", "triangle"]
    assert (meta["arch"], meta["freeze_depth"], meta["image_size"], meta["weights"]) == ("resnet18", 0, 64, "none")
    assert meta["epoch"] == result["metrics"]["epoch"]
    layout = data.discover(str(source_data))
    # The checkpoint alone reproduces the run's validation accuracy: same classes, same preprocessing.
    assert checkpoint_accuracy(result["best_checkpoint"], layout.val) == pytest.approx(
        result["metrics"]["val_acc"], abs=0.02
    )


def test_rerun_with_same_name_resumes(source_run):
    argv, storage, before, _ = source_run
    more_epochs = list(argv)
    more_epochs[more_epochs.index("--epochs") + 1] = "4"
    assert cli.main([*more_epochs, "--storage", str(storage), "--name", "src"]) == 0
    after = json.loads((storage / "src" / "result.json").read_text())
    assert [row["epoch"] for row in after["history"]] == [1, 2, 3, 4]
    # Epochs 1-3 were not trained again: their recorded timings and metrics are the originals.
    assert after["history"][:3] == before["history"]
    assert (storage / "src" / "checkpoint_epoch004" / "model.pt").exists()
    kept = sorted(p.name for p in (storage / "src").glob("checkpoint_epoch*"))
    assert len(kept) <= 3  # --keep-checkpoints 2 best, plus the latest


def test_transfer_from_own_checkpoint_to_new_classes(source_run, sample_root, tmp_path):
    _, _, source, _ = source_run
    source_checkpoint = source["best_checkpoint"]
    result = tl_ray.train(
        data=str(sample_root / "target"),
        weights=source_checkpoint,
        freeze_depth=4,
        epochs=2,
        arch="resnet18",
        image_size=64,
        num_workers=2,
        storage=str(tmp_path),
        name="target",
    )
    meta = read_meta(result.best_checkpoint)
    assert meta["class_names"] == ["cross", "diamond", "hexagon"]
    assert meta["weights"].startswith("checkpoint:") and meta["freeze_depth"] == 4
    before, after = read_model_state(source_checkpoint), read_model_state(result.best_checkpoint)
    assert after["fc.weight"].shape == (3, 512)
    frozen = [key for key in after if key.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3."))]
    assert frozen and all(torch.equal(before[key], after[key]) for key in frozen), "frozen stages must not change"
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"]), "layer4 must train"
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])

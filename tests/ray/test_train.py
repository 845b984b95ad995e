"""End to end on real Ray: sample data -> `tl-ray train` -> checkpoint -> predictions, resume, transfer.

These share one Ray cluster and run in order (each builds on the previous run), so
the module costs four small training runs in all.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    SOURCE_BATCH,
    SOURCE_EPOCHS,
    as_reported,
    kill_a_worker_once_recorded,
    recorded,
    tensorboard_scalars,
    wait_for_free_cpus,
)

import tl_ray
from tl_ray import cli
from tl_ray.checkpoint import read_meta, read_model_state
from tl_ray.cli.console import EPOCH_HEADER
from tl_ray.inputs import imaging
from tl_ray.inputs.sources import class_folders
from tl_ray.options import merge
from tl_ray.training.config import TrainConfig

pytestmark = pytest.mark.timeout(900)


def test_train_learns_and_leaves_a_loadable_checkpoint(source_run, source_data, checkpoint_accuracy):
    _, _, result, printed = source_run
    assert "best val_acc" in printed and "skipped files    2" in printed and "broken.jpg: " in printed
    # One row per epoch, printed as each ended (a header once, the rows in order, before the summary).
    lines = printed.splitlines()
    assert lines.count(EPOCH_HEADER) == 1
    rows = lines[lines.index(EPOCH_HEADER) + 1 : lines.index(EPOCH_HEADER) + 1 + SOURCE_EPOCHS]
    assert [int(row.split()[0]) for row in rows] == list(range(1, SOURCE_EPOCHS + 1))
    assert [float(row.split()[4].rstrip("*")) for row in rows] == pytest.approx(
        [row["val_acc"] for row in result["history"]], abs=5e-4
    )

    assert [row["epoch"] for row in result["history"]] == list(range(1, SOURCE_EPOCHS + 1))
    assert result["metrics"]["val_acc"] == max(row["val_acc"] for row in result["history"])
    assert result["metrics"]["val_acc"] >= 0.4, "4 classes: chance is 0.25"
    assert result["history"][-1]["val_images"] == 200 and result["history"][-1]["train_images"] == 600
    # Two CPU workers on a 2-CPU node: one torch thread each, not two (which would oversubscribe the cores).
    assert (result["metrics"]["workers"], result["metrics"]["torch_threads"]) == (2, 1)

    skipped = {Path(item["path"]).name: item["reason"] for item in result["skipped_files"]}
    assert set(skipped) == {"broken.jpg", "readme.jpg"}
    assert skipped["readme.jpg"] == "not an image file PIL can identify"
    # Decoded once into the cache under --storage (train and val), which recorded the same skips.
    manifests = [json.loads(p.read_text()) for p in (source_run[1] / ".tl-ray-cache").glob("*/manifest.json")]
    assert sorted(m["rows"] for m in manifests) == [200, 600]
    assert sorted(Path(path).name for m in manifests for path, _, _ in m["skipped"]) == ["broken.jpg", "readme.jpg"]

    _, meta = tl_ray.load_checkpoint(result["best_checkpoint"])
    assert meta["class_names"] == ["circle", "square", "star", "triangle"]
    assert (meta["arch"], meta["freeze_depth"], meta["image_size"], meta["weights"]) == ("resnet18", 0, 48, "none")
    assert meta["epoch"] == result["metrics"]["epoch"]
    # The recipe from random weights: one learning rate everywhere, recorded with the model.
    assert meta["strategy"]["name"] == "plain" and meta["strategy"]["backbone_lr_mult"] == 1.0
    assert meta["strategy"]["head_epochs"] == 0 and meta["strategy"]["optimizer"] == "adamw"
    # The run's folder holds its resolved configuration, which --config reads back.
    saved = merge(TrainConfig, str(source_run[1] / "src" / "config.yaml"), {})
    assert (saved.epochs, saved.batch_size, saved.image_size) == (SOURCE_EPOCHS, SOURCE_BATCH, 48)
    assert (saved.lr, saved.weight_decay, saved.strategy) == (meta["strategy"]["lr"], 0.05, "plain")
    # TensorBoard: every numeric metric per epoch (step = epoch), per-class recall by class, as result.json has them.
    assert result["tensorboard"] == str(source_run[1] / "src" / "tensorboard")
    assert f"tensorboard      {result['tensorboard']}" in printed
    scalars = tensorboard_scalars(Path(result["tensorboard"]))
    for tag, key in (("val_acc", "val_acc"), ("train_loss", "train_loss"), ("images_per_s", "images_per_s")):
        assert scalars[tag] == [(row["epoch"], pytest.approx(row[key], rel=1e-6)) for row in result["history"]]
    assert scalars["val_recall/star"] == [
        (row["epoch"], pytest.approx(row["val_recall"]["star"], rel=1e-6)) for row in result["history"]
    ]
    assert {"macro_f1", "head_lr_now", "data_wait_s", "val_loss", "train_acc"} <= set(scalars)
    layout = class_folders.discover(str(source_data))
    # The checkpoint alone reproduces the run's validation accuracy: same classes, same preprocessing.
    assert checkpoint_accuracy(result["best_checkpoint"], layout.val) == pytest.approx(
        result["metrics"]["val_acc"], abs=0.02
    )


# Extended: make test's 30 minutes (a clean run took 26.7 at 03d43f5); a killed worker's group resumes mid-run
# in CI in test_toolbox_run, a rerun resumes in test_signals and contract/test_storage.
@pytest.mark.extended
@pytest.mark.slow
def test_rerun_resumes_and_a_killed_worker_restarts_from_the_last_checkpoint(source_run, source_model, ray_cluster):
    argv, storage, before, _ = source_run
    more_epochs = list(argv)
    total = SOURCE_EPOCHS + 2
    more_epochs[more_epochs.index("--epochs") + 1] = str(total)
    killed: list[int] = []
    watched = storage / "src" / f"checkpoint_epoch{SOURCE_EPOCHS + 1:03d}"
    killer = threading.Thread(
        target=kill_a_worker_once_recorded, args=(watched, ray_cluster.get_runtime_context().gcs_address, killed)
    )
    killer.start()
    try:
        assert cli.main([*more_epochs, "--storage", str(storage), "--name", "src"]) == 0
    finally:
        killer.join()
    assert killed, "no training worker was found to kill"
    after = json.loads((storage / "src" / "result.json").read_text())
    assert [row["epoch"] for row in after["history"]] == list(range(1, total + 1))
    # The source run's epochs were not trained again: their recorded timings and metrics are the originals.
    assert after["history"][:SOURCE_EPOCHS] == before["history"]
    # The rerun started after the source run's last epoch; the group that replaced the killed worker, an epoch later.
    resumed = [row["resumed_after_epoch"] for row in after["history"][SOURCE_EPOCHS:]]
    assert resumed == [SOURCE_EPOCHS, SOURCE_EPOCHS + 1]
    state = torch.load(Path(after["last_checkpoint"]) / "train_state.pt", weights_only=True)
    steps = total * math.ceil(after["history"][-1]["train_images"] / SOURCE_BATCH)
    assert state["scheduler"]["last_epoch"] == steps, "the LR schedule continued instead of starting over"
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {steps}, "AdamW's step count continued"
    assert (storage / "src" / f"checkpoint_epoch{total:03d}" / "model.pt").exists()
    # TensorBoard went on in the same folder: each epoch once, across the rerun and the worker restart.
    val_acc = tensorboard_scalars(storage / "src" / "tensorboard")["val_acc"]
    assert val_acc == [(row["epoch"], pytest.approx(row["val_acc"], rel=1e-6)) for row in after["history"]]
    kept = sorted(p.name for p in (storage / "src").glob("checkpoint_epoch*"))
    assert len(kept) <= 3  # --keep-checkpoints 2 best, plus the latest


@pytest.mark.slow
def test_transfer_to_new_classes_survives_a_killed_driver(source_model, sample_root, tmp_path, ray_cluster):
    """`tl-ray train` from the source checkpoint is SIGKILLed after its first epoch, then run again.

    With ``--strategy probe`` epoch 1 trains the head alone and epoch 2 unfreezes layer4: the
    resumed run must switch phases where the killed one would have.
    """
    source_checkpoint = source_model
    argv = [
        "train", "--data", str(sample_root / "target"), "--weights", source_checkpoint, "--freeze-depth", "4",
        "--strategy", "probe", "--lr", "3e-3", "--epochs", "2", "--arch", "resnet18", "--image-size", "64",
        "--num-workers", "2",
        "--storage", str(tmp_path), "--name", "target",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "tl_ray.cli", *argv], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    first = tmp_path / "target" / "checkpoint_epoch001"
    deadline = time.monotonic() + 600
    while not recorded(first) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    driver.kill()
    driver.wait()
    assert not (tmp_path / "target" / "result.json").exists(), f"the run ended before the kill: {log.read_text()}"
    epoch_one = read_meta(first)["metrics"]
    wait_for_free_cpus(ray_cluster)

    with pytest.MonkeyPatch.context() as patch:
        printed = io.StringIO()
        patch.setattr(sys, "stdout", printed)
        assert cli.main(argv) == 0  # the same command again
    # Said once, before the table: the checkpoint it picks up and what is left.
    lines = printed.getvalue().splitlines()
    resumed = [line for line in lines if line.startswith("resuming from ")]
    assert resumed == [f"resuming from {first}: 1 of 2 epochs done, 1 epoch left"], printed.getvalue()
    assert lines.index(resumed[0]) < next(i for i, line in enumerate(lines) if line.startswith("epoch "))
    result = json.loads((tmp_path / "target" / "result.json").read_text())
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert as_reported(result["history"][0]) == epoch_one, "epoch 1 was not trained again"
    assert result["history"][1]["resumed_after_epoch"] == 1
    assert [row["frozen_stages"] for row in result["history"]] == [5, 4], "head alone, then layer4 unfrozen"
    meta = read_meta(result["last_checkpoint"])
    assert meta["strategy"]["name"] == "probe" and meta["strategy"]["head_epochs"] == 1
    assert meta["strategy"]["backbone_lr_mult"] == 0.1
    assert meta["class_names"] == ["cross", "diamond", "hexagon"]
    assert meta["weights"].startswith("checkpoint:") and meta["freeze_depth"] == 4
    before, after = read_model_state(source_checkpoint), read_model_state(result["last_checkpoint"])
    assert after["fc.weight"].shape == (3, 512)
    frozen = [key for key in after if key.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3."))]
    assert frozen and all(torch.equal(before[key], after[key]) for key in frozen), "frozen stages must not change"
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"]), "layer4 must train"
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])


def test_imbalanced_classes_with_auto_weights_keep_the_best_macro_f1_checkpoint(
    sample_root, tmp_path, ray_cluster, capsys
):
    """Triangles are rare (4 training images against 24): the loss weighs them up, every epoch reports each class's
    recall and macro_f1, and the kept checkpoint is the epoch of the best macro_f1."""
    root = tmp_path / "imbalanced"
    counts = {"circle": 24, "square": 24, "star": 24, "triangle": 4}
    for split, per_class in (("train", counts), ("val", dict.fromkeys(counts, 8))):
        for name, count in per_class.items():
            (root / split / name).mkdir(parents=True)
            for image in sorted((sample_root / "source" / split / name).glob("*.jpg"))[:count]:
                shutil.copy(image, root / split / name / image.name)
    argv = [
        "train", "--data", str(root), "--weights", "none", "--arch", "resnet18", "--image-size", "32",
        "--num-workers", "1", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--class-weights", "auto",
        "--monitor", "macro_f1", "--storage", str(tmp_path / "runs"), "--name", "imbalanced",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "runs" / "imbalanced" / "result.json").read_text())

    assert result["monitor"] == "macro_f1"
    history = result["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert set(row["val_recall"]) == set(counts) and all(0 <= r <= 1 for r in row["val_recall"].values())
        # Every class has 8 validation images: accuracy is the mean of the per-class recalls.
        assert row["val_acc"] == pytest.approx(sum(row["val_recall"].values()) / 4)
        assert 0 <= row["macro_f1"] <= 1
    assert result["metrics"]["macro_f1"] == max(row["macro_f1"] for row in history)
    assert history[-1]["best_macro_f1"] == max(row["macro_f1"] for row in history)
    meta = read_meta(result["best_checkpoint"])
    assert meta["metrics"] == as_reported(history[meta["epoch"] - 1]) and meta["monitor"] == "macro_f1"
    total = sum(counts.values())
    assert meta["strategy"]["class_weights"] == pytest.approx({n: total / (4 * c) for n, c in counts.items()})
    assert f"best macro_f1    {result['metrics']['macro_f1']:.3f} (epoch {meta['epoch']})" in printed
    assert "val recall       " in printed

    # val_loss is the unweighted cross-entropy, comparable with a run without weights.
    model, _ = tl_ray.load_checkpoint(result["best_checkpoint"])
    files = class_folders.discover(str(root)).val
    transform = imaging.eval_transform(meta["image_size"], imaging.Resize.from_meta(meta))
    images = torch.stack(
        [transform(imaging.load_rgb(Path(path).read_bytes(), meta["resize_size"])) for path, _ in files]
    )
    labels = torch.tensor([label for _, label in files])
    with torch.no_grad():
        logits = model(imaging.normalize(images, torch.tensor(meta["mean"]), torch.tensor(meta["std"])))
    weights = torch.tensor([meta["strategy"]["class_weights"][name] for name in meta["class_names"]])
    unweighted = torch.nn.functional.cross_entropy(logits, labels).item()
    weighted = torch.nn.functional.cross_entropy(logits, labels, weight=weights).item()
    assert abs(meta["metrics"]["val_loss"] - unweighted) < min(0.02, abs(meta["metrics"]["val_loss"] - weighted))

"""Tracking: TensorBoard event files and the --logger trackers, read back with their own readers.

The callbacks are called here as Ray Train's controller calls them (``after_report`` with every worker's
metrics); one real `tl-ray train --logger wandb` checks that the settings reach the controller. TensorBoard in
real runs and the sweep's MLflow logging are checked beside the runs that already exist (test_train, test_tune).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from helpers import tensorboard_scalars, wandb_offline_history

from tl_ray import cli, errors, tracking
from tl_ray.errors import UsageError

pytestmark = pytest.mark.timeout(600)


def _epoch(epoch: int, val_acc: float) -> dict:
    return {"epoch": epoch, "val_acc": val_acc, "val_recall": {"cat": val_acc / 2, "dog": None}, "stopped": "no"}


def test_tensorboard_logs_each_epoch_once_when_a_killed_run_resumes(tmp_path):
    run = tmp_path / "run"
    first = tracking.TensorBoardCallback(str(run), epochs=4)
    for epoch, acc in ((1, 0.1), (2, 0.2), (3, 0.3)):
        first.after_report(None, [_epoch(epoch, acc), _epoch(epoch, acc)], None)
    # The driver was killed after logging epoch 3 but before recording its checkpoint: the rerun resumes from
    # epoch 2, in a new controller process, and trains epoch 3 again.
    resumed = tracking.TensorBoardCallback(str(run), epochs=4)
    resumed.after_report(None, [_epoch(3, 0.35)], None)
    resumed.after_report(None, [_epoch(4, 0.4)], None)
    scalars = tensorboard_scalars(run / "tensorboard")
    # Epoch 3 once, as the resumed run logged it (TensorBoard stores float32).
    assert [step for step, _ in scalars["val_acc"]] == [1, 2, 3, 4]
    assert [value for _, value in scalars["val_acc"]] == pytest.approx([0.1, 0.2, 0.35, 0.4])
    assert [step for step, _ in scalars["val_recall/cat"]] == [1, 2, 3, 4]
    assert sorted(scalars) == ["val_acc", "val_recall/cat"], "no epoch, text or None class as a scalar"
    assert len(list((run / "tensorboard").iterdir())) == 2


def test_mlflow_tracker_logs_every_epoch_to_a_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without it
    settings = tracking.logger_settings("mlflow", "shapes")
    callback = tracking.TrackerCallback(settings, str(tmp_path / "src"), epochs=2, params={"arch": "resnet18"})
    for epoch, acc in ((1, 0.5), (2, 0.75)):
        callback.after_report(None, [_epoch(epoch, acc)], None)
    client = mlflow.MlflowClient(settings.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("shapes").experiment_id])
    assert (run.info.run_name, run.info.status, run.data.params["arch"]) == ("src", "FINISHED", "resnet18")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_acc")] == [(1, 0.5), (2, 0.75)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_recall/cat")] == [0.25, 0.375]


def test_a_tracker_that_cannot_log_is_refused_before_training(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    # A tracking server that is down (nothing listens on the loopback's discard port).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(UsageError, match=r"^--logger mlflow: cannot use the tracking store http://127.0.0.1:9 "):
        tracking.logger_settings("mlflow", None)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    assert cli.main(["train", "--data", str(tmp_path), "--logger", "wandb"]) == errors.EXIT_USAGE
    assert capsys.readouterr().err == (
        "tl-ray: error: --logger wandb needs the wandb package: pip install wandb (or tl-ray[wandb])\n"
    )


def test_train_logs_to_wandb_offline_in_the_run_folder(sample_root, tmp_path, monkeypatch, ray_cluster, capsys):
    """A real run: the driver's WANDB_MODE reaches Ray Train's controller, which logs each recorded epoch."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "data"
    for split, count in (("train", 6), ("val", 3)):
        for folder in sorted((sample_root / "source" / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*.jpg"))[:count]:
                shutil.copy(image, root / split / folder.name / image.name)
    argv = [
        "train", "--data", str(root), "--weights", "none", "--arch", "resnet18", "--image-size", "32",
        "--num-workers", "1", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--storage", str(tmp_path / "runs"),
        "--name", "tracked", "--logger", "wandb", "--logger-project", "shapes",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    run_dir = tmp_path / "runs" / "tracked"
    result = json.loads((run_dir / "result.json").read_text())
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    rows = wandb_offline_history(offline)
    assert [row["_step"] for row in rows] == [1, 2]
    for row, epoch in zip(rows, result["history"], strict=True):
        assert row["val_acc"] == pytest.approx(epoch["val_acc"])
        assert row["val_recall/circle"] == pytest.approx(epoch["val_recall"]["circle"])
    assert offline.name.endswith(tracking.run_id(str(run_dir)))
    assert result["tensorboard"] == str(run_dir / "tensorboard")
    assert f"tensorboard      {run_dir / 'tensorboard'}" in capsys.readouterr().out

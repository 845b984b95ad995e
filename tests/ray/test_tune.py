"""`tl-ray tune` on real Ray: one sweep that is early-stopped, killed, resumed and reported.

Three trials on a small subset of the source task: freeze depth 4 from the source model
trained in conftest at two shared learning rates, a gentle one (3e-3) and an absurd one (40
for AdamW), and the from-scratch baseline, for 3 epochs. ASHA stops the absurd trial before
its budget (after its first epoch; CI once saw it pass that rung, for a reason not found, and
run a second epoch, which a 2-epoch budget could not tell from a finished trial); then
the baseline must still get the CPUs (a stopped trial that kept its workers'
placement group would make it wait forever), and ASHA must let it run its whole budget
although it trails. The sweep's driver is SIGKILLed once the first two trials have ended,
and the same command run again; before that, a training worker of the first trial is
SIGKILLed in its second epoch.
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import kill_a_training_worker, recorded, tensorboard_scalars, wait_for_free_cpus

import tl_ray
from tl_ray import cli
from tl_ray.inputs.sources import class_folders
from tl_ray.options import merge
from tl_ray.training.config import TrainConfig
from tl_ray.tuning import report
from tl_ray.tuning.config import TuneConfig

pytestmark = pytest.mark.timeout(900)


def _trial_rows(run_dir: Path) -> dict[str, list[dict]]:
    """What each Tune trial reported so far, from Tune's own per-trial result files."""
    rows = {}
    for result_file in run_dir.glob("trials/*/result.json"):
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if lines:
            rows[lines[0]["trial_id"]] = lines
    return rows


def _ended_trials(run_dir: Path) -> set[str]:
    """Trials that Tune's last saved experiment state records as ended."""
    states = sorted(run_dir.glob("trials/experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        trials = [json.loads(item[0]) for item in json.loads(states[-1].read_text())["trial_data"]]
    except (IndexError, ValueError, KeyError):  # not written yet, or caught mid-write
        return set()
    return {trial["trial_id"] for trial in trials if trial["status"] == "TERMINATED"}


@pytest.fixture(scope="module")
def sweep_data(source_data, tmp_path_factory) -> Path:
    """40 training and 20 validation images per class of the source task: a trial-epoch takes seconds."""
    root = tmp_path_factory.mktemp("sweepdata")
    for split, count in (("train", 40), ("val", 20)):
        for folder in sorted((source_data / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*_*.jpg"))[:count]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


@pytest.fixture(scope="module")
def sweep(source_model, sweep_data, tmp_path_factory, ray_cluster):
    storage = tmp_path_factory.mktemp("sweeps")
    run_dir = storage / "s1"
    argv = [
        "tune",
        "--data", str(sweep_data),
        "--weights", source_model,
        "--arch", "resnet18", "--image-size", "48", "--num-workers", "1",
        "--freeze-depths", "4", "--lrs", "3e-3,40", "--scratch-baseline", "--max-epochs", "3",
        "--storage", str(storage), "--name", "s1",
        # A one-value --grid (no more trials) and a policy with erasing: through Tune, the trials and their meta.
        "--grid", "label_smoothing=0.1", "--augment", "trivial", "--random-erasing", "0.25",
    ]  # fmt: skip
    if importlib.util.find_spec("mlflow"):  # Tune's MLflow callback logs each trial (the mlflow extra)
        argv += ["--logger", "mlflow"]
    # The sweep runs as its own driver process on this test session's Ray cluster, and is SIGKILLed as
    # soon as Tune has recorded the first two trials as ended.
    tracking_env = {"MLFLOW_TRACKING_URI": f"file:{storage / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true"}
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    env.update(tracking_env)
    log = storage / "interrupted-driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "tl_ray.cli", *argv],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    killed = None
    try:
        while time.monotonic() < deadline and driver.poll() is None and len(_ended_trials(run_dir)) < 2:
            first_trial = next(iter(sorted((run_dir / "trials").glob("*_00000"))), None)
            if killed is None and first_trial and recorded(first_trial / "train" / "checkpoint_epoch001"):
                # Recorded: Ray Train has taken epoch 1's report (it polls its workers every 0.25 s), so the worker
                # is in its second epoch, which takes about a second here: kill it now, not a second later.
                killed = kill_a_training_worker(env["RAY_ADDRESS"])
            time.sleep(0.1 if killed is None else 1)
        assert driver.poll() is None, f"the sweep ended before it could be interrupted: {log.read_text()[-3000:]}"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = _trial_rows(run_dir)
    assert len(_ended_trials(run_dir)) == 2, f"two trials did not end in time: {log.read_text()[-3000:]}"

    assert killed is not None, "no training worker of the first trial was found to kill"
    wait_for_free_cpus(ray_cluster)

    with pytest.MonkeyPatch.context() as patch:
        for key, value in tracking_env.items():
            patch.setenv(key, value)
        printed = io.StringIO()
        patch.setattr(sys, "stdout", printed)
        assert cli.main(argv) == 0  # the same command again: Tune restores, Train resumes
    # Said once, before the trials: two ended; the baseline was killed before or after its first checkpoint.
    resumed = [line for line in printed.getvalue().splitlines() if line.startswith("resuming sweep ")]
    assert len(resumed) == 1 and resumed[0] in {
        f"resuming sweep {run_dir}: 2 of 3 trials done, 1 to resume from their last checkpoint, 0 not started",
        f"resuming sweep {run_dir}: 2 of 3 trials done, 0 to resume from their last checkpoint, 1 not started",
    }, printed.getvalue()
    return run_dir, before


def _results(run_dir: Path) -> dict[str, dict]:
    """results.csv rows by role: "gentle" and "absurd" learning rate at depth 4, and "scratch"."""
    rows = {}
    for row in csv.DictReader((run_dir / "results.csv").open()):
        if row["strategy"] == "from scratch":
            rows["scratch"] = row
        else:
            rows["gentle" if float(row["lr"]) < 1 else "absurd"] = row
    return rows


def test_sweep_resumes_without_rerunning_ended_trials(sweep):
    run_dir, before = sweep
    after = _trial_rows(run_dir)
    assert len(after) == 3
    ended = sorted(trial for trial, rows in before.items() if "weights" not in rows[0]["config"]["point"])
    assert len(ended) == 2
    for trial in ended:
        assert after[trial] == before[trial], "an ended trial's epochs must not run again"
    gentle = next(trial for trial in ended if after[trial][0]["config"]["point"]["lr"] < 1)
    assert [row["epoch"] for row in after[gentle]] == [1, 2, 3]
    # A training worker of that trial was killed in its second epoch: Ray Train restarted the trial's
    # workers from its first checkpoint, and the trial went on.
    assert [row["resumed_after_epoch"] for row in after[gentle]] == [0, 1, 1]


def test_one_folder_per_trial_holds_its_records_checkpoints_and_tensorboard(sweep):
    run_dir, _ = sweep
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    reported = _trial_rows(run_dir)
    folders = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert folders == ["best", "trials"], "trials live in trials/, nothing else beside the report"
    trials = run_dir / "trials"
    assert sorted(p.name for p in trials.iterdir() if p.is_dir()) == sorted(row["trial_id"] for row in rows)
    for row in rows:
        trial = trials / row["trial_id"]
        # Tune's records of the trial, and the trial's Train run beside them in train/.
        assert {"params.json", "result.json", "progress.csv"} <= {p.name for p in trial.iterdir()}
        assert Path(row["checkpoint"]).parent == trial / "train"
        assert (trial / "train" / "config.yaml").exists()
        val_acc = tensorboard_scalars(trial / "train" / "tensorboard")["val_acc"]
        if row["status"] == "stopped early":  # ASHA stopped its Train run: no result.json, Tune has its epochs
            history = reported[row["trial_id"]]
            assert not (trial / "train" / "result.json").exists()
        else:
            train = json.loads((trial / "train" / "result.json").read_text())
            history = train["history"]
            assert train["tensorboard"] == str(trial / "train" / "tensorboard")
        assert val_acc == [(h["epoch"], pytest.approx(h["val_acc"], rel=1e-6)) for h in history]
        assert len(val_acc) == int(row["epochs"])


@pytest.mark.skipif(not importlib.util.find_spec("mlflow"), reason="the mlflow extra is not installed")
def test_mlflow_has_a_run_per_trial_with_its_epochs(sweep):
    import mlflow

    run_dir, _ = sweep
    client = mlflow.MlflowClient(f"file:{run_dir.parent / 'mlruns'}")
    runs = client.search_runs([client.get_experiment_by_name("tl-ray").experiment_id])
    reported = _trial_rows(run_dir)
    logged: dict[str, set[float]] = {}
    for run in runs:  # Tune names each MLflow run after its trial; a trial resumed by the rerun gets a second run
        trial_id = next(trial_id for trial_id in reported if run.info.run_name.endswith(trial_id))
        history = client.get_metric_history(run.info.run_id, "val_acc")
        logged.setdefault(trial_id, set()).update(round(metric.value, 9) for metric in history)
    assert sorted(logged) == sorted(reported)
    for trial_id, rows in reported.items():  # (the killed driver may have logged an epoch Tune did not record)
        assert {round(row["val_acc"], 9) for row in rows} <= logged[trial_id]


def test_asha_stopped_the_absurd_learning_rate_early_but_not_the_baseline(sweep):
    run_dir, _ = sweep
    rows = _results(run_dir)
    assert sorted(rows) == ["absurd", "gentle", "scratch"]
    assert (rows["gentle"]["freeze_depth"], rows["absurd"]["freeze_depth"], rows["scratch"]["freeze_depth"]) == (
        "4",
        "4",
        "0",
    )
    assert rows["gentle"]["strategy"] == rows["absurd"]["strategy"] == "plain"  # auto, from any start
    assert rows["absurd"]["status"] == "stopped early" and rows["absurd"]["epochs"] in ("1", "2")
    assert (rows["gentle"]["status"], rows["gentle"]["epochs"]) == ("finished", "3")
    assert (rows["scratch"]["status"], rows["scratch"]["epochs"]) == ("finished", "3"), "the yardstick runs in full"
    report = (run_dir / "report.md").read_text()
    assert "## Stopped early by ASHA" in report and f"{rows['absurd']['trial_id']} (depth 4" in report
    assert f"trial-epochs run: {6 + int(rows['absurd']['epochs'])} (of 9 without early stopping)" in report
    assert "- validation set: 80 images; one image = 0.013 of val_acc; chance = 0.250" in report
    gain = float(rows["gentle"]["val_acc"]) - float(rows["scratch"]["val_acc"])
    assert f"transfer vs from scratch**: {float(rows['gentle']['val_acc']):.3f} vs" in report
    assert f"({gain:+.3f}, {round(gain * 80):+d} images)" in report


def test_results_csv_is_sorted_and_best_is_the_argmax(sweep):
    run_dir, _ = sweep
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    best = max(rows, key=lambda row: float(row["val_acc"]))
    assert rows[0] == best, "results.csv is sorted best first"
    assert list(rows[0])[-1] == "label_smoothing"  # a column per --grid option
    assert {row["label_smoothing"] for row in rows if row["strategy"] != "from scratch"} == {"0.1"}
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    assert meta["freeze_depth"] == int(best["freeze_depth"])
    assert meta["metrics"]["val_acc"] == pytest.approx(float(best["val_acc"]))
    assert Path(best["checkpoint"]).name == f"checkpoint_epoch{int(best['best_epoch']):03d}"
    # Tune ranked trials on best_val_acc (its console's "current best"): the same number as results.csv's.
    for trial_id, reported in _trial_rows(run_dir).items():
        row = next(r for r in rows if r["trial_id"] == trial_id)
        assert max(line["best_val_acc"] for line in reported) == pytest.approx(float(row["val_acc"]))
        assert max(line["val_acc"] for line in reported) == pytest.approx(float(row["val_acc"]))


def test_best_checkpoint_loads_and_predicts_on_its_own(sweep, sweep_data, checkpoint_accuracy):
    run_dir, _ = sweep
    # What a user deploys, with the configuration that trained it; the optimizer state stays with the trial.
    assert sorted(p.name for p in (run_dir / "best").iterdir()) == ["config.yaml", "meta.json", "model.pt"]
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    trained = merge(TrainConfig, str(run_dir / "best" / "config.yaml"), {})
    assert (trained.freeze_depth, trained.strategy) == (meta["freeze_depth"], meta["strategy"]["name"])
    assert merge(TuneConfig, str(run_dir / "config.yaml"), {}).freeze_depths == "4"  # the sweep's own
    assert merge(TuneConfig, str(run_dir / "config.yaml"), {}).grid == {"label_smoothing": "0.1"}
    # The trial's --grid value reached its Train run; the augmentation is recorded where resuming checks it.
    assert (trained.label_smoothing, trained.augment, trained.random_erasing) == (0.1, "trivial", 0.25)
    assert (meta["strategy"]["augment"], meta["strategy"]["random_erasing"]) == ("trivial", 0.25)
    accuracy = checkpoint_accuracy(str(run_dir / "best"), class_folders.discover(str(sweep_data)).val)
    assert accuracy == pytest.approx(meta["metrics"]["val_acc"], abs=0.01)
    evaluation = tl_ray.evaluate(str(run_dir / "best"), str(sweep_data / "val"))
    assert evaluation.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)  # torch's float32 mean


def test_report_png_is_a_picture_and_report_command_regenerates(sweep, capsys):
    run_dir, _ = sweep
    (run_dir / "report.png").unlink()
    assert cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "report.png").stat().st_size > 10_000
    page = (run_dir / "report.html").read_text(encoding="utf-8")  # rewritten with the plot it embeds
    assert base64.b64encode((run_dir / "report.png").read_bytes()).decode() in page
    printed = capsys.readouterr().out
    assert f"page             {run_dir / 'report.html'} (open it in a browser)" in printed
    assert "| trial | freeze depth |" in printed and "best checkpoint" in printed


def test_a_sweep_monitoring_val_loss_ranks_by_the_lowest_val_loss(ray_cluster, tmp_path):
    """Real Tune, stand-in trials (no training): per-class recalls (flattened by Tune, None for a class without
    validation images) pass through, and each trial's best epoch and the best trial are those of the lowest
    val_loss, as Tune's own best result says."""
    from ray import tune

    from tl_ray.tuning.sweep import load_summary

    curves = {  # (val_acc, val_loss, macro_f1) per epoch
        0: [(0.90, 0.60, 0.70), (0.95, 0.50, 0.80)],  # the most accurate trial ...
        3: [(0.80, 0.30, 0.60), (0.85, 0.40, 0.65)],  # ... but this one reaches the lowest val_loss, at epoch 1
    }

    def stand_in(config):
        point, best = config["point"], float("inf")
        for epoch, (acc, loss, f1) in enumerate(curves[point["freeze_depth"]], 1):
            best = min(best, loss)
            tune.report(
                {
                    "epoch": epoch, "best_val_loss": best, "val_acc": acc, "val_loss": loss, "macro_f1": f1,
                    "val_recall": {"cat": acc, "dog": None}, "epoch_s": 0.1, "images_per_s": 10.0,
                    "val_images": 20, "num_classes": 2, "checkpoint_path": f"/c/{point['freeze_depth']}/{epoch}",
                }
            )  # fmt: skip

    points = [{"freeze_depth": depth, "strategy": "plain", "lr": 1e-3, "mixed": depth == 3} for depth in curves]
    tuner = tune.Tuner(
        tune.with_resources(stand_in, {"CPU": 0.5}),
        param_space={"point": tune.grid_search(points), "max_epochs": 2, "monitor": "val_loss"},
        tune_config=tune.TuneConfig(metric="best_val_loss", mode="min"),
        run_config=tune.RunConfig(name="by-loss", storage_path=str(tmp_path), verbose=0),
    )
    tune_best = tuner.fit().get_best_result()
    summary = load_summary(str(tmp_path / "by-loss"))
    assert summary.monitor == "val_loss"
    assert (summary.best.freeze_depth, summary.best.val_loss, summary.best.checkpoint) == (3, 0.30, "/c/3/1")
    assert (summary.best.val_acc, summary.best.macro_f1, summary.best.best_epoch) == (0.80, 0.60, 1)
    assert tune_best.config["point"]["freeze_depth"] == 3, "Tune's best trial is the report's"
    depth0 = next(t for t in summary.trials if t.freeze_depth == 0)
    assert (depth0.val_loss, depth0.best_epoch) == (0.50, 2)
    assert [h["macro_f1"] for h in depth0.history] == [0.70, 0.80]
    assert tune_best.metrics["val_recall"] == {"cat": 0.85, "dog": None}
    assert (depth0.grid, summary.best.grid) == ({"mixed": False}, {"mixed": True})  # a --grid option's values
    written = report.write_report(summary, tmp_path / "report")
    assert "## All trials (best val_loss first)" in written["markdown"].read_text()
    assert written["csv"].read_text().splitlines()[1].startswith(f"{summary.best.trial_id},3,plain,0.001,0.8,0.3,")

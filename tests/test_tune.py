"""`tl-ray tune` on real Ray: a sweep that is killed mid-way, resumed, early-stopped and reported.

Two small sweeps: two trials (freeze depth 0 and 5) starting from the source model
trained in conftest, on the source task; one is killed and resumed, one runs through.
The seeded learning-rate draws give trial 0 (full fine-tuning) a gentle rate and trial 1
an absurd one (4.2 for AdamW), so ASHA is expected to stop trial 1 after its first epoch.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tl_ray
from tl_ray import cli, data

pytestmark = pytest.mark.timeout(900)


def _trial_rows(run_dir: Path) -> dict[str, list[dict]]:
    """What each Tune trial reported so far, from Tune's own per-trial result files."""
    rows = {}
    for result_file in run_dir.glob("_run_trial_*/result.json"):
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if lines:
            rows[lines[0]["trial_id"]] = lines
    return rows


@pytest.fixture(scope="module")
def sweep(source_run, source_data, tmp_path_factory, ray_cluster):
    _, _, source, _ = source_run
    storage = tmp_path_factory.mktemp("sweeps")
    run_dir = storage / "s1"
    argv = [
        "tune",
        "--data", str(source_data),
        "--weights", source["best_checkpoint"],
        "--arch", "resnet18", "--image-size", "64", "--num-workers", "2",
        "--freeze-depths", "0,5", "--num-samples", "1", "--max-epochs", "2",
        "--lr-min", "1e-6", "--lr-max", "10", "--seed", "12",
        "--storage", str(storage), "--name", "s1",
    ]  # fmt: skip
    # Run the sweep as its own driver process on this test session's Ray cluster, and SIGKILL
    # it as soon as the first trial has finished all its epochs.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    log = storage / "interrupted-driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "tl_ray.cli", *argv],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if any(len(rows) == 2 for rows in _trial_rows(run_dir).values()):
                break
            time.sleep(1)
        assert driver.poll() is None, f"the sweep ended before it could be interrupted: {log.read_text()[-3000:]}"
        time.sleep(3)  # let Tune write its experiment state once more, as it would before a real crash
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = _trial_rows(run_dir)
    assert any(len(rows) == 2 for rows in before.values()), "no trial finished before the deadline"

    assert cli.main(argv) == 0  # the same command again: Tune restores, Train resumes
    (run_dir / "argv.json").write_text(json.dumps(argv))
    return run_dir, before


def test_sweep_resumes_without_rerunning_finished_trials(sweep):
    run_dir, before = sweep
    after = _trial_rows(run_dir)
    finished = next(trial for trial, rows in before.items() if len(rows) == 2)
    assert [row["epoch"] for row in after[finished]] == [1, 2], "a finished trial's epochs must not run again"
    assert after[finished] == before[finished]
    assert len(after) == 2


def test_results_csv_has_one_row_per_trial_and_the_best_is_the_argmax(sweep):
    run_dir, _ = sweep
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert sorted(int(row["freeze_depth"]) for row in rows) == [0, 5]
    lrs = {int(row["freeze_depth"]): float(row["lr"]) for row in rows}
    assert 1e-6 <= lrs[0] <= 1e-4 and lrs[5] > 1.0, f"seeded lr draws changed: {lrs}"
    best = max(rows, key=lambda row: float(row["val_acc"]))
    assert rows[0] == best, "results.csv is sorted best first"
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    assert meta["freeze_depth"] == int(best["freeze_depth"])
    assert meta["metrics"]["val_acc"] == pytest.approx(float(best["val_acc"]))
    assert Path(best["checkpoint"]).name == f"checkpoint_epoch{int(best['best_epoch']):03d}"


@pytest.fixture(scope="module")
def asha_sweep(sweep, tmp_path_factory):
    """The same sweep again, uninterrupted (Tune does not carry ASHA's rungs across a restore)."""
    argv = json.loads((sweep[0] / "argv.json").read_text())
    storage = tmp_path_factory.mktemp("asha")
    argv[argv.index("--storage") + 1] = str(storage)
    assert cli.main(argv) == 0
    return storage / "s1"


def test_asha_stopped_the_absurd_learning_rate_early(asha_sweep):
    run_dir = asha_sweep
    rows = {int(row["freeze_depth"]): row for row in csv.DictReader((run_dir / "results.csv").open())}
    assert (rows[5]["status"], rows[5]["epochs"]) == ("stopped early", "1")
    assert (rows[0]["status"], rows[0]["epochs"]) == ("finished", "2")
    report = (run_dir / "report.md").read_text()
    assert "## Stopped early by ASHA" in report and f"{rows[5]['trial_id']} (depth 5" in report
    assert "trial-epochs run: 3 (of 4 without early stopping)" in report


def test_best_checkpoint_loads_and_predicts_on_its_own(sweep, source_data, checkpoint_accuracy):
    run_dir, _ = sweep
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    accuracy = checkpoint_accuracy(str(run_dir / "best"), data.discover(str(source_data)).val)
    assert accuracy == pytest.approx(meta["metrics"]["val_acc"], abs=0.01)
    evaluation = tl_ray.evaluate(str(run_dir / "best"), str(source_data / "val"))
    assert evaluation.metrics["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_report_png_is_a_picture_and_report_command_regenerates(sweep, capsys):
    run_dir, _ = sweep
    (run_dir / "report.png").unlink()
    assert cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "report.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| trial | freeze depth |" in printed and "best checkpoint" in printed

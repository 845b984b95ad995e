"""Ctrl-C and a closed stdout, as a user gives them to `tl-ray train` (issue 39): real signals to a real CLI process.

SIGINT goes to the command's process group, as a terminal's Ctrl-C does. Whenever it comes (Ray starting, the run
training) the command exits 130 with the line that says how to resume, and no traceback; rerunning the same command
resumes, and a reader that leaves it early (`tl-ray train ... | head`) costs no traceback: the run finishes.
Each test starts its own Ray in the subprocess and kills only the process group it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tl_ray import write_sample_data
from tl_ray.errors import EXIT_INTERRUPTED, EXIT_OK

pytestmark = pytest.mark.timeout(600)
RESUME_LINE = "tl-ray: interrupted; rerun the same command to resume"
WAIT_S = 240
EPOCHS = 6  # Ctrl-C comes at epoch 2: four are left to the rerun


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signals")
    write_sample_data(root, per_class=8, seed=0)
    return root / "source"


ENVIRONMENT = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}


def _train(data: Path, storage: Path, epochs: int = EPOCHS) -> subprocess.Popen:
    argv = ["--data", str(data), "--arch", "resnet18", "--weights", "none", "--image-size", "32", "--lr", "0.001"]
    argv += ["--epochs", str(epochs), "--storage", str(storage), "--name", "run"]
    return subprocess.Popen(
        [sys.executable, "-m", "tl_ray.cli", "train", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the Ctrl-C goes to it and nothing else
        env=ENVIRONMENT,
    )


def _finish(process: subprocess.Popen, errors: list[str]) -> int:
    try:
        return process.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    finally:
        time.sleep(0.2)  # the stderr reader's last lines


def _read_stderr(process: subprocess.Popen) -> list[str]:
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True).start()
    return errors


def test_ctrl_c_while_training_exits_130_and_the_rerun_resumes(tiny_data, tmp_path):
    process = _train(tiny_data, tmp_path)
    errors = _read_stderr(process)
    printed = []
    for line in process.stdout:
        printed.append(line)
        # Epoch 2's row: epoch 1's checkpoint is recorded (a worker's report waits for the last to be taken).
        if line.split()[:1] == ["2"]:
            os.killpg(process.pid, signal.SIGINT)
            break
    printed += process.stdout.read().splitlines(keepends=True)
    code = _finish(process, errors)
    output = "".join(printed) + "".join(errors)
    assert code == EXIT_INTERRUPTED, output
    assert errors and errors[-1].strip() == RESUME_LINE, output
    assert "Traceback" not in output

    # The rerun resumes, read by a reader that leaves once it has seen so (`tl-ray train ... | head`): the closed
    # stdout costs no traceback and the run goes on to its end.
    rerun = _train(tiny_data, tmp_path)
    errors = _read_stderr(rerun)
    head = []
    while not any("resuming from" in line for line in head) and len(head) < 40:
        head.append(rerun.stdout.readline())
    rerun.stdout.close()
    code = _finish(rerun, errors)
    assert "resuming from" in head[-1], "".join(head)
    assert code == EXIT_OK, "".join(errors)
    assert "Traceback" not in "".join(errors) and "BrokenPipeError" not in "".join(errors), "".join(errors)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [row["epoch"] for row in result["history"]] == list(range(1, EPOCHS + 1))


def test_ctrl_c_while_ray_starts_exits_130_without_a_traceback(tiny_data, tmp_path):
    process = _train(tiny_data, tmp_path)
    errors = _read_stderr(process)
    time.sleep(4)  # imports done, Ray starting or the caches being built (the tiny run trains after ~10 s)
    os.killpg(process.pid, signal.SIGINT)
    printed = process.stdout.read()
    code = _finish(process, errors)
    output = printed + "".join(errors)
    assert code == EXIT_INTERRUPTED, output
    assert RESUME_LINE in output
    assert "Traceback" not in output and "Exception ignored" not in output, output

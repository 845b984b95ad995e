"""CPU sharing between training workers and the data pipeline: the machine used, and no setting that hangs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tl_ray.cluster import PIPELINE_CPU, check_pipeline_room, cpus_per_worker, torch_threads
from tl_ray.errors import TlRayError


@pytest.mark.parametrize(
    ("total", "workers", "concurrent", "expected"),
    [(2, 1, 1, 1.0), (2, 2, 1, 0.5), (16, 1, 1, 8.0), (16, 3, 1, 5.0), (2, 1, 2, 0.5), (4, 2, 3, 0.5)],
)
def test_workers_reserve_what_ray_data_does_not_need(total, workers, concurrent, expected):
    per_worker = cpus_per_worker(total, workers, concurrent)
    assert per_worker == expected
    check_pipeline_room(total, workers, per_worker, concurrent)  # the default always leaves the pipeline room
    assert total - workers * concurrent * per_worker >= PIPELINE_CPU


@pytest.mark.parametrize(
    ("total", "workers", "per_worker", "concurrent", "option"),
    [
        (2, 1, 2, 1, "--cpus-per-worker 2 x --num-workers 1"),
        (2, 2, 1, 1, "--num-workers 2"),
        (4, 1, 1.5, 3, "3 concurrent"),
    ],
)
def test_a_setting_that_leaves_the_pipeline_no_cpu_is_refused(total, workers, per_worker, concurrent, option):
    with pytest.raises(TlRayError, match="never start") as info:
        check_pipeline_room(total, workers, per_worker, concurrent)
    assert option in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("node_cpus", "workers", "decoding", "threads"),
    [(2, 1, False, 2), (2, 1, True, 1), (2, 2, False, 1), (16, 2, False, 8), (16, 2, True, 7), (1, 1, True, 1)],
)
def test_torch_threads_use_the_cores_the_pipeline_leaves(node_cpus, workers, decoding, threads):
    assert torch_threads(node_cpus, workers, decoding) == threads


def _tl_ray(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's first run
    return subprocess.run(
        [sys.executable, "-m", "tl_ray.cli", *argv], env=env, capture_output=True, text=True, timeout=180
    )


def test_cli_refuses_worker_cpus_that_would_hang_before_anything_starts(sample_root: Path, tmp_path):
    cpus = os.cpu_count() or 1
    common = ["--data", str(sample_root / "target"), "--weights", "none", "--arch", "resnet18"]
    run = _tl_ray("train", *common, "--cpus-per-worker", str(cpus), "--storage", str(tmp_path), "--name", "t")
    assert run.returncode == 2, "a usage error"
    assert f"--cpus-per-worker {cpus} x --num-workers 1" in run.stderr and "never start" in run.stderr
    assert not (tmp_path / "t").exists(), "nothing may start before the refusal"


# Extended: make test's 30 minutes (CI ran 35 at 6b881ac); the concurrent-trials check itself is tested above.
@pytest.mark.extended
def test_cli_refuses_concurrent_trials_that_would_hang_before_anything_starts(sample_root: Path, tmp_path):
    cpus = os.cpu_count() or 1
    common = ["--data", str(sample_root / "target"), "--weights", "none", "--arch", "resnet18"]
    sweep = ["tune", *common, "--freeze-depths", "0", "--max-concurrent", str(2 * cpus), "--storage", str(tmp_path)]
    run = _tl_ray(*sweep, "--cpus-per-worker", "1", "--name", "s")
    assert run.returncode == 2
    assert f"{2 * cpus} concurrent trials (--max-concurrent)" in run.stderr and "never start" in run.stderr
    assert not (tmp_path / "s").exists()

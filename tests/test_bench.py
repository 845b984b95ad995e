"""The benchmarks in bench/ run (on a tiny setting): their numbers live in BENCHMARKS.md, not here.

Each runs as its own process, as a user runs it: it starts and stops its own local Ray.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)


def test_ingest_benchmark_runs_and_writes_both_sides(tmp_path):
    out = tmp_path / "ingest.json"
    argv = ["--images", "24", "--epochs", "2", "--image-size", "32", "--data", str(tmp_path / "data")]
    argv += ["--out", str(out)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "bench/ingest.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio tl-ray / baseline" in done.stdout
    results = json.loads(out.read_text())
    for side in ("baseline", "tl_ray"):
        assert [row["images"] for row in results[side]["epochs"]] == [24, 24]
        assert results[side]["warm_images_per_s"] > 0
    assert math.isfinite(results["ratio_warm"]) and 40 < results["mean_kb"] < 100

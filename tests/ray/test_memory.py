"""Datasets larger than Ray's object store train and predict in bounded memory.

A separate Ray instance with a 100 MB object store reads ~300 MB of photo-sized JPEGs
(three times the store) through `tl-ray train` and `tl-ray predict`. The driver only
ever holds the file list, and the pipeline streams with backpressure, so the driver's
memory must not grow with the data.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.timeout(900)]

OBJECT_STORE = 100 * 1024**2

PROBE = """
import json, resource, sys
import ray
from tl_ray import cli

small_dir, data_dir, out_dir, store = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ray.init(address="local", num_cpus=2, object_store_memory=store, dashboard_host="127.0.0.1")
common = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "16"]

def run(data, name):
    trained = cli.main(["train", "--data", data, *common, "--epochs", "1", "--storage", out_dir, "--name", name])
    result = json.load(open(f"{out_dir}/{name}/result.json"))
    predicted = cli.main(["predict", "--checkpoint", result["best_checkpoint"], "--data", data + "/val",
                          "--out", f"{out_dir}/{name}.csv", "--batch-size", "16"])
    return trained, predicted, result

run(small_dir, "warm-up")  # every code path once, on a few images: what it costs is not the data's
start_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train, predict, result = run(data_dir, "big")
end_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"train": train, "predict": predict, "growth": (end_peak_kb - start_peak_kb) * 1024,
                  "train_images": result["history"][-1]["train_images"]}))
"""


def _photo_jpegs(root: Path, per_class: int) -> int:
    """~1 MB noisy 1200x900 JPEGs: decoding them costs what decoding photos does.

    Eight distinct images per class, copied under many names: encoding is the slow part here.
    """
    rng = np.random.default_rng(0)
    total = 0
    for name in ("a", "b"):
        variants = []
        for _ in range(8):
            pixels = rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8)
            pixels[:, :, 0 if name == "a" else 2] //= 2  # a learnable hint of colour
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            variants.append(buffer.getvalue())
        for split, count in (("train", per_class), ("val", per_class // 4)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                (folder / f"{index:03d}.jpg").write_bytes(variants[index % len(variants)])
                total += len(variants[index % len(variants)])
    return total


def test_train_and_predict_three_times_the_object_store_in_bounded_memory(tmp_path):
    _photo_jpegs(tmp_path / "few", per_class=8)
    data_bytes = _photo_jpegs(tmp_path / "photos", per_class=144)
    assert data_bytes > 3 * OBJECT_STORE
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *(str(tmp_path / name) for name in ("few", "photos", "out")), str(OBJECT_STORE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["train"] == 0 and report["predict"] == 0
    assert report["train_images"] == 288
    assert len((tmp_path / "out" / "big.csv").read_text().splitlines()) == 1 + 72
    growth = report["growth"]  # of the driver's peak resident memory, training and predicting on all of it
    assert growth < data_bytes / 3, f"the driver grew by {growth / 2**20:.0f} MB reading {data_bytes / 2**20:.0f} MB"
    print(f"data {data_bytes / 2**20:.0f} MB, object store {OBJECT_STORE / 2**20:.0f} MB")
    print(f"driver +{growth / 2**20:.0f} MB")

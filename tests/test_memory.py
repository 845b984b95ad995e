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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OBJECT_STORE = 100 * 1024**2

PROBE = """
import json, sys, threading, time
import psutil, ray
import torch, torchvision  # imported before the baseline is taken: their size is not the data's
from tl_ray import cli, predict, train

data_dir, out_dir, store = sys.argv[1], sys.argv[2], int(sys.argv[3])
ray.init(address="local", num_cpus=2, object_store_memory=store, dashboard_host="127.0.0.1")
me = psutil.Process()
start_rss = me.memory_info().rss
peak = {"driver": start_rss}
done = threading.Event()

def sample():
    while not done.is_set():
        peak["driver"] = max(peak["driver"], me.memory_info().rss)
        time.sleep(0.25)

threading.Thread(target=sample, daemon=True).start()
common = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "16"]
train = cli.main(["train", "--data", data_dir, *common, "--epochs", "1", "--storage", out_dir, "--name", "big"])
result = json.load(open(f"{out_dir}/big/result.json"))
predict = cli.main(["predict", "--checkpoint", result["best_checkpoint"], "--data", data_dir + "/val",
                    "--out", out_dir + "/preds.csv", "--batch-size", "16"])
done.set()
print(json.dumps({"train": train, "predict": predict, "start_rss": start_rss, **peak,
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
    data_bytes = _photo_jpegs(tmp_path / "photos", per_class=128)
    assert data_bytes > 3 * OBJECT_STORE
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "photos"), str(tmp_path / "out"), str(OBJECT_STORE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["train"] == 0 and report["predict"] == 0
    assert report["train_images"] == 256
    assert len((tmp_path / "out" / "preds.csv").read_text().splitlines()) == 1 + 64
    growth = report["driver"] - report["start_rss"]
    assert growth < data_bytes / 3, f"the driver grew by {growth / 2**20:.0f} MB reading {data_bytes / 2**20:.0f} MB"
    print(f"data {data_bytes / 2**20:.0f} MB, object store {OBJECT_STORE / 2**20:.0f} MB")
    print(f"driver +{growth / 2**20:.0f} MB")

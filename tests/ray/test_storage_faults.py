"""Object storage that misbehaves while the cache is built: no image is lost to it (issue 38).

The images live in moto's S3 server, read through a fault-injecting proxy on loopback (tests/faultproxy.py) that
answers 503 SlowDown to the first N GETs of chosen objects. Throttling within the read's retries costs nothing; an
outage beyond them leaves those images unreadable (never recorded as bad), stops a run whose split lost more than a
trace of its images, and a rerun on healthy storage reads and caches every image.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np
import pyarrow.fs as pafs
import pytest
from faultproxy import FaultProxy
from PIL import Image

import tl_ray
from tl_ray.errors import RunError
from tl_ray.inputs import cache, skiplog, sources
from tl_ray.inputs.config import SourceOptions

pytestmark = pytest.mark.timeout(300)
SIZE = 32
BUCKET = "faulty"


@pytest.fixture(scope="module")
def images(s3_server) -> str:
    """12 training images of 2 classes (named as two of the shared source model's, so evaluate can score them) and 4
    validation ones in a bucket of their own."""
    s3_server.create_bucket(BUCKET)
    filesystem = s3_server.filesystem()
    for index in range(16):
        split = "train" if index < 12 else "val"
        buffer = io.BytesIO()
        pixels = np.random.default_rng(index).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        with filesystem.open_output_stream(
            f"{BUCKET}/shapes/{split}/{('circle', 'square')[index % 2]}/{index:02d}.png"
        ) as out:
            out.write(buffer.getvalue())
    return f"{BUCKET}/shapes"


def test_an_outage_beyond_the_retries_loses_no_image_and_a_rerun_reads_them_all(
    s3_server, images, tmp_path, ray_cluster
):
    where = str(tmp_path / "cache")
    with FaultProxy(s3_server.endpoint) as proxy:
        layout = sources.discover(proxy.uri(images), options=SourceOptions(retry_seconds=1.0))  # --retry-seconds 1
        assert len(layout.train) == 12 and len(layout.val) == 4 and layout.retry_seconds == 1.0

        # Class a's training images: every GET refused for longer than the read retries (1 s here).
        proxy.fail(r"/train/circle/", times=1_000)
        split = cache.prepare(layout.train, layout, SIZE, where, split="train")
        assert split.rows == 6 and split.skipped == []  # nothing recorded as a bad image
        assert sorted(path.rsplit("/", 1)[-1].split("?")[0] for path, _, _ in split.unreadable) == [
            f"{index:02d}.png" for index in range(0, 12, 2)
        ]
        reasons = [reason for _, reason, _ in split.unreadable]
        assert all(reason.startswith("unreadable: storage error after") for reason in reasons), reasons
        assert all(re.search(r"SLOW_DOWN|SERVICE_UNAVAILABLE|503", reason) for reason in reasons), reasons
        with open(f"{split.folder}/{cache.MANIFEST}") as written:
            manifest = json.load(written)
        assert manifest["skipped"] == [] and len(manifest["unreadable"]) == 6
        assert cache.read_manifest(pafs.LocalFileSystem(), split.folder) is None  # the next run builds again
        faults = sum(proxy.faults.values())
        assert faults >= 12  # each unreadable image was tried more than once

        # A run on that split stops with one line naming what failed, instead of training on half the images.
        with pytest.raises(RunError, match=r"^--data: the storage failed to deliver 6 of the 12 train images"):
            cache.prepare_splits(layout, SIZE, where, skiplog.SkipLog())

        # Storage healthy again: the rerun reads every image, and the skip list is empty.
        proxy.heal()
        skips = skiplog.SkipLog()
        rerun = cache.prepare_splits(layout, SIZE, where, skips)
        assert rerun["train"].built and rerun["train"].rows == 12 and rerun["val"].rows == 4
        assert rerun["train"].unreadable == [] and rerun["train"].skipped == [] and skiplog.skipped_files(skips) == {}

        # Throttling the client and our retries absorb: 3 refused GETs an object, every image read.
        proxy.fail(r"/val/", times=3)
        before = proxy.count("GET", r"/val/")
        patient = dataclasses.replace(layout, retry_seconds=60.0)
        throttled = cache.prepare(patient.val, patient, SIZE, where, image_format="png")
        assert throttled.rows == 4 and throttled.unreadable == [] and throttled.skipped == []
        assert proxy.count("GET", r"/val/") - before >= 4 * 4  # 3 refusals and the read, for each image


def test_predict_evaluate_and_inspect_tell_an_outage_from_bad_images(s3_server, images, source_model, tmp_path):
    """The commands that read images without a cache: an outage beyond --retry-seconds stops predict and evaluate
    with one line and nothing written, inspect lists the images as unreadable (not bad); throttling inside the
    retries costs nothing."""
    from tl_ray import cli

    out = tmp_path / "predictions.csv"
    metrics = tmp_path / "evaluation"
    with FaultProxy(s3_server.endpoint) as proxy:
        data = proxy.uri(images)
        proxy.fail(r"/train/circle/", times=1_000)  # 6 of the 16 images, for longer than the retries (1 s here)
        with pytest.raises(RunError, match=r"^--data: the storage failed to deliver 6 of the 16 images .*rerun"):
            tl_ray.predict(source_model, data, out=str(out), retry_seconds=1.0)
        assert not out.exists()
        scored = ["--data", proxy.uri(f"{images}/train"), "--retry-seconds", "1"]  # class folders: 6 of 12
        assert cli.main(["evaluate", "--checkpoint", source_model, *scored, "--out", str(metrics)]) == 1
        assert not metrics.exists() or not any(metrics.iterdir())  # --out checked writable, nothing written
        found = tl_ray.inspect(data, decode=True, retry_seconds=1.0)
        assert len(found.unreadable) == 6 and found.skipped == []
        assert all(reason.startswith("unreadable: storage error after") for _, reason in found.unreadable)

        # Throttling the retries absorb: 3 refused GETs for each training image, every image classified.
        proxy.heal()
        proxy.fail(r"/train/", times=3)
        rows = tl_ray.predict(source_model, data, out=str(out))
        assert len(rows) == 16 and (rows["error"] == "").all() and out.exists()


def test_writes_retry_what_passes_and_name_what_does_not(s3_server, images):
    """Results, reports and cache files are written through location.write_bytes: throttled PUTs are made again
    until they land; an outage beyond the retries is an OSError that says so (each caller's one line)."""
    from tl_ray import location, retries

    with FaultProxy(s3_server.endpoint) as proxy:
        where = location.resolve(proxy.uri(f"{BUCKET}/results"), "--out")
        proxy.fail(r"/results/throttled\.json", times=3, method="PUT")
        location.write_bytes(where.filesystem, where.join("throttled.json").path, b'{"ok": true}\n')
        assert proxy.count("PUT", r"/results/throttled\.json") == 4  # 3 refused, then the one that landed
        with where.filesystem.open_input_stream(where.join("throttled.json").path) as written:
            assert written.read() == b'{"ok": true}\n'

        proxy.fail(r"/results/down\.json", times=1_000, method="PUT")
        with pytest.raises(retries.Exhausted, match=r"^storage error after \d+ tries in 1 s: OSError: .*SLOW_DOWN"):
            location.write_bytes(where.filesystem, where.join("down.json").path, b"{}", retry_seconds=1.0)
        assert where.filesystem.get_file_info(where.join("down.json").path).type == pafs.FileType.NotFound

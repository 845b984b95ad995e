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
from faultproxy import RESET, FaultProxy
from PIL import Image

import tl_ray
from tl_ray.errors import RunError
from tl_ray.inputs import cache, reading, skiplog, sources
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


def test_a_connection_reset_mid_object_is_read_again_never_half_an_image(s3_server, images):
    """An object cut off half-way (headers promising its length, half its bytes, the connection dropped) is a
    failure that passes: the read asks again and returns the whole object, never the half it got."""
    filesystem = s3_server.filesystem()
    whole = filesystem.open_input_stream(f"{images}/train/circle/00.png").read()
    with FaultProxy(s3_server.endpoint) as proxy:
        layout = sources.discover(proxy.uri(images), options=SourceOptions(retry_seconds=30.0))
        [item] = [path for path, _ in layout.train if path.endswith("/00.png")]
        proxy.fail(r"/train/circle/00\.png$", times=2, status=RESET)
        assert reading.read_item(layout.opener, item, layout.retry_seconds) == whole
        assert proxy.count("GET", r"/00\.png$") == 3  # two cut off, the third whole
        proxy.fail(r"/train/circle/02\.png$", times=1_000, status=RESET)  # every GET cut off: an outage
        [other] = [path for path, _ in layout.train if path.endswith("/02.png")]
        with pytest.raises(reading.StorageError):
            reading.read_item(layout.opener, other, 1.0)


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


# A run's own arguments: the storage is under test, so the smallest run (a rate given: no --lr select).
TINY = ["--arch", "resnet18", "--image-size", "32", "--num-workers", "1", "--weights", "none", "--batch-size", "16"]
TINY += ["--lr", "1e-3", "--max-failures", "0"]


@pytest.fixture(scope="module")
def checkpoint_outage(s3_server, images, ray_cluster, tmp_path_factory):
    """`tl-ray train` for 2 epochs with --storage in the bucket, through the proxy: epoch 1's checkpoint throttled
    (3 refused PUTs of each file: more than the S3 client's own retries), epoch 2's train_state.pt refused for longer
    than --retry-seconds, 8 s (its model.pt and meta.json land: a partial checkpoint).
    Yields (proxy, argv, exit code, stderr)."""
    import contextlib
    import io
    import sys

    from tl_ray import cli

    cwd = tmp_path_factory.mktemp("cwd")
    with FaultProxy(s3_server.endpoint) as proxy, pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        argv = ["train", "--data", proxy.uri(images), *TINY, "--storage", proxy.uri(f"{BUCKET}/runs")]
        argv += ["--name", "outage", "--retry-seconds", "8"]
        proxy.fail(r"/runs/outage/checkpoint_epoch001/", times=3, method="PUT")
        proxy.fail(r"/runs/outage/checkpoint_epoch002/train_state\.pt", times=1_000, method="PUT")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            patch.setattr(sys, "stderr", err)
            code = cli.main([*argv, "--epochs", "2"])
        yield proxy, argv, code, err.getvalue()


# Extended: make test's 30 minutes (CI ran 35 at 6b881ac); the uploader's retries and refusals are tested
# without a run below (test_a_folder_upload_retries_each_file_...).
@pytest.mark.extended
def test_a_checkpoint_outage_fails_the_run_in_one_line_and_throttling_costs_nothing(checkpoint_outage, s3_server):
    proxy, _, code, err = checkpoint_outage
    assert code == 1, err
    # What tl-ray printed itself (the test's Ray forwards its processes' logs, each line tagged with its process).
    own = [line for line in err.splitlines() if line.strip() and not line.startswith("\x1b[36m(")]
    said = [line for line in own if line.startswith("tl-ray: error:")]
    assert len(said) == 1 and not any("Traceback" in line for line in own), own[-5:]
    assert said[0].startswith(
        "tl-ray: error: training failed: --storage: checkpoint checkpoint_epoch002 could not be"
    ), said[0]
    assert f"s3://{BUCKET}/runs/outage/checkpoint_epoch002?endpoint_override={proxy.endpoint}" in said[0]
    assert "SLOW_DOWN" in said[0] and "rerun the same command" in said[0]
    # Epoch 1's files were refused 3 times each, then written whole; epoch 2's partial folder is gone.
    assert proxy.count("PUT", r"/checkpoint_epoch001/model\.pt") >= 4
    stored = s3_server.filesystem().get_file_info(pafs.FileSelector(f"{BUCKET}/runs/outage", recursive=True))
    names = {info.path.removeprefix(f"{BUCKET}/runs/outage/") for info in stored}
    assert {
        "checkpoint_epoch001/model.pt",
        "checkpoint_epoch001/meta.json",
        "checkpoint_epoch001/train_state.pt",
    } <= names
    assert not any(name.startswith("checkpoint_epoch002") for name in names), names


@pytest.mark.extended
def test_a_rerun_on_healthy_storage_resumes_from_the_last_checkpoint_written_whole(checkpoint_outage, s3_server):
    """The same command once the storage answers: epoch 2 trained again from epoch 1's checkpoint (the partial
    epoch 2 was never registered), the run completed. A second Ray run (~35 s): extended tier."""
    import json

    from tl_ray import cli

    proxy, argv, code, _ = checkpoint_outage
    assert code == 1
    proxy.heal()
    assert cli.main([*argv, "--epochs", "2"]) == 0
    with s3_server.filesystem().open_input_stream(f"{BUCKET}/runs/outage/result.json") as written:
        result = json.loads(written.read())
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert result["history"][-1]["resumed_after_epoch"] == 1
    assert result["best_checkpoint"].startswith(f"s3://{BUCKET}/runs/outage/checkpoint_epoch00")
    stored = s3_server.filesystem().get_file_info(pafs.FileSelector(f"{BUCKET}/runs/outage/checkpoint_epoch002"))
    assert sorted(info.base_name for info in stored) == ["meta.json", "model.pt", "train_state.pt"]


def test_a_folder_upload_retries_each_file_and_never_calls_a_refused_put_written(s3_server, images, tmp_path):
    """location.upload (TensorBoard files, evaluate's and export's outputs) and a checkpoint's upload: each file's
    PUT made again while throttled; one refused beyond the retries raises. pyarrow.fs.copy_files, which Ray Train's
    own checkpoint upload uses, returned as if it had written it (the error dropped in a destructor)."""
    from tl_ray import location, retries

    folder = tmp_path / "run"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_bytes(b"a" * 1000)
    (folder / "sub" / "b.bin").write_bytes(b"b" * 3000)
    with FaultProxy(s3_server.endpoint) as proxy:
        where = location.resolve(proxy.uri(f"{BUCKET}/uploads"), "--out")
        proxy.fail(r"/uploads/sub/b\.bin", times=3, method="PUT")
        location.upload(str(folder), where)
        assert proxy.count("PUT", r"/uploads/sub/b\.bin") == 4
        stored = s3_server.filesystem()
        with stored.open_input_stream(f"{BUCKET}/uploads/sub/b.bin") as written:
            assert written.read() == b"b" * 3000

        proxy.fail(r"/again/a\.json", times=1_000, method="PUT")
        with pytest.raises(retries.Exhausted, match=r"SLOW_DOWN"):
            location.upload(str(folder), where.join("again"), retry_seconds=1.0)
        assert stored.get_file_info(f"{BUCKET}/uploads/again/a.json").type == pafs.FileType.NotFound
        # Why not pyarrow.fs.copy_files: the same refusal, and it returns as if all was written.
        proxy.fail(r"/copied/a\.json", times=1_000, method="PUT")
        pafs.copy_files(str(folder), where.join("copied").path, destination_filesystem=where.filesystem)
        assert stored.get_file_info(f"{BUCKET}/uploads/copied/a.json").type == pafs.FileType.NotFound

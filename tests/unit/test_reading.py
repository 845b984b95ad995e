"""Reading an item's bytes: a storage failure that passes is retried with backoff for a bounded time, one that
outlasts it (or does not pass) is a StorageError, and an item's own fault stays what it was (tl_ray.inputs.reading).

A stand-in opener and a fake clock: no storage, no waiting."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
from PIL import Image

from tl_ray import retries
from tl_ray.errors import RunError
from tl_ray.inputs import imaging, reading


class Flaky:
    """Fails the first ``failures`` reads with ``error``, then returns the item's bytes."""

    def __init__(self, failures: int, error: Exception, filesystem=None) -> None:
        self.failures, self.error, self.reads = failures, error, 0
        self.filesystem = filesystem if filesystem is not None else pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())

    def read(self, item: str) -> bytes:
        self.reads += 1
        if self.reads <= self.failures:
            raise self.error
        return item.encode()


class Clock:
    def __init__(self) -> None:
        self.now, self.waits = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


SLOW_DOWN = OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")


def test_throttling_inside_the_budget_is_absorbed_with_growing_jittered_waits():
    clock = Clock()
    opener = Flaky(5, SLOW_DOWN)
    assert reading.read_item(opener, "s3://b/k", 60, clock.sleep, clock) == b"s3://b/k"
    assert opener.reads == 6 and len(clock.waits) == 5
    caps = [min(retries.MAX_DELAY, retries.FIRST_DELAY * 2**n) for n in range(5)]
    assert all(0 <= wait <= cap for wait, cap in zip(clock.waits, caps, strict=True))


def test_an_outage_longer_than_the_budget_is_a_storage_error_not_a_bad_file():
    clock = Clock()
    opener = Flaky(10_000, SLOW_DOWN)
    with pytest.raises(reading.StorageError, match=r"^unreadable: storage error after \d+ tries in 30 s: OSError"):
        reading.read_item(opener, "s3://b/k", 30, clock.sleep, clock)
    assert clock.now <= 30 and opener.reads > 3


@pytest.mark.parametrize(
    "error",
    [
        OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Failure when receiving data"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
        OSError("When reading information for key 'x' in bucket 'b': AWS Error INTERNAL_FAILURE (HTTP status 500)"),
        OSError("HTTP status 503: Service Unavailable"),
    ],
)
def test_failures_that_pass_are_retried(error):
    clock = Clock()
    assert retries.is_transient(error)
    assert reading.read_item(Flaky(1, error), "s3://b/k", 10, clock.sleep, clock) == b"s3://b/k"


def test_an_items_own_fault_is_raised_as_it_was_at_once():
    for error in (FileNotFoundError(2, "No such file"), PermissionError(13, "Permission denied")):
        opener = Flaky(1, error)
        with pytest.raises(type(error)):
            reading.read_item(opener, "s3://b/k", 10, Clock().sleep, Clock())
        assert opener.reads == 1


def test_a_storage_failure_that_does_not_pass_is_a_storage_error_at_once_and_a_local_one_a_bad_file():
    denied = OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")
    opener = Flaky(1, denied)
    with pytest.raises(reading.StorageError, match=r"^unreadable: storage error: OSError: AWS Error ACCESS_DENIED"):
        reading.read_item(opener, "s3://b/k", 10, Clock().sleep, Clock())
    assert opener.reads == 1
    local = Flaky(1, OSError("Input/output error"))
    with pytest.raises(OSError, match="Input/output error") as raised:
        reading.read_item(local, "/data/train/a/1.jpg", 10, Clock().sleep, Clock())
    assert not isinstance(raised.value, reading.StorageError)


class Objects:
    """A stand-in object store of PNGs: items named ``s3://b/bad*`` hold no image, ``s3://b/gone*`` never come."""

    filesystem = None

    def read(self, item: str) -> bytes:
        if "/gone" in item:
            raise OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation (HTTP status 503)")
        if "/bad" in item:
            return b"\x89PNG not really"
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
        return buffer.getvalue()

    def display(self, item: str) -> str:
        return item


def test_predicts_rows_tell_an_undelivered_image_from_a_bad_one_and_too_many_stop_it():
    from tl_ray.inference import classify

    items = np.asarray(["s3://b/ok.png", "s3://b/bad.png", "s3://b/gone.png"], dtype=object)
    decoded = classify._decode_for_inference({"path": items}, Objects(), 32, imaging.Resize(37), retry_seconds=0.0)
    assert decoded["image"].shape == (3, 3, 32, 32) and decoded["image"][0].any()
    ok, bad, gone = decoded[classify.ERROR_COLUMN]
    assert ok == "" and not reading.is_unreadable(bad) and bad  # a bad file: the decoder's reason
    assert gone.startswith("unreadable: storage error after 1 tries in 0 s: OSError: AWS Error SERVICE_UNAVAILABLE")

    frame = pd.DataFrame({"path": items, classify.ERROR_COLUMN: decoded[classify.ERROR_COLUMN]})
    with pytest.raises(RunError, match=r"^--data: the storage failed to deliver 1 of the 3 images \(first: s3://b/go"):
        classify.check_delivered(frame, 3)
    classify.check_delivered(frame, 100)  # 1 of 100: at the share, reported in its row, not a stop
    classify.check_delivered(frame.iloc[:2], 2)  # a bad file alone is never a storage failure


def test_an_uncached_epoch_fails_on_an_undelivered_image_instead_of_skipping_it():
    from tl_ray.inputs import pipelines

    batch = {"path": np.asarray(["s3://b/ok.png", "s3://b/gone.png"], dtype=object), "label": np.asarray([0, 1])}
    with pytest.raises(reading.StorageError, match=r"^unreadable: storage error"):
        pipelines._decode_batch(
            batch, Objects(), 32, True, (0.6, 1.0), 0.0, None, imaging.Resize(37), retry_seconds=0.0
        )
    delivered = {"path": batch["path"][:1], "label": batch["label"][:1]}
    out = pipelines._decode_batch(
        delivered, Objects(), 32, True, (0.6, 1.0), 0.0, None, imaging.Resize(37), retry_seconds=0.0
    )
    assert out["image"].shape == (1, 3, 32, 32) and out["label"].tolist() == [0]


def test_the_share_that_stops_a_command():
    unreadable = [("s3://b/1.png", "unreadable: storage error after 9 tries in 180 s: OSError: SLOW_DOWN")]
    reading.check_unreadable(unreadable, 100, "train images", "rerun")  # 1%: not above the share
    with pytest.raises(RunError, match=r"^--data: the storage failed to deliver 1 of the 99 train images \(first: "):
        reading.check_unreadable(unreadable, 99, "train images", "rerun")
    reading.check_unreadable([], 0, "images", "rerun")

"""Reading an item's bytes: a storage failure that passes is retried with backoff for a bounded time, one that
outlasts it (or does not pass) is a StorageError, and an item's own fault stays what it was (tl_ray.inputs.reading).

A stand-in opener and a fake clock: no storage, no waiting."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from tl_ray.inputs import reading


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
    caps = [min(reading.MAX_DELAY, reading.FIRST_DELAY * 2**n) for n in range(5)]
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
    assert reading.is_transient(error)
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

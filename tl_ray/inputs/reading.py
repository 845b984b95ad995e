"""Reading an item's bytes from where it is stored, telling a storage failure from a bad image.

Object storage throttles (S3's 503 SlowDown), drops connections and has outages of seconds to minutes. The
filesystem client retries a few times; what outlasts those retries used to reach the decoder's ``except`` and be
recorded as a bad image, cached as bad, and skipped by every later run. Here a read that fails for a reason that
passes (throttling, 5xx, a reset connection, a timeout) is retried with exponential backoff and full jitter for a
bounded time, as the AWS SDKs' standard retry mode does; a read that still fails, or fails for a reason of the
storage rather than of the item, raises ``StorageError``, which callers keep apart from undecodable files: never
cached as bad, retried by the next run, and too many of them stop the run instead of training on a subset.

What stays an item's own fault: a local file that is missing, unreadable by permission or a folder, and an object
that no longer exists (listed, then deleted): reading it again would fail the same way.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any

from tl_ray.errors import RunError, TlRayError

# How long a read keeps retrying a failure that passes, in seconds: a throttling burst or a short outage is
# absorbed; a longer one is a StorageError. The cache build's tasks take it as an argument.
RETRY_SECONDS = 180.0
FIRST_DELAY = 0.5  # seconds before the first retry; doubled each time (full jitter), at most MAX_DELAY
MAX_DELAY = 20.0
# A failure that passes, as the AWS SDKs, Google's and Azure's clients word it (pyarrow passes their text on).
TRANSIENT = re.compile(
    r"slow[ _]?down|throttl|too[ _]many[ _]requests|request[ _]?time[ _]?out|timed? ?out|timeout|"
    r"service[ _]?unavailable|internal[ _]?(?:error|failure)|bad[ _]gateway|\b50[0234]\b|\b429\b|"
    r"connection (?:was )?(?:reset|refused|aborted|closed)|network[ _]connection|could ?n[o']t connect|"
    r"broken pipe|unexpected eof|curl",
    re.IGNORECASE,
)
ITEM_FAULTS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# How a StorageError's message begins, and so the reason recorded for an item its storage did not deliver: what
# tells it apart from an undecodable one in skip lists, predict's error column and evaluate's metrics.
UNREADABLE = "unreadable: "
# The share of a set whose storage may fail to deliver (after the retries) before the command stops rather than
# train on, or report on, a subset: a file or two of a large set is reported and read again by the next run; more
# is an outage.
MAX_UNREADABLE_SHARE = 0.01


class StorageError(TlRayError):
    """An item that could not be read from its storage: the storage's failure, not the image's."""


def is_transient(error: BaseException) -> bool:
    """Whether a read that failed with ``error`` may succeed if tried again."""
    if isinstance(error, ITEM_FAULTS):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    return bool(TRANSIENT.search(str(error)))


def read_item(
    opener: Any,
    item: str,
    retry_seconds: float = RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """``opener.read(item)``, retried while it fails for a reason that passes, for up to ``retry_seconds``.

    Raises ``StorageError`` for a storage failure (after the retries, or at once for one that does not pass, on an
    opener that reads object storage); an item's own fault (``ITEM_FAULTS``, or any failure of a local file) is
    raised as it was, for the caller to record as a bad item.
    """
    deadline = clock() + retry_seconds
    attempts, delay = 0, FIRST_DELAY
    while True:
        attempts += 1
        try:
            return opener.read(item)
        except Exception as error:
            if not is_transient(error):
                if isinstance(error, ITEM_FAULTS) or not is_remote(opener, item):
                    raise
                raise StorageError(f"{UNREADABLE}storage error: {_one_line(error)}") from error
            wait = random.uniform(0, delay)
            if clock() + wait > deadline:
                raise StorageError(
                    f"{UNREADABLE}storage error after {attempts} tries in {retry_seconds:g} s: {_one_line(error)}"
                ) from error
            sleep(wait)
            delay = min(MAX_DELAY, delay * 2)


def is_unreadable(reason: str) -> bool:
    """Whether a recorded reason is a storage failure (``StorageError``'s text), not the item's own fault."""
    return reason.startswith(UNREADABLE)


def check_unreadable(unreadable: list[tuple[str, str]], total: int, what: str, after: str) -> None:
    """Stop the command (``RunError``: one line naming the first item and the storage's error) when its storage
    failed to deliver more than ``MAX_UNREADABLE_SHARE`` of ``total`` items; ``what`` names them ("train images"),
    ``after`` says what was kept from the subset and what to do."""
    if not unreadable or len(unreadable) <= MAX_UNREADABLE_SHARE * total:
        return
    item, reason = unreadable[0]
    raise RunError(
        f"--data: the storage failed to deliver {len(unreadable)} of the {total} {what} (first: {item}:"
        f" {reason.removeprefix(UNREADABLE)}); {after}"
    )


def is_remote(opener: Any, item: str) -> bool:
    """Whether ``item`` is read from object storage (or another filesystem than the local one): a URI of its own
    (a manifest's ``s3://...`` rows), or a path in the opener's filesystem."""
    import pyarrow.fs as pafs

    scheme = item.partition("://")[0] if "://" in item else ""
    if scheme:
        return scheme != "file"
    filesystem = getattr(opener, "filesystem", None)
    while isinstance(filesystem, pafs.SubTreeFileSystem):
        filesystem = filesystem.base_fs
    return filesystem is not None and not isinstance(filesystem, pafs.LocalFileSystem)


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]

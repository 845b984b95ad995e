"""Reading an item's bytes from where it is stored, telling a storage failure from a bad image.

A read that outlasted the storage client's retries used to reach the decoder's ``except`` and be recorded as a bad
image, cached as bad, and skipped by every later run. Here a read that fails for a reason that passes is retried
(``tl_ray.retries``: backoff with jitter, for a bounded time); a read that still fails, or fails for a reason of the
storage rather than of the item, raises ``StorageError``, which callers keep apart from undecodable files: never
cached as bad, retried by the next run, and too many of them stop the run instead of training on a subset.

What stays an item's own fault: a local file that is missing, unreadable by permission or a folder, and an object
that no longer exists (listed, then deleted): reading it again would fail the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tl_ray import retries
from tl_ray.errors import RunError, TlRayError
from tl_ray.retries import RETRY_SECONDS

ITEM_FAULTS = retries.PERMANENT  # an item's own fault: recorded as a bad item
# How a StorageError's message begins, and so the reason recorded for an item its storage did not deliver: what
# tells it apart from an undecodable one in skip lists, predict's error column and evaluate's metrics.
UNREADABLE = "unreadable: "
# The share of a set whose storage may fail to deliver (after the retries) before the command stops rather than
# train on, or report on, a subset: a file or two of a large set is reported and read again by the next run; more
# is an outage.
MAX_UNREADABLE_SHARE = 0.01


class StorageError(TlRayError):
    """An item that could not be read from its storage: the storage's failure, not the image's."""


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
    try:
        return retries.call(lambda: opener.read(item), retry_seconds, sleep, clock)
    except retries.Exhausted as spent:
        raise StorageError(f"{UNREADABLE}{spent}") from spent.last
    except Exception as error:
        if isinstance(error, ITEM_FAULTS) or not is_remote(opener, item):
            raise
        raise StorageError(f"{UNREADABLE}storage error: {retries.one_line(error)}") from error


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

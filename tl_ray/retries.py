"""Object storage's failures that pass, and how long to wait them out: what reads of images and writes of results share.

Object storage throttles (S3's 503 SlowDown), drops connections and has outages of seconds to minutes. Its client
retries a few times; what outlasts those retries reaches tl-ray. A failure that passes (throttling, 5xx, a reset
connection, a timeout: told by the error's text, as pyarrow passes on the AWS, Google and Azure clients') is tried
again with exponential backoff and full jitter, as the AWS SDKs' standard retry mode does, for a bounded time
(``RETRY_SECONDS``, or what --retry-seconds says); one that does not pass, or outlasts it, is raised.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

# How long a read or write keeps retrying a failure that passes, in seconds: a throttling burst or a short outage is
# absorbed; a longer one is the storage's failure, reported as such.
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
# What no retry mends: a missing file, a refused permission, a folder where a file was meant.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

T = TypeVar("T")


class Exhausted(OSError):
    """A failure that passes, still failing when the retry time ran out: the storage's, after ``attempts`` tries.
    An OSError, so what callers already say of a storage error (one line naming the location) they say of it."""

    def __init__(self, attempts: int, retry_seconds: float, last: BaseException) -> None:
        super().__init__(f"storage error after {attempts} tries in {retry_seconds:g} s: {one_line(last)}")
        self.attempts, self.last = attempts, last


def is_transient(error: BaseException) -> bool:
    """Whether a read or write that failed with ``error`` may succeed if tried again."""
    if isinstance(error, PERMANENT):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    return bool(TRANSIENT.search(str(error)))


def call(
    attempt: Callable[[], T],
    retry_seconds: float = RETRY_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``attempt()``, tried again while it fails for a reason that passes, for up to ``retry_seconds``.

    A failure that does not pass is raised as it was, at once; one that passes and outlasts the time is raised as
    ``Exhausted`` (from it). ``attempt`` must be safe to repeat: a whole read, or a whole write of the same bytes.
    """
    deadline = clock() + retry_seconds
    attempts, delay = 0, FIRST_DELAY
    while True:
        attempts += 1
        try:
            return attempt()
        except Exception as error:
            if not is_transient(error):
                raise
            wait = random.uniform(0, delay)
            if clock() + wait > deadline:
                raise Exhausted(attempts, retry_seconds, error) from error
            sleep(wait)
            delay = min(MAX_DELAY, delay * 2)


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]

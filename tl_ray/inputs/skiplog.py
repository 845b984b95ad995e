"""The record of items a run dropped (path and reason), so one bad JPEG never stops a long run: held by the
driver when every item is decoded before training, or by an actor that decode tasks add to while it trains."""

from __future__ import annotations

import collections
from typing import Any

import ray


class SkipLog:
    """Files a run dropped, (path, reason), and each training file's label, to notice a class with nothing left to
    learn.

    Held by the driver, and copied to the workers, when every file is decoded before training starts (into the
    cache): the record is complete then, and needs no process of its own. ``SkippedFiles`` is the same record as
    an actor, for runs whose decode tasks find bad files while they train (``--cache none``).
    """

    def __init__(self, reasons: dict[str, str] | None = None, train_labels: dict[str, int] | None = None) -> None:
        self._reasons: dict[str, str] = dict(reasons or {})
        self._train_labels: dict[str, int] = dict(train_labels or {})

    def add(self, items: list[tuple[str, str]], train_labels: list[int] | None = None) -> None:
        """``train_labels``, given for training files, lets the run notice a class with nothing left to learn."""
        for path, reason in items:
            self._reasons.setdefault(path, reason)
        if train_labels is not None:
            self._train_labels.update((path, int(label)) for (path, _), label in zip(items, train_labels, strict=True))

    def get(self) -> dict[str, str]:
        return dict(self._reasons)

    def train_counts(self) -> dict[int, int]:
        """Skipped training files per class label."""
        return dict(collections.Counter(self._train_labels.values()))

    def state(self) -> tuple[dict[str, str], dict[str, int]]:
        """What ``SkippedFiles.remote(*log.state())`` starts from."""
        return dict(self._reasons), dict(self._train_labels)


@ray.remote(num_cpus=0)
class SkippedFiles(SkipLog):
    """A ``SkipLog`` that every decode task of a run adds to while the run trains."""


Skips = SkipLog | ray.actor.ActorHandle  # a SkipLog here, or a SkippedFiles actor's handle


def _call(skipped: Skips, method: str, *args: Any) -> Any:
    """``method`` of the skip log, here or on its actor."""
    if isinstance(skipped, SkipLog):
        return getattr(skipped, method)(*args)
    return ray.get(getattr(skipped, method).remote(*args))


def add_skips(skipped: Skips, items: list[tuple[str, str]], train_labels: list[int] | None = None) -> None:
    _call(skipped, "add", items, train_labels)


def skipped_files(skipped: Skips) -> dict[str, str]:
    return _call(skipped, "get")


def skipped_train_counts(skipped: Skips) -> dict[int, int]:
    return _call(skipped, "train_counts")


def release_skips(skipped: Skips) -> None:
    if not isinstance(skipped, SkipLog):
        ray.kill(skipped)


def labels_without_images(train_per_class: list[int], skipped_per_class: dict[int, int]) -> list[int]:
    """Labels all of whose training files failed to decode: the model could never learn them."""
    return [label for label, total in enumerate(train_per_class) if skipped_per_class.get(label, 0) >= total]

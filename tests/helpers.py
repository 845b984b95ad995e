"""Helpers shared by the torch-level unit tests (imported by test modules; pytest puts tests/ on the path)."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
from pathlib import Path

import torch
from PIL import Image

# The shared source run (conftest): 5 epochs of batch 16 reach 0.65-0.75 val_acc in ~75 s; 3 epochs of 32
# ended anywhere in 0.39-0.6.
SOURCE_EPOCHS, SOURCE_BATCH = 5, 16


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual.keys()) == list(expected.keys())
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


class RunsShellCommand:
    """Unpickling this object (without weights_only) runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def payload(sentinel: Path) -> RunsShellCommand:
    """A pickle payload that, if it ever runs, creates ``sentinel``."""
    return RunsShellCommand(f"touch {shlex.quote(str(sentinel))}")


def recorded(checkpoint_dir: Path) -> bool:
    """Whether Ray Train has recorded this checkpoint as reported (only those are resumed from)."""
    snapshot = checkpoint_dir.parent / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return False
    return any(item["checkpoint_dir_name"] == checkpoint_dir.name for item in results)


def kill_a_training_worker(gcs_address: str) -> int | None:
    """SIGKILL one live Ray Train worker process of the cluster at ``gcs_address``; its pid, or None."""
    from ray.util.state import list_actors

    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    workers = list_actors(address=gcs_address, filters=alive)
    if not workers:
        return None
    os.kill(workers[0].pid, signal.SIGKILL)
    return workers[0].pid


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """The bytes of ``image`` saved as ``fmt``, as a file of that format would hold them."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()

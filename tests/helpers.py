"""Helpers shared by the torch-level unit tests (imported by test modules; pytest puts tests/ on the path)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch


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

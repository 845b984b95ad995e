"""The tl-ray checkpoint format: a directory with ``model.pt`` and ``meta.json``.

``model.pt`` is a plain torchvision state dict and ``meta.json`` says everything
needed to use it (classes, preprocessing), so a checkpoint is useful without the run
that made it. ``train_state.pt`` (optimizer, schedule, history) is only there for
resuming. Every file is loaded with ``weights_only=True``: a checkpoint from
someone else cannot run code on this machine.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.models import ResNet

from tl_ray.config import ARCHS
from tl_ray.errors import TlRayError

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1
REQUIRED_META = ("arch", "num_classes", "class_names", "image_size", "mean", "std")


def _write_atomically(path: Path, write) -> None:
    """Write to a temporary name, flush it to disk, then rename: a crash leaves the old file or none."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    with open(temporary, "rb") as written:
        os.fsync(written.fileno())
    os.replace(temporary, path)


def save_checkpoint(
    directory: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    meta = {"format_version": FORMAT_VERSION, **meta}
    cpu_state = {key: value.detach().cpu() for key, value in model_state.items()}
    _write_atomically(directory / MODEL_FILE, lambda p: torch.save(cpu_state, p))
    if train_state is not None:
        _write_atomically(directory / TRAIN_STATE_FILE, lambda p: torch.save(train_state, p))
    # meta.json last: its presence marks a complete checkpoint.
    _write_atomically(directory / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / META_FILE
    if not directory.is_dir():
        raise TlRayError(f"checkpoint {directory} is not a directory (expected {MODEL_FILE} and {META_FILE} in it)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TlRayError(f"checkpoint {directory} has no {META_FILE}: not a (complete) tl-ray checkpoint") from None
    except (OSError, ValueError) as error:
        raise TlRayError(f"checkpoint {path} is unreadable: {error}") from error
    missing = [key for key in REQUIRED_META if key not in meta] if isinstance(meta, dict) else list(REQUIRED_META)
    if missing:
        raise TlRayError(f"checkpoint {path} lacks {', '.join(missing)}")
    return meta


def load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words rather than torch's paragraph."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds objects other than tensors, and tl-ray never unpickles those (weights_only=True)"
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _load(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise TlRayError(f"checkpoint {path.parent} has no {path.name}") from None
    except Exception as error:  # refused pickles, truncated files
        raise TlRayError(f"checkpoint file {path} does not load safely: {load_failure(error)}") from error


def read_model_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    state = _load(Path(directory) / MODEL_FILE)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise TlRayError(f"checkpoint {directory}: {MODEL_FILE} holds {type(state).__name__}, not a state dict")
    return state


def read_train_state(directory: str | os.PathLike, mmap: bool = False) -> dict[str, Any] | None:
    """``mmap``: the tensors (the optimizer's state, most of the file) are read only if used: for the history."""
    path = Path(directory) / TRAIN_STATE_FILE
    return _load(path, mmap) if path.exists() else None


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ResNet, dict[str, Any]]:
    """The trained torchvision ResNet (eval mode, on ``device``) and its meta: all predict needs."""
    meta = read_meta(directory)
    if meta["arch"] not in ARCHS:
        raise TlRayError(f"checkpoint {directory}: unknown arch {meta['arch']!r} in {META_FILE}")
    model = torchvision.models.get_model(meta["arch"], weights=None, num_classes=meta["num_classes"])
    try:
        model.load_state_dict(read_model_state(directory))
    except RuntimeError as error:
        raise TlRayError(f"checkpoint {directory}: {MODEL_FILE} does not match its {META_FILE}: {error}") from error
    return model.to(device).eval(), meta

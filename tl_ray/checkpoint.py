"""The tl-ray checkpoint format: a directory with ``model.pt`` and ``meta.json``.

``model.pt`` is a plain torchvision state dict and ``meta.json`` says everything
needed to use it (classes, preprocessing), so a checkpoint is useful without the run
that made it. ``train_state.pt`` (optimizer, schedule, history) is only there for
resuming. Every file is loaded with ``weights_only=True``: a checkpoint from
someone else cannot run code on this machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from tl_ray import backbones, location, retries
from tl_ray.errors import TlRayError

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1
REQUIRED_META = ("arch", "num_classes", "class_names", "image_size", "mean", "std")
FETCH_CHUNK_BYTES = 256 << 20  # the most a fetch holds in memory at once


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


class CheckpointWriteError(TlRayError):
    """A checkpoint the storage did not take, after the retries: the run fails with this one line."""


def uploader(storage: str, retry_seconds: float = retries.RETRY_SECONDS) -> Callable[[Any, str], Any]:
    """Ray Train's ``checkpoint_upload_fn`` for a run under ``storage`` (the --storage text): the checkpoint's files
    written to where Ray's own upload puts them (``StorageContext.build_checkpoint_path_from_name``, through the run's
    storage filesystem), each retried while the storage fails for a reason that passes, for ``retry_seconds``
    (``tl_ray.retries``), ``meta.json`` last. Ray's own upload (``pyarrow.fs.copy_files``) reports a refused PUT as
    a success (``location.upload``), so a checkpoint could be registered without its files.

    Ray registers a checkpoint only once this returns, so a rerun resumes from the last checkpoint written whole;
    the folder of one that failed is deleted where the storage allows. A failure that outlasts the retries is a
    ``CheckpointWriteError`` naming the checkpoint's URI and the storage's error, which ends the attempt (Ray Train
    restarts the workers from the last checkpoint up to --max-failures times, then the run fails with that line).
    """

    def upload(saved: Any, name: str) -> Any:
        import ray.train

        storage_context = ray.train.get_context().get_storage()
        filesystem = storage_context.storage_filesystem
        path = storage_context.build_checkpoint_path_from_name(name)
        files = sorted(location.files_under(saved.path), key=lambda pair: (pair[1] == META_FILE, pair[1]))
        try:
            retries.call(lambda: filesystem.create_dir(path), retry_seconds)  # as Ray's own upload does first
            for local, relative in files:
                location.put_file(local, filesystem, f"{path}/{relative}", retry_seconds)
        except (OSError, ValueError) as error:
            with contextlib.suppress(OSError, ValueError):
                filesystem.delete_dir(path)
            where = location.resolve(storage, "--storage").at(path)
            # Ray retries an upload whose error names AWS's transient codes ("AWS Error SLOW_DOWN"): this one has
            # had its retries, so its text names the code without that prefix.
            said = location.describe(error).replace("AWS Error ", "AWS: ")
            raise CheckpointWriteError(
                f"--storage: checkpoint {name} could not be written to {where.uri}: {said}; rerun the same command"
                " once the storage answers to resume from the last checkpoint written whole"
            ) from None
        return ray.train.Checkpoint(filesystem=filesystem, path=path)

    return upload


def cache_dir() -> Path:
    """Where checkpoints read from object storage are kept on this machine: ``$TL_RAY_CHECKPOINT_CACHE``, else
    ``$XDG_CACHE_HOME/tl-ray/checkpoints`` (``~/.cache/...``)."""
    if os.environ.get("TL_RAY_CHECKPOINT_CACHE"):
        return Path(os.environ["TL_RAY_CHECKPOINT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tl-ray" / "checkpoints"


def fetch(checkpoint: str | os.PathLike | location.Location, option: str = "--checkpoint") -> Path:
    """A local folder holding the checkpoint at ``checkpoint``: a local one as it is; one in object storage copied
    once into ``cache_dir()``, keyed by its URI and its files' sizes and modification times, so a checkpoint
    predict's actors or a sweep's trials all read is downloaded once per machine, and a replaced one again.

    Only what using a checkpoint needs is fetched (model.pt, meta.json), not the optimizer state."""
    where = location.resolve(checkpoint, option)
    if where.is_local:
        return Path(where.path)
    folder, model, meta = _infos(where, [where.path, where.join(MODEL_FILE).path, where.join(META_FILE).path], option)
    if folder.type == pafs.FileType.NotFound and meta.type == pafs.FileType.NotFound:
        raise TlRayError(f"{option}: checkpoint {where.uri} does not exist")
    if meta.type != pafs.FileType.File:
        raise TlRayError(f"{option}: checkpoint {where.uri} has no {META_FILE}: not a (complete) tl-ray checkpoint")
    if model.type != pafs.FileType.File:
        raise TlRayError(f"{option}: checkpoint {where.uri} has no {MODEL_FILE}")
    return _download(where, [model, meta], option)  # meta.json last, as saved: it marks a complete copy


def fetch_file(uri: str | location.Location, option: str) -> Path:
    """This machine's copy of one file in object storage (a ``.pth`` state dict), cached as ``fetch`` caches."""
    where = location.resolve(uri, option)
    if where.is_local:
        return Path(where.path)
    (info,) = _infos(where, [where.path], option)
    if info.type != pafs.FileType.File:
        raise TlRayError(f"{option}: {where.uri} does not exist")
    return _download(where, [info], option) / info.base_name


def _infos(where: location.Location, paths: list[str], option: str) -> list[pafs.FileInfo]:
    try:
        return where.filesystem.get_file_info(paths)
    except (OSError, ValueError) as error:
        raise TlRayError(f"{option}: cannot read {where.uri}: {location.describe(error)}") from error


def _download(where: location.Location, files: list[pafs.FileInfo], option: str) -> Path:
    stamp = json.dumps([where.uri, [(info.path, info.size, str(info.mtime)) for info in files]])
    target = cache_dir() / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    if all((target / info.base_name).is_file() for info in files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".fetching-", dir=target.parent))
    try:
        for info in files:
            # One read (one ranged GET on S3) per chunk: pyarrow's 1 MiB default would be ~100 GETs a ResNet-50.
            chunk = min(max(info.size or 0, 1 << 20), FETCH_CHUNK_BYTES)
            retries.call(
                lambda info=info, chunk=chunk: pafs.copy_files(
                    info.path, str(scratch / info.base_name), source_filesystem=where.filesystem, chunk_size=chunk
                )
            )
        try:
            os.replace(scratch, target)  # atomic: of two processes fetching the same files, one wins whole
        except OSError:
            if not all((target / info.base_name).is_file() for info in files):
                raise
    except (OSError, ValueError) as error:
        raise TlRayError(f"{option}: cannot read {where.uri}: {location.describe(error)}") from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def read_meta(directory: str | os.PathLike | location.Location) -> dict[str, Any]:
    directory = _local_dir(directory)
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


def _local_dir(directory: str | os.PathLike | location.Location) -> Path:
    """A local checkpoint folder as given; a location or URI through ``fetch``."""
    if isinstance(directory, location.Location) or location.is_uri(os.fspath(directory)):
        return fetch(directory)
    return Path(directory)


def load_checkpoint(
    directory: str | os.PathLike | location.Location, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained torchvision model (eval mode, on ``device``) and its meta: all predict needs. ``directory`` may
    be a URI: the checkpoint is then read from this machine's copy (``fetch``)."""
    directory = _local_dir(directory)
    meta = read_meta(directory)
    try:
        backbones.check_arch(meta["arch"])
    except TlRayError:
        raise TlRayError(f"checkpoint {directory}: unknown arch {meta['arch']!r} in {META_FILE}") from None
    model = backbones.create(meta["arch"], meta["num_classes"], meta["image_size"])
    try:
        model.load_state_dict(read_model_state(directory))
    except RuntimeError as error:
        raise TlRayError(f"checkpoint {directory}: {MODEL_FILE} does not match its {META_FILE}: {error}") from error
    return model.to(device).eval(), meta

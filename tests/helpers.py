"""Helpers shared by the torch-level unit tests (imported by test modules; pytest puts tests/ on the path)."""

from __future__ import annotations

import functools
import io
import json
import os
import shlex
import signal
import time
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


def kill_a_worker_once_recorded(checkpoint_dir: Path, gcs_address: str, killed: list[int]) -> None:
    """SIGKILL one Ray Train worker process soon after ``checkpoint_dir`` is recorded (mid-epoch); its pid goes into
    ``killed``. Recorded: Ray Train has taken that epoch's report (it polls every 0.25 s), so the worker is in the
    next epoch."""
    deadline = time.monotonic() + 600
    while not recorded(checkpoint_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = kill_a_training_worker(gcs_address)
    if pid is not None:
        killed.append(pid)


def wait_for_free_cpus(ray, timeout_s: float = 180) -> None:
    """Wait until every CPU of the cluster is free again: a SIGKILLed driver's actors and placement groups are
    released by Ray some seconds after its death, and a run started before that can starve past Ray Train's
    60 s worker-startup timeout on 2 CPUs."""
    from ray.util.placement_group import placement_group_table
    from ray.util.state import list_actors

    total = ray.cluster_resources().get("CPU", 0)

    def settled() -> bool:
        # A placement group the dead driver's trial was still creating can be granted after its CPUs were
        # briefly free: wait until every group is removed too, and the CPUs stay free for a few seconds.
        groups = [group["state"] for group in placement_group_table().values()]
        return ray.available_resources().get("CPU", 0) >= total and all(state == "REMOVED" for state in groups)

    deadline = time.monotonic() + timeout_s
    free_since = None
    while free_since is None or time.monotonic() - free_since < 3:
        if not settled():
            free_since = None
        elif free_since is None:
            free_since = time.monotonic()
        if time.monotonic() > deadline:
            alive = list_actors(filters=[("state", "=", "ALIVE")])
            holders = sorted({actor.class_name for actor in alive})
            groups = sorted(group["state"] for group in placement_group_table().values())
            raise AssertionError(
                f"CPUs still held {timeout_s:.0f} s after the kill; live actors: {holders}; placement groups: {groups}"
            )
        time.sleep(0.5)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """The bytes of ``image`` saved as ``fmt``, as a file of that format would hold them."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def as_reported(history_row: dict) -> dict:
    """A result.json history row as the epoch's metrics were reported (and stored in its meta.json): the history
    adds the workers' node ids."""
    return {key: value for key, value in history_row.items() if key != "node_ids"}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar in a TensorBoard folder, as TensorBoard shows them (orphaned steps purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_offline_history(run_folder: Path) -> list[dict]:
    """The rows a W&B offline run logged, read from its transaction log (``run-<id>.wandb``: a W&B header, then
    LevelDB-log framed ``Record`` protos). wandb ships no Python reader for it any more (its core is a binary)."""
    from wandb.proto import wandb_internal_pb2

    raw = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert raw[:4] == b":W&B", "not a W&B transaction log"
    block, position, pending, rows = 32768, 7, b"", []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(raw[position + 4 : position + 6], "little"), raw[position + 6]
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
        elif kind == 0:
            break
    return rows


@functools.cache
def initial_state(arch: str, num_classes: int = 3, size: int = 32) -> dict:
    """A fresh model's state dict, the same every call (seeded once, then cached: building is slow)."""
    import torch

    from tl_ray import model

    torch.manual_seed(0)
    return model.create_model(arch, num_classes, size).state_dict()


def checkpoint_meta(arch: str, num_classes: int, size: int = 32) -> dict:
    """The meta.json of a checkpoint of ``arch`` with classes c0, c1, ...: what loading one reads."""
    from tl_ray.inputs import imaging

    return {
        "arch": arch,
        "num_classes": num_classes,
        "class_names": [f"c{i}" for i in range(num_classes)],
        "image_size": size,
        "resize_size": imaging.resize_size(size),
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }


# ---------------------------------------------------------------- WebDataset shards

SHARD_COLOURS = [(230, 30, 30), (30, 30, 230), (30, 200, 30)]


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A shard as webdataset's ShardWriter writes one: per sample, its members KEY.EXT one after another."""
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mode, info.mtime = len(data), 0o444, 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return path


def cls_samples(first: int, count: int, classes: int = 2) -> list[tuple[str, dict[str, bytes]]]:
    """Samples numbered from ``first``: a JPEG of its class's colour and a .cls of the class id."""
    return [
        (f"{index:06d}", {"jpg": jpeg(SHARD_COLOURS[index % classes]), "cls": str(index % classes).encode()})
        for index in range(first, first + count)
    ]

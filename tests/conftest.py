"""Shared fixtures: one local Ray cluster per test session, and sample data made once."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import SOURCE_BATCH, SOURCE_EPOCHS
from s3server import CREDENTIALS, S3Server

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The S3 server's fake credentials, set before any Ray starts: Ray's workers take the environment of the raylet
# that the session's ray.init starts, and a pickled pyarrow S3FileSystem carries no credentials from the
# environment (each node resolves its own chain, as on a cluster). Only when none are set: tests never reach AWS.
if "AWS_ACCESS_KEY_ID" not in os.environ:
    os.environ.update(CREDENTIALS)
# Checkpoints fetched from object storage (checkpoint.fetch) go to a folder of this session, not ~/.cache: set before
# Ray starts, so predict's model actors use it too.
CHECKPOINT_CACHE = os.environ.setdefault("TL_RAY_CHECKPOINT_CACHE", tempfile.mkdtemp(prefix="tl-ray-checkpoints-"))


def pytest_collection_modifyitems(items):
    """Mark ``ray`` every test that starts Ray: all of tests/ray/, and any other that uses the session's cluster, so
    ``pytest -m "not ray"`` runs exactly those that need no Ray."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()) or item.path.parent.name == "ray":
            item.add_marker(pytest.mark.ray)


def pytest_sessionfinish(session, exitstatus):
    if Path(CHECKPOINT_CACHE).name.startswith("tl-ray-checkpoints-"):
        shutil.rmtree(CHECKPOINT_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for torch-level unit tests: on a small shared CPU, OpenMP spin-waits cost 10x."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray, shared: starting one costs ~7 s, so tests must not each start their own."""
    import ray

    if not ray.is_initialized():
        # A new local cluster even if another runs here; its dashboard serves the state API Ray Train polls.
        ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 and a free port, one per session, stopped (by its pid) at the end.

    Tests make their own buckets (`s3_server.create_bucket`) and count requests with `mark()` / `requests(since)`.
    """
    server = S3Server(tmp_path_factory.mktemp("s3server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The synthetic source/target datasets, at the size `tl-ray sample-data` writes by default."""
    from tl_ray import write_sample_data

    root = tmp_path_factory.mktemp("sample")
    write_sample_data(root, per_class=200, seed=0)
    return root


COMMON = ["--arch", "resnet18", "--image-size", "48", "--num-workers", "2"]


@pytest.fixture(scope="session")
def source_data(sample_root, tmp_path_factory) -> Path:
    """The sample source task plus files that cannot be decoded, which must be skipped, not fatal."""
    root = tmp_path_factory.mktemp("source") / "source"
    shutil.copytree(sample_root / "source", root)
    (root / "train" / "circle" / "broken.jpg").write_bytes((root / "val" / "star" / "star_0000.jpg").read_bytes()[:500])
    (root / "train" / "square" / "readme.jpg").write_text("this is not an image")
    return root


@pytest.fixture(scope="session")
def source_run(source_data, tmp_path_factory, ray_cluster):
    """`tl-ray train` from scratch on the source task: (argv, storage, result.json, printed output)."""
    storage = tmp_path_factory.mktemp("runs")
    argv = ["train", "--data", str(source_data), "--weights", "none", *COMMON]
    argv += ["--epochs", str(SOURCE_EPOCHS), "--batch-size", str(SOURCE_BATCH)]
    with pytest.MonkeyPatch.context() as patch:
        printed = io.StringIO()
        patch.setattr(sys, "stdout", printed)
        from tl_ray import cli

        assert cli.main([*argv, "--storage", str(storage), "--name", "src"]) == 0
    result = json.loads((storage / "src" / "result.json").read_text())
    return argv, storage, result, printed.getvalue()


@pytest.fixture(scope="session")
def source_model(source_run, tmp_path_factory) -> str:
    """A copy of the source run's best checkpoint: resuming that run may prune the original."""
    copy = tmp_path_factory.mktemp("model") / "source"
    shutil.copytree(source_run[2]["best_checkpoint"], copy)
    return str(copy)


@pytest.fixture(scope="session")
def checkpoint_probabilities():
    """A checkpoint's class probabilities for image files, (N, classes), by plain torch on its own preprocessing."""
    import torch

    import tl_ray
    from tl_ray.inputs import imaging

    def probabilities(checkpoint: str, paths: list[str]) -> torch.Tensor:
        model, meta = tl_ray.load_checkpoint(checkpoint)
        transform = imaging.eval_transform(meta["image_size"], imaging.Resize.from_meta(meta))
        images = torch.stack(
            [transform(imaging.load_rgb(Path(path).read_bytes(), meta["resize_size"])) for path in paths]
        )
        with torch.no_grad():
            logits = model(imaging.normalize(images, torch.tensor(meta["mean"]), torch.tensor(meta["std"])))
        return torch.softmax(logits, dim=1)

    return probabilities


@pytest.fixture(scope="session")
def checkpoint_accuracy(checkpoint_probabilities):
    """Accuracy of a checkpoint on (path, label) files."""
    import torch

    def accuracy(checkpoint: str, files: list[tuple[str, int]]) -> float:
        predicted = checkpoint_probabilities(checkpoint, [path for path, _ in files]).argmax(1)
        return (predicted == torch.tensor([label for _, label in files])).float().mean().item()

    return accuracy

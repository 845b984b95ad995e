"""Everything in object storage, end to end, against a real S3-protocol server (moto's, tests/s3server.py).

One small dataset in a bucket; one train run (then resumed) and one 2-trial sweep with their data, storage and cache
in buckets; predict, evaluate, export and report from those. The train run names the endpoint in the URI's query
(``?endpoint_override=...&scheme=http``), the sweep and what reads its results through ``AWS_ENDPOINT_URL``.
Refusals of outputs that cannot be written, and of a Ray job's temporary working dir, come first: they start no Ray.
"""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest
from conftest import COMMON

from tl_ray import cli, location, places
from tl_ray.errors import UsageError

# A rate given: the storage is under test, not --lr select (the default on a set this small: six trainings).
TINY = ["--arch", "resnet18", "--image-size", "32", "--num-workers", "1", "--weights", "none", "--batch-size", "16"]
TINY += ["--lr", "1e-3"]


@pytest.fixture(scope="module")
def buckets(s3_server, tmp_path_factory):
    """Buckets `data` (the sample source task at 8 images a class) and `results` (empty)."""
    from tl_ray import write_sample_data

    local = tmp_path_factory.mktemp("tiny")
    write_sample_data(local, per_class=8, seed=0)
    for bucket in ("data", "results"):
        s3_server.create_bucket(bucket)
    pafs.copy_files(str(local / "source"), "data/shapes", destination_filesystem=s3_server.filesystem())
    return s3_server


def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _objects(server, prefix: str) -> list[str]:
    infos = server.filesystem().get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(info.path[len(prefix) + 1 :] for info in infos if info.type == pafs.FileType.File)


def _read(server, path: str) -> bytes:
    with server.filesystem().open_input_stream(path) as stream:
        return stream.read()


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        ("s3://no-such-bucket/runs?{query}", "--storage: cannot write to s3://no-such-bucket/runs?"),
        ("s3://results/runs?{query}&colour=blue", "--storage: cannot open s3://results/runs?"),
        ("nosuchscheme://results/runs", "--storage: cannot open nosuchscheme://results/runs"),
    ],
)
def test_an_unusable_storage_is_one_line_naming_it_before_any_work(
    buckets, capsys, tmp_path, monkeypatch, storage, expected
):
    monkeypatch.chdir(tmp_path)
    storage = storage.format(query=buckets.query)
    start = buckets.mark()
    code, _, err = _run(["train", "--data", buckets.uri("data/shapes"), *TINY, "--storage", storage], capsys)
    assert code == 2
    assert err.startswith(f"tl-ray: error: {expected}") and err.count("\n") == 1, err
    assert "Traceback" not in err
    # Nothing was read or written first: no listing of the data, no config.yaml anywhere.
    assert not [r for r in buckets.requests(since=start) if r.bucket == "data"]
    assert not list(tmp_path.iterdir())


def test_outputs_that_cannot_be_written_and_missing_checkpoints_are_refused(buckets, capsys, tmp_path):
    image = buckets.uri("data/shapes/val/circle")
    code, _, err = _run(
        ["predict", "--checkpoint", str(tmp_path), "--data", image, "--out", buckets.uri("no-such-bucket/p.csv")],
        capsys,
    )
    assert code == 2 and err.startswith("tl-ray: error: --out: cannot write to s3://no-such-bucket?"), err
    missing = buckets.uri("results/no-such-run/checkpoint_epoch001")
    code, _, err = _run(["predict", "--checkpoint", missing, "--data", image, "--out", str(tmp_path / "p.csv")], capsys)
    assert code == 2 and err.strip() == f"tl-ray: error: --checkpoint: checkpoint {missing} does not exist", err
    code, _, err = _run(
        ["export", "--checkpoint", missing, "--format", "torchscript", "--out", buckets.uri("results/m.ts")], capsys
    )
    assert code == 2 and f"checkpoint {missing} does not exist" in err and err.count("\n") == 1, err


def test_a_ray_job_with_the_default_storage_is_refused(s3_server, monkeypatch, tmp_path):
    job = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    default = location.resolve(places.DEFAULT_STORAGE, "--storage")
    with pytest.raises(UsageError, match=r"^--storage: this run is a Ray job.*pass --storage s3://bucket/path"):
        places.check_not_temporary(places.DEFAULT_STORAGE, default)
    # The user's own local choice (a shared mount, a node's disk) and any URI stand.
    places.check_not_temporary(str(tmp_path / "mine"), location.resolve(tmp_path / "mine", "--storage"))
    remote = s3_server.uri("results/runs")
    places.check_not_temporary(remote, location.resolve(remote, "--storage"))


def test_a_submitted_job_is_recognised_by_the_job_config_ray_sets(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert places.ray_job_working_dir() is None
    monkeypatch.setenv(places.RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "."}, "metadata": {}}))
    assert places.ray_job_working_dir() == str(tmp_path)


def test_locations_join_children_to_the_path_and_keep_the_query(buckets):
    where = location.resolve(buckets.uri("results/tl-ray"), "--storage")
    child = where.join("NAME", ".tl-ray-cache")
    assert child.path == "results/tl-ray/NAME/.tl-ray-cache"
    assert child.uri == f"s3://results/tl-ray/NAME/.tl-ray-cache?{buckets.query}"
    assert where.at("results/tl-ray/NAME/checkpoint_epoch001").uri == (
        f"s3://results/tl-ray/NAME/checkpoint_epoch001?{buckets.query}"
    )
    assert location.resolve(child.uri, "--checkpoint") == child  # what is printed can be pasted back


# --------------------------------------------------------------------------------- train, predict, evaluate


@pytest.fixture(scope="module")
def s3_train_run(buckets, ray_cluster, tmp_path_factory):
    """`tl-ray train` with data, storage and cache in buckets, the endpoint in the URIs' query; 1 epoch."""
    cwd = tmp_path_factory.mktemp("cwd")
    storage = buckets.uri("results/tl-ray")
    argv = ["train", "--data", buckets.uri("data/shapes"), *TINY, "--epochs", "1", "--storage", storage]
    argv += ["--name", "s3run"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        import io
        import sys

        printed = io.StringIO()
        patch.setattr(sys, "stdout", printed)
        code = cli.main(argv)
    return code, argv, printed.getvalue(), cwd


def test_train_writes_its_run_and_cache_to_object_storage(s3_train_run, buckets):
    code, _, printed, cwd = s3_train_run
    assert code == 0, printed
    assert not list(cwd.iterdir())  # nothing landed in the working directory
    files = _objects(buckets, "results/tl-ray")
    assert "s3run/config.yaml" in files and "s3run/result.json" in files and "s3run/report.html" in files
    assert "s3run/checkpoint_epoch001/model.pt" in files and "s3run/checkpoint_epoch001/meta.json" in files
    assert any(name.startswith("s3run/tensorboard/events.out.tfevents") for name in files)
    assert any(name.startswith(".tl-ray-cache/") and name.endswith("manifest.json") for name in files)
    result = json.loads(_read(buckets, "results/tl-ray/s3run/result.json"))
    best = f"s3://results/tl-ray/s3run/checkpoint_epoch001?{buckets.query}"
    assert result["best_checkpoint"] == best
    assert result["tensorboard"] == f"s3://results/tl-ray/s3run/tensorboard?{buckets.query}"
    assert f"best checkpoint  {best}" in printed


def test_rerunning_the_run_resumes_it_from_object_storage(s3_train_run, buckets, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, argv, _, _ = s3_train_run
    code, _, err = _run([*argv[: argv.index("--epochs")], "--epochs", "2", *argv[argv.index("--epochs") + 2 :]], capsys)
    assert code == 0, err
    result = json.loads(_read(buckets, "results/tl-ray/s3run/result.json"))
    assert [row["epoch"] for row in result["history"]] == [1, 2]
    assert "s3run/checkpoint_epoch002/model.pt" in _objects(buckets, "results/tl-ray")


def test_predict_and_evaluate_read_the_checkpoint_once_and_write_to_object_storage(s3_train_run, buckets, capsys):
    checkpoint = buckets.uri("results/tl-ray/s3run/checkpoint_epoch001")
    start = buckets.mark()
    out = buckets.uri("results/preds.csv")
    code, printed, err = _run(
        ["predict", "--checkpoint", checkpoint, "--data", buckets.uri("data/shapes/val"), "--out", out], capsys
    )
    assert code == 0, err
    assert f"to {out}" in printed
    rows = _read(buckets, "results/preds.csv").decode().replace('"', "").splitlines()
    assert rows[0].startswith("path,predicted,probability") and len(rows) > 4
    assert all(row.startswith("s3://data/shapes/val/") for row in rows[1:])
    model_reads = [r for r in buckets.requests(since=start) if r.method == "GET" and r.path.endswith("/model.pt")]
    assert len(model_reads) <= 1, model_reads  # once into the machine's checkpoint cache, not per actor or batch

    code, printed, err = _run(
        [
            "evaluate",
            "--checkpoint",
            checkpoint,
            "--data",
            buckets.uri("data/shapes/val"),
            "--out",
            buckets.uri("results/eval"),
        ],
        capsys,
    )
    assert code == 0, err
    written = ["confusion.png", "metrics.json", "misclassified.csv", "per_class.png", "reliability.png"]
    assert _objects(buckets, "results/eval") == [*written, "report.html", "top_losses.png"]
    page = _read(buckets, "results/eval/report.html").decode()
    assert page.count('<img src="data:image/png;base64,') == 3  # self-contained: opens from the bucket alone
    worst = json.loads(_read(buckets, "results/eval/metrics.json"))["top_losses"]
    assert page.count('<img src="data:image/jpeg;base64,') == len(worst) > 0  # read back from the bucket
    metrics = json.loads(_read(buckets, "results/eval/metrics.json"))
    assert metrics["images"] > 4


def test_export_reads_a_checkpoint_uri_and_uploads_the_file(s3_train_run, buckets, capsys, tmp_path):
    checkpoint = buckets.uri("results/tl-ray/s3run/checkpoint_epoch001")
    out = buckets.uri("results/export/model.ts")
    code, printed, err = _run(["export", "--checkpoint", checkpoint, "--format", "torchscript", "--out", out], capsys)
    assert code == 0, err
    assert f"wrote torchscript {out}" in printed
    assert _objects(buckets, "results/export") == ["model.ts", "model.ts.json"]
    meta = json.loads(_read(buckets, "results/export/model.ts.json"))
    assert meta["class_names"] == ["circle", "square", "star", "triangle"]


def test_weights_from_a_checkpoint_uri(s3_train_run, buckets):
    from tl_ray import model

    checkpoint = buckets.uri("results/tl-ray/s3run/checkpoint_epoch001")
    weights = model.initial_weights("resnet18", checkpoint, ["circle", "square", "star", "triangle"])
    assert weights.source == f"checkpoint:{checkpoint}" and not weights.head_reset


# ------------------------------------------------------------------ tune and report, through AWS_ENDPOINT_URL


@pytest.fixture(scope="module")
def s3_sweep(buckets, ray_cluster, tmp_path_factory):
    """`tl-ray tune`: 2 one-epoch trials, data and storage as plain s3:// URIs, the endpoint in AWS_ENDPOINT_URL."""
    cwd = tmp_path_factory.mktemp("cwd")
    argv = ["tune", "--data", "s3://data/shapes", *COMMON[:4], "--num-workers", "1", "--weights", "none"]
    argv += ["--image-size", "32", "--freeze-depths", "5", "--lrs", "0.01,0.003", "--max-epochs", "1"]
    argv += ["--batch-size", "16", "--scheduler", "fifo", "--storage", "s3://results/sweeps", "--name", "sw"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setenv("AWS_ENDPOINT_URL", buckets.url)
        import io
        import sys

        printed = io.StringIO()
        patch.setattr(sys, "stdout", printed)
        code = cli.main(argv)
    return code, printed.getvalue(), cwd


def test_tune_writes_trials_report_and_best_to_object_storage(s3_sweep, buckets):
    code, printed, cwd = s3_sweep
    assert code == 0, printed
    assert not list(cwd.iterdir())
    files = _objects(buckets, "results/sweeps/sw")
    written = ("config.yaml", "results.csv", "report.md", "report.png", "report.html")
    for name in (*written, "best/model.pt", "best/meta.json"):
        assert name in files, files
    assert any(name.startswith("trials/experiment_state") for name in files)
    assert sum(name.endswith("/train/result.json") for name in files) == 2
    assert sum(name.endswith("/train/report.html") for name in files) == 2  # each trial's run, its page
    rows = _read(buckets, "results/sweeps/sw/results.csv").decode().splitlines()
    assert len(rows) == 3 and all(",s3://results/sweeps/sw/trials/" in row for row in rows[1:])
    assert "best checkpoint  s3://results/sweeps/sw/best" in printed


def test_report_and_predict_through_aws_endpoint_url(s3_sweep, buckets, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", buckets.url)
    _objects(buckets, "results/sweeps/sw")
    buckets.filesystem().delete_file("results/sweeps/sw/report.md")
    code, printed, err = _run(["report", "s3://results/sweeps/sw"], capsys)
    assert code == 0, err
    assert "report           s3://results/sweeps/sw/report.md" in printed
    assert "report.md" in _objects(buckets, "results/sweeps/sw")
    out = tmp_path / "preds.parquet"
    code, _, err = _run(
        ["predict", "--checkpoint", "s3://results/sweeps/sw/best", "--data", "s3://data/shapes/val", "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    assert out.stat().st_size > 0
    assert os.listdir(tmp_path) == ["preds.parquet"]

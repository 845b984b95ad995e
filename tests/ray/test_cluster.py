"""Cluster runs: cluster.yaml passes Ray's validator, and jobs/ run under a real `ray job submit`.

The job tests start their own Ray head (token authentication on, everything on
127.0.0.1, ports picked free) and stop it by killing the process group they started:
`ray stop` would stop every Ray instance on the machine, and `ray start --block`
ignores SIGTERM.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tl_ray import write_sample_data
from tl_ray.cli.console import EPOCH_HEADER, TRIAL_HEADER

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _validate(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_rays_validator():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate(config)
    assert config["available_node_types"]["gpu-worker"]["min_workers"] == 0
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in command for command in config["head_start_ray_commands"][1:])
    assert "~/.ray/auth_token" in config["file_mounts"], "every node gets the token"


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(unknown_key=1),
        lambda c: c.update(head_node_type="no-such-type"),
        lambda c: c["available_node_types"]["gpu-worker"].pop("node_config"),
    ],
    ids=["unknown key", "bad head_node_type", "worker without node_config"],
)
def test_broken_cluster_yaml_fails_validation(break_it):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    break_it(config)
    with pytest.raises(Exception):  # noqa: B017 - Ray raises ValueError or jsonschema's ValidationError
        _validate(config)


def test_runtime_env_keeps_data_and_vcs_out_of_the_upload():
    excludes = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["excludes"]
    assert {".git", ".venv", "runs", "demo", "data"} <= set(excludes)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head on 127.0.0.1 with token auth: (dashboard address, client environment)."""
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python` in a job = this venv
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--ray-client-server-port": _free_port(),
    }
    # Its own temp dir: `ray start` records itself as "the" cluster of this machine in the default one, and
    # Ray processes of the other cluster (this session's) would then look for their state API here.
    temp_dir = tempfile.mkdtemp(prefix="tlr-head-")  # short: Ray's socket paths must fit in 107 bytes
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1"]
    command += [f"--temp-dir={temp_dir}"]
    command += ["--num-cpus=2", "--include-dashboard=true"] + [f"{flag}={port}" for flag, port in ports.items()]
    log = tmp_path_factory.mktemp("head") / "head.log"
    head = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, f"ray head exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"ray head never answered: {log.read_text()[-2000:]}"
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, env: dict, script: str, *options: str) -> tuple[str, str, str]:
    """Run `ray job submit` as a user would; (status, logs, submission id)."""
    job_id = f"tl-ray-{uuid.uuid4().hex[:8]}"
    submit = [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", "."]
    submit += ["--runtime-env", "jobs/runtime_env.yaml", "--", "python", script, *options]
    subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, timeout=900)
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, job_id], env=env, capture_output=True, text=True
    ).stdout
    status = re.sub(r"\x1b\[[0-9;]*m", "", status).lower()  # "Job 'x' succeeded", coloured
    logs = subprocess.run(
        [RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True
    ).stdout
    return status, logs, job_id


def assert_quiet_console(logs: str, header: str) -> None:
    """The console of a job: tl-ray's rows, none of Ray's per-worker dumps, execution plans, banners or warnings."""
    assert logs.count(header) == 1, logs[-3000:]
    for noise in ("Reporting training result", "Execution plan", "Configuration for experiment", "is deprecated"):
        assert noise not in logs, noise


@pytest.fixture(scope="module")
def job_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jobdata")
    write_sample_data(root, per_class=12, seed=3)
    return root


TINY = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8"]


@pytest.mark.timeout(900)
def test_train_job_succeeds_and_writes_its_result(ray_head, job_data, tmp_path):
    address, env = ray_head
    status, logs, job_id = _submit(
        address, env, "jobs/train.py", "--data", str(job_data / "source"), *TINY, "--epochs", "1", "--lr", "1e-3",
        "--storage", str(tmp_path), "--name", "j1",
    )  # fmt: skip
    assert f"'{job_id}' succeeded" in status, logs[-3000:]
    result = json.loads((tmp_path / "j1" / "result.json").read_text())
    assert Path(result["best_checkpoint"], "model.pt").exists()
    assert "best checkpoint" in logs and str(tmp_path / "j1") in logs
    assert_quiet_console(logs, EPOCH_HEADER)


@pytest.mark.extended  # make test's 30 minutes (CI ran 35 at 6b881ac): the train job above is the submission path in CI
@pytest.mark.timeout(900)
def test_sweep_job_succeeds_and_writes_its_report(ray_head, job_data, tmp_path):
    address, env = ray_head
    status, logs, job_id = _submit(
        address, env, "jobs/sweep.py", "--data", str(job_data / "target"), *TINY, "--freeze-depths", "5",
        "--max-epochs", "1", "--scheduler", "fifo", "--storage", str(tmp_path), "--name", "s1",
    )  # fmt: skip
    assert f"'{job_id}' succeeded" in status, logs[-3000:]
    assert len((tmp_path / "s1" / "results.csv").read_text().splitlines()) == 2  # header and the one trial
    assert (tmp_path / "s1" / "best" / "meta.json").exists()
    assert_quiet_console(logs, TRIAL_HEADER)


# Extended: make test's 30 minutes (CI ran 35 at 6b881ac); a bad --data's line without a job: test_config.py
@pytest.mark.extended
@pytest.mark.timeout(300)
def test_job_with_a_bad_data_path_fails_with_the_clear_error(ray_head, tmp_path):
    address, env = ray_head
    missing = tmp_path / "no-such-dataset"
    status, logs, job_id = _submit(
        address, env, "jobs/train.py", "--data", str(missing), *TINY, "--storage", str(tmp_path)
    )
    assert f"'{job_id}' failed" in status, status
    assert f"tl-ray: error: --data: {missing} does not exist" in logs
    assert "Traceback" not in logs

"""A real multi-node Ray cluster on this machine: workers spread over nodes, node loss, elastic resizing.

The module starts its own cluster: a head with no CPUs (the driver's node: no training worker runs there,
so killing a worker node never kills the driver) and worker nodes of one CPU each, every node a `ray start
--block` process group with its own temp dir and ports, token authentication on, everything on 127.0.0.1.
One CPU per node makes each training worker (1 CPU) a node of its own, as on a cluster of small machines.
A node is lost by SIGKILLing its whole process group (raylet, agents, workers), as a machine that dies.
Runs are `tl-ray train`/`tl-ray tune` subprocesses with RAY_ADDRESS, so the pytest process's own Ray
(conftest's session cluster) is never touched. The tests run in order and change the cluster as they go.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import as_reported, recorded

from tl_ray import write_sample_data
from tl_ray.checkpoint import read_meta

pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.timeout(420)]

RAY = str(Path(sys.executable).with_name("ray"))
ELASTIC_EPOCHS = 20  # enough for a node to join and the group to grow before the run ends
TINY = ["--arch", "resnet18", "--weights", "none", "--image-size", "48", "--batch-size", "8"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    temp_dir: str
    log: Path


@dataclass
class LocalCluster:
    """Ray nodes started by this module, each its own process group (never `ray stop`: other clusters run here)."""

    env: dict[str, str]
    logs: Path
    address: str = ""
    nodes: list[Node] = field(default_factory=list)
    client: subprocess.Popen | None = None
    drivers: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, cpus: int, head: bool = False) -> Node:
        temp_dir = tempfile.mkdtemp(prefix="tlr-mn-")  # short: Ray's socket paths must fit in 107 bytes
        command = [RAY, "start", "--block", f"--temp-dir={temp_dir}", f"--num-cpus={cpus}", "--num-gpus=0"]
        command += ["--node-ip-address=127.0.0.1", f"--node-name={name}", "--object-store-memory=150000000"]
        ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        ports += ["--metrics-export-port", "--node-manager-port", "--object-manager-port"]
        if head:
            port = _free_port()
            self.address = f"127.0.0.1:{port}"
            command += ["--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
            ports += ["--dashboard-port", "--ray-client-server-port"]
        else:
            command += [f"--address={self.address}"]
        command += [f"{flag}={_free_port()}" for flag in ports]
        log = self.logs / f"{name}.log"
        process = subprocess.Popen(
            command, env=self.env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
        node = Node(name, process, temp_dir, log)
        self.nodes.append(node)
        return node

    def kill(self, node: Node) -> None:
        """The node's machine dies: every process of it, at once."""
        if node.process.poll() is None:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()

    def query(self, code: str) -> object:
        """Evaluate ``code`` (an expression of JSON values) in a state-API client of this cluster, a process of
        its own started once (queries then answer in a fraction of a second, while a run is still mid-epoch)."""
        if self.client is None or self.client.poll() is not None:
            serve = (
                "import json, sys\n"
                "from ray.util.state import list_actors, list_nodes\n"
                "for line in sys.stdin:\n"
                "    try:\n"
                "        print(json.dumps(eval(line)), flush=True)\n"
                "    except Exception as error:\n"
                "        print(json.dumps({'error': repr(error)}), flush=True)\n"
            )
            self.client = subprocess.Popen(
                [sys.executable, "-c", serve], env={**self.env, "RAY_ADDRESS": self.address},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
            )  # fmt: skip
        self.client.stdin.write(code + "\n")
        self.client.stdin.flush()
        answer = json.loads(self.client.stdout.readline())
        assert not (isinstance(answer, dict) and "error" in answer), answer
        return answer

    def alive(self) -> dict[str, str]:
        """Node name -> node id of the alive nodes, as the cluster sees them."""
        nodes = f"list_nodes(address='{self.address}')"
        return dict(self.query(f"{{n.node_name: n.node_id for n in {nodes} if n.state == 'ALIVE'}}"))

    def wait_for(self, names: set[str], timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                alive = self.alive()
            except AssertionError:
                alive = {}
            if set(alive) == names:
                return alive
            for node in self.nodes:
                assert node.name not in names or node.process.poll() is None, node.log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"nodes alive: {sorted(alive)}, wanted {sorted(names)}"
            time.sleep(1)

    def training_nodes(self) -> list[str]:
        """The node ids of the live Ray Train workers."""
        alive = "[('class_name', '=', 'RayTrainWorker'), ('state', '=', 'ALIVE')]"
        return list(self.query(f"[a.node_id for a in list_actors(address='{self.address}', filters={alive})]"))

    def node(self, node_id: str) -> Node:
        name = {value: key for key, value in self.alive().items()}[node_id]
        return next(node for node in self.nodes if node.name == name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # A dead node is noticed in seconds, not the default ~15-30 s.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_DEDUP_LOGS": "0",
    }
    env.pop("RAY_ADDRESS", None)
    local = LocalCluster(env, tmp_path_factory.mktemp("nodes"))
    try:
        local.start("head", cpus=0, head=True)
        local.wait_for({"head"})
        for name in ("n1", "n2", "n3"):
            local.start(name, cpus=1)
        local.wait_for({"head", "n1", "n2", "n3"})
        yield local
    finally:
        for driver in local.drivers:  # a test that failed mid-run leaves its driver running
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        if local.client is not None:
            os.killpg(local.client.pid, signal.SIGKILL)
            local.client.wait()
        for node in reversed(local.nodes):
            local.kill(node)
        for node in local.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mndata")
    write_sample_data(root, per_class=24, seed=5)
    return root / "source"


@dataclass
class Driver:
    """A `tl-ray` command running against the cluster, its output in a file."""

    process: subprocess.Popen
    log: Path

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode, self.log.read_text()


def _tl_ray(cluster: LocalCluster, *argv: str) -> Driver:
    log = cluster.logs / f"driver-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "tl_ray.cli", *argv],
        env={**cluster.env, "RAY_ADDRESS": cluster.address},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    cluster.drivers.append(process)
    return Driver(process, log)


def _wait_until(condition, driver: Driver, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert driver.process.poll() is None, f"the run ended before {what}: {driver.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {driver.log.read_text()[-3000:]}"
        time.sleep(0.5)


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "result.json").read_text())["history"]


def test_a_sweep_spreads_its_trials_over_nodes(cluster, tiny_data, tmp_path):
    driver = _tl_ray(
        cluster, "tune", "--data", str(tiny_data), *TINY, "--freeze-depths", "0,5", "--max-epochs", "1",
        "--scheduler", "fifo", "--max-concurrent", "2", "--storage", str(tmp_path), "--name", "sweep",
    )  # fmt: skip
    code, output = driver.finish()
    assert code == 0, output[-3000:]
    trials = [
        _history(folder / "train") for folder in sorted((tmp_path / "sweep" / "trials").iterdir()) if folder.is_dir()
    ]
    assert len(trials) == 2
    nodes = [set(history[0]["node_ids"]) for history in trials]
    # Two one-worker trials at once, one CPU each: each on a node of its own.
    assert all(len(ids) == 1 for ids in nodes) and nodes[0] != nodes[1]


def _kill_a_training_node(cluster: LocalCluster) -> Node:
    """SIGKILL a node that runs a training worker (never the head: no worker runs there)."""
    nodes = cluster.training_nodes()
    assert nodes, "no live training worker"
    node = cluster.node(nodes[-1])
    cluster.kill(node)
    return node


def test_two_workers_span_two_nodes_and_a_lost_node_restarts_them_from_the_last_checkpoint(
    cluster, tiny_data, tmp_path
):
    alive = cluster.alive()
    run_dir = tmp_path / "loss"
    # A local --storage (and its cache) on a 4-node cluster: accepted, every node runs on this machine.
    driver = _tl_ray(
        cluster, "train", "--data", str(tiny_data), *TINY, "--num-workers", "2", "--epochs", "3",
        "--storage", str(tmp_path), "--name", "loss",
    )  # fmt: skip
    _wait_until(lambda: recorded(run_dir / "checkpoint_epoch001"), driver, "epoch 1 was recorded")
    epoch_one = read_meta(run_dir / "checkpoint_epoch001")["metrics"]  # (pruned later: --keep-checkpoints 2)
    lost = _kill_a_training_node(cluster)
    code, output = driver.finish()
    assert code == 0, output[-3000:]
    history = _history(run_dir)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    # Epoch 1 was recorded before the loss and kept as it was; the new group started from a checkpoint.
    assert as_reported(history[0]) == epoch_one
    assert history[-1]["resumed_after_epoch"] >= 1
    assert all(row["workers"] == 2 for row in history), "a fixed group restarts at its size on the nodes left"
    assert lost.name not in cluster.alive()
    # Each worker of one CPU on a one-CPU node of its own, before and after the loss.
    assert all(row["nodes"] == 2 and len(row["node_ids"]) == 2 for row in history)
    assert set(history[0]["node_ids"]) <= {alive["n1"], alive["n2"], alive["n3"]}
    assert alive[lost.name] in history[0]["node_ids"] and alive[lost.name] not in history[-1]["node_ids"]


def test_an_elastic_run_shrinks_when_a_node_is_lost_and_grows_when_one_joins(cluster, tiny_data, tmp_path):
    run_dir = tmp_path / "elastic"
    driver = _tl_ray(
        cluster, "train", "--data", str(tiny_data), *TINY, "--num-workers", "1-2", "--cpus-per-worker", "1",
        "--epochs", str(ELASTIC_EPOCHS), "--resize-interval", "2", "--storage", str(tmp_path), "--name", "elastic",
    )  # fmt: skip

    def latest_workers() -> int | None:
        done = sorted(path for path in run_dir.glob("checkpoint_epoch*") if recorded(path))
        return read_meta(done[-1])["metrics"]["workers"] if done else None

    _wait_until(lambda: latest_workers() == 2, driver, "an epoch of 2 workers")
    assert len(cluster.alive()) == 3, "the head and two one-CPU nodes: losing one leaves room for one worker"
    lost = _kill_a_training_node(cluster)
    _wait_until(lambda: latest_workers() == 1, driver, "an epoch of 1 worker after the loss")
    joined = cluster.start(f"{lost.name}b", cpus=1)
    _wait_until(lambda: latest_workers() == 2, driver, "an epoch of 2 workers after a node joined")
    code, output = driver.finish()
    assert code == 0, output[-3000:]
    history = _history(run_dir)
    assert [row["epoch"] for row in history] == list(range(1, ELASTIC_EPOCHS + 1))
    workers = [row["workers"] for row in history]
    assert workers[0] == 2 and workers[-1] == 2, workers
    # 2 -> 1 after the loss, back to 2 once the new node joined, each group from the last checkpoint.
    first_one = workers.index(1)
    assert history[first_one]["resumed_after_epoch"] >= 1
    assert 2 in workers[first_one:]
    assert joined.name in cluster.alive()
    # The LR curve is the planned one, whatever the group's size: cosine decay ends at zero.
    assert history[-1]["head_lr_now"] == pytest.approx(0.0, abs=1e-9)


def test_a_fixed_run_without_room_after_a_node_loss_fails_in_one_line_and_keeps_its_epochs(
    cluster, tiny_data, tmp_path
):
    run_dir = tmp_path / "stuck"
    argv = ["train", "--data", str(tiny_data), *TINY, "--epochs", "3", "--storage", str(tmp_path), "--name", "stuck"]
    driver = _tl_ray(cluster, *argv, "--num-workers", "2", "--cpus-per-worker", "1", "--resource-timeout", "20")
    _wait_until(lambda: recorded(run_dir / "checkpoint_epoch001"), driver, "epoch 1 was recorded")
    _kill_a_training_node(cluster)  # one one-CPU node left: two workers of one CPU cannot start again
    started = time.monotonic()
    code, output = driver.finish()
    assert code == 1, output[-3000:]
    assert time.monotonic() - started < 120, "the wait is bounded by --resource-timeout"
    last = output.strip().splitlines()[-1]
    assert last.startswith("tl-ray: error: training failed: --resource-timeout: waited 20 s for 2 training worker")
    # tl-ray's own output has no traceback (Ray's streamed worker and controller logs, "(... pid=N)", may).
    assert not [line for line in output.splitlines() if "Traceback" in line and "pid=" not in line]
    # Nothing recorded is lost: the same run resumes on what is left, from its last recorded epoch.
    recorded_epochs = read_meta(max(path for path in run_dir.glob("checkpoint_epoch*") if recorded(path)))["epoch"]
    code, output = _tl_ray(cluster, *argv, "--num-workers", "1").finish()
    assert code == 0, output[-3000:]
    history = _history(run_dir)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [row["workers"] for row in history[recorded_epochs:]] == [1] * (3 - recorded_epochs)
    assert history[recorded_epochs]["resumed_after_epoch"] == recorded_epochs

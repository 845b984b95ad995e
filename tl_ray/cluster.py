"""How a run talks to Ray: starting or joining the cluster (``ensure_ray``), keeping Ray's own output quiet
(``quiet_ray``), the cluster's facts (which nodes share this machine, the CPUs of each), the resources a run's
workers and pipelines take, and how long the run may wait for the nodes its workers need.

Two facts of Ray 2.60 (Train V2) shape this module:

- A local folder is shared storage only when every node runs on the driver's machine. Ray
  reports each node's hostname and IP (``ray.nodes()``), and a cluster of nodes on one host
  (several ``ray start`` on a workstation) is common; refusing it would be wrong.
- When a node is lost, Ray Train restarts the worker group from the last checkpoint, and
  waits for resources to do so: a fixed-size group retries its placement group forever
  (``FailureConfig.controller_failure_limit`` is -1), an elastic group below its minimum
  waits forever. ``ResourceWait`` bounds that wait (``--resource-timeout``) with one clear
  error instead of a silent hang.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

import ray
import ray.data
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import (
    InitializingState,
    ReschedulingState,
    ResizingState,
    RestartingState,
    SchedulingState,
)

from tl_ray import location
from tl_ray.errors import UsageError

# Controller states in which no worker group runs: the run is waiting for one to start.
_WAITING_STATES = (InitializingState, SchedulingState, ReschedulingState, RestartingState, ResizingState)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def on_one_host(nodes: Iterable[dict[str, Any]], hostname: str, addresses: set[str]) -> bool:
    """Whether every alive node of ``ray.nodes()`` runs on the machine called ``hostname`` with ``addresses``.

    Both must match: a hostname alone can repeat across machines (containers), an address alone
    cannot tell a loopback of this machine from a NAT'd one; a loopback address (all nodes
    started with ``--node-ip-address 127.0.0.1``) can only be this machine's.
    """
    for node in nodes:
        if not node.get("Alive"):
            continue
        address = node.get("NodeManagerAddress", "")
        if node.get("NodeManagerHostname") != hostname or not (address in addresses or _is_loopback(address)):
            return False
    return True


def local_addresses() -> set[str]:
    """This machine's IP addresses as Ray and the resolver see them (best effort: unknown ones refuse sharing)."""
    import ray.util

    found = {ray.util.get_node_ip_address()}
    with contextlib.suppress(OSError):
        found |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    return found


class ResourceTimeoutError(RuntimeError):
    """No worker group could start for ``--resource-timeout`` seconds (raised on the Train controller)."""


class ResourceWait(ControllerCallback):
    """Fail the run when no worker group has run for ``timeout_s`` seconds: at the start, after a node loss,
    or while an elastic group waits for its minimum.

    A Ray Train controller callback (Ray's internal API in 2.60): the controller calls it on every state
    update, and turns an error raised here into a non-retryable controller error that ends ``fit()``.
    """

    def __init__(self, timeout_s: float, message: str) -> None:
        self.timeout_s = timeout_s
        self.message = message
        self._waiting_since: float | None = None

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        if not isinstance(current_state, _WAITING_STATES):
            self._waiting_since = None
            return
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        elif now - self._waiting_since > self.timeout_s:
            raise ResourceTimeoutError(self.message)


def task_pool(blocks: int) -> ray.data.TaskPoolStrategy:
    """At most one pipeline task per CPU of the cluster, and no more than the ``blocks`` there are to map
    (Ray warns of a pool larger than its inputs).

    Our tasks ask for half a CPU so they fit beside training workers that hold all but a
    fraction of one; left to that alone, Ray runs two per core, and image decoding packed
    like that ran 3x slower on a 2-core machine (bench/ingest.py: 98 vs 300 images/s).
    """
    return ray.data.TaskPoolStrategy(size=max(1, min(blocks, int(ray.cluster_resources().get("CPU", 1)))))


_ray_output = {"verbose": True, "started_here": False}  # the Python API shows Ray's output as Ray prints it


def quiet_ray(verbose: bool) -> None:
    """Whether Ray's own output reaches this process's console: its workers' and actors' logs (Ray Train's
    per-worker report dumps, Ray Data's execution plans), Ray Data's progress bars, Ray's INFO lines and
    Tune's status table. The CLI turns them off unless --verbose (it prints its own progress); errors still
    surface as exceptions. Call before Ray starts: its workers' output is chosen at ``ray.init``."""
    _ray_output["verbose"] = verbose
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("ray.data").setLevel(level)
    logging.getLogger("ray.data._internal.progress").setLevel(level if verbose else logging.ERROR)  # "bars disabled"
    # Ray 2.60 warns at every start that token authentication is on (its default, which we keep).
    logging.getLogger("ray._private.authentication").setLevel(level if verbose else logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:  # Tune's newer output engine prints its experiment banner even at verbose=0; the older is silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def ray_is_verbose() -> bool:
    return _ray_output["verbose"]


def ensure_ray() -> bool:
    """Connect to the cluster in RAY_ADDRESS, else start a new local one; True if tl-ray started Ray in this
    process (a cluster of its own, which no other node joins).

    Without RAY_ADDRESS, a new local instance rather than Ray's default of joining whatever
    cluster this machine last started: a stale or unrelated one would hang or mix runs.
    (``RAY_ADDRESS=auto`` joins a `ray start` cluster on this machine.)
    """
    if ray.is_initialized():
        return _ray_output["started_here"]
    verbose = _ray_output["verbose"]
    output = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **output)
        return False
    # Token authentication stays as Ray 2.60 sets it; the dashboard answers on loopback only.
    ray.init(address="local", dashboard_host="127.0.0.1", **output)
    _ray_output["started_here"] = True
    return True


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "fuse")


def _mount_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (Linux /proc/mounts), or "" when unknown."""
    try:
        with open("/proc/mounts", encoding="utf-8") as table:
            mounts = [line.split()[1:3] for line in table]
    except OSError:
        return ""
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")), key=len, default=None)
    return best[1] if best else ""


def check_shared_storage(storage: location.Location | str, option: str = "--storage") -> None:
    """On a multi-node cluster, refuse a node-local folder: nodes of other machines could not see its
    checkpoints (or cache). Nodes that all run on this machine (several ``ray start`` on one host) share it."""
    storage = location.resolve(storage, option)
    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) < 2 or not storage.is_local:
        return
    if _mount_type(storage.path).split(".")[0] in NETWORK_FILESYSTEMS:
        return
    if on_one_host(alive, socket.gethostname(), local_addresses()):
        return
    raise UsageError(
        f"{option}: {storage} is a node-local folder, but this Ray cluster has {len(alive)} nodes, not all on"
        " this machine; "
        "pass shared storage: s3://bucket/path, gs://bucket/path or a folder on an NFS mount"
    )


# Ray Data's decode and crop tasks ask for half a CPU each: at least that must stay free beside the workers.
PIPELINE_CPU = 0.5


def cpus_per_worker(
    total_cpus: float, num_workers: int, concurrent_runs: int = 1, largest_node: float | None = None
) -> float:
    """The CPUs Ray reserves for each CPU training worker: what is left after one CPU (or half the machine)
    for Ray Data, shared by ``concurrent_runs`` runs' workers, and never more than the largest node has
    (a worker sized from a multi-node cluster's total would fit on no node, and wait forever).

    A logical reservation only: it keeps Ray from scheduling more than fits, while each worker's
    torch threads are sized to the cores it can actually use (``torch_threads``).
    """
    spare = max(total_cpus - 1.0, total_cpus / 2.0)
    if largest_node is not None:
        spare = min(spare, largest_node * num_workers * concurrent_runs)
    return max(0.01, min(8.0, math.floor(100 * spare / (num_workers * concurrent_runs)) / 100))


def check_pipeline_room(
    total_cpus: float, num_workers: int, per_worker: float, concurrent_runs: int = 1, overhead: float = 0.0
) -> None:
    """Refuse before anything starts a CPU setting whose workers would leave Ray Data no CPU: the run would
    wait forever for a decode task that never gets scheduled."""
    reserved = num_workers * per_worker * concurrent_runs + overhead
    if total_cpus - reserved >= PIPELINE_CPU:
        return
    runs = f" x {concurrent_runs} concurrent trials (--max-concurrent)" if concurrent_runs > 1 else ""
    raise UsageError(
        f"--cpus-per-worker {per_worker:g} x --num-workers {num_workers}{runs} reserves {reserved:g} of this"
        f" cluster's {total_cpus:g} CPUs, leaving less than {PIPELINE_CPU} for loading images, so training would"
        " never start; lower them or leave --cpus-per-worker unset"
    )


def torch_threads(node_cpus: float, workers_on_node: int, decoding_every_epoch: bool) -> int:
    """Intra-op threads for a CPU worker: the node's cores shared by its workers, less one core for JPEG
    decoding when there is no cache (with the decoded-image cache or cached features the pipeline only
    crops and flips, which costs a few percent of a core)."""
    cores = node_cpus - (1 if decoding_every_epoch and node_cpus > 1 else 0)
    return max(1, int(cores // max(1, workers_on_node)))


def largest_node_cpus() -> float | None:
    """The most CPUs one alive node has: no CPU worker can be larger."""
    sizes = [node.get("Resources", {}).get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    return max(sizes, default=0.0) or None


def node_cpus() -> float:
    """The logical CPUs of the node this process runs on (`ray start --num-cpus`, else its cores)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return node.get("Resources", {}).get("CPU", 1.0)
    return float(os.cpu_count() or 1)

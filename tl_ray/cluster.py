"""What a run needs to know about the Ray cluster's nodes: which of them share this machine, and how
long the run may wait for the nodes its workers need.

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
import socket
import time
from collections.abc import Iterable
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import (
    InitializingState,
    ReschedulingState,
    ResizingState,
    RestartingState,
    SchedulingState,
)

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

"""Multi-node decisions that need no cluster: which nodes share this machine's folders, elastic worker ranges,
an LR curve that a resized worker group keeps, and the bounded wait for workers' resources."""

from __future__ import annotations

import time

import pytest
from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState

from tl_ray.cluster import ResourceTimeoutError, ResourceWait, cpus_per_worker, on_one_host
from tl_ray.errors import UsageError
from tl_ray.training.config import TrainConfig, parse_workers


def _node(host: str, address: str, alive: bool = True) -> dict:
    return {"NodeManagerHostname": host, "NodeManagerAddress": address, "Alive": alive}


@pytest.mark.parametrize(
    ("nodes", "shared"),
    [
        ([_node("ws", "10.0.0.5"), _node("ws", "10.0.0.5")], True),  # several `ray start` on one workstation
        ([_node("ws", "127.0.0.1"), _node("ws", "127.0.0.1")], True),  # all on this machine's loopback
        ([_node("ws", "10.0.0.5"), _node("gpu-1", "10.0.0.9")], False),  # a second machine
        ([_node("ws", "10.0.0.5"), _node("ws", "10.0.0.9")], False),  # same hostname, another machine's address
        ([_node("ws", "10.0.0.5"), _node("gpu-1", "10.0.0.9", alive=False)], True),  # only alive nodes count
    ],
    ids=["one host", "loopback", "two machines", "hostname alone", "dead node"],
)
def test_a_local_folder_is_shared_only_when_every_alive_node_is_on_this_machine(nodes, shared):
    assert on_one_host(nodes, "ws", {"10.0.0.5"}) is shared


@pytest.mark.parametrize(("text", "expected"), [(4, (4, 4)), ("4", None), ("1-4", (1, 4)), (" 2 - 3 ", (2, 3))])
def test_num_workers_is_a_count_or_a_range(text, expected):
    assert parse_workers(text) == expected


@pytest.mark.parametrize("value", ["0-2", "3-1", "two", "1-", "-2"])
def test_a_bad_worker_range_is_one_clear_usage_error(value):
    with pytest.raises(UsageError, match="--num-workers must be a positive number of workers") as info:
        TrainConfig(data="d", num_workers=value).validate()
    assert "\n" not in str(info.value)


def test_an_elastic_range_sizes_batches_for_its_maximum():
    config = TrainConfig(data="d", num_workers="1-4", batch_size=8).validate()
    assert (config.min_workers, config.max_workers, config.elastic) == (1, 4, True)
    with pytest.raises(UsageError, match=r"at least 2 per worker \(8\); got 6"):
        TrainConfig(data="d", num_workers="1-4", batch_size=6).validate()


def test_a_worker_is_never_larger_than_the_largest_node():
    # Three 2-CPU nodes: one worker sized from the total (5 CPUs) would fit on none of them.
    assert cpus_per_worker(6, 1) == 5.0
    assert cpus_per_worker(6, 1, largest_node=2) == 2.0
    assert cpus_per_worker(6, 2, largest_node=2) == 2.0
    assert cpus_per_worker(2, 2, largest_node=2) == 0.5  # one node: unchanged


def test_a_run_waiting_too_long_for_its_workers_fails_and_a_running_one_does_not():
    wait = ResourceWait(0.2, "--resource-timeout: waited")
    wait.after_controller_state_update(None, RestartingState(training_failed_error=None))
    time.sleep(0.3)
    wait.after_controller_state_update(None, RunningState())  # running again: the clock stops
    wait.after_controller_state_update(None, RestartingState(training_failed_error=None))
    wait.after_controller_state_update(None, RestartingState(training_failed_error=None))
    time.sleep(0.3)
    with pytest.raises(ResourceTimeoutError, match="--resource-timeout: waited"):
        wait.after_controller_state_update(None, RestartingState(training_failed_error=None))

"""The live console: progress events from other processes reach the driver in order, and become one row each."""

from __future__ import annotations

import io
import time

import pytest
import ray

from tl_ray import progress
from tl_ray.cli.console import EPOCH_HEADER, TRIAL_HEADER, Console, duration


def _epoch(epoch: int, val_acc: float, seconds: float, best: float, best_epoch: int) -> progress.Epoch:
    metrics = {
        "epoch": epoch,
        "best_val_acc": best,
        "best_epoch": best_epoch,
        "train_loss": 1.0 / epoch,
        "train_acc": 0.5,
        "val_loss": 0.9,
        "val_acc": val_acc,
        "images_per_s": 100.0,
        "epoch_s": seconds,
    }
    return progress.Epoch(metrics, epochs=4)


def test_epochs_become_one_row_each_with_the_best_starred_and_an_eta():
    out, err = io.StringIO(), io.StringIO()
    console = Console(out=out, err=err)
    console(progress.Task("decoding images into the cache", 5, 10))
    console(progress.Step(1, 4, 3, 8))
    for event in (_epoch(1, 0.5, 30.0, 0.5, 1), _epoch(2, 0.7, 10.0, 0.7, 2), _epoch(3, 0.6, 12.0, 0.7, 2)):
        console(event)
    console.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == EPOCH_HEADER and len(lines) == 4
    assert [line.split()[4] for line in lines[1:]] == ["0.500*", "0.700*", "0.600"]
    # ETA from the epochs after the first (which carries the warm-up): 10 s, then 11 s per epoch left.
    assert [line.split()[-1] for line in lines[1:]] == ["1m30s", "20.0s", "11.0s"]
    assert err.getvalue() == ""  # not a terminal: no progress bars in logs
    assert console.rows == 3


def test_a_tie_on_the_monitor_is_starred_only_when_it_is_the_best_epoch():
    """Epoch 2 ties epoch 1 on val_acc but has the worse val_loss: the best epoch is still 1, so no star."""
    out = io.StringIO()
    console = Console(out=out, err=io.StringIO())
    for event in (_epoch(1, 0.25, 3.0, 0.25, 1), _epoch(2, 0.25, 1.0, 0.25, 1), _epoch(3, 0.25, 1.0, 0.25, 3)):
        console(event)
    console.close()
    assert [line.split()[4] for line in out.getvalue().splitlines()[1:]] == ["0.250*", "0.250", "0.250*"]


def test_finished_trials_become_rows_with_their_best_epoch():
    out = io.StringIO()
    console = Console(trials=3, max_epochs=4, out=out, err=io.StringIO())
    point = {"freeze_depth": 3, "strategy": "discriminative", "lr": 0.001}
    console(progress.TrialEpoch("a_00000", point, {"epoch": 1, "val_acc": 0.61, "epoch_s": 2.0}))
    best = {"epoch": 2, "val_acc": 0.75, "val_loss": 0.8123}
    console(progress.TrialEnd("a_00000", point, "stopped early", 2, best))
    console(progress.TrialEnd("a_00001", {"freeze_depth": 0, "strategy": "plain", "lr": 3e-3, "weights": "none"},
                              "error", 0, {}, "worker died"))  # fmt: skip
    lines = out.getvalue().splitlines()
    assert lines[0] == TRIAL_HEADER
    assert lines[1].split() == ["a_00000", "3", "discriminative", "1.00e-03", "2/4", "0.750", "0.8123",
                                lines[1].split()[7], "stopped", "early"]  # fmt: skip
    assert lines[2].split()[:7] == ["a_00001", "0", "scratch", "3.00e-03", "0/4", "-", "-"]
    assert lines[2].endswith("error: worker died")


@pytest.mark.parametrize(("seconds", "text"), [(4.25, "4.2s"), (65, "1m05s"), (3725, "1h02m"), (float("nan"), "?")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def _a_run_that_reports() -> ray.remote_function.RemoteFunction:
    """What rank 0 does, as a Ray task: paced step updates, then the epoch's metrics. (Defined in a function so
    that Ray ships it by value: workers cannot import test modules.)"""

    @ray.remote(num_cpus=0)
    def report(events, steps: int) -> None:
        from tl_ray import progress

        pacer = progress.StepPacer(events, 1, 1, steps)
        for done in range(1, steps + 1):
            pacer.step(done)
            time.sleep(0.01)
        progress.send(events, progress.Epoch({"epoch": 1}, 1))

    return report


def test_events_from_a_ray_worker_reach_the_driver_in_order_and_steps_are_paced(ray_cluster):
    received = []
    with progress.relay(received.append) as events:
        ray.get(_a_run_that_reports().remote(events, 50))
    steps = [event for event in received if isinstance(event, progress.Step)]
    assert isinstance(received[-1], progress.Epoch) and received[-1].metrics["epoch"] == 1
    # 50 steps in ~0.5 s at two updates a second: a few updates, never one per step; the last always sent.
    assert 1 <= len(steps) <= 5 and steps[-1].step == 50
    assert [event.step for event in steps] == sorted(event.step for event in steps)


def test_without_a_listener_nothing_is_sent_and_a_failing_listener_does_not_stop_the_run(ray_cluster):
    with progress.relay(None) as events:
        assert events is None
        progress.send(events, _epoch(1, 0.5, 1.0, 0.5, 1))  # a no-op
    calls = []

    def failing(event):
        calls.append(event)
        raise ValueError("a broken console")

    with progress.relay(failing) as events:
        ray.get(_a_run_that_reports().remote(events, 2))
    assert len(calls) >= 2  # it kept draining after the first failure

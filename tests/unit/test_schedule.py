"""The learning-rate schedule (tl_ray.training.schedule): steps an epoch as each worker takes them, warm-up then
cosine decay in each phase, and the planned curve a resized worker group follows."""

from __future__ import annotations

import itertools

import pytest

from tl_ray.training.config import TrainConfig
from tl_ray.training.schedule import lr_factor, planned_position, steps_per_epoch


def resolved(**options) -> TrainConfig:
    return TrainConfig(data="d", **options).validate()


def _curve(num_train: int, batch: int, worlds_per_epoch: list[int], planned_world: int) -> list[tuple[float, float]]:
    """(epoch progress, LR factor) after every step of a run whose worker count changes between epochs."""
    planned = steps_per_epoch(num_train, batch, planned_world)
    epochs = len(worlds_per_epoch)
    points = []
    for epoch, world in enumerate(worlds_per_epoch, start=1):
        now = steps_per_epoch(num_train, batch, world)
        for stepped in range(1, now + 1):
            position = planned_position(epoch, stepped, now, planned)
            points.append((epoch - 1 + stepped / now, lr_factor(position, planned, epochs, 0.5)))
    return points


def schedule(steps: int, epochs: int, warmup_epochs: float, head_epochs: int = 0) -> list[float]:
    return [lr_factor(step, steps, epochs, warmup_epochs, head_epochs) for step in range(steps * epochs)]


def test_one_epoch_run_warms_up_for_its_first_twentieth_only():
    config = resolved(epochs=1, weights="none")
    assert config.warmup_epochs == pytest.approx(0.05)
    factors = schedule(100, 1, config.warmup_epochs)
    peak = max(range(100), key=factors.__getitem__)
    assert peak == 5, "warm-up takes 5% of the steps, then the peak"
    assert factors[0] < 0.2 and factors[peak] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(factors[: peak + 1]))
    assert all(a >= b for a, b in itertools.pairwise(factors[peak:]))
    assert 0 < factors[-1] < 0.01, "decays towards zero at the last step, and not before"
    assert sum(factors) / len(factors) > 0.45, "most of a one-epoch run trains near its peak rate, not in warm-up"


def test_warm_up_never_exceeds_one_epoch():
    assert resolved(epochs=50, weights="none").warmup_epochs == 1.0
    assert resolved(epochs=10, weights="none").warmup_epochs == pytest.approx(0.5)


def test_probe_schedule_warms_up_and_decays_in_each_phase():
    factors = schedule(10, 5, 0.5, head_epochs=1)
    head, rest = factors[:10], factors[10:]
    assert head[-1] < 0.05 and max(head) == pytest.approx(1.0)
    assert rest[0] < 0.5 and max(rest) == pytest.approx(1.0), "the unfrozen backbone starts gently again"
    assert 0 < rest[-1] < 0.01


@pytest.mark.parametrize(
    ("num_train", "batch_size", "world", "steps"),
    [(100, 32, 1, 4), (97, 32, 1, 3), (65, 32, 1, 2), (66, 32, 1, 3), (100, 32, 2, 4), (100, 32, 8, 3), (33, 32, 1, 1)],
)
def test_steps_per_epoch_is_what_each_worker_runs(num_train, batch_size, world, steps):
    """Each worker gets num_train // world images in batches of batch_size // world, a last batch of one skipped."""
    shard, worker_batch = num_train // world, batch_size // world
    taken = sum(1 for start in range(0, shard, worker_batch) if min(worker_batch, shard - start) >= 2)
    assert steps_per_epoch(num_train, batch_size, world) == taken == steps


def test_a_resized_worker_group_follows_the_planned_lr_curve():
    fixed = dict(_curve(600, 16, [2, 2, 2, 2], planned_world=2))
    resized = _curve(600, 16, [2, 1, 3, 2], planned_world=2)
    # Wherever both runs reach the same share of the run, the learning rate is the same.
    common = [(progress, factor) for progress, factor in resized if progress in fixed]
    assert len(common) >= 4 * 18
    assert all(factor == pytest.approx(fixed[progress]) for progress, factor in common)
    # Every epoch ends where the planned curve puts the end of that epoch, and the run ends at zero.
    ends = [factor for progress, factor in resized if progress.is_integer()]
    assert ends == pytest.approx([fixed[float(epoch)] for epoch in range(1, 5)])
    assert ends[-1] == pytest.approx(0.0, abs=1e-9)

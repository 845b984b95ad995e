"""The LR range test (tl_ray.training.lr_range): fastai's rates, smoothing, divergence stop and valley rule, on a
real model and optimizer in this process (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tl_ray.training import lr_range


def test_rates_grow_exponentially_from_start_to_end():
    test = lr_range.RangeTest(steps=100, start_lr=1e-7, end_lr=10.0)
    assert test.lr_at(0) == pytest.approx(1e-7)
    assert test.lr_at(50) == pytest.approx(math.sqrt(1e-7 * 10.0))
    assert test.lr_at(100) == pytest.approx(10.0)
    ratios = [test.lr_at(step + 1) / test.lr_at(step) for step in range(99)]
    assert max(ratios) == pytest.approx(min(ratios))


def test_valley_is_two_thirds_down_the_longest_descent():
    # Flat, then a 31-point descent (indices 10-40), then a rise: the valley rule's point is 2/3 along it.
    losses = [2.0] * 10 + [2.0 - 0.05 * i for i in range(1, 32)] + [0.5 + 0.3 * i for i in range(10)]
    # fastai's arithmetic: the descent ends at 40 and is 32 long with the flat point before it, so it "starts" at
    # 8; 8 + int(32 / 3) + int(32 / 6) = 23.
    assert lr_range.valley(losses) == 23


def test_suggestion_skips_the_first_tenth_and_the_last_points_and_stops_at_a_nan():
    lrs = [1e-7 * 1.2**i for i in range(60)]
    # A descent early on (indices 0-9, left out as fastai leaves out the first tenth of 100 steps), a long one
    # from 12 to 40, then NaN: the suggestion must come from the long descent before the NaN.
    losses = [5.0 - 0.3 * i for i in range(10)] + [3.0, 3.0] + [3.0 - 0.05 * i for i in range(29)]
    losses += [float("nan")] * (60 - len(losses))
    suggestion, index = lr_range.suggest(lrs, losses, steps=100)
    assert 12 <= index <= 40 and suggestion == lrs[index]
    assert math.isfinite(losses[index])


def test_a_curve_too_short_to_trim_is_used_whole():
    lrs, losses = [1e-3, 1e-2, 1e-1, 1.0], [1.0, 0.8, 0.6, 9.0]
    suggestion, index = lr_range.suggest(lrs, losses, steps=100)
    assert index in (0, 1, 2) and suggestion == lrs[index]
    with pytest.raises(ValueError):
        lr_range.suggest([], [], steps=100)


def _problem(seed: int = 0):
    """A separable 3-class problem and a small net with BatchNorm, as the worker's loop would see it."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 8, generator=generator) * 3
    labels = torch.arange(96) % 3
    features = centres[labels] + torch.randn(96, 8, generator=generator)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def batches(epoch: int):
        order = torch.randperm(96, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, 96, 16):
            rows = order[start : start + 16]
            yield {"features": features[rows], "label": labels[rows]}

    return net, batches


def _run(net, batches, test, **kwargs):
    optimizer = torch.optim.SGD([{"params": list(net.parameters()), "lr": 1.0}], **kwargs)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return lr_range.run(
        net,
        batches,
        lambda batch: batch["features"],
        nn.CrossEntropyLoss(),
        optimizer,
        scaler,
        None,
        torch.device("cpu"),
        test,
        lambda loss_sum, images: loss_sum / images,
    ), optimizer


@pytest.mark.slow  # trains the toy problem three times
def test_the_test_stops_when_the_loss_diverges_and_suggests_a_rate_that_trains():
    torch.manual_seed(0)
    net, batches = _problem()
    curve, _ = _run(net, batches, lr_range.RangeTest(steps=100, start_lr=1e-5, end_lr=100.0), momentum=0.9)
    assert curve.stopped == "diverged" and len(curve.lrs) < 100
    # fastai's stop: the last smoothed loss is above 4x the lowest (or not finite).
    assert not math.isfinite(curve.losses[-1]) or curve.losses[-1] > 4 * min(curve.losses)
    assert curve.lrs == [pytest.approx(lr_range.RangeTest(100, 1e-5, 100.0).lr_at(i)) for i in range(len(curve.lrs))]
    assert curve.suggestion == curve.lrs[curve.suggestion_index]
    # The suggestion lies where the loss was falling, well below the rate it diverged at.
    assert 1e-4 < curve.suggestion < curve.lrs[-1] / 3

    # And it trains: a fresh net at the suggested rate learns the problem in a few epochs; one at the rate the
    # test diverged at does worse.
    def accuracy_after(lr: float) -> float:
        torch.manual_seed(1)
        model, data = _problem()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        for epoch in range(1, 6):
            for batch in data(epoch):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(batch["features"]), batch["label"]).backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            batch = next(data(99))
            return (model(batch["features"]).argmax(1) == batch["label"]).float().mean().item()

    assert accuracy_after(curve.suggestion) >= 0.9
    assert accuracy_after(curve.suggestion) > accuracy_after(curve.lrs[-1])


def test_the_smoothed_loss_is_fastais_debiased_average():
    torch.manual_seed(0)
    net, batches = _problem()
    raw: list[float] = []
    groups = [{"params": list(net.parameters()), "lr": 1.0}]
    optimizer = torch.optim.SGD(groups)

    def record(loss_sum: float, images: int) -> float:
        raw.append(loss_sum / images)
        return raw[-1]

    curve = lr_range.run(
        net, batches, lambda b: b["features"], nn.CrossEntropyLoss(), optimizer,
        torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"),
        lr_range.RangeTest(steps=10, start_lr=1e-6, end_lr=1e-5), record,
    )  # fmt: skip
    assert curve.stopped == "steps" and len(curve.lrs) == 10
    average = 0.0
    for step, value in enumerate(raw):
        average = 0.98 * average + 0.02 * value
        assert curve.losses[step] == pytest.approx(average / (1 - 0.98 ** (step + 1)))
    # Steps cross epochs (16-image batches of 96: 6 an epoch): 10 steps took two.
    assert len(raw) == 10


def test_group_shares_are_kept_and_a_set_without_a_usable_batch_is_refused():
    torch.manual_seed(0)
    net, batches = _problem()
    head, body = list(net[3].parameters()), [p for m in list(net)[:3] for p in m.parameters()]
    optimizer = torch.optim.SGD([{"params": head, "lr": 1.0}, {"params": body, "lr": 0.1}])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    test = lr_range.RangeTest(steps=8, start_lr=1e-4, end_lr=1e-2)
    lr_range.run(net, batches, lambda b: b["features"], nn.CrossEntropyLoss(), optimizer, scaler, None,
                 torch.device("cpu"), test, lambda s, n: s / n)  # fmt: skip
    # The backbone's group kept its tenth of the head's rate at the last step.
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * optimizer.param_groups[0]["lr"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(test.lr_at(7))

    def single_images(epoch: int):
        yield {"features": torch.zeros(1, 8), "label": torch.zeros(1, dtype=torch.long)}

    with pytest.raises(ValueError, match="no batch of two"):
        lr_range.run(net, single_images, lambda b: b["features"], nn.CrossEntropyLoss(), optimizer, scaler, None,
                     torch.device("cpu"), test, lambda s, n: s / n)  # fmt: skip


def test_the_curve_round_trips_through_json():
    curve = lr_range.LrCurve([1e-5, 1e-4], [1.0, 0.5], 1e-4, 1, "steps", 2)
    assert lr_range.LrCurve.from_json(curve.to_json()) == curve

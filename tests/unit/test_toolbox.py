"""The fine-tuning toolbox's maths (tl_ray.training.toolbox): the EMA and its warm-up, gradient accumulation through
the epoch loop, MixUp/CutMix targets and the soft-target loss, layer-wise LR decay, patience; the options' checks;
what a checkpoint records and restores of them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from tl_ray import model, progress
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs.plan import WorkerBatches
from tl_ray.training import ema, mixing, schedule, toolbox
from tl_ray.training.config import TrainConfig
from tl_ray.training.loop import EpochLoop
from tl_ray.training.state import RunMeta, RunState, check_resumable, load_run_state, save_run_state, strategy_meta

CPU = torch.device("cpu")


def _config(**changes) -> TrainConfig:
    return TrainConfig(data="/d", name="run", **changes).validate()


# --ema --------------------------------------------------------------------------------------------------------------


def test_ema_decay_warms_up_as_timms_model_ema_v3():
    """timm's ModelEmaV3.get_decay(step) with use_warmup: step' = step - 1; 0 if step' <= 0, else
    min(decay, 1 - (1 + step') ** -power) (power 3/4 here)."""
    assert toolbox.ema_decay(0.999, 1) == 0.0  # the first update copies the weights
    assert toolbox.ema_decay(0.999, 2) == pytest.approx(1 - 2**-0.75)  # 0.405
    assert toolbox.ema_decay(0.999, 11) == pytest.approx(1 - 11**-0.75)  # 0.834
    assert toolbox.ema_decay(0.999, 10_000) == pytest.approx(0.999)  # 1 - 10000 ** -0.75 = 0.999
    assert toolbox.ema_decay(0.999, 1_000_000) == 0.999  # capped at --ema
    decays = [toolbox.ema_decay(0.99, step) for step in range(1, 1000)]
    assert decays == sorted(decays) and max(decays) == 0.99


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def test_ema_averages_weights_and_batchnorm_statistics_and_copies_the_batch_count():
    net = _bn_net()
    net.eval()(torch.randn(2, 3, 6, 6))  # materialise the lazy layer (in eval mode: BatchNorm does not count it)
    average = ema.WeightEma(net, 0.9)
    expected = {key: value.clone().float() for key, value in net.state_dict().items()}
    for update in range(1, 6):
        net.train()
        net(torch.randn(4, 3, 6, 6))  # moves BatchNorm's running statistics and batch count
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param))
        average.update(net)
        decay = toolbox.ema_decay(0.9, update)
        for key, value in net.state_dict().items():
            if value.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * value
            else:
                expected[key] = value.clone()
    averaged = average.net.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key].to(value.dtype), value, rtol=1e-5, atol=1e-6)
    assert averaged["1.num_batches_tracked"] == 5
    assert not any(param.requires_grad for param in average.net.parameters())
    assert average.updates == 5


# --accumulate -------------------------------------------------------------------------------------------------------


class _ListBatches(WorkerBatches):
    """Fixed batches of features, in a fixed order: the loop's input without a pipeline."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, worker_batch: int) -> None:
        self.inputs, self.labels, self.worker_batch = inputs, labels, worker_batch
        self.device, self.world, self.rank = CPU, 1, 0

    def train(self, epoch: int):
        for start in range(0, len(self.labels), self.worker_batch):
            yield {
                "x": self.inputs[start : start + self.worker_batch],
                "label": self.labels[start : start + self.worker_batch],
            }

    def model_input(self, batch) -> torch.Tensor:
        return batch["x"]


def _trained_weights(batch: int, accumulate: int, count: int, ema: float | None = None) -> tuple[nn.Module, RunState]:
    """A tiny model trained for one epoch of ``count`` samples by the epoch loop, at ``batch`` x ``accumulate``."""
    torch.manual_seed(1)
    inputs, labels = torch.randn(count, 6), torch.randint(0, 3, (count,))
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    options = _config(
        optimizer="sgd",
        momentum=0.0,
        weight_decay=0.0,
        lr=0.5,
        epochs=1,
        warmup_epochs=0.0,
        batch_size=batch,
        accumulate=accumulate,
        ema=ema,
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    steps = schedule.steps_per_epoch(count, batch, 1, accumulate)
    state = RunState.start(net, optimizer, options, steps, CPU, None)
    holder = nn.Module()  # the loop's EMA follows ``transfer.net``
    holder.net = net
    loop = EpochLoop(
        options,
        holder,
        net,
        _ListBatches(inputs, labels, batch),
        steps,
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(),
        None,
        3,
        wrapped=net,
        batches_now=schedule.steps_per_epoch(count, batch, 1),
    )
    loop._train_epoch(state, 1, progress.StepPacer(None, 1, 1, steps))
    return net, state


@pytest.mark.parametrize("count", [16, 20])  # 20: the epoch's last group is one batch of 4
def test_accumulated_steps_equal_the_larger_batchs_within_float_rounding(count):
    """4 x 2 accumulated gives the weights batches of 8 give (SGD, no momentum: any gradient difference would
    show): tolerance 1e-6, float32 summation order."""
    accumulated, state = _trained_weights(4, 2, count)
    larger, larger_state = _trained_weights(8, 1, count)
    assert state.curve.position == larger_state.curve.position == schedule.steps_per_epoch(count, 8, 1)
    for mine, theirs in zip(accumulated.parameters(), larger.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    single, _ = _trained_weights(4, 1, count)  # and without accumulation it would differ
    assert not torch.allclose(next(single.parameters()), next(accumulated.parameters()), atol=1e-4)


def test_accumulation_groups_and_steps():
    assert [toolbox.group_size(index, 5, 2) for index in range(5)] == [2, 2, 2, 2, 1]
    assert [toolbox.group_size(index, 6, 3) for index in range(6)] == [3] * 6
    assert schedule.steps_per_epoch(100, 10, 1, 3) == 4  # 10 batches: 3 + 3 + 3 + 1
    assert schedule.steps_per_epoch(100, 10, 2, 1) == 10  # two workers, 5-image batches each
    assert schedule.steps_per_epoch(100, 10, 1) == 10


def test_the_ema_moves_once_an_optimizer_step():
    _, state = _trained_weights(4, 2, 20, ema=0.99)
    assert state.ema is not None and state.ema.updates == 3  # 5 batches, 2 to a step: 3 steps


# --mixup, --cutmix -------------------------------------------------------------------------------------------------


def _constant_images(count: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i + 1 (so every pixel says which image it came from); label i is i % 3."""
    images = torch.arange(1, count + 1, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 3, size, size)
    return images.contiguous(), torch.arange(count) % 3


def test_mixup_blends_each_image_with_the_one_before_and_its_label_by_the_same_share():
    torch.manual_seed(0)
    images, labels = _constant_images(4)
    mixed, targets = mixing.Mixer(0.4, 0.0, 1.0, 3)(images, labels, 1, 0, 0)
    assert targets.sum(1).tolist() == pytest.approx([1.0] * 4)
    for i in range(4):
        previous = (i - 1) % 4
        lam = (mixed[i, 0, 0, 0] - (previous + 1)) / ((i + 1) - (previous + 1))
        assert torch.allclose(mixed[i], torch.full_like(mixed[i], float(mixed[i, 0, 0, 0])))
        expected = torch.zeros(3)
        expected[labels[i]] += lam
        expected[labels[previous]] += 1 - lam
        torch.testing.assert_close(targets[i], expected, rtol=1e-5, atol=1e-5)


def test_cutmix_labels_are_the_pasted_boxs_exact_area():
    torch.manual_seed(3)
    images, labels = _constant_images(4, size=16)
    for index in range(5):
        mixed, targets = mixing.Mixer(0.0, 1.0, 1.0, 3)(images, labels, 1, 0, index)
        for i in range(4):
            previous = (i - 1) % 4
            pasted = (mixed[i, 0] == previous + 1).float().mean()
            expected = torch.zeros(3)
            expected[labels[i]] += 1 - pasted
            expected[labels[previous]] += pasted
            torch.testing.assert_close(targets[i], expected, rtol=1e-5, atol=1e-5)


def test_mix_prob_zero_leaves_the_batch_alone_with_one_hot_targets():
    images, labels = _constant_images(4)
    same, targets = mixing.Mixer(0.4, 1.0, 0.0, 3)(images, labels, 1, 0, 0)
    assert torch.equal(same, images)
    assert torch.equal(targets, nn.functional.one_hot(labels, 3).float())
    assert torch.equal(mixing.dominant_labels(targets), labels)


def test_a_batchs_mix_depends_on_the_seed_and_its_place_alone():
    """A resumed run meets its batches with another history of draws behind it: each mix must come out the same."""
    images, labels = _constant_images(8, size=16)
    uninterrupted = mixing.Mixer(0.4, 1.0, 0.8, 3, seed=7)
    first = [uninterrupted(images, labels, epoch, 1, index) for epoch in (1, 2) for index in range(6)]
    resumed = mixing.Mixer(0.4, 1.0, 0.8, 3, seed=7)
    torch.manual_seed(12345)  # another process, another global generator state
    torch.rand(100)
    again = [resumed(images, labels, 2, 1, index) for index in range(6)]
    for (mixed, targets), (mixed_again, targets_again) in zip(first[6:], again, strict=True):
        assert torch.equal(mixed, mixed_again) and torch.equal(targets, targets_again)
    # the draws differ from batch to batch, and with the seed and the worker
    assert len({tuple(targets[:, 0].tolist()) for _, targets in first}) > 6
    epoch_two = torch.stack([targets for _, targets in first[6:]])
    other_seed = torch.stack([mixing.Mixer(0.4, 1.0, 0.8, 3, seed=8)(images, labels, 2, 1, i)[1] for i in range(6)])
    other_rank = torch.stack([uninterrupted(images, labels, 2, 0, i)[1] for i in range(6)])
    assert not torch.equal(other_seed, epoch_two) and not torch.equal(other_rank, epoch_two)
    # and they leave the global generator where it was: dropout's draws do not depend on whether a batch mixed
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    uninterrupted(images, labels, 3, 0, 0)
    assert torch.equal(torch.rand(3), expected)


def test_soft_target_loss_is_cross_entropy_on_hard_labels_with_weights_and_smoothing():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    weight = torch.tensor([0.5, 1.0, 2.0])
    for smoothing in (0.0, 0.1):
        expected = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)(logits, labels)
        soft = mixing.SoftTargetLoss(weight, smoothing)
        torch.testing.assert_close(soft(logits, labels), expected)
        torch.testing.assert_close(soft(logits, nn.functional.one_hot(labels, 3).float()), expected)


def test_soft_target_loss_weighs_a_mixed_image_by_its_classes_shares():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    targets = torch.tensor([[0.7, 0.3, 0.0]])
    weight = torch.tensor([1.0, 3.0, 1.0])
    log_p = torch.log_softmax(logits, 1)[0]
    smoothed = targets[0] * 0.9 + 0.1 / 3
    expected = -(smoothed * weight * log_p).sum() / (0.7 * 1.0 + 0.3 * 3.0)
    torch.testing.assert_close(mixing.SoftTargetLoss(weight, 0.1)(logits, targets), expected)


# --layer-decay -----------------------------------------------------------------------------------------------------


def _multipliers(decay: float, backbone_lr_mult: float, depth: int) -> dict[str, float] | None:
    config = _config(layer_decay=decay, backbone_lr_mult=backbone_lr_mult, freeze_depth=depth, weights="none")
    return toolbox.layer_multipliers(config)


def test_layer_decay_multipliers_head_one_then_powers_down_the_stages():
    assert _multipliers(0.5, 1.0, 0) == {
        "head": 1.0,
        "stage5": 0.5,
        "stage4": 0.25,
        "stage3": 0.125,
        "stage2": 0.0625,
        "stage1": 0.03125,
    }
    assert _multipliers(0.5, 0.1, 3) == pytest.approx({"head": 1.0, "stage5": 0.05, "stage4": 0.025})
    assert _multipliers(0.5, 1.0, 5) == {"head": 1.0}


def test_layer_decay_gives_each_unfrozen_stage_its_own_groups_at_its_rate():
    net = model.create_model("resnet18", 3, 32)
    transfer = model.TransferModel(net, 2)
    groups = transfer.parameter_groups(0.01, 0.05, 1.0, _multipliers(0.5, 1.0, 2))
    rates = {group["name"]: group["lr"] for group in groups}
    assert rates == pytest.approx(
        {
            "head": 0.01,
            "head_no_decay": 0.01,
            "stage5": 0.005,
            "stage5_no_decay": 0.005,
            "stage4": 0.0025,
            "stage4_no_decay": 0.0025,
            "stage3": 0.00125,
            "stage3_no_decay": 0.00125,
        }
    )
    grouped = [param for group in groups for param in group["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(transfer.trainable_parameters())
    plain = transfer.parameter_groups(0.01, 0.05, 1.0)
    assert [group["name"] for group in plain] == ["head", "head_no_decay", "backbone", "backbone_no_decay"]


# --patience --------------------------------------------------------------------------------------------------------


def _history(values: list[float], key: str = "val_acc") -> list[dict]:
    return [{"epoch": epoch, key: value} for epoch, value in enumerate(values, 1)]


def test_patience_stops_after_n_epochs_without_a_better_value():
    assert toolbox.patience_reason(_history([0.5, 0.6, 0.6, 0.55]), "val_acc", 2) == (
        "--patience 2: no better val_acc than 0.6000 (epoch 2) in the 2 epochs since"
    )
    assert toolbox.patience_reason(_history([0.5, 0.6, 0.6, 0.61]), "val_acc", 2) is None
    assert toolbox.patience_reason(_history([0.5, 0.6]), "val_acc", 2) is None  # not yet N epochs after any
    assert toolbox.patience_reason(_history([0.5, 0.4, 0.3]), "val_acc", None) is None
    losses = _history([1.0, 0.8, 0.9, 0.85], "val_loss")  # val_loss improves downwards
    assert toolbox.patience_reason(losses, "val_loss", 2).startswith("--patience 2: no better val_loss than 0.8000")
    assert toolbox.patience_reason(_history([1.0, 0.8, 0.9, 0.7], "val_loss"), "val_loss", 2) is None


# The options ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ema": 1.5}, "--ema must be between 0.0 and 1.0; got 1.5"),
        ({"ema": 1.0}, "--ema is a decay between 0 and 1, exclusive"),
        ({"mixup": -1.0}, "--mixup must be between 0.0 and 100.0; got -1.0"),
        ({"accumulate": 0}, "--accumulate must be positive; got 0"),
        ({"layer_decay": 0.0}, "--layer-decay must be positive; got 0.0"),
        ({"patience": 0}, "--patience must be positive; got 0"),
        ({"mix_prob": 1.5}, "--mix-prob must be between 0 and 1; got 1.5"),
        ({"mixup": 0.2}, "--mixup mixes images, but at --freeze-depth 5 with --augment none and the cache on"),
        ({"cutmix": 1.0, "freeze_depth": 5}, "--cutmix mixes images"),
    ],
)
def test_bad_toolbox_options_are_one_line_naming_the_option(changes, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("+", r"\+")) as raised:
        _config(**changes)
    assert "\n" not in str(raised.value)


def test_mixing_is_taken_where_images_reach_the_model():
    _config(mixup=0.2, freeze_depth=3)
    _config(mixup=0.2, augment="light")  # depth 5 on images through the frozen backbone
    _config(cutmix=1.0, cache="none")


def test_strategy_meta_records_the_toolbox_only_when_used_and_patience_may_change_on_resume():
    plain = _config()
    assert not {"ema", "accumulate", "mixing", "layer_decay", "patience", "compile"} & set(strategy_meta(plain))
    used = _config(ema=0.999, accumulate=4, mixup=0.2, freeze_depth=0, layer_decay=0.75, patience=3)
    recorded = strategy_meta(used)
    assert recorded["ema"] == {"decay": 0.999, "warmup_power": 0.75}
    assert recorded["accumulate"] == 4 and recorded["patience"] == 3
    assert recorded["mixing"] == {"mixup": 0.2, "cutmix": 0.0, "mix_prob": 1.0}
    assert recorded["layer_decay"]["lr_mult"]["stage5"] == 0.75 and recorded["layer_decay"]["lr_mult"]["head"] == 1.0
    meta = {"arch": used.arch, "freeze_depth": 0, "class_names": ["a", "b"], "strategy": recorded, "monitor": "val_acc"}
    check_resumable(meta, dataclasses.replace(used, patience=None, compile=True), ["a", "b"], None)
    with pytest.raises(TlRayError, match="was started with strategy="):
        check_resumable(meta, dataclasses.replace(used, ema=0.99), ["a", "b"], None)


def test_an_ema_checkpoint_saves_the_average_as_the_model_and_resumes_both(tmp_path):
    options = _config(weights="none", arch="resnet18", image_size=32, ema=0.9, accumulate=2, epochs=3)
    meta = RunMeta(options, ["a", "b"], None, 36, [0.5] * 3, [0.2] * 3, "none")

    def fresh() -> RunState:  # a small model stands for the run's: the round trip is the state's
        net = _bn_net()
        net.eval()(torch.randn(2, 3, 6, 6))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        return RunState.start(net, optimizer, options, 4, CPU, None, meta=meta)

    state = fresh()
    with torch.no_grad():
        for param in state.net.parameters():
            param.add_(1.0)
    state.ema.update(state.net)
    state.ema.update(state.net)
    with torch.no_grad():
        for param in state.net.parameters():
            param.add_(1.0)
    state.epoch, state.stopped_early = 1, "--patience 1: ..."
    save_run_state(tmp_path, state)
    saved_model = torch.load(tmp_path / "model.pt", weights_only=True)
    for key, value in state.ema.net.state_dict().items():
        assert torch.equal(saved_model[key], value)
    resumed = fresh()
    load_run_state(tmp_path, resumed)
    for mine, theirs in zip(resumed.net.state_dict().values(), state.net.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(resumed.ema.net.state_dict().values(), state.ema.net.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    assert resumed.ema.updates == 2 and resumed.stopped_early == "--patience 1: ..."


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ema", "1.5"], "tl-ray: error: --ema must be between 0.0 and 1.0; got 1.5"),
        (["--mixup", "-1"], "tl-ray: error: --mixup must be between 0.0 and 100.0; got -1.0"),
        (["--accumulate", "0"], "tl-ray: error: --accumulate must be positive; got 0"),
        (["--layer-decay", "0"], "tl-ray: error: --layer-decay must be positive; got 0.0"),
        (["--patience", "0"], "tl-ray: error: --patience must be positive; got 0"),
        # A one-class set: every train run refuses it at the listing (nothing to classify), --mixup's too.
        (["--mixup", "0.2", "--freeze-depth", "3"], "tl-ray: error: --data: "),
    ],
)
def test_bad_toolbox_flags_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    from PIL import Image

    from tl_ray import cli

    for split in ("train", "val"):  # a one-class set: the options' own checks come first, then this one
        folder = tmp_path / "data" / split / "only"
        folder.mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), (index * 90, 0, 0)).save(folder / f"{index}.png")
    storage = tmp_path / "runs"
    argv = ["train", "--data", str(tmp_path / "data"), "--weights", "none", "--storage", str(storage), *flags]
    assert cli.main([*argv, "--arch", "resnet18", "--cache", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not storage.exists() or not any(storage.iterdir())


def test_the_epoch_table_marks_rows_that_validated_the_average():
    from tl_ray.cli.console import epoch_row

    row = {
        "epoch": 2, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.4, "val_acc": 0.9, "images_per_s": 10.0,
        "epoch_s": 3.0, "best_epoch": 2,
    }  # fmt: skip
    assert epoch_row({**row, "validated": "ema"}, 3, 3.0).endswith("(ema)")
    assert not epoch_row({**row, "validated": "model"}, 3, 3.0).endswith(")")
    assert not epoch_row(row, 3, 3.0).endswith(")")  # a record from before --ema

"""The training recipe: defaults per start and optimizer, the LR schedule, fine-tuning strategies
(parameter groups, learning rates, probe-then-fine-tune, --no-train-bn) and the fair sweep grid.

Real torch on resnet18 at 32 px; no Ray (the loop's own use of these is covered by test_train/test_tune).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tl_ray import recipe
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import TlRayError
from tl_ray.model import STAGE_MODULES, TransferResNet, create_resnet
from tl_ray.training.config import TrainConfig
from tl_ray.training.schedule import make_optimizer, steps_per_epoch
from tl_ray.tuning.config import TuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def resolved(**options) -> TrainConfig:
    """Resolved for a training set large enough that a left-out --lr is the recipe's one rate."""
    return TrainConfig(data="d", **options).validate().for_training_set(recipe.SELECT_MAX_TRAIN + 1)


# ----------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    ("num_train", "workers", "batch", "steps"),
    [
        (25, 1, 25, 1),  # 5 images a class, 5 classes: the whole set, one step an epoch
        (50, 1, 32, 2),  # the 10 a class
        (150, 1, 32, 5),
        (100_000, 1, 32, 3125),
        (25, 16, 32, 1),  # at least two images a worker
        (1, 1, 2, 1),
    ],
)
def test_a_left_out_batch_size_follows_the_training_set(num_train, workers, batch, steps):
    config = TrainConfig(data="d", num_workers=workers).validate()
    assert config.batch_size is None  # not known before the training set is listed
    sized = config.for_training_set(num_train)
    assert sized.batch_size == recipe.batch_size(num_train, workers) == batch
    assert steps_per_epoch(num_train, sized.batch_size, workers) == steps
    assert TrainConfig(data="d", batch_size=64).validate().for_training_set(num_train).batch_size == 64


@pytest.mark.parametrize(
    ("num_train", "depth", "expected"),
    [
        (25, 0, "select"),
        (recipe.SELECT_MAX_TRAIN, 3, "select"),
        (recipe.SELECT_MAX_TRAIN + 1, 0, recipe.LR["adamw"]),
        (40, NUM_STAGES, "select"),
        (100_000, NUM_STAGES, recipe.HEAD_ONLY_LR["sgd"]),
    ],
)
def test_a_left_out_lr_is_select_on_a_small_training_set(num_train, depth, expected):
    config = TrainConfig(data="d", weights="imagenet", freeze_depth=depth).validate()
    assert config.lr is None  # like the batch, not known before the training set is listed
    sized = config.for_training_set(num_train)
    assert sized.lr == expected
    assert sized.recipe_lr() == (recipe.HEAD_ONLY_LR["sgd"] if depth == NUM_STAGES else recipe.LR["adamw"])
    given = TrainConfig(data="d", weights="imagenet", freeze_depth=depth, lr=0.2).validate()
    assert given.for_training_set(num_train).lr == 0.2, "a given --lr is never replaced"
    assert TrainConfig(data="d", lr="select").validate().for_training_set(100_000).lr == "select", "asked for: kept"


def test_select_tries_a_third_of_the_recipes_rate_it_and_three_times_it():
    assert recipe.lr_candidates(1e-3) == pytest.approx((1e-3 / 3, 1e-3, 3e-3))
    assert recipe.lr_candidates(recipe.HEAD_ONLY_LR["sgd"]) == pytest.approx((0.01, 0.03, 0.09))


def test_select_tries_two_rates_at_half_the_batch_too():
    def pairs(*args, **kwargs) -> list[tuple[str, int]]:
        return [(f"{rate:.3g}", batch) for rate, batch in recipe.select_candidates(*args, **kwargs)]

    thirds = ("0.000333", "0.001", "0.003")
    assert pairs(1e-3, 32) == [*((rate, 32) for rate in thirds), ("0.001", 16), ("0.003", 16)]
    assert pairs(recipe.HEAD_ONLY_LR["sgd"], 25)[3:] == [("0.03", 12), ("0.09", 12)]
    # Never below two images a worker: on 8 workers a batch of 16 has no half to try; on 4 it is 8.
    assert pairs(1e-3, 16, workers=8) == [(rate, 16) for rate in thirds]
    assert pairs(1e-3, 16, workers=4)[3:] == [("0.001", 8), ("0.003", 8)]


def test_commands_that_set_each_runs_rate_never_select():
    from tl_ray.training.config import LrFindConfig
    from tl_ray.tuning.config import TuneConfig

    for kind in (LrFindConfig, TuneConfig):
        sized = kind(data="d", weights="none").validate().for_training_set(25)
        assert sized.lr is None and sized.batch_size == 25, kind.__name__


def test_the_batch_plan_is_one_console_line():
    import io

    from tl_ray import progress
    from tl_ray.cli.console import Console

    out = io.StringIO()
    console = Console(out=out, err=io.StringIO())
    console(progress.batch_plan(25, 25, steps_per_epoch(25, 25, 1), chosen=True))
    console(progress.batch_plan(50, 16, steps_per_epoch(50, 16, 1), chosen=False))
    console(progress.batch_plan(100, 16, steps_per_epoch(100, 16, 1, accumulate=3), chosen=False, accumulate=3))
    console.close()
    assert out.getvalue().splitlines() == [
        "25 training images: batch 25 (from the training set's size), 1 step an epoch",
        "50 training images: batch 16, 4 steps an epoch",
        # 7 batches (6 of 16, the last of 4), in groups of 3: 3 optimizer steps, the last of one batch
        "100 training images: batch 16, 3 batches an optimizer step (48 images), 3 optimizer steps an epoch",
    ]


def test_print_config_counts_optimizer_steps_under_accumulate(tmp_path, capsys):
    from PIL import Image

    from tl_ray import cli

    for split, count in (("train", 30), ("val", 4)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / split / name / f"{index}.png")
    argv = ["train", "--data", str(tmp_path), "--weights", "none", "--lr", "1e-3", "--print-config"]
    assert cli.main([*argv, "--accumulate", "2"]) == 0
    printed = capsys.readouterr().out
    # 60 images -> batch 32 (recipe.BATCH_SIZE): 2 batches, one optimizer step of both
    assert "# batch_size: from the training set's size: 60 training images -> 32, 1 optimizer step an epoch" in printed
    assert "# accumulate: 2 batches an optimizer step: 32 x 2 images = 64 a step;" in printed
    assert cli.main([*argv, "--batch-size", "8"]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("# accumulate")]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_defaults_follow_the_optimizer(optimizer):
    config = resolved(optimizer=optimizer, weights="none")
    assert config.lr == recipe.LR[optimizer]
    assert config.weight_decay == recipe.WEIGHT_DECAY[optimizer]
    assert recipe.WEIGHT_DECAY["sgd"] <= 1e-4 < recipe.WEIGHT_DECAY["adamw"]  # SGD's decay is L2: far smaller
    head_only = resolved(optimizer=optimizer, weights="imagenet", freeze_depth=NUM_STAGES)
    assert head_only.lr == recipe.HEAD_ONLY_LR[optimizer] > config.lr, "a linear head alone takes a larger step"
    assert (config.optimizer, head_only.optimizer) == (optimizer, optimizer), "a named optimizer is kept"


@pytest.mark.parametrize("depth", range(NUM_STAGES + 1))
def test_auto_optimizer_is_sgd_for_a_head_alone_and_adamw_beyond_it(depth):
    config = resolved(weights="imagenet", freeze_depth=depth)
    expected = "sgd" if depth == NUM_STAGES else "adamw"
    assert config.optimizer == expected
    assert config.weight_decay == recipe.WEIGHT_DECAY[expected]
    assert config.lr == (recipe.HEAD_ONLY_LR["sgd"] if depth == NUM_STAGES else recipe.LR["adamw"])
    assert resolved(weights="imagenet", freeze_depth=depth, lr=0.5).optimizer == expected, "--lr alone keeps auto"


def test_defaults_follow_the_start():
    scratch = resolved(weights="none")
    assert (scratch.strategy, scratch.backbone_lr_mult, scratch.head_epochs, scratch.freeze_depth) == ("plain", 1, 0, 0)
    pretrained = resolved(weights="imagenet", freeze_depth=2)
    assert (pretrained.strategy, pretrained.backbone_lr_mult, pretrained.lr) == ("plain", 1, recipe.LR["adamw"])
    discriminative = resolved(weights="imagenet", freeze_depth=2, strategy="discriminative")
    assert discriminative.backbone_lr_mult == recipe.PRETRAINED_BACKBONE_LR_MULT < 1
    assert discriminative.lr == recipe.DISCRIMINATIVE_HEAD_LR["adamw"] > recipe.LR["adamw"]


def test_explicit_options_beat_the_recipe():
    config = resolved(weights="imagenet", freeze_depth=0, lr=0.2, weight_decay=0.0, backbone_lr_mult=0.5, epochs=4)
    assert (config.lr, config.weight_decay, config.backbone_lr_mult) == (0.2, 0.0, 0.5)
    assert resolved(strategy="probe", freeze_depth=0, head_epochs=3, epochs=4).head_epochs == 3


@pytest.mark.parametrize(("epochs", "head_epochs"), [(2, 1), (5, 1), (10, 2), (20, 4)])
def test_probe_trains_the_head_alone_for_a_fifth_of_the_run(epochs, head_epochs):
    config = resolved(strategy="probe", freeze_depth=0, epochs=epochs)
    assert config.head_epochs == head_epochs and config.backbone_lr_mult == recipe.PRETRAINED_BACKBONE_LR_MULT


def test_probe_at_depth_5_is_plain_feature_extraction_and_an_explicit_head_phase_there_is_an_error():
    assert resolved(strategy="probe", freeze_depth=NUM_STAGES).head_epochs == 0
    with pytest.raises(TlRayError, match="--head-epochs trains the head alone before unfreezing"):
        resolved(freeze_depth=NUM_STAGES, head_epochs=1)
    with pytest.raises(TlRayError, match="--head-epochs must be between 0 and 2"):
        resolved(freeze_depth=0, head_epochs=3, epochs=3)


def test_unknown_strategy_names_the_option():
    with pytest.raises(TlRayError, match="--strategy must be one of auto, plain, discriminative, probe; got 'lpft'"):
        resolved(strategy="lpft")


@pytest.mark.parametrize(
    ("size", "scale"), [(32, recipe.LIGHT_CROP_SCALE), (64, recipe.LIGHT_CROP_SCALE), (224, recipe.STANDARD_CROP_SCALE)]
)
def test_augmentation_strength_follows_the_image_size(size, scale):
    assert resolved(image_size=size, freeze_depth=3).crop_scale() == scale
    assert resolved(image_size=size, augment="standard").crop_scale() == recipe.STANDARD_CROP_SCALE
    assert resolved(image_size=size, augment="none").crop_scale() is None


def test_a_head_alone_trains_on_centre_crops_by_default_and_so_on_cached_features():
    head_only = resolved(weights="imagenet")  # feature extraction: freeze depth 5
    assert (head_only.freeze_depth, head_only.augment, head_only.crop_scale()) == (NUM_STAGES, "none", None)
    assert resolved(weights="imagenet", freeze_depth=NUM_STAGES, augment="light").augment == "light", "asked: kept"
    assert resolved(weights="imagenet", freeze_depth=4).augment == "auto"
    explicit = resolved(freeze_depth=NUM_STAGES, optimizer="sgd", strategy="plain", lr=0.1, weight_decay=0.0)
    assert explicit.augment == "none", "resolved even when every other option was given"


# ----------------------------------------------------------------------------- the LR schedule


# ----------------------------------------------------------------------------- strategies: parameter groups


def model(depth: int, train_bn: bool = True) -> TransferResNet:
    torch.manual_seed(0)
    return TransferResNet(create_resnet("resnet18", 3), depth, train_bn=train_bn)


def groups_by_name(transfer: TransferResNet, config: TrainConfig) -> dict[str, dict]:
    optimizer = make_optimizer(
        transfer.parameter_groups(config.lr, config.weight_decay, config.backbone_lr_mult), config
    )
    return {group["name"]: group for group in optimizer.param_groups}


@pytest.mark.parametrize("strategy", ["plain", "discriminative", "probe"])
@pytest.mark.parametrize("depth", [0, 3])
def test_each_strategy_gives_head_and_backbone_their_learning_rates(strategy, depth):
    config = resolved(weights="imagenet", strategy=strategy, freeze_depth=depth, epochs=5)
    transfer = model(depth)
    groups = groups_by_name(transfer, config)
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    mult = 1.0 if strategy == "plain" else recipe.PRETRAINED_BACKBONE_LR_MULT
    assert groups["head"]["lr"] == groups["head_no_decay"]["lr"] == config.lr
    assert groups["backbone"]["lr"] == groups["backbone_no_decay"]["lr"] == pytest.approx(config.lr * mult)
    head = {id(p) for p in transfer.net.fc.parameters()}
    assert {id(p) for g in ("head", "head_no_decay") for p in groups[g]["params"]} == head
    trainable = {id(p) for p in transfer.parameters() if p.requires_grad}
    assert {id(p) for g in groups.values() for p in g["params"]} == trainable, "exactly the unfrozen parameters"


def test_batchnorm_weights_and_biases_get_no_weight_decay():
    config = resolved(weights="none", weight_decay=0.05)
    transfer = model(0)
    groups = groups_by_name(transfer, config)
    no_decay = {id(p) for g in ("head_no_decay", "backbone_no_decay") for p in groups[g]["params"]}
    expected = {id(m.weight) for m in transfer.modules() if isinstance(m, nn.BatchNorm2d)}
    expected |= {id(m.bias) for m in transfer.modules() if getattr(m, "bias", None) is not None}
    assert no_decay == expected
    assert groups["head_no_decay"]["weight_decay"] == groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["head"]["weight_decay"] == groups["backbone"]["weight_decay"] == 0.05
    assert all(p.ndim == 4 for p in groups["backbone"]["params"]), "only conv kernels decay in the backbone"


def test_feature_extraction_has_only_head_groups():
    assert set(groups_by_name(model(NUM_STAGES), resolved(weights="imagenet"))) == {"head", "head_no_decay"}


def step(transfer: TransferResNet, optimizer: torch.optim.Optimizer) -> None:
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % 3
    transfer.train()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(transfer(images), labels).backward()
    optimizer.step()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_probe_then_fine_tune_moves_only_the_head_first_then_the_unfrozen_stages():
    """One optimizer over the stages unfrozen later: the head phase leaves them untouched, BatchNorm included."""
    config = resolved(weights="imagenet", strategy="probe", freeze_depth=3, epochs=5)
    transfer = model(config.freeze_depth)
    optimizer = make_optimizer(
        transfer.parameter_groups(config.lr, config.weight_decay, config.backbone_lr_mult), config
    )
    transfer.set_freeze_depth(NUM_STAGES)
    before = snapshot(transfer.net)
    step(transfer, optimizer)
    after_head = snapshot(transfer.net)
    changed = {k for k in before if not torch.equal(before[k], after_head[k])}
    assert changed and all(k.startswith("fc.") for k in changed)
    transfer.set_freeze_depth(config.freeze_depth)
    step(transfer, optimizer)
    after = snapshot(transfer.net)
    changed = {k.split(".")[0] for k in before if not torch.equal(after_head[k], after[k])}
    assert changed == {"layer3", "layer4", "fc"}


def test_no_train_bn_keeps_the_fine_tuned_stages_statistics_but_trains_their_scale():
    transfer = model(0, train_bn=False)
    config = resolved(weights="none")
    optimizer = make_optimizer(transfer.parameter_groups(config.lr, config.weight_decay), config)
    before = snapshot(transfer.net)
    step(transfer, optimizer)
    after = snapshot(transfer.net)
    for name, module in transfer.net.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert not module.training
            assert torch.equal(before[f"{name}.running_mean"], after[f"{name}.running_mean"])
            assert not torch.equal(before[f"{name}.weight"], after[f"{name}.weight"])


# ----------------------------------------------------------------------------- the sweep grid


def sweep(**options) -> TuneConfig:
    return TuneConfig(data="d", weights="imagenet", **options).validate()


def test_every_depth_and_strategy_gets_the_same_learning_rates():
    config = sweep(freeze_depths="0,2,5", strategies="plain,probe", num_samples=3, lr_min=1e-4, lr_max=1e-2)
    points = config.search_points()
    rates = {}
    for point in points:
        rates.setdefault((point["freeze_depth"], point["strategy"]), []).append(point["lr"])
    assert set(rates) == {(0, "plain"), (0, "probe"), (2, "plain"), (2, "probe"), (5, "plain")}
    assert all(r == pytest.approx([1e-4, 1e-3, 1e-2]) for r in rates.values())


def test_one_sample_is_the_recipe_rate_of_each_trial_and_explicit_rates_are_shared():
    config = sweep(freeze_depths="0,5", strategies="plain,discriminative")
    assert [(p["freeze_depth"], p["strategy"], p["lr"]) for p in config.search_points()] == [
        (0, "plain", recipe.LR["adamw"]),
        (0, "discriminative", recipe.DISCRIMINATIVE_HEAD_LR["adamw"]),
        (5, "plain", recipe.HEAD_ONLY_LR["sgd"]),  # auto: a head alone trains with SGD, at its rate
    ]
    assert sweep(optimizer="sgd").learning_rates() == [recipe.LR["sgd"]]
    assert sweep(optimizer="adamw").learning_rates(NUM_STAGES) == [recipe.HEAD_ONLY_LR["adamw"]]
    three = sweep(num_samples=3).learning_rates(NUM_STAGES)
    assert three == pytest.approx([recipe.HEAD_ONLY_LR["sgd"] * f for f in (1 / 3, 1, 3)])
    assert sweep(lr_min=1e-4, lr_max=1e-2).learning_rates() == [pytest.approx(1e-3)]
    config = sweep(freeze_depths="1,4", lrs="3e-3, 1e-3")
    assert [p["lr"] for p in config.search_points()] == [1e-3, 3e-3, 1e-3, 3e-3]
    with pytest.raises(TlRayError, match="--lrs must be comma-separated numbers"):
        sweep(lrs="fast")


def test_auto_strategy_is_named_for_the_start_and_scratch_baseline_is_one_extra_trial():
    assert sweep(freeze_depths="0").strategy_names() == ["plain"]
    points = sweep(freeze_depths="0,5", strategies="auto,discriminative", scratch_baseline=True).search_points()
    assert points[-1] == {"freeze_depth": 0, "strategy": "plain", "lr": recipe.LR["adamw"], "weights": "none"}
    assert [(p["freeze_depth"], p["strategy"]) for p in points[:-1]] == [
        (0, "plain"),
        (0, "discriminative"),
        (5, "plain"),
    ]


@pytest.mark.parametrize(
    ("options", "grace"),
    [({"max_epochs": 3}, 1), ({"max_epochs": 10}, 1), ({"max_epochs": 20}, 2), ({"strategies": "probe"}, 2)],
)
def test_asha_judges_trials_only_after_warm_up_and_the_head_phase(options, grace):
    config = sweep(**options)
    assert config.grace_epochs() == grace
    trial = TrainConfig.with_recipe(config.trial_config(config.search_points()[0], "/s", "t"))
    assert grace >= trial.head_epochs + math.ceil(trial.warmup_epochs)


def test_stage_modules_cover_the_backbone():
    assert len(STAGE_MODULES) == NUM_STAGES

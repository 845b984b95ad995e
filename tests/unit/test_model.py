"""Unit tests for tl_ray.model: architectures, heads, freezing by depth, and weight sources.

Real torch throughout (resnet18, a handful of 32x32 images); no Ray, no network.
"""

from __future__ import annotations

import functools
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import assert_same_tensors
from helpers import payload as make_payload
from torch import nn
from torchvision.models import ResNet

from tl_ray import backbones, checkpoint
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import TlRayError
from tl_ray.inputs import imaging
from tl_ray.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TransferResNet,
    create_resnet,
    eval_preprocessing,
    initial_weights,
)

DEPTHS = list(range(NUM_STAGES + 1))  # 0..5
HEAD = NUM_STAGES  # the head (avgpool + fc) counts as stage 5: never frozen
NUM_CLASSES = 3
BATCH = 4
SIZE = 32
STEPS = 3


# ----------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def stage_of(name: str) -> int:
    """Stage index of a parameter/module name in torchvision's layout: 0 stem, 1..4 layerN, 5 head."""
    top = name.split(".")[0]
    if top in ("conv1", "bn1", "relu", "maxpool"):
        return 0
    if top.startswith("layer"):
        return int(top.removeprefix("layer"))
    if top in ("avgpool", "fc"):
        return HEAD
    raise AssertionError(f"unexpected module name {name!r}")


def is_frozen(name: str, depth: int) -> bool:
    return stage_of(name) < depth


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    labels = torch.arange(BATCH) % NUM_CLASSES
    return images, labels


def build(depth: int, num_classes: int = NUM_CLASSES, seed: int = 0) -> TransferResNet:
    torch.manual_seed(seed)
    return TransferResNet(create_resnet("resnet18", num_classes), depth)


def batchnorms(net: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: module for name, module in net.named_modules() if isinstance(module, nn.BatchNorm2d)}


def clone_state(tensors) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in tensors}


@functools.cache
def resnet18_state(num_classes: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict (cached: callers must not modify it)."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).state_dict()


def write_malicious_pth(path: Path, sentinel: Path, how: str) -> None:
    payload = make_payload(sentinel)
    if how == "torch.save":
        torch.save({"conv1.weight": payload}, path)
    else:
        with path.open("wb") as f:
            pickle.dump({"conv1.weight": payload}, f, protocol=2)


def prove_payload_is_live(path: Path, sentinel: Path, how: str) -> None:
    """The control: loading the same file without weights_only really does run the command."""
    assert not sentinel.exists()
    if how == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with path.open("rb") as f:
            pickle.load(f)
    assert sentinel.exists()


def classes(count: int) -> list[str]:
    """Class names as save_tl_checkpoint writes them."""
    return [f"c{i}" for i in range(count)]


def save_tl_checkpoint(
    directory: Path, state: dict[str, torch.Tensor], arch: str, num_classes: int, resize_size: int | None = None
) -> None:
    meta = {
        "arch": arch,
        "num_classes": num_classes,
        "class_names": classes(num_classes),
        "image_size": SIZE,
        "resize_size": resize_size or imaging.resize_size(SIZE),
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
    }
    checkpoint.save_checkpoint(directory, state, meta)


# ----------------------------------------------------------------------------- architectures and heads


@pytest.mark.parametrize("arch", backbones.BY_ARCH["resnet18"].archs)  # other families: tests/unit/test_backbones.py
def test_every_resnet_builds_with_requested_head(arch):
    net = create_resnet(arch, 7)
    assert isinstance(net, ResNet)
    assert net.fc.out_features == 7
    assert net.fc.weight.shape[0] == 7


@pytest.mark.parametrize("num_classes", [3, 7])
def test_head_size_equals_num_classes(num_classes):
    net = create_resnet("resnet18", num_classes)
    assert net.fc.out_features == num_classes
    images, _ = batch()
    for depth in (0, NUM_STAGES):
        model = build(depth, num_classes).eval()
        assert model(images).shape == (BATCH, num_classes)
    weights = initial_weights("resnet18", "none", classes(num_classes))
    assert weights.state_dict["fc.weight"].shape == (num_classes, 512)
    assert weights.state_dict["fc.bias"].shape == (num_classes,)


# vgg16 is a timm model now (tl_ray.backbones_timm): vgg17 is nobody's
@pytest.mark.parametrize("arch", ["resnet19", "ResNet18", "vgg17", "", "resnet18 "])
def test_invalid_arch_is_rejected(arch):
    with pytest.raises(TlRayError, match="--arch"):
        create_resnet(arch, 3)
    with pytest.raises(TlRayError, match="--arch"):
        initial_weights(arch, "none", classes(3))


@pytest.mark.parametrize("depth", [-1, 6, 7])
def test_invalid_freeze_depth_is_rejected(depth):
    with pytest.raises(TlRayError, match="--freeze-depth"):
        TransferResNet(create_resnet("resnet18", 3), depth)


def test_net_keeps_torchvision_state_dict_layout():
    model = build(3)
    assert list(model.net.state_dict().keys()) == list(resnet18_state(NUM_CLASSES).keys())


@pytest.mark.parametrize("depth", DEPTHS)
def test_forward_matches_torchvision_in_eval_mode(depth):
    model = build(depth).eval()
    reference = build(depth).net.eval()  # same seed: same weights, torchvision's own forward
    images, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))


# ----------------------------------------------------------------------------- freezing: static properties


@pytest.mark.parametrize("depth", DEPTHS)
def test_requires_grad_by_stage(depth):
    model = build(depth)
    named = dict(model.net.named_parameters())
    assert {stage_of(name) for name in named} == set(range(NUM_STAGES + 1))
    for name, param in named.items():
        assert param.requires_grad is not is_frozen(name, depth), name
    trainable_tops = {name.split(".")[0] for name, p in named.items() if p.requires_grad}
    expected = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
    frozen_tops = [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)][:depth]
    assert trainable_tops == expected - {top for tops in frozen_tops for top in tops}


@pytest.mark.parametrize("depth", DEPTHS)
def test_optimizer_holds_exactly_the_trainable_parameters(depth):
    model = build(depth)
    trainable = model.trainable_parameters()
    assert len({id(p) for p in trainable}) == len(trainable), "a parameter is listed twice"
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    expected = {id(p) for name, p in model.net.named_parameters() if not is_frozen(name, depth)}
    assert in_optimizer == expected
    frozen = {id(p) for name, p in model.net.named_parameters() if is_frozen(name, depth)}
    assert not in_optimizer & frozen
    assert {id(p) for p in model.parameters()} == expected | frozen
    if depth == NUM_STAGES:  # feature extraction: only the head trains
        assert in_optimizer == {id(model.net.fc.weight), id(model.net.fc.bias)}


@pytest.mark.parametrize("depth", DEPTHS)
def test_frozen_batchnorm_stays_in_eval_mode(depth):
    model = build(depth)

    def check(expect_training: bool) -> None:
        for name, bn in batchnorms(model.net).items():
            expected = expect_training and not is_frozen(name, depth)
            assert bn.training is expected, (name, bn.training)

    model.train()
    check(True)
    model.eval()
    check(False)
    model.train()
    check(True)
    wrapper = nn.Sequential(model)  # a parent's train() (e.g. DDP's) must not unfreeze either
    wrapper.eval()
    wrapper.train()
    check(True)


# ----------------------------------------------------------------------------- freezing: training behaviour


@dataclass
class Trained:
    depth: int
    model: TransferResNet
    params_before: dict[str, torch.Tensor]
    params_after: dict[str, torch.Tensor]
    buffers_before: dict[str, torch.Tensor]
    buffers_after: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]  # after the last backward


@pytest.fixture(scope="module", params=DEPTHS, ids=[f"depth{d}" for d in DEPTHS])
def trained(request) -> Trained:
    depth = request.param
    model = build(depth)
    params_before = clone_state(model.net.named_parameters())
    buffers_before = clone_state(model.net.named_buffers())
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for step in range(STEPS):
        images, labels = batch(seed=10 + step)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    grads = {name: (None if p.grad is None else p.grad.clone()) for name, p in model.net.named_parameters()}
    return Trained(
        depth,
        model,
        params_before,
        clone_state(model.net.named_parameters()),
        buffers_before,
        clone_state(model.net.named_buffers()),
        grads,
    )


def test_frozen_batchnorm_statistics_are_bit_identical_after_training(trained):
    changed_trainable = 0
    for name in batchnorms(trained.model.net):
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{name}.{buffer}"
            before, after = trained.buffers_before[key], trained.buffers_after[key]
            if is_frozen(name, trained.depth):
                assert torch.equal(before, after), key
            elif buffer == "num_batches_tracked":
                assert after.item() == before.item() + STEPS, key
            else:
                assert not torch.equal(before, after), f"{key} of a trainable stage did not update"
                changed_trainable += 1
    if trained.depth < NUM_STAGES:
        assert changed_trainable > 0
    else:  # only the head trains: no BatchNorm statistics move at all
        assert changed_trainable == 0
        assert_same_tensors(trained.buffers_after, trained.buffers_before)


def test_frozen_parameters_unchanged_and_gradient_free_trainable_ones_updated(trained):
    for name, before in trained.params_before.items():
        after = trained.params_after[name]
        if is_frozen(name, trained.depth):
            assert torch.equal(before, after), f"frozen {name} changed"
            assert trained.grads[name] is None, f"frozen {name} got a gradient"
        else:
            assert not torch.equal(before, after), f"trainable {name} did not change"
            assert trained.grads[name] is not None, f"trainable {name} got no gradient"
            assert trained.grads[name].abs().sum() > 0, f"trainable {name} got an all-zero gradient"


@pytest.mark.parametrize("depth", DEPTHS)
def test_frozen_prefix_builds_no_autograd_graph(depth):
    model = build(depth).train()
    seen: list[tuple[str, bool, bool]] = []  # (module name, grad mode on, output requires grad)

    def hook(name):
        def record(module, inputs, output):
            seen.append((name, torch.is_grad_enabled(), output.requires_grad))

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.net.named_modules()
        if name and not list(module.children())  # every leaf module: conv, bn, relu, pool, fc
    ]
    handles += [model.net.get_submodule(f"layer{i}").register_forward_hook(hook(f"layer{i}")) for i in range(1, 5)]
    images, labels = batch()
    # An input that requires grad: without torch.no_grad the frozen stages' outputs would require
    # grad too (and keep activations for backward), even though their parameters do not.
    images.requires_grad_(True)
    try:
        loss = nn.functional.cross_entropy(model(images), labels)
    finally:
        for handle in handles:
            handle.remove()
    assert {stage_of(name) for name, _, _ in seen} == set(range(NUM_STAGES + 1))
    for name, grad_enabled, requires_grad in seen:
        frozen = is_frozen(name, depth)
        assert grad_enabled is not frozen, (name, grad_enabled)
        if name == "avgpool" and depth == NUM_STAGES:
            continue  # no parameters, and its input (layer4's output) is rightly graph-free
        assert requires_grad is not frozen, (name, requires_grad)
    last_frozen = ["maxpool", "layer1", "layer2", "layer3", "layer4"][depth - 1] if depth else None
    first_trainable = ["bn1", "layer1", "layer2", "layer3", "layer4", "fc"][depth]
    outputs = {name: requires_grad for name, _, requires_grad in seen}
    if last_frozen:
        assert outputs[last_frozen] is False
    assert outputs[first_trainable] is True
    loss.backward()
    if depth == 0:
        assert images.grad is not None
    else:  # the graph starts after the frozen prefix: nothing flows back to the input
        assert images.grad is None


# ----------------------------------------------------------------------------- initial_weights: none and files


def test_initial_weights_none_is_seeded_random_init():
    first = initial_weights("resnet18", "none", classes(7), seed=0)
    again = initial_weights("resnet18", "none", classes(7), seed=0)
    other = initial_weights("resnet18", "none", classes(7), seed=1)
    assert first.source == "none"
    assert first.head_reset is True
    assert first.mean == IMAGENET_MEAN and first.std == IMAGENET_STD
    assert first.state_dict.keys() == resnet18_state(7).keys()
    assert_same_tensors(again.state_dict, first.state_dict)
    assert not torch.equal(other.state_dict["conv1.weight"], first.state_dict["conv1.weight"])
    assert not torch.equal(other.state_dict["fc.weight"], first.state_dict["fc.weight"])
    net = create_resnet("resnet18", 7)
    net.load_state_dict(first.state_dict)  # strict: the result fits the architecture exactly


def test_initial_weights_from_state_dict_replaces_even_a_head_of_the_right_size(tmp_path):
    """A bare state dict does not say what its outputs mean: a head of the same size is no evidence."""
    state = resnet18_state(1000, seed=5)
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    weights = initial_weights("resnet18", str(path), classes(1000), seed=0)
    assert weights.head_reset is True
    assert weights.source == str(path.resolve())
    assert weights.mean == IMAGENET_MEAN and weights.std == IMAGENET_STD
    assert not torch.equal(weights.state_dict["fc.weight"], state["fc.weight"])
    assert_same_tensors(
        {k: v for k, v in weights.state_dict.items() if not k.startswith("fc.")},
        {k: v for k, v in state.items() if not k.startswith("fc.")},
    )


@pytest.mark.parametrize("num_classes", [3, 7])
def test_initial_weights_from_state_dict_replaces_the_head(tmp_path, num_classes):
    state = resnet18_state(1000, seed=5)
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    weights = initial_weights("resnet18", str(path), classes(num_classes), seed=0)
    assert weights.head_reset is True
    assert weights.state_dict["fc.weight"].shape == (num_classes, 512)
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert_same_tensors({k: v for k, v in weights.state_dict.items() if not k.startswith("fc.")}, backbone)
    again = initial_weights("resnet18", str(path), classes(num_classes), seed=0)
    assert torch.equal(again.state_dict["fc.weight"], weights.state_dict["fc.weight"])  # the new head is seeded


def test_initial_weights_unwraps_state_dict_wrapper_and_ddp_prefix(tmp_path):
    state = resnet18_state(NUM_CLASSES, seed=6)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    weights = initial_weights("resnet18", str(path), classes(NUM_CLASSES))
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert_same_tensors({k: v for k, v in weights.state_dict.items() if not k.startswith("fc.")}, backbone)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_initial_weights_refuses_a_malicious_pickle(tmp_path, how):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pth"
    write_malicious_pth(path, sentinel, how)
    with pytest.raises(TlRayError, match=r"evil\.pth"):
        initial_weights("resnet18", str(path), classes(NUM_CLASSES))
    assert not sentinel.exists(), "loading --weights ran code from the pickle"
    prove_payload_is_live(path, sentinel, how)


def _list_of_ints(path: Path) -> None:
    torch.save([1, 2, 3], path)


def _text_file(path: Path) -> None:
    path.write_text("these are not weights\n")


def _dict_of_non_tensors(path: Path) -> None:
    torch.save({"conv1.weight": 1, "fc.bias": [0.0]}, path)


def _truncated(path: Path) -> None:
    torch.save(resnet18_state(NUM_CLASSES), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("write", [_list_of_ints, _text_file, _dict_of_non_tensors, _truncated])
def test_initial_weights_rejects_a_file_that_is_not_a_state_dict(tmp_path, write):
    path = tmp_path / "weights.pth"
    write(path)
    with pytest.raises(TlRayError) as info:
        initial_weights("resnet18", str(path), classes(NUM_CLASSES))
    assert str(path) in str(info.value)
    assert "--weights" in str(info.value)


def test_initial_weights_rejects_a_state_dict_with_missing_blocks(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state(1000), path)  # resnet34 has more blocks per layer
    with pytest.raises(TlRayError, match="--arch") as info:
        initial_weights("resnet34", str(path), classes(NUM_CLASSES))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("other_arch", ["resnet34", "resnet50"], ids=["extra keys", "bottleneck arch"])
def test_initial_weights_rejects_a_state_dict_of_another_arch(tmp_path, other_arch):
    path = tmp_path / f"{other_arch}.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(other_arch, weights=None).state_dict(), path)
    with pytest.raises(TlRayError, match="--arch"):
        initial_weights("resnet18", str(path), classes(NUM_CLASSES))


@pytest.mark.parametrize("weights", ["missing.pth", "no/such/dir/w.pt", "/no/such/weights"])
def test_initial_weights_missing_file_is_an_error(tmp_path, monkeypatch, weights):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TlRayError, match="does not exist"):
        initial_weights("resnet18", weights, classes(NUM_CLASSES))


def test_initial_weights_unknown_weights_name_lists_the_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TlRayError, match="IMAGENET1K_V1") as info:
        initial_weights("resnet18", "IMAGENET9K_V9", classes(NUM_CLASSES))
    assert "--weights" in str(info.value)


# ----------------------------------------------------------------------------- initial_weights: checkpoints


def test_initial_weights_from_a_checkpoint_with_the_same_classes(tmp_path):
    state = resnet18_state(NUM_CLASSES, seed=7)
    save_tl_checkpoint(tmp_path / "ckpt", state, "resnet18", NUM_CLASSES)
    weights = initial_weights("resnet18", str(tmp_path / "ckpt"), classes(NUM_CLASSES))
    assert weights.head_reset is False
    assert weights.source == f"checkpoint:{(tmp_path / 'ckpt').resolve()}"
    assert weights.mean == (0.5, 0.4, 0.3) and weights.std == (0.2, 0.25, 0.3)  # preprocessing from meta.json
    assert_same_tensors(weights.state_dict, state)


def test_validation_resize_follows_the_weights(tmp_path):
    """torchvision's IMAGENET1K_V2 was evaluated at 232 -> 224, V1 at 256 -> 224; a checkpoint as its source was."""
    assert imaging.resize_size(224, eval_preprocessing("resnet50", "IMAGENET1K_V2")[0]) == 232
    assert imaging.resize_size(224, eval_preprocessing("resnet50", "imagenet")[0]) == 232  # the DEFAULT is V2
    assert imaging.resize_size(224, eval_preprocessing("resnet18", "imagenet")[0]) == 256
    assert imaging.resize_size(112, eval_preprocessing("resnet50", "IMAGENET1K_V2")[0]) == 116
    assert eval_preprocessing("resnet18", "none")[0] == initial_weights("resnet18", "none", classes(3)).crop_fraction
    assert imaging.resize_size(48, eval_preprocessing("resnet18", "none")[0]) == 55

    state = resnet18_state(NUM_CLASSES, seed=7)
    save_tl_checkpoint(tmp_path / "ckpt", state, "resnet18", NUM_CLASSES, resize_size=SIZE + 1)
    weights = initial_weights("resnet18", str(tmp_path / "ckpt"), classes(7))
    assert weights.crop_fraction == eval_preprocessing("resnet18", str(tmp_path / "ckpt"))[0]
    assert imaging.resize_size(SIZE, weights.crop_fraction) == SIZE + 1
    # torchvision's weights resize bilinearly, and say nothing (no meta.json key: None)
    assert weights.interpolation is None and eval_preprocessing("resnet18", "imagenet")[1] is None
    assert eval_preprocessing("resnet18", str(tmp_path / "ckpt")) == (weights.crop_fraction, None)


def test_a_checkpoint_that_records_an_interpolation_hands_it_on(tmp_path):
    """A run started from a checkpoint resizes as that checkpoint's weights did (its meta.json's interpolation)."""
    save_tl_checkpoint(tmp_path / "ckpt", resnet18_state(NUM_CLASSES, seed=7), "resnet18", NUM_CLASSES)
    meta = {**checkpoint.read_meta(tmp_path / "ckpt"), "interpolation": "bicubic"}
    checkpoint.save_checkpoint(tmp_path / "ckpt", checkpoint.read_model_state(tmp_path / "ckpt"), meta)
    weights = initial_weights("resnet18", str(tmp_path / "ckpt"), classes(NUM_CLASSES))
    assert weights.interpolation == "bicubic"
    assert eval_preprocessing("resnet18", str(tmp_path / "ckpt")) == (weights.crop_fraction, "bicubic")


def test_initial_weights_from_a_checkpoint_with_other_classes_resets_the_head(tmp_path):
    state = resnet18_state(NUM_CLASSES, seed=7)
    save_tl_checkpoint(tmp_path / "ckpt", state, "resnet18", NUM_CLASSES)
    weights = initial_weights("resnet18", str(tmp_path / "ckpt"), classes(7))
    assert weights.head_reset is True
    assert weights.state_dict["fc.weight"].shape == (7, 512)
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(weights.state_dict[key], value), key


def test_initial_weights_from_a_checkpoint_with_as_many_but_other_classes_resets_the_head(tmp_path):
    """Same class count, other task: keeping the head would start every output on the wrong class."""
    state = resnet18_state(NUM_CLASSES, seed=7)
    save_tl_checkpoint(tmp_path / "ckpt", state, "resnet18", NUM_CLASSES)
    for names in (["cross", "diamond", "hexagon"], list(reversed(classes(NUM_CLASSES)))):
        weights = initial_weights("resnet18", str(tmp_path / "ckpt"), names, seed=0)
        assert weights.head_reset is True
        assert weights.state_dict["fc.weight"].shape == state["fc.weight"].shape
        assert not torch.equal(weights.state_dict["fc.weight"], state["fc.weight"])
        assert torch.equal(weights.state_dict["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])


def test_initial_weights_from_a_checkpoint_of_another_arch_says_which(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet34(weights=None, num_classes=NUM_CLASSES).state_dict()
    save_tl_checkpoint(tmp_path / "ckpt", state, "resnet34", NUM_CLASSES)
    with pytest.raises(TlRayError, match="--arch resnet34"):
        initial_weights("resnet18", str(tmp_path / "ckpt"), classes(NUM_CLASSES))


def test_initial_weights_from_a_folder_without_meta_is_an_error(tmp_path):
    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    torch.save(resnet18_state(NUM_CLASSES), folder / "model.pt")
    with pytest.raises(TlRayError, match=r"meta\.json"):
        initial_weights("resnet18", str(folder), classes(NUM_CLASSES))


def test_initial_weights_refuses_a_malicious_checkpoint(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    save_tl_checkpoint(tmp_path / "ckpt", resnet18_state(NUM_CLASSES), "resnet18", NUM_CLASSES)
    write_malicious_pth(tmp_path / "ckpt" / "model.pt", sentinel, "torch.save")
    with pytest.raises(TlRayError, match=r"model\.pt"):
        initial_weights("resnet18", str(tmp_path / "ckpt"), classes(NUM_CLASSES))
    assert not sentinel.exists()


def test_initial_weights_from_a_checkpoint_whose_model_file_is_not_a_state_dict(tmp_path):
    save_tl_checkpoint(tmp_path / "ckpt", resnet18_state(NUM_CLASSES), "resnet18", NUM_CLASSES)
    torch.save([1, 2, 3], tmp_path / "ckpt" / "model.pt")
    with pytest.raises(TlRayError, match=r"model\.pt"):
        initial_weights("resnet18", str(tmp_path / "ckpt"), classes(NUM_CLASSES))


# ----------------------------------------------------------------------------- initial_weights: downloads


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty torch cache, and HTTP(S) through a proxy that refuses connections: no download can succeed."""
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    return torch_home


def test_imagenet_weights_offline_fail_fast_then_a_staged_file_is_used(offline):
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    cache = offline / "hub" / "checkpoints" / os.path.basename(enum.url)
    start = time.monotonic()
    with pytest.raises(TlRayError) as info:
        initial_weights("resnet18", "imagenet", classes(NUM_CLASSES))
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert "--weights" in message
    assert str(cache) in message  # says where to pre-stage the file
    assert enum.url in message
    assert not cache.exists()

    # Follow the message's advice: copy the file into the cache, and no download is attempted.
    staged = resnet18_state(1000, seed=9)
    torch.save(staged, cache)
    weights = initial_weights("resnet18", "imagenet", classes(NUM_CLASSES))
    assert weights.source == f"imagenet:{enum.name}"
    assert weights.head_reset is True
    assert weights.mean == tuple(enum.transforms().mean) and weights.std == tuple(enum.transforms().std)
    for key, value in staged.items():
        if not key.startswith("fc."):
            assert torch.equal(weights.state_dict[key], value), key
    assert weights.state_dict["fc.weight"].shape == (NUM_CLASSES, 512)
    by_name = initial_weights("resnet18", enum.name, classes(NUM_CLASSES))  # the enum name resolves to the same file
    assert_same_tensors(by_name.state_dict, weights.state_dict)
    # ImageNet's own 1000 categories keep ImageNet's head; 1000 other classes do not.
    same = initial_weights("resnet18", "imagenet", enum.meta["categories"])
    assert same.head_reset is False and torch.equal(same.state_dict["fc.weight"], staged["fc.weight"])
    assert initial_weights("resnet18", "imagenet", classes(1000)).head_reset is True


def test_imagenet_cache_file_with_a_malicious_pickle_runs_no_code(offline):
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    cache = offline / "hub" / "checkpoints" / os.path.basename(enum.url)
    cache.parent.mkdir(parents=True)
    sentinel = offline / "SENTINEL"
    write_malicious_pth(cache, sentinel, "torch.save")
    with pytest.raises(Exception):  # noqa: B017 - the type is the subject of the next test
        initial_weights("resnet18", "imagenet", classes(NUM_CLASSES))
    assert not sentinel.exists()


def test_imagenet_cache_file_with_a_malicious_pickle_is_a_tl_ray_error(offline):
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    cache = offline / "hub" / "checkpoints" / os.path.basename(enum.url)
    cache.parent.mkdir(parents=True)
    write_malicious_pth(cache, offline / "SENTINEL", "torch.save")
    with pytest.raises(TlRayError):
        initial_weights("resnet18", "imagenet", classes(NUM_CLASSES))

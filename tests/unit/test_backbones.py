"""The backbone table (tl_ray.backbones) and the generic model around it, for every family.

Real torchvision models at 32 px, random weights, no Ray, no network (unit tests); one end-to-end
run of the new archs through Ray (marked slow).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import checkpoint_meta, initial_state
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

import tl_ray
from tl_ray import backbones, checkpoint, model
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inference import export as deployable
from tl_ray.inputs import imaging
from tl_ray.training import config

# One arch of every family in the backbone table (its smallest: the first listed), as torchvision's test_models.py
# walks its model list: a family added to tl_ray/backbones.py is tested here without editing this file.
ARCHS = tuple(next(iter(family.archs)) for family in backbones.FAMILIES)
NEW_ARCHS = tuple(arch for arch in ARCHS if not arch.startswith("resnet"))  # beyond ResNet
# vit_b_16's 86M parameters make each of its cases seconds: in make test, but out of the 2-minute unit tier.
HEAVY = {"vit_b_16"}


def arch_params(archs: tuple[str, ...]) -> list:
    return [pytest.param(arch, marks=pytest.mark.slow) if arch in HEAVY else arch for arch in archs]


SIZE = 32
BATCH = 4
NUM_CLASSES = 3
DEPTHS = range(NUM_STAGES + 1)

pytestmark = pytest.mark.usefixtures("one_thread")


def build(arch: str, depth: int, num_classes: int = NUM_CLASSES, size: int = SIZE) -> model.TransferModel:
    """The same weights every call (building is random; loading a cached state is cheaper than seeding twice)."""
    net = model.create_model(arch, num_classes, size)
    net.load_state_dict(initial_state(arch, num_classes, size))
    return model.TransferModel(net, depth)


def images(seed: int = 1, size: int = SIZE) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))


def stage_parameter_names(transfer: model.TransferModel) -> list[set[str]]:
    """Each stage's parameter names, then the head's, as state-dict keys of ``net``."""
    ids = {id(p): name for name, p in transfer.net.named_parameters()}
    stages = [{ids[id(p)] for p in transfer._stage_parameters([names])} for names in transfer.stages]
    return [*stages, {ids[id(p)] for p in transfer.head.parameters()}]


def stage_buffer_names(transfer: model.TransferModel, depth: int) -> set[str]:
    """The buffers (BatchNorm running statistics) of the first ``depth`` stages."""
    names = set()
    for module in transfer._stage_modules(transfer.stages[:depth]):
        names |= {id(buffer) for buffer in module.buffers()}
    return {name for name, buffer in transfer.net.named_buffers() if id(buffer) in names}


# ----------------------------------------------------------------------------- the table


def test_archs_come_from_the_table_and_config_re_exports_them():
    assert config.ARCHS == backbones.ARCHS == tuple(backbones.BY_ARCH)
    assert set(ARCHS) <= set(backbones.ARCHS)
    assert [a for a in backbones.ARCHS if a.startswith("resnet")] == [f"resnet{n}" for n in (18, 34, 50, 101, 152)]


@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_stages_and_head_cover_every_parameter_once_and_the_head_fits_the_features(arch):
    transfer = build(arch, 0)
    groups = stage_parameter_names(transfer)
    assert len(groups) == NUM_STAGES + 1 and all(groups), "an empty stage would make two depths the same"
    every = [name for group in groups for name in group]
    assert sorted(every) == sorted(name for name, _ in transfer.net.named_parameters())
    family = backbones.family(arch)
    linear = transfer.net.get_submodule(family.linear)
    assert isinstance(linear, nn.Linear) and linear.out_features == NUM_CLASSES
    assert linear.in_features == family.archs[arch].feature_dim
    assert set(backbones.head_keys(arch, transfer.net.state_dict())) == groups[-1]
    with torch.no_grad():
        assert transfer.eval().features(images()).shape == (BATCH, family.archs[arch].feature_dim)


@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_weights_enum_and_its_eval_crop_come_from_torchvision(arch):
    enum = backbones.weights_enum(arch)
    assert enum is torchvision.models.get_model_weights(arch)
    transforms = enum.DEFAULT.transforms()
    expected = transforms.crop_size[0] / transforms.resize_size[0]
    assert model.eval_preprocessing(arch, "imagenet")[0] == pytest.approx(expected)
    assert len(enum.DEFAULT.meta["categories"]) == 1000


@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_forward_is_torchvisions_at_every_depth(arch):
    x = images()
    reference = build(arch, 0).net.eval()
    with torch.no_grad():
        expected = reference(x)
        for depth in DEPTHS:
            assert torch.equal(build(arch, depth).eval()(x), expected), depth


# ----------------------------------------------------------------------------- freezing and training


@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_frozen_parameters_get_no_gradient_and_leave_the_optimizer(arch):
    transfer = build(arch, 0)
    groups = stage_parameter_names(transfer)
    named = dict(transfer.net.named_parameters())
    for depth in DEPTHS:
        transfer.set_freeze_depth(depth)
        frozen = set().union(*groups[:depth])
        assert {n for n, p in named.items() if not p.requires_grad} == frozen, depth
        in_groups = [p for group in transfer.parameter_groups(1e-3, 0.05, 0.1) for p in group["params"]]
        assert len(in_groups) == len({id(p) for p in in_groups})
        assert {id(p) for p in in_groups} == {id(p) for n, p in named.items() if n not in frozen}, depth
        by_name = {group["name"]: group for group in transfer.parameter_groups(1e-3, 0.05, 0.1)}
        assert by_name["head"]["lr"] == 1e-3
        if depth == NUM_STAGES:
            assert set(by_name) <= {"head", "head_no_decay"}
        else:
            assert by_name["backbone"]["lr"] == pytest.approx(1e-4)  # --strategy discriminative's multiplier
            assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    transfer.set_freeze_depth(0)
    decayed = {id(p) for g in transfer.parameter_groups(1e-3, 0.05) if g["weight_decay"] for p in g["params"]}
    assert all(p.ndim > 1 for n, p in named.items() if id(p) in decayed), "norm weights and biases never decay"
    for name in backbones.family(arch).no_decay:  # nor do ViT's class token and position embeddings
        assert id(named[name]) not in decayed


@pytest.mark.parametrize("arch", arch_params(ARCHS))
@pytest.mark.parametrize("depth", DEPTHS)
def test_training_moves_only_unfrozen_stages_and_frozen_batchnorm_statistics_stay(arch, depth):
    transfer = build(arch, depth).train()
    family = backbones.family(arch)
    before = {k: v.clone() for k, v in transfer.net.state_dict().items()}
    optimizer = torch.optim.AdamW(transfer.trainable_parameters(), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(transfer(images(10 + step)), torch.arange(BATCH) % NUM_CLASSES).backward()
        optimizer.step()
    after = transfer.net.state_dict()
    groups = stage_parameter_names(transfer)
    frozen = set().union(*groups[:depth]) | stage_buffer_names(transfer, depth)
    for key in frozen:
        assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    for names in groups[depth:]:  # every trainable stage, and the head, learned
        assert any(not torch.equal(before[n], after[n]) for n in names)
    statistics = [k for k in after if k.endswith("running_mean")]
    assert bool(statistics) is family.batch_norm  # LayerNorm families keep none
    moved = [k for k in statistics if not torch.equal(before[k], after[k])]
    assert all(k not in frozen for k in moved)
    if family.batch_norm and depth < NUM_STAGES:
        assert moved, "a trainable stage's BatchNorm should update its statistics"


@pytest.mark.parametrize("arch", arch_params(NEW_ARCHS))
def test_probe_then_fine_tune_moves_the_head_first_then_the_backbone(arch):
    """--strategy probe: one optimizer built at the final depth; the head phase leaves the backbone untouched."""
    transfer = build(arch, 3).train()
    optimizer = torch.optim.AdamW(transfer.parameter_groups(1e-2, 0.0), lr=1e-2)

    def step() -> dict[str, torch.Tensor]:
        start = {k: v.clone() for k, v in transfer.net.state_dict().items()}
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(transfer(images()), torch.arange(BATCH) % NUM_CLASSES).backward()
        optimizer.step()
        return {k for k, v in transfer.net.state_dict().items() if not torch.equal(start[k], v)}

    head = set(backbones.head_keys(arch, transfer.net.state_dict()))
    transfer.set_freeze_depth(NUM_STAGES)
    assert step() == head
    transfer.set_freeze_depth(3)
    assert step() - head


@pytest.mark.parametrize("arch", arch_params(NEW_ARCHS))
def test_head_alone_on_features_is_the_model_at_depth_5(arch):
    """What the feature cache relies on: the head applied to ``features`` is the whole model's forward."""
    transfer = build(arch, NUM_STAGES).eval()
    with torch.no_grad():
        assert torch.equal(transfer.head(transfer.features(images())), transfer(images()))


# ----------------------------------------------------------------------------- weights and checkpoints


@pytest.mark.parametrize("arch", arch_params(NEW_ARCHS))
def test_checkpoint_round_trip_and_weights_from_a_checkpoint_with_other_classes(arch, tmp_path):
    state = initial_state(arch)
    assert list(state) == list(model.create_model(arch, NUM_CLASSES, SIZE).state_dict())  # torchvision's keys
    checkpoint.save_checkpoint(tmp_path / "ckpt", state, checkpoint_meta(arch, NUM_CLASSES))
    loaded, meta = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert type(loaded).__name__ == backbones.family(arch).model_class and not loaded.training
    reference = build(arch, 0).net.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images()), reference(images()))

    same = model.initial_weights(arch, str(tmp_path / "ckpt"), meta["class_names"], image_size=SIZE)
    assert same.head_reset is False and all(torch.equal(same.state_dict[k], v) for k, v in state.items())
    other = model.initial_weights(arch, str(tmp_path / "ckpt"), ["x", "y", "z", "w", "v"], image_size=SIZE)
    head = set(backbones.head_keys(arch, state))
    assert other.head_reset is True and other.source.startswith("checkpoint:")
    linear = backbones.family(arch).linear
    assert other.state_dict[f"{linear}.weight"].shape == (5, backbones.family(arch).archs[arch].feature_dim)
    assert all(torch.equal(other.state_dict[k], v) for k, v in state.items() if k not in head)
    with pytest.raises(TlRayError, match="--arch"):
        model.initial_weights("resnet18", str(tmp_path / "ckpt"), meta["class_names"])


def test_a_bare_state_dict_of_another_arch_does_not_fit(tmp_path):
    torch.save(initial_state("convnext_tiny"), tmp_path / "convnext.pth")
    with pytest.raises(TlRayError, match="does not fit this architecture"):
        model.initial_weights("efficientnet_b0", str(tmp_path / "convnext.pth"), ["a", "b", "c"], image_size=SIZE)


# ----------------------------------------------------------------------------- ViT image sizes


@pytest.mark.slow  # vit_b_16 at three sizes
def test_vit_at_another_size_interpolates_position_embeddings_from_224(tmp_path):
    torch.manual_seed(0)
    at_224 = torchvision.models.vit_b_16(weights=None).state_dict()  # as ImageNet weights come: 224 px, 1000 classes
    torch.save(at_224, tmp_path / "vit_b_16.pth")
    weights = model.initial_weights("vit_b_16", str(tmp_path / "vit_b_16.pth"), ["a", "b", "c"], image_size=64)
    state = weights.state_dict
    assert weights.head_reset and state["encoder.pos_embedding"].shape == (1, (64 // 16) ** 2 + 1, 768)
    expected = interpolate_embeddings(64, 16, dict(at_224))["encoder.pos_embedding"]
    assert torch.equal(state["encoder.pos_embedding"], expected)
    key = "encoder.layers.encoder_layer_0.mlp.0.weight"
    assert torch.equal(state[key], at_224[key])
    net = model.create_model("vit_b_16", NUM_CLASSES, 64)
    net.load_state_dict(state)
    transfer = model.TransferModel(net, 2).eval()
    with torch.no_grad():
        assert transfer(images(size=64)).shape == (BATCH, NUM_CLASSES)


@pytest.mark.parametrize("size", [100, 225, 40])
def test_vit_needs_an_image_size_that_is_a_multiple_of_its_patch(size, tmp_path):
    with pytest.raises(
        UsageError, match=r"^--image-size must be a multiple of 16 for vit_b_16 \(its patch size\); got"
    ):
        config.TrainConfig(data=str(tmp_path), arch="vit_b_16", image_size=size, weights="none").validate()
    with pytest.raises(UsageError, match="--image-size"):
        backbones.create("vit_b_16", NUM_CLASSES, size)
    config.TrainConfig(data=str(tmp_path), arch="convnext_tiny", image_size=size, weights="none").validate()


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("arch", arch_params(NEW_ARCHS))
@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])  # onnx: ~10-25 s each
def test_export_gives_the_checkpoints_probabilities(arch, fmt, tmp_path):
    if fmt == "onnx":
        onnxruntime = pytest.importorskip("onnxruntime")
    checkpoint.save_checkpoint(tmp_path / "ckpt", initial_state(arch), checkpoint_meta(arch, NUM_CLASSES))
    result = tl_ray.export(str(tmp_path / "ckpt"), str(tmp_path / f"model.{fmt}"), fmt)
    assert result.metadata["arch"] == arch
    crops = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loaded, meta = checkpoint.load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        logits = loaded(imaging.normalize(crops, torch.tensor(meta["mean"]), torch.tensor(meta["std"])))
    expected = torch.softmax(logits, dim=1)
    if fmt == "torchscript":
        actual = torch.jit.load(str(result.path))(crops)
    else:
        session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        actual = torch.tensor(session.run(None, {deployable.INPUT_NAME: crops.numpy()})[0])
    assert torch.allclose(actual, expected, atol=1e-5)

"""timm architectures by name (tl_ray.backbones_timm, tl_ray.weights_timm): their five freeze stages, head swap,
weights from files, preprocessing, the unknown-name line, listing and export.

Real timm models at 32 px with random weights; no Ray, no network (nothing here downloads: timm's hub path is
exercised only by name resolution and its pretrained configs, which ship with timm).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch import nn

import tl_ray
from tl_ray import backbones, backbones_timm, checkpoint, cli, model
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs import imaging
from tl_ray.training import config

SIZE = 32
BATCH = 4
NUM_CLASSES = 3
# A ResNet-D, ConvNeXt, EfficientNet (timm's: torchvision has the name too), MobileNet, RegNet, ViT
ARCHS = (
    "resnet18d",
    "convnext_atto",
    "timm/efficientnet_b0",
    "mobilenetv3_small_050",
    "regnetx_002",
    "vit_tiny_patch16_224",
)
# Where each family's stages begin and end, as timm names its modules (``feature_info``'s reductions 4..32)
# Modules without parameters (activations, pooling, dropout) go with the stage before them: frozen, they are off too.
EXPECTED_STAGES = {
    "resnet18d": (
        ("conv1", "bn1", "act1", "maxpool"),
        ("layer1",),
        ("layer2",),
        ("layer3",),
        ("layer4", "global_pool"),
    ),
    "convnext_atto": (
        ("stem",),
        ("stages.0",),
        ("stages.1",),
        ("stages.2",),
        ("stages.3", "head.global_pool", "head.norm", "head.flatten", "head.drop"),
    ),
    "regnetx_002": (("stem",), ("s1",), ("s2",), ("s3",), ("s4", "head.global_pool", "head.drop")),
    "mobilenetv3_small_050": (
        ("conv_stem", "bn1"),
        ("blocks.0",),
        ("blocks.1",),
        ("blocks.2", "blocks.3"),
        ("blocks.4", "blocks.5", "global_pool", "conv_head", "act2", "flatten"),
    ),
    "vit_tiny_patch16_224": (
        ("cls_token", "pos_embed", "patch_embed", "pos_drop"),
        ("blocks.0", "blocks.1", "blocks.2"),
        ("blocks.3", "blocks.4", "blocks.5"),
        ("blocks.6", "blocks.7", "blocks.8"),
        ("blocks.9", "blocks.10", "blocks.11", "norm", "head_drop"),
    ),
}
HEADS = {"convnext_atto": "head.fc", "regnetx_002": "head.fc", "vit_tiny_patch16_224": "head"}

pytestmark = pytest.mark.usefixtures("one_thread")
_STATES: dict[str, dict] = {}


def build(arch: str, depth: int, num_classes: int = NUM_CLASSES) -> model.TransferModel:
    if (arch, num_classes) not in _STATES:
        torch.manual_seed(0)
        _STATES[arch, num_classes] = model.create_model(arch, num_classes, SIZE).state_dict()
    net = model.create_model(arch, num_classes, SIZE)
    net.load_state_dict(_STATES[arch, num_classes])
    return model.TransferModel(net, depth)


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def stage_parameter_names(transfer: model.TransferModel) -> list[set[str]]:
    ids = {id(p): name for name, p in transfer.net.named_parameters()}
    stages = [{ids[id(p)] for p in transfer._stage_parameters([names])} for names in transfer.stages]
    return [*stages, {ids[id(p)] for p in transfer.head.parameters()}]


# ----------------------------------------------------------------------------- names


def test_a_name_is_torchvisions_unless_only_timm_has_it_or_it_says_timm():
    assert type(model.create_model("resnet18", 3, SIZE)).__module__.startswith("torchvision.")
    assert type(model.create_model("timm/resnet18", 3, SIZE)).__module__.startswith("timm.")
    assert type(model.create_model("convnext_atto", 3, SIZE)).__module__.startswith("timm.")
    assert backbones.is_timm("convnext_atto") and not backbones.is_timm("convnext_tiny")


@pytest.mark.parametrize(
    ("arch", "nearest"), [("convnext_ato", "convnext_atto"), ("timm/resnet18x", "resnet18"), ("vit_tiny", "vit_tiny")]
)
def test_an_unknown_arch_is_one_line_with_the_nearest_names(arch, nearest, tmp_path, capsys):
    with pytest.raises(UsageError, match=r"^--arch: no torchvision or timm architecture is named .*did you mean") as e:
        config.TrainConfig(data=str(tmp_path), arch=arch, weights="none").validate()
    suggested = str(e.value).split("did you mean ")[1].split("?")[0].split(", ")
    assert len(suggested) == 3 and any(name.startswith(nearest) for name in suggested)
    assert cli.main(["train", "--data", str(tmp_path), "--arch", arch, "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tl-ray: error: --arch: no torchvision or timm architecture")


def test_archs_lists_torchvision_then_timm_and_which_have_weights(capsys):
    assert cli.main(["archs", "convnext_at"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert rows["convnext_atto"] == ["timm", "yes"] and rows["convnext_atto_rms"] == ["timm", "-"]
    assert (
        lines[-1] == f"{len(rows)} architectures, {sum(r[1] == 'yes' for r in rows.values())} with pretrained weights"
    )
    assert cli.main(["archs", "resnet18", "--pretrained"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert names[0] == "resnet18" and "timm/resnet18" in names and "resnet18d" in names


# ----------------------------------------------------------------------------- stages and freezing


@pytest.mark.parametrize("arch", list(EXPECTED_STAGES))
def test_stages_split_at_reductions_4_8_16_32_or_a_vits_four_block_groups(arch):
    transfer = build(arch, 0)
    assert transfer.stages == EXPECTED_STAGES[arch]
    groups = stage_parameter_names(transfer)
    assert set().union(*groups) == set(dict(transfer.net.named_parameters()))  # every parameter, once
    assert sum(len(group) for group in groups) == len(list(transfer.net.parameters()))
    assert transfer.family.head == HEADS.get(arch, transfer.family.head)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth", [0, 3, NUM_STAGES])
def test_each_depth_freezes_its_stages_as_torchvisions_do(arch, depth):
    transfer = build(arch, depth).train()
    groups = stage_parameter_names(transfer)
    named = dict(transfer.net.named_parameters())
    frozen = set().union(*groups[:depth])
    assert {name for name, p in named.items() if not p.requires_grad} == frozen
    in_optimizer = {id(p) for group in transfer.parameter_groups(1e-3, 0.05, 0.1) for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in named.items() if name not in frozen}
    frozen_modules = list(transfer.frozen_modules())
    assert all(not m.training for module in frozen_modules for m in module.modules())  # eval mode after .train()
    assert (len(frozen_modules) > 0) is (depth > 0)
    before = {k: v.clone() for k, v in transfer.net.state_dict().items()}
    optimizer = torch.optim.AdamW(transfer.trainable_parameters(), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(transfer(images(10 + step)), torch.arange(BATCH) % NUM_CLASSES)
        loss.backward()
        optimizer.step()
    after = transfer.net.state_dict()
    buffers = {id(b) for module in frozen_modules for b in module.buffers()}
    frozen_keys = frozen | {name for name, b in transfer.net.named_buffers() if id(b) in buffers}
    assert all(torch.equal(before[key], after[key]) for key in frozen_keys)  # BatchNorm statistics too
    for names in groups[depth:]:
        assert any(not torch.equal(before[n], after[n]) for n in names)
    assert all(p.grad is None for name, p in named.items() if name in frozen)


@pytest.mark.parametrize("arch", ["convnext_atto", "vit_tiny_patch16_224", "mobilenetv3_small_050"])
def test_head_swapped_and_the_head_on_features_is_the_model(arch):
    transfer = build(arch, NUM_STAGES, num_classes=5).eval()
    linear = transfer.net.get_submodule(transfer.family.linear)
    assert isinstance(linear, nn.Linear) and linear.out_features == 5
    assert set(backbones.head_keys(transfer.family, transfer.net.state_dict())) == {
        f"{transfer.family.head}.weight",
        f"{transfer.family.head}.bias",
    }
    with torch.no_grad():
        features = transfer.features(images())
        assert features.shape == (BATCH, transfer.family.archs[next(iter(transfer.family.archs))].feature_dim)
        assert torch.equal(transfer.head(features), transfer(images()))
        assert torch.allclose(transfer(images()), transfer.net(images()), atol=1e-6)  # timm's own forward


def test_a_model_without_stages_trains_at_depths_0_and_5_only(tmp_path):
    net = model.create_model("pit_ti_224", NUM_CLASSES, SIZE)
    assert not backbones.family_of(net).splittable
    for depth in (0, NUM_STAGES):
        transfer = model.TransferModel(net, depth)
        trainable = {id(p) for p in transfer.trainable_parameters()}
        expected = net.parameters() if depth == 0 else transfer.head.parameters()
        assert trainable == {id(p) for p in expected}
    with pytest.raises(TlRayError, match=r"^--freeze-depth: PoolingVisionTransformer has no stages .* use 0 or 5"):
        model.TransferModel(net, 3)
    with pytest.raises(UsageError, match=r"^--freeze-depth: pit_ti_224 has no stages tl-ray can split"):
        backbones.check_freeze_depth("pit_ti_224", 2)
    with pytest.raises(UsageError, match=r"^--freeze-depth: pit_ti_224 has no stages .* use 0 or 5; got 4$"):
        config.TrainConfig(data=str(tmp_path), arch="pit_ti_224", freeze_depth=4, weights="none").validate()
    config.TrainConfig(data=str(tmp_path), arch="pit_ti_224", freeze_depth=5, weights="none").validate()


def test_an_image_size_the_model_cannot_take_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"^--image-size: crossvit_tiny_240 cannot take 64 px images \("):
        config.TrainConfig(data=str(tmp_path), arch="crossvit_tiny_240", image_size=64, weights="none").validate()
    with pytest.raises(UsageError, match="--image-size must be a multiple of 16 for vit_tiny_patch16_224"):
        config.TrainConfig(data=str(tmp_path), arch="vit_tiny_patch16_224", image_size=40, weights="none").validate()


# ----------------------------------------------------------------------------- weights and preprocessing


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("arch", ["convnext_atto", "vit_tiny_patch16_224"])
def test_weights_from_a_file_load_the_backbone_and_reset_the_head(arch, suffix, tmp_path):
    import timm

    torch.manual_seed(7)
    source = timm.create_model(
        backbones_timm.model_name(arch), pretrained=False
    ).state_dict()  # as timm ships them: 224 px, 1000 classes
    path = tmp_path / f"weights{suffix}"
    save_file(source, str(path)) if suffix == ".safetensors" else torch.save(source, path)
    weights = model.initial_weights(arch, str(path), ["a", "b", "c"], image_size=SIZE)
    head = set(backbones.head_keys(arch, weights.state_dict))
    assert weights.head_reset and weights.source == str(path.resolve())
    assert weights.state_dict[sorted(head)[0]].shape[0] == 3
    kept = [k for k in source if k not in head and k != "pos_embed"]
    assert kept and all(torch.equal(weights.state_dict[k], source[k]) for k in kept)
    if arch.startswith("vit"):  # 224 px embeddings resampled to 32 px's 2 x 2 patches and the class token
        assert weights.state_dict["pos_embed"].shape == (1, 1 + (SIZE // 16) ** 2, 192)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_weights_file_of_another_arch_is_refused_naming_its_key(suffix, tmp_path):
    state = model.create_model("resnet18d", 1000, SIZE).state_dict()
    path = tmp_path / f"resnet18d{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(TlRayError, match=r"^--weights: .* does not fit this architecture \((missing|shape of|unexp)"):
        model.initial_weights("regnetx_002", str(path), ["a", "b", "c"], image_size=SIZE)
    narrower = {k: v for k, v in model.create_model("resnet10t", 3, SIZE).state_dict().items()}
    torch.save(narrower, tmp_path / "resnet10t.pth")
    with pytest.raises(TlRayError, match=r"\(shape of conv1\.0\.weight differs\); check --arch|missing"):
        model.initial_weights("resnet18d", str(tmp_path / "resnet10t.pth"), ["a", "b", "c"], image_size=SIZE)


@pytest.mark.parametrize("arch", ["resnet18d", "vit_tiny_patch16_224", "convnext_atto"])
def test_preprocessing_is_the_weights_pretrained_cfg(arch):
    net = model.create_model(arch, NUM_CLASSES, SIZE)
    expected = resolve_data_config(model=net)
    weights = model.initial_weights(arch, "none", ["a", "b", "c"], image_size=SIZE)
    assert weights.mean == tuple(expected["mean"]) and weights.std == tuple(expected["std"])
    assert weights.crop_fraction == expected["crop_pct"] and weights.interpolation == expected["interpolation"]
    assert model.eval_preprocessing(arch, "none")[0] == expected["crop_pct"]
    assert model.eval_preprocessing(arch, "none") == (expected["crop_pct"], expected["interpolation"])
    tag = backbones_timm.pretrained_tags(arch)[-1]
    cfg = get_pretrained_cfg(f"{backbones_timm.model_name(arch)}.{tag}")
    assert model.eval_preprocessing(arch, tag)[0] == cfg.crop_pct  # without downloading anything
    assert model.eval_preprocessing(arch, "imagenet")[0] == get_pretrained_cfg(backbones_timm.model_name(arch)).crop_pct


@pytest.mark.parametrize(("arch", "weights"), [("convnext_atto", "imagenet"), ("vit_tiny_patch16_224", "augreg_in21k")])
def test_pretrained_weights_load_through_timms_own_loading_from_its_hub_cache(arch, weights, tmp_path, monkeypatch):
    """No hub here: the weights file is staged in a Hugging Face cache as a download leaves it, offline."""
    import huggingface_hub.constants
    import timm

    tag = get_pretrained_cfg(arch).tag if weights == "imagenet" else weights
    cfg = get_pretrained_cfg(f"{arch}.{tag}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(3)
    shipped = timm.create_model(arch, pretrained=False, num_classes=cfg.num_classes).state_dict()  # 224 px
    repo = tmp_path / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(shipped, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))

    loaded = model.initial_weights(arch, weights, ["a", "b"], image_size=SIZE)
    assert loaded.source == f"timm:{arch}.{tag}" and loaded.head_reset
    head = set(backbones.head_keys(arch, loaded.state_dict))
    assert all(loaded.state_dict[k].shape[0] == 2 for k in head)
    same = [k for k in shipped if k not in head and k != "pos_embed"]
    assert all(torch.equal(loaded.state_dict[k], shipped[k]) for k in same)
    assert (loaded.mean, loaded.std) == (tuple(cfg.mean), tuple(cfg.std)) and loaded.crop_fraction == cfg.crop_pct
    if arch.startswith("vit"):  # timm resampled the 14 x 14 grid to 32 px's 2 x 2
        assert loaded.state_dict["pos_embed"].shape == (1, 1 + (SIZE // 16) ** 2, 192)


def test_an_arch_with_a_weights_tag_says_to_pass_the_tag_as_weights(tmp_path):
    with pytest.raises(UsageError, match=r"^--arch: 'convnext_atto.d2_in1k' names weights: pass --arch convnext_atto"):
        config.TrainConfig(data=str(tmp_path), arch="convnext_atto.d2_in1k", weights="none").validate()


def test_imagenet_for_an_arch_timm_has_no_weights_for_is_one_line():
    with pytest.raises(TlRayError, match=r"^--weights imagenet: timm has no pretrained weights for convnext_atto_rms"):
        model.initial_weights("convnext_atto_rms", "imagenet", ["a", "b"], image_size=SIZE)
    with pytest.raises(TlRayError, match=r"^--weights imagenet: timm has no pretrained weights"):
        model.eval_preprocessing("convnext_atto_rms", "imagenet")


def test_a_tag_the_arch_lacks_lists_its_tags():
    with pytest.raises(
        TlRayError, match=r"^--weights: 'in22k_ft_in9k' is not .* convnext_atto's timm tags are: d2_in1k"
    ):
        model.initial_weights("convnext_atto", "in22k_ft_in9k", ["a", "b"], image_size=SIZE)


def _saved_checkpoint(arch: str, folder) -> tuple[model.InitialWeights, dict]:
    """A checkpoint of ``arch`` with random weights and classes a, b, c, its meta.json as training writes it (the
    weights' preprocessing): (the initial weights, the meta)."""
    weights = model.initial_weights(arch, "none", ["a", "b", "c"], image_size=SIZE)
    meta = {
        "arch": arch,
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "image_size": SIZE,
        "resize_size": imaging.resize_size(SIZE, weights.crop_fraction),
        "mean": list(weights.mean),
        "std": list(weights.std),
        "interpolation": weights.interpolation,
    }
    checkpoint.save_checkpoint(folder, weights.state_dict, meta)
    return weights, meta


def test_a_checkpoint_records_and_reloads_the_timm_preprocessing(tmp_path):
    arch = "convnext_atto"
    weights, meta = _saved_checkpoint(arch, tmp_path / "ckpt")
    loaded, _ = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert type(loaded).__module__.startswith("timm.") and not loaded.training
    again = model.initial_weights(arch, str(tmp_path / "ckpt"), ["a", "b", "c"], image_size=SIZE)
    assert again.head_reset is False and again.source.startswith("checkpoint:")
    assert (again.mean, again.std, again.interpolation) == (weights.mean, weights.std, "bicubic")
    assert again.crop_fraction == pytest.approx(model.eval_preprocessing(arch, str(tmp_path / "ckpt"))[0])
    result = tl_ray.export(str(tmp_path / "ckpt"), str(tmp_path / "model.pt"), "torchscript")
    crops = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.softmax(
            loaded(imaging.normalize(crops, torch.tensor(meta["mean"]), torch.tensor(meta["std"]))), 1
        )
    assert result.metadata["arch"] == arch
    assert result.metadata["interpolation"] == "bicubic" and "Image.BICUBIC" in str(result.metadata["preprocessing"])
    assert torch.allclose(torch.jit.load(str(result.path))(crops), expected, atol=1e-5)


@pytest.mark.slow  # ~7-10 s each: torch.onnx's dynamo export
@pytest.mark.parametrize("arch", ["convnext_atto", "vit_tiny_patch16_224"])
def test_onnx_export_of_a_timm_checkpoint_gives_its_probabilities(arch, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    _, meta = _saved_checkpoint(arch, tmp_path / "ckpt")
    result = tl_ray.export(str(tmp_path / "ckpt"), str(tmp_path / "model.onnx"), "onnx")
    crops = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loaded, _ = checkpoint.load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        expected = torch.softmax(
            loaded(imaging.normalize(crops, torch.tensor(meta["mean"]), torch.tensor(meta["std"]))), 1
        )
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    actual = torch.tensor(session.run(None, {"images": crops.numpy()})[0])
    assert torch.allclose(actual, expected, atol=1e-5)


def test_a_torchvision_arch_takes_a_safetensors_file_too(tmp_path):
    torch.manual_seed(5)
    state = model.create_model("resnet18", 1000, SIZE).state_dict()
    save_file(state, str(tmp_path / "resnet18.safetensors"))
    weights = model.initial_weights("resnet18", str(tmp_path / "resnet18.safetensors"), ["a", "b"], image_size=SIZE)
    assert weights.head_reset and torch.equal(weights.state_dict["conv1.weight"], state["conv1.weight"])
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TlRayError, match=r"^--weights: .*broken.safetensors is not a loadable safetensors file"):
        model.initial_weights("resnet18", str(tmp_path / "broken.safetensors"), ["a", "b"], image_size=SIZE)

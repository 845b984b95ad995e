"""The supported torchvision backbones, as data: one ``Family`` entry per architecture family.

Everything tl-ray needs to know about an architecture is here and nowhere else: the
torchvision builder of each arch name, its five freeze stages (freeze depth N freezes the
first N; depth 5 leaves only the head to learn), how to run them one at a time, the head
(the module that maps pooled features to logits, its final ``nn.Linear`` built with
``num_classes`` outputs), whether its normalisation layers keep running statistics
(BatchNorm does, LayerNorm has none), and the feature width. Weights come from
torchvision's weights API (``weights_enum``). Adding a backbone is one entry in
``FAMILIES``; ``tl_ray.model.TransferModel`` is the generic code around it.

Any other name is timm's (``timm/NAME`` where both libraries have it): its ``Family`` is derived from the
built model by ``tl_ray.backbones_timm``, so the functions here answer for both libraries.

This module imports torch only when a model is built, so ``tl_ray.training.config`` (and the CLI's
``--help``) can list ``ARCHS`` without loading it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from tl_ray.errors import TlRayError, UsageError

if TYPE_CHECKING:
    import torch
    import torchvision
    from torch import nn

NUM_STAGES = 5  # freeze groups before the head: see docs/architecture.md "freeze depth"
DEFAULT_IMAGE_SIZE = 224
Stages = tuple[tuple[str, ...], ...]  # module or parameter names of ``net``, one tuple per stage


class Arch(NamedTuple):
    feature_dim: int  # width of the pooled features, the head's input
    patch_size: int = 0  # > 0: a transformer built for one image size, a multiple of this


@dataclass(frozen=True)
class Family:
    """One torchvision family (or one timm model's, derived by ``backbones_timm.family_for``). Names are paths in
    the library's own modules, so state dicts keep its keys."""

    name: str
    model_class: str  # torchvision's class name: how a built network is recognised (``family_of``)
    archs: Mapping[str, Arch]  # torchvision builder name -> its sizes
    stages: Callable[[nn.Module], Stages]  # the NUM_STAGES freeze groups: every parameter outside the head
    run_stage: Callable[[nn.Module, int, torch.Tensor], torch.Tensor]  # stage ``index``'s forward
    pool: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # last stage's output -> (N, feature_dim)
    head: str  # the module from features to logits: what trains on cached features
    linear: str  # the final nn.Linear inside ``head`` (``num_classes`` outputs)
    batch_norm: bool  # its norm layers keep running statistics (BatchNorm), which frozen stages must not update
    no_decay: tuple[str, ...] = ()  # parameters never weight-decayed beyond norms and biases (embeddings)
    splittable: bool = True  # False: no stage structure found (a timm model): depths 0 and 5 only
    run_whole: bool = False  # True: stage 0 runs the whole backbone (timm's forward_features), the rest pass through


def _in_order(*stages: tuple[str, ...]) -> Callable[[nn.Module, int, torch.Tensor], torch.Tensor]:
    """A CNN stage's forward: its modules applied one after another."""

    def run(net: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
        for path in stages[index]:
            x = net.get_submodule(path)(x)
        return x

    return run


def _pooled(*paths: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """A CNN's pooling (and any norm before its head), flattened to (N, features)."""

    def pool(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for path in paths:
            x = net.get_submodule(path)(x)
        return x.flatten(1)

    return pool


def _fixed(stages: Stages) -> Callable[[nn.Module], Stages]:
    def named(net: nn.Module) -> Stages:
        return stages

    return named


RESNET_STAGES: Stages = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
CONVNEXT_STAGES: Stages = (
    ("features.0",),
    ("features.1",),
    ("features.2", "features.3"),  # each stage with the downsampling before it, like ResNet's layer2..4
    ("features.4", "features.5"),
    ("features.6", "features.7", "classifier.0"),  # the LayerNorm before the head belongs to the last stage
)
EFFICIENTNET_STAGES: Stages = (  # split at ResNet's strides: 4, 8, 16, 32
    ("features.0", "features.1"),
    ("features.2",),
    ("features.3",),
    ("features.4", "features.5"),
    ("features.6", "features.7", "features.8"),
)


def _vit_stages(net: nn.Module) -> Stages:
    """The patch embedding, then the encoder's layers in four equal groups (3 each for vit_b_16)."""
    layers = [f"encoder.layers.{name}" for name, _ in net.encoder.layers.named_children()]
    size = len(layers) // (NUM_STAGES - 1)
    groups = [tuple(layers[i * size : (i + 1) * size]) for i in range(NUM_STAGES - 1)]
    groups[-1] = (*groups[-1], *layers[(NUM_STAGES - 1) * size :], "encoder.ln")
    return (("conv_proj", "class_token", "encoder.pos_embedding", "encoder.dropout"), *groups)


def _vit_run_stage(net: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """torchvision's VisionTransformer.forward, cut at the same places as ``_vit_stages``."""
    import torch

    if index == 0:
        x = net._process_input(x)
        x = torch.cat([net.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return net.encoder.dropout(x + net.encoder.pos_embedding)
    for path in _vit_stages(net)[index]:
        if path.startswith("encoder.layers."):
            x = net.get_submodule(path)(x)
    return x


def _vit_pool(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.encoder.ln(x)[:, 0]  # the class token


FAMILIES: tuple[Family, ...] = (
    Family(
        name="resnet",
        model_class="ResNet",
        archs={
            "resnet18": Arch(512),
            "resnet34": Arch(512),
            "resnet50": Arch(2048),
            "resnet101": Arch(2048),
            "resnet152": Arch(2048),
        },
        stages=_fixed(RESNET_STAGES),
        run_stage=_in_order(("conv1", "bn1", "relu", "maxpool"), *RESNET_STAGES[1:]),
        pool=_pooled("avgpool"),
        head="fc",
        linear="fc",
        batch_norm=True,
    ),
    Family(
        name="convnext",
        model_class="ConvNeXt",
        archs={"convnext_tiny": Arch(768)},
        stages=_fixed(CONVNEXT_STAGES),
        run_stage=_in_order(*CONVNEXT_STAGES[:-1], CONVNEXT_STAGES[-1][:-1]),
        pool=_pooled("avgpool", "classifier.0"),
        head="classifier.2",
        linear="classifier.2",
        batch_norm=False,
    ),
    Family(
        name="efficientnet",
        model_class="EfficientNet",
        archs={"efficientnet_b0": Arch(1280)},
        stages=_fixed(EFFICIENTNET_STAGES),
        run_stage=_in_order(*EFFICIENTNET_STAGES),
        pool=_pooled("avgpool"),
        head="classifier",  # dropout, then the Linear: the dropout trains on cached features too
        linear="classifier.1",
        batch_norm=True,
    ),
    Family(
        name="vit",
        model_class="VisionTransformer",
        archs={"vit_b_16": Arch(768, patch_size=16)},
        stages=_vit_stages,
        run_stage=_vit_run_stage,
        pool=_vit_pool,
        head="heads",
        linear="heads.head",
        batch_norm=False,
        no_decay=("class_token", "encoder.pos_embedding"),
    ),
)
BY_ARCH: dict[str, Family] = {arch: family for family in FAMILIES for arch in family.archs}
ARCHS: tuple[str, ...] = tuple(BY_ARCH)


def is_timm(arch: str) -> bool:
    """timm's architecture: a name torchvision's table does not hold, or one written ``timm/NAME``
    (``tl_ray.backbones_timm``)."""
    return arch not in BY_ARCH


def check_arch(arch: str, option: str = "--arch") -> None:
    """A torchvision name of the table, or a name timm knows; else one line with the nearest names."""
    if is_timm(arch):
        from tl_ray import backbones_timm

        backbones_timm.check_arch(arch, ARCHS, option)


def family(arch: str) -> Family:
    if is_timm(arch):
        from tl_ray import backbones_timm

        check_arch(arch)
        return backbones_timm.family(arch)
    return BY_ARCH[arch]


def listing(pattern: str = "") -> list[tuple[str, str, bool]]:
    """What --arch takes: (name, library, has pretrained weights), torchvision's table first, then timm's (a name
    both have as ``timm/NAME``); ``pattern`` as fnmatch, a bare word matching anywhere."""
    import fnmatch

    from tl_ray import backbones_timm

    wanted = pattern if "*" in pattern else f"*{pattern}*"
    rows = [(arch, "torchvision", True) for arch in ARCHS if fnmatch.fnmatch(arch, wanted)]
    for name, pretrained in backbones_timm.listing(pattern):
        rows.append((backbones_timm.PREFIX + name if name in BY_ARCH else name, "timm", pretrained))
    return rows


def family_of(net: nn.Module) -> Family:
    """The family of a built torchvision or timm network (a SyncBatchNorm conversion keeps its class)."""
    from tl_ray import backbones_timm

    if backbones_timm.is_timm_net(net):
        return backbones_timm.family_for(net)
    for candidate in FAMILIES:
        if type(net).__name__ == candidate.model_class:
            return candidate
    raise TlRayError(f"{type(net).__name__} is not a supported backbone ({', '.join(ARCHS)}, or a timm model)")


def patch_size(arch: str) -> int:
    """> 0: a transformer built for one image size, a multiple of this."""
    if is_timm(arch):
        from tl_ray import backbones_timm

        check_arch(arch)
        return backbones_timm.patch_size(arch)
    return BY_ARCH[arch].archs[arch].patch_size


def check_image_size(arch: str, image_size: int, option: str = "--image-size") -> None:
    """A patch transformer cuts the image into whole patches: its size must be a multiple of the patch."""
    patch = patch_size(arch)
    if patch and image_size % patch:
        raise UsageError(f"{option} must be a multiple of {patch} for {arch} (its patch size); got {image_size}")
    if is_timm(arch):
        from tl_ray import backbones_timm

        backbones_timm.check_image_size(arch, image_size, option)


def check_freeze_depth(arch: str, freeze_depth: int | None, option: str = "--freeze-depth") -> None:
    """A model without stages tl-ray can split trains at depths 0 and NUM_STAGES only."""
    if freeze_depth not in (None, 0, NUM_STAGES) and not family(arch).splittable:
        raise UsageError(f"{option}: {arch} has no stages tl-ray can split; use 0 or {NUM_STAGES}; got {freeze_depth}")


def create(arch: str, num_classes: int, image_size: int = DEFAULT_IMAGE_SIZE) -> nn.Module:
    """The bare torchvision architecture with a ``num_classes`` head, randomly initialised (for ``image_size``
    where the architecture is built for one size)."""
    check_image_size(arch, image_size)
    if is_timm(arch):
        from tl_ray import backbones_timm

        return backbones_timm.create(arch, num_classes, image_size)
    import torchvision

    spec = family(arch).archs[arch]
    extra = {"image_size": image_size} if spec.patch_size else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)


def weights_enum(arch: str) -> type[torchvision.models.WeightsEnum]:
    """torchvision's weights for ``arch`` (``.DEFAULT`` is what ``--weights imagenet`` means)."""
    import torchvision

    if is_timm(arch):
        raise TlRayError(f"{arch} is a timm architecture: its weights are timm's (tl_ray.backbones_timm)")
    return torchvision.models.get_model_weights(arch)


def head_keys(arch_or_family: str | Family, state: Mapping[str, Any]) -> list[str]:
    """The state-dict keys of the head: what a new class list replaces, and what features do not depend on."""
    chosen = family(arch_or_family) if isinstance(arch_or_family, str) else arch_or_family
    return [key for key in state if key.startswith(chosen.head + ".")]


def fit_state(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` made loadable into ``net`` where only the image size differs: a transformer's position
    embeddings interpolated to its patch grid (torchvision's ``interpolate_embeddings``)."""
    from tl_ray import backbones_timm

    if backbones_timm.is_timm_net(net):
        return backbones_timm.fit_state(net, state)
    key = "encoder.pos_embedding"
    if family_of(net).model_class != "VisionTransformer" or key not in state:
        return state
    if state[key].shape == net.encoder.pos_embedding.shape:
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    return dict(interpolate_embeddings(net.image_size, net.patch_size, dict(state)))

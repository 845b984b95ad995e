"""Backbone construction, weight sources, the new head, and freezing by depth, for any ``tl_ray.backbones`` arch.

Weights are resolved once, in the driver (``initial_weights``), into a plain state
dict in torchvision's layout; workers build the bare architecture and load it. So
a cluster's workers never download anything, and a missing download fails before
any worker starts.
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from tl_ray import backbones, checkpoint, location, recipe
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import TlRayError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_MODULES = backbones.RESNET_STAGES  # a ResNet's freeze stages (the bench scripts name them)


@dataclass(frozen=True)
class InitialWeights:
    """A starting point for training: weights for a model with the new head, and how to normalise for them."""

    state_dict: dict[str, torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # human-readable: "imagenet:IMAGENET1K_V2", "none", a path
    head_reset: bool  # True when the head was freshly initialised for these classes
    crop_fraction: float = recipe.EVAL_CROP_FRACTION  # validation's centre crop / resize the weights expect
    # The resize the weights were trained with, where they say (timm's pretrained_cfg); None: torchvision's bilinear,
    # and no meta.json key (checkpoints from before timm stay byte-identical when resumed).
    interpolation: str | None = None


def create_model(arch: str, num_classes: int, image_size: int = backbones.DEFAULT_IMAGE_SIZE) -> nn.Module:
    """The bare torchvision architecture with a ``num_classes`` head, randomly initialised (``backbones.create``)."""
    return backbones.create(arch, num_classes, image_size)


create_resnet = create_model  # its name when every backbone was a ResNet


def _torchvision_weights(arch: str, name: str) -> torchvision.models.WeightsEnum:
    enum = backbones.weights_enum(arch)
    if name == "imagenet":
        return enum.DEFAULT
    try:
        return enum[name]
    except KeyError:
        choices = ", ".join(member.name for member in enum)
        raise TlRayError(
            f"--weights: {name!r} is not a file, a folder, 'imagenet' or 'none'; {arch} weights are: {choices}"
        ) from None


def _download(weights: torchvision.models.WeightsEnum) -> dict[str, torch.Tensor]:
    filename = os.path.basename(weights.url)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cache.exists():  # already staged: a bad file there is a bad file, not a download problem
        return _read_state_dict(cache)
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise TlRayError(
            f"--weights: cannot download {weights} from {weights.url} ({error}). Without internet, copy that "
            f"file to {cache} (TORCH_HOME sets the cache root) or pass --weights /path/to/{filename}"
        ) from error


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":  # any arch's: safetensors holds tensors only, nothing to unpickle
        from tl_ray import backbones_timm

        return backbones_timm.read_safetensors(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, refused globals, truncated zips all land here
        raise TlRayError(f"--weights: {path} is not a loadable state dict: {checkpoint.load_failure(error)}") from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]  # the common {"state_dict": ...} wrapper
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise TlRayError(f"--weights: {path} holds {type(loaded).__name__}, not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def _fit_to_model(
    model: nn.Module, weights: dict[str, torch.Tensor], source: str, keep_head: bool
) -> tuple[dict[str, torch.Tensor], bool]:
    """Load ``weights`` into ``model``; the old head only when ``keep_head`` (its classes are ours) and it fits.

    A head is kept for the same class *names*, never for the same count alone: a 4-class model's
    head transferred to another 4-class task would start every output on the wrong class.
    Weights for another image size are fitted to this one (a ViT's position embeddings).
    """
    family = backbones.family_of(model)
    head = weights.get(f"{family.linear}.weight")
    head_reset = not keep_head or head is None or head.shape != model.get_submodule(family.linear).weight.shape
    if head_reset:
        dropped = set(backbones.head_keys(family, weights))
        weights = {k: v for k, v in weights.items() if k not in dropped}
    weights = backbones.fit_state(model, weights)
    expected = model.state_dict()
    mismatched = [k for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        raise TlRayError(
            f"--weights: {source} does not fit this architecture (shape of {mismatched[0]} differs); check --arch"
        )
    result = model.load_state_dict(weights, strict=False)
    new_head = set(backbones.head_keys(family, expected)) if head_reset else set()
    missing = [k for k in result.missing_keys if k not in new_head]
    if missing or result.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise TlRayError(f"--weights: {source} does not fit this architecture ({detail}); check --arch")
    return model.state_dict(), head_reset


def initial_weights(
    arch: str,
    weights: str,
    class_names: Sequence[str],
    seed: int = 0,
    image_size: int = backbones.DEFAULT_IMAGE_SIZE,
) -> InitialWeights:
    """Resolve a --weights source (docs/architecture.md) into a state dict for ``arch`` with a head for ``class_names``
    (at ``image_size``, for an architecture built for one size).

    The source's head is kept only when it is known to predict these very classes: a tl-ray
    checkpoint with the same class names, or torchvision weights whose categories are ours.
    A bare ``.pth`` state dict does not say what its outputs mean, so its head is replaced.
    """
    torch.manual_seed(seed)  # the new head's initialisation is part of the run's reproducibility
    class_names = list(class_names)
    if backbones.is_timm(arch):
        from tl_ray import weights_timm

        return weights_timm.initial_weights(arch, weights, class_names, image_size)
    model = create_model(arch, len(class_names), image_size)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if weights == "none":
        return InitialWeights(model.state_dict(), mean, std, "none", True)
    path, named = _local_weights(weights)
    if path.is_dir():
        meta = checkpoint.read_meta(path)
        if meta["arch"] != arch:
            raise TlRayError(f"--weights: checkpoint {named} is a {meta['arch']}; pass --arch {meta['arch']}")
        same_classes = meta["class_names"] == class_names
        state, head_reset = _fit_to_model(model, checkpoint.read_model_state(path), named, same_classes)
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
        return InitialWeights(state, mean, std, f"checkpoint:{named}", head_reset, *_meta_preprocessing(meta))
    if path.is_file():
        state, head_reset = _fit_to_model(model, _read_state_dict(path), named, keep_head=False)
        return InitialWeights(state, mean, std, named, head_reset)
    if os.sep in weights or weights.endswith((".pth", ".pt", ".safetensors")):
        raise TlRayError(f"--weights: {weights} does not exist")
    enum_value = _torchvision_weights(arch, weights)
    same_classes = list(enum_value.meta.get("categories", [])) == class_names
    state, head_reset = _fit_to_model(model, _download(enum_value), str(enum_value), same_classes)
    transforms = enum_value.transforms()
    source = f"imagenet:{enum_value.name}"
    return InitialWeights(
        state, tuple(transforms.mean), tuple(transforms.std), source, head_reset, _enum_crop_fraction(enum_value)
    )


def _local_weights(weights: str) -> tuple[Path, str]:
    """A --weights file or checkpoint folder on this machine (one in object storage fetched once, ``checkpoint.fetch``)
    and the name to record and show: the absolute path, or the URI."""
    if location.is_uri(weights):
        if weights.partition("?")[0].endswith((".pth", ".pt", ".safetensors")):
            return checkpoint.fetch_file(weights, "--weights"), weights
        return checkpoint.fetch(weights, "--weights"), weights
    path = Path(weights).expanduser()
    return path, str(path.resolve())


def eval_preprocessing(arch: str, weights: str) -> tuple[float, str | None]:
    """The validation crop fraction and resize interpolation ``initial_weights`` would give (None: torchvision's
    bilinear), without reading any weights (a sweep decodes its cache with this resize before any trial starts)."""
    if backbones.is_timm(arch) and not _names_checkpoint(weights):
        from tl_ray import weights_timm

        return weights_timm.eval_preprocessing(arch, weights)
    if location.is_uri(weights) and not weights.partition("?")[0].endswith((".pth", ".pt")):
        return _meta_preprocessing(checkpoint.read_meta(checkpoint.fetch(weights, "--weights")))
    path = Path(weights).expanduser()
    if weights != "none" and path.is_dir():
        return _meta_preprocessing(checkpoint.read_meta(path))
    if weights == "none" or path.is_file() or os.sep in weights or weights.endswith((".pth", ".pt")):
        return recipe.EVAL_CROP_FRACTION, None
    return _enum_crop_fraction(_torchvision_weights(arch, weights)), None


def _names_checkpoint(weights: str) -> bool:
    """``weights`` is a tl-ray checkpoint folder (local or a URI), not a file, a tag, 'imagenet' or 'none'."""
    if weights in ("none", "imagenet"):
        return False
    if location.is_uri(weights):
        return not weights.partition("?")[0].endswith((".pth", ".pt", ".safetensors"))
    return Path(weights).expanduser().is_dir()


def _meta_crop_fraction(meta: Mapping) -> float:
    """A checkpoint evaluates as its source did: its recorded crop / resize."""
    if not meta.get("resize_size"):
        return recipe.EVAL_CROP_FRACTION
    return meta["image_size"] / meta["resize_size"]


def _meta_preprocessing(meta: Mapping) -> tuple[float, str | None]:
    """A checkpoint evaluates as its source did: its crop fraction and resize interpolation (None: bilinear)."""
    return _meta_crop_fraction(meta), meta.get("interpolation")


def _enum_crop_fraction(enum_value: torchvision.models.WeightsEnum) -> float:
    transforms = enum_value.transforms()
    return transforms.crop_size[0] / transforms.resize_size[0]


class TransferModel(nn.Module):
    """A torchvision backbone with its first ``freeze_depth`` stages frozen, in the full sense of the architecture doc.

    Frozen stages: no gradients, not in the optimizer (see ``parameter_groups``), in eval mode
    whatever ``train()`` says (BatchNorm keeps its running statistics, dropout is off), and run
    under ``torch.no_grad`` so no autograd graph (or its activation memory) is built.
    With ``train_bn=False`` the BatchNorm layers of the fine-tuned stages stay in eval
    mode too (their running statistics are kept; their scale and shift still learn):
    the usual choice when each worker's batch is too small for good batch statistics.
    The stages, head and forward come from the net's ``backbones.Family``; ``net`` keeps
    torchvision's module names, so ``net.state_dict()`` is a plain torchvision state dict.
    """

    def __init__(self, net: nn.Module, freeze_depth: int, train_bn: bool = True) -> None:
        super().__init__()
        self.net = net
        self.family = backbones.family_of(net)
        self.stages = self.family.stages(net)
        self.train_bn = train_bn
        self.freeze_depth = NUM_STAGES
        self.set_freeze_depth(freeze_depth)

    @property
    def head(self) -> nn.Module:
        """The module from features to logits (what trains alone on cached features)."""
        return self.net.get_submodule(self.family.head)

    def _members(self, stages: Sequence[tuple[str, ...]]) -> Iterator[nn.Module | nn.Parameter]:
        for names in stages:
            for name in names:
                try:
                    yield self.net.get_submodule(name)
                except AttributeError:  # a bare parameter: a ViT's class token and position embedding
                    yield self.net.get_parameter(name)

    def set_freeze_depth(self, freeze_depth: int) -> None:
        """Freeze the first ``freeze_depth`` stages and unfreeze the rest (a probe-then-fine-tune run moves it)."""
        if not 0 <= freeze_depth <= NUM_STAGES:
            raise TlRayError(f"--freeze-depth must be between 0 and {NUM_STAGES}; got {freeze_depth}")
        if not self.family.splittable and freeze_depth not in (0, NUM_STAGES):
            raise TlRayError(
                f"--freeze-depth: {self.family.model_class} has no stages tl-ray can split; use 0 or {NUM_STAGES}"
            )
        self.freeze_depth = freeze_depth
        for index, names in enumerate(self.stages):
            for member in self._members([names]):
                member.requires_grad_(index >= freeze_depth)
        self.train(self.training)

    def _stage_modules(self, stages: Sequence[tuple[str, ...]]) -> Iterator[nn.Module]:
        return (member for member in self._members(stages) if isinstance(member, nn.Module))

    def _stage_parameters(self, stages: Sequence[tuple[str, ...]]) -> list[nn.Parameter]:
        params = []
        for member in self._members(stages):
            params.extend(member.parameters() if isinstance(member, nn.Module) else [member])
        return params

    def frozen_modules(self) -> Iterator[nn.Module]:
        return self._stage_modules(self.stages[: self.freeze_depth])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(
        self,
        lr: float,
        weight_decay: float,
        backbone_lr_mult: float = 1.0,
        stage_lr_mult: Mapping[str, float] | None = None,
    ) -> list[dict]:
        """Optimizer parameter groups: head and backbone apart (the backbone at ``lr * backbone_lr_mult``),
        each split into weights that decay and norm weights, biases and embeddings that do not. With
        ``stage_lr_mult`` (--layer-decay: ``toolbox.layer_multipliers``, by ``stage1`` .. ``stage5``) each unfrozen
        stage is a group of its own at its share of ``lr`` (which includes the backbone multiplier).

        Decaying a BatchNorm scale or a bias pulls it towards zero for no gain in generalisation
        (the torchvision reference recipes and timm leave them out too). The groups hold the stages
        unfrozen at the current depth: a probe-then-fine-tune run builds its optimizer once, at its
        final depth, before freezing to the head phase, so its state survives the switch and a resume.
        """
        parts: dict[str, tuple[list[nn.Parameter], float]] = {"head": (list(self.head.parameters()), 1.0)}
        if stage_lr_mult is None:
            backbone = self._stage_parameters(self.stages[self.freeze_depth :])
            parts["backbone"] = (backbone, backbone_lr_mult)
        else:
            for index in range(self.freeze_depth, NUM_STAGES):
                name = f"stage{index + 1}"
                parts[name] = (self._stage_parameters(self.stages[index : index + 1]), stage_lr_mult[name])
        never_decayed = {id(self.net.get_parameter(name)) for name in self.family.no_decay}
        groups = []
        for part, (params, scale) in parts.items():
            decay = [p for p in params if p.ndim > 1 and id(p) not in never_decayed]
            no_decay = [p for p in params if p.ndim <= 1 or id(p) in never_decayed]
            for suffix, chosen, decay_value in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
                if chosen:
                    groups.append(
                        {"name": part + suffix, "params": chosen, "lr": lr * scale, "weight_decay": decay_value}
                    )
        return groups

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        if not self.train_bn:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled backbone output the head sees: at depth 5 a fixed function of the image, so cacheable."""
        if self.family.run_whole:  # timm's forward_features: frozen parameters need no grad, so build no graph
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze_depth < NUM_STAGES):
                return self.family.pool(self.net, self.family.run_stage(self.net, 0, x))
        run_stage = self.family.run_stage
        with torch.no_grad():
            for index in range(self.freeze_depth):
                x = run_stage(self.net, index, x)
        for index in range(self.freeze_depth, NUM_STAGES):
            x = run_stage(self.net, index, x)
        return self.family.pool(self.net, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


TransferResNet = TransferModel  # its name when every backbone was a ResNet

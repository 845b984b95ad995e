"""ResNet construction, weight sources, the new head, and freezing by depth.

Weights are resolved once, in the driver (``initial_weights``), into a plain state
dict in torchvision's layout; workers build the bare architecture and load it. So
a cluster's workers never download anything, and a missing download fails before
any worker starts.
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet

from tl_ray import checkpoint
from tl_ray.config import ARCHS, NUM_STAGES
from tl_ray.errors import TlRayError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_MODULES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
assert len(STAGE_MODULES) == NUM_STAGES


@dataclass(frozen=True)
class InitialWeights:
    """A starting point for training: weights for a model with the new head, and how to normalise for them."""

    state_dict: dict[str, torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # human-readable: "imagenet:IMAGENET1K_V2", "none", a path
    head_reset: bool  # True when the head was freshly initialised for these classes


def create_resnet(arch: str, num_classes: int) -> ResNet:
    """The bare torchvision architecture with a ``num_classes`` head, randomly initialised."""
    if arch not in ARCHS:
        raise TlRayError(f"--arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _torchvision_weights(arch: str, name: str) -> torchvision.models.WeightsEnum:
    enum = torchvision.models.get_model_weights(arch)
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
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, refused globals, truncated zips all land here
        raise TlRayError(f"--weights: {path} is not a loadable state dict: {checkpoint.load_failure(error)}") from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]  # the common {"state_dict": ...} wrapper
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise TlRayError(f"--weights: {path} holds {type(loaded).__name__}, not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def _fit_to_model(model: ResNet, weights: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Drop the old head when its shape does not match ours; refuse anything else that does not fit."""
    head_reset = weights.get("fc.weight") is None or weights["fc.weight"].shape != model.fc.weight.shape
    if head_reset:
        weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    expected = model.state_dict()
    mismatched = [k for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        raise TlRayError(
            f"--weights: {source} does not fit this architecture (shape of {mismatched[0]} differs); check --arch"
        )
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not (head_reset and k.startswith("fc."))]
    if missing or result.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise TlRayError(f"--weights: {source} does not fit this architecture ({detail}); check --arch")
    return model.state_dict(), head_reset


def initial_weights(arch: str, weights: str, num_classes: int, seed: int = 0) -> InitialWeights:
    """Resolve a --weights source (see DESIGN.md) into a state dict for ``arch`` with a ``num_classes`` head."""
    torch.manual_seed(seed)  # the new head's initialisation is part of the run's reproducibility
    model = create_resnet(arch, num_classes)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    path = Path(weights).expanduser()
    if weights == "none":
        return InitialWeights(model.state_dict(), mean, std, "none", True)
    if path.is_dir():
        meta = checkpoint.read_meta(path)
        if meta["arch"] != arch:
            raise TlRayError(f"--weights: checkpoint {path} is a {meta['arch']}; pass --arch {meta['arch']}")
        state, head_reset = _fit_to_model(model, checkpoint.read_model_state(path), str(path))
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
        return InitialWeights(state, mean, std, f"checkpoint:{path.resolve()}", head_reset)
    if path.is_file():
        state, head_reset = _fit_to_model(model, _read_state_dict(path), str(path))
        return InitialWeights(state, mean, std, str(path.resolve()), head_reset)
    if os.sep in weights or weights.endswith((".pth", ".pt")):
        raise TlRayError(f"--weights: {weights} does not exist")
    enum_value = _torchvision_weights(arch, weights)
    state, head_reset = _fit_to_model(model, _download(enum_value), str(enum_value))
    transforms = enum_value.transforms()
    return InitialWeights(
        state, tuple(transforms.mean), tuple(transforms.std), f"imagenet:{enum_value.name}", head_reset
    )


class TransferResNet(nn.Module):
    """A torchvision ResNet with its first ``freeze_depth`` stages frozen, in the full sense of DESIGN.md.

    Frozen stages: no gradients, not in the optimizer (see ``trainable_parameters``),
    BatchNorm kept in eval mode whatever ``train()`` says, and run under
    ``torch.no_grad`` so no autograd graph (or its activation memory) is built.
    ``net`` keeps torchvision's module names, so ``net.state_dict()`` is a plain
    torchvision state dict.
    """

    def __init__(self, net: ResNet, freeze_depth: int) -> None:
        super().__init__()
        if not 0 <= freeze_depth <= NUM_STAGES:
            raise TlRayError(f"--freeze-depth must be between 0 and {NUM_STAGES}; got {freeze_depth}")
        self.net = net
        self.freeze_depth = freeze_depth
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> Iterator[nn.Module]:
        for names in STAGE_MODULES[: self.freeze_depth]:
            for name in names:
                yield getattr(self.net, name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> TransferResNet:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def _stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        if index == 0:
            return net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return getattr(net, f"layer{index}")(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled backbone output the head sees: at depth 5 a fixed function of the image, so cacheable."""
        with torch.no_grad():
            for index in range(self.freeze_depth):
                x = self._stage(index, x)
        for index in range(self.freeze_depth, NUM_STAGES):
            x = self._stage(index, x)
        return torch.flatten(self.net.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.features(x))

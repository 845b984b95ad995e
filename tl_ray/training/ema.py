"""--ema: an exponential moving average of the weights, as timm's ModelEmaV3 keeps it (its warm-up of the decay is
``toolbox.ema_decay``). A run state holds one (``state.RunState.ema``); the epoch loop updates it after every
optimizer step and validates it instead of the trained weights; the checkpoint saves it as the model."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tl_ray import model
from tl_ray.backbones import NUM_STAGES
from tl_ray.training.toolbox import ema_decay


class WeightEma:
    """An averaged copy of a model, moved towards it after every optimizer step. Floating-point state (weights and
    BatchNorm running statistics) is averaged, integer buffers (BatchNorm's batch count) copied: timm's ModelEmaV3.
    ``transfer`` is a ``model.TransferModel`` around the copy: validation runs it as it runs the live model."""

    def __init__(self, net: nn.Module, decay: float, train_bn: bool = True) -> None:
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.decay, self.train_bn = decay, train_bn
        self.updates = 0
        self._transfer: model.TransferModel | None = None

    @property
    def transfer(self) -> model.TransferModel:
        """The averaged backbone as validation runs it (all stages frozen: it never trains)."""
        if self._transfer is None:
            self._transfer = model.TransferModel(self.net, NUM_STAGES, train_bn=self.train_bn).eval()
            self.net.requires_grad_(False)
        return self._transfer

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        device = next(net.parameters()).device
        if next(self.net.parameters()).device != device:  # the trained model moved to its GPU after the copy
            self.net.to(device)
        self.updates += 1
        decay = ema_decay(self.decay, self.updates)
        averaged, copied = [], []
        for mine, theirs in zip(self.net.state_dict().values(), net.state_dict().values(), strict=True):
            if mine.is_floating_point():
                averaged.append(mine)
                copied.append(theirs.detach().to(mine.dtype))
            else:
                mine.copy_(theirs)
        if averaged:
            torch._foreach_lerp_(averaged, copied, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        """What the train state keeps besides the averaged weights (which are model.pt)."""
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.updates = int(saved["updates"])

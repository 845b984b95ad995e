"""--mixup, --cutmix, --mix-prob: training batches mixed pairwise (``Mixer``), the soft targets they make, and the loss
that takes them with --label-smoothing and --class-weights (``SoftTargetLoss``); train_acc counts the dominant label."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from tl_ray.seeds import Stream, stream_seed

# timm's Mixup switch_prob: with both --mixup and --cutmix, a mixed batch is CutMix half of the time.
CUTMIX_SHARE = 0.5


class Mixer:
    """MixUp and CutMix of a training batch (torchvision.transforms.v2's, which pair each image with the one before
    it in the batch and set CutMix's label share to the pasted box's exact area), applied to a ``mix_prob`` share of
    batches; returns the images and soft targets (rows of class shares summing to 1).

    Each batch's draws (whether it mixes, which mix, the mixing weight, CutMix's box) come from the run's seed and
    the batch's (epoch, rank, index) alone, with torch's global generator forked around them (v2's transforms take
    no generator): a resumed run mixes its batches exactly as the uninterrupted run did, and mixing takes nothing
    from the generator that dropout and the rest of training draw from."""

    def __init__(self, mixup: float, cutmix: float, mix_prob: float, num_classes: int, seed: int = 0) -> None:
        self.mix_prob = mix_prob
        self.num_classes = num_classes
        self.seed = seed
        self.mixup = v2.MixUp(alpha=mixup, num_classes=num_classes) if mixup > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix, num_classes=num_classes) if cutmix > 0 else None

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, rank: int, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``index``: the batch's place in this worker's epoch."""
        with torch.random.fork_rng(devices=[]):  # the draws are on the CPU generator, whatever the images' device
            torch.manual_seed(stream_seed(Stream.MIX, self.seed, epoch, rank, index))
            draws = torch.rand(2).tolist()
            chosen = self.mixup or self.cutmix
            if self.mixup is not None and self.cutmix is not None and draws[1] < CUTMIX_SHARE:
                chosen = self.cutmix
            if chosen is None or draws[0] >= self.mix_prob or len(labels) < 2:
                return images, nn.functional.one_hot(labels, self.num_classes).to(images.dtype)
            return chosen(images, labels)


class SoftTargetLoss(nn.Module):
    """Cross-entropy against soft targets (mixed labels), with label smoothing and class weights combined as
    nn.CrossEntropyLoss combines them for hard labels, of which it is the generalisation (equal on one-hot targets):

    loss = sum_i sum_c w_c q_ic (-log p_ic) / sum_i sum_c w_c t_ic, where t is the mixed target and
    q = (1 - smoothing) t + smoothing / C its smoothed form. A mixed image's weight in the mean is its classes'
    weights in the shares of the mix (the rule for a hard label, w of its class, spread over the mix). Integer labels
    are taken as one-hot targets."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        classes_count = logits.shape[1]
        if not targets.is_floating_point():
            targets = nn.functional.one_hot(targets, classes_count)
        targets = targets.float()
        smoothed = targets * (1.0 - self.label_smoothing) + self.label_smoothing / classes_count
        log_p = torch.log_softmax(logits.float(), dim=1)
        weight = self.weight if self.weight is not None else torch.ones(classes_count, device=logits.device)
        per_image = -(smoothed * weight * log_p).sum(1)
        return per_image.sum() / (targets * weight).sum()


def dominant_labels(targets: torch.Tensor) -> torch.Tensor:
    """The label with the larger share of each mixed target: what train_acc counts a prediction against."""
    return targets.argmax(1) if targets.is_floating_point() else targets

"""What a worker measures on validation: counts that sum across workers into the whole set's metrics.

Each worker validates its own (unequal) share of the validation set, so every metric is reduced from sums (loss,
correct and seen images, and per class: images, predictions and hits), never from per-worker rates: averaging the
workers' accuracies or F1s would weigh a worker with 3 images like one with 9. ``classes`` turns the summed counts
into per-class recall and macro F1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from tl_ray import classes

if TYPE_CHECKING:
    from tl_ray.inputs.plan import WorkerBatches

# The epoch metric Ray Train keeps checkpoints by: classes.rank_score, the ranking that picks the best checkpoint.
RANK_SCORE = "rank_score"


def sum_across_workers(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over every worker of the group (as they are on one worker, or outside Ray Train)."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return totals.tolist()


def sync_buffers_from_rank0(module: nn.Module) -> None:
    """Give every worker rank 0's BatchNorm statistics before validating.

    Each worker's last training step updated its own running statistics; rank 0's are
    the ones the checkpoint keeps, so val_acc must be measured with those.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def split_counts(values: list[float], parts: int) -> list[list[float]]:
    """``values`` cut into ``parts`` equal lists: ``count_classes``' concatenated counts back apart."""
    size = len(values) // parts
    return [values[index * size : (index + 1) * size] for index in range(parts)]


def count_classes(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per true class, per predicted class, and correct per class, concatenated (3 x num_classes): counts
    that sum across batches and workers into ``classes.class_metrics``' arguments."""
    hits = labels[predictions == labels]
    return torch.cat([torch.bincount(values, minlength=num_classes) for values in (labels, predictions, hits)]).double()


def evaluate(
    net: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    model_input: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    criterion: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    num_classes: int,
) -> tuple[float, float, float, list[float]]:
    """Validate this worker's shard on the unwrapped model: DDP would add collectives workers do not share.

    Returns the loss sum, correct and seen images, and ``count_classes``' counts, all to be summed across workers.
    """
    net.eval()
    loss_sum = correct = seen = 0.0
    counts = torch.zeros(3 * num_classes, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            labels = batch["label"]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(model_input(batch))
            loss_sum += criterion(logits.float(), labels).item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            counts += count_classes(labels, logits.argmax(1), num_classes)
    return loss_sum, correct, seen, counts.tolist()


def validate(
    transfer: nn.Module,
    trained: nn.Module,
    batches: WorkerBatches,
    criterion: nn.Module,
    amp_dtype: torch.dtype | None,
    num_classes: int,
    train_totals: list[float],
) -> tuple[list[float], dict[str, Any], dict[str, float]]:
    """Validate rank 0's model on every worker's share: (this epoch's training and validation totals summed
    across workers, the per-class metrics, {val_acc, val_loss, macro_f1}).

    ``train_totals`` (this worker's loss sum, correct and seen training images) ride on the same all-reduce, so
    an epoch takes one collective for all its numbers."""
    device = batches.device
    sync_buffers_from_rank0(transfer)
    val_loss, val_correct, val_seen, val_counts = evaluate(
        trained, batches.val(), batches.model_input, criterion, device, amp_dtype, num_classes
    )
    totals = sum_across_workers([*train_totals, val_loss, val_correct, val_seen, *val_counts], device)
    per_class = classes.class_metrics(*split_counts(totals[6:], 3))
    validation = {
        "val_acc": totals[4] / max(totals[5], 1),
        "val_loss": totals[3] / max(totals[5], 1),
        "macro_f1": per_class["macro_f1"],
    }
    return totals, per_class, validation

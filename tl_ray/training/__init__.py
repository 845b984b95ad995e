"""Training one model: the driver that sets a run up (``driver``), the loop every Ray Train worker runs (``loop``),
the learning-rate schedule they share (``schedule``) and the LR range test of ``--lr auto`` (``lr_range``)."""

from tl_ray.training.driver import LrFinding, TrainResult, find_lr, run

__all__ = ["LrFinding", "TrainResult", "find_lr", "run"]

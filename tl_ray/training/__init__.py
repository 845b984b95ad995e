"""Training one model: the driver that sets a run up (``driver``), the loop every Ray Train worker runs (``loop``)
and the learning-rate schedule they share (``schedule``)."""

from tl_ray.training.driver import TrainResult, run

__all__ = ["TrainResult", "run"]

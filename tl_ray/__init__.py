"""tl-ray: transfer learning of image classifiers with Ray Data, Ray Train and Ray Tune.

The Python API mirrors the CLI: ``tl_ray.train(data=..., arch=..., epochs=...)``.
Importing the package is cheap (``tl-ray --help`` should not wait ~8 s for torch and
Ray); each API function imports what it needs when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch

    from tl_ray.config import TrainConfig
    from tl_ray.train import TrainResult


def train(config: TrainConfig | None = None, /, **options: Any) -> TrainResult:
    """Run `tl-ray train` from Python; keyword options are the CLI flags with underscores."""
    import dataclasses

    from tl_ray.config import TrainConfig, merge
    from tl_ray.train import run

    # Importing the submodule tl_ray.train rebinds this package's `train` attribute to
    # the module; put the API function back so `tl_ray.train(...)` keeps working.
    globals()["train"] = _train_api
    if config is None:
        config = merge(TrainConfig, None, options)
    elif options:
        config = dataclasses.replace(config, **options)
    return run(config)


_train_api = train


def load_checkpoint(path: str, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, meta) from a tl-ray checkpoint directory: all that predicting needs."""
    from tl_ray.checkpoint import load_checkpoint as load

    return load(path, device)


def write_sample_data(out: str, per_class: int = 200, seed: int = 0) -> dict[str, int]:
    """Write the synthetic source/target datasets of `tl-ray sample-data`."""
    from tl_ray.sample import write_sample_data as write

    return write(out, per_class, seed)

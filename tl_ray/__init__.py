"""tl-ray: transfer learning of image classifiers with Ray Data, Ray Train and Ray Tune.

The Python API mirrors the CLI: ``tl_ray.train(data=..., arch=..., epochs=...)``,
``tl_ray.tune(...)``, ``tl_ray.predict(...)``, ``tl_ray.evaluate(...)``.
Importing the package is cheap (``tl-ray --help`` should not wait ~8 s for torch and
Ray); each API function imports what it needs when called.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

__version__ = "0.1.0"

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from tl_ray.config import TrainConfig, TuneConfig
    from tl_ray.predict import Evaluation
    from tl_ray.train import TrainResult
    from tl_ray.tune import SweepSummary

Function = TypeVar("Function", bound=Callable[..., Any])


def _api(function: Function) -> Function:
    """Keep ``tl_ray.<name>`` the API function even after its namesake submodule is imported.

    Importing ``tl_ray.train`` (the module) rebinds the package attribute ``train`` to
    that module; the wrapper puts the function back after every call.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        finally:
            globals()[function.__name__] = wrapper

    return wrapper  # type: ignore[return-value]


def _config(config_class: type, config: Any, options: dict[str, Any]) -> Any:
    from tl_ray.config import merge

    if config is None:
        return merge(config_class, None, options)
    return dataclasses.replace(config, **options) if options else config


@_api
def train(config: TrainConfig | None = None, /, **options: Any) -> TrainResult:
    """Run `tl-ray train` from Python; keyword options are the CLI flags with underscores."""
    from tl_ray.config import TrainConfig
    from tl_ray.train import run

    return run(_config(TrainConfig, config, options).validate())


@_api
def tune(config: TuneConfig | None = None, /, **options: Any) -> tuple[SweepSummary, dict[str, str]]:
    """Run `tl-ray tune` from Python: (sweep summary, paths of the report files)."""
    from tl_ray.config import TuneConfig
    from tl_ray.tune import sweep

    return sweep(_config(TuneConfig, config, options))


@_api
def predict(checkpoint: str, data: str, out: str | None = None, top_k: int = 3, batch_size: int = 64) -> pd.DataFrame:
    """`tl-ray predict` from Python: one row per image, sorted by path (and written to ``out``)."""
    from tl_ray.predict import predict as run_predict

    return run_predict(checkpoint, data, out, top_k, batch_size)


def evaluate(checkpoint: str, data: str, out: str | None = None, batch_size: int = 64) -> Evaluation:
    """`tl-ray evaluate` from Python: metrics, per-image rows and the misclassified ones."""
    from tl_ray.predict import evaluate as run_evaluate

    return run_evaluate(checkpoint, data, out, batch_size)


def load_checkpoint(path: str, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, meta) from a tl-ray checkpoint directory: all that predicting needs."""
    from tl_ray.checkpoint import load_checkpoint as load

    return load(path, device)


def write_sample_data(out: str, per_class: int = 200, seed: int = 0) -> dict[str, int]:
    """Write the synthetic source/target datasets of `tl-ray sample-data`."""
    from tl_ray.sample import write_sample_data as write

    return write(out, per_class, seed)

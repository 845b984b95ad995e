"""tl-ray: transfer learning of image classifiers with Ray Data, Ray Train and Ray Tune.

The Python API mirrors the CLI: ``tl_ray.train(data=..., arch=..., epochs=...)``,
``tl_ray.lr_find(...)``, ``tl_ray.tune(...)``, ``tl_ray.predict(...)``, ``tl_ray.evaluate(...)``,
``tl_ray.inspect(...)``, ``tl_ray.export(...)``.
The modules are named apart from these functions (``tl_ray.training``, ``tl_ray.sweep``,
``tl_ray.inference``, ``tl_ray.deployable``), so importing one never replaces a function.
Importing the package is cheap (``tl-ray --help`` should not wait ~8 s for torch and
Ray); each API function imports what it needs when called.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from tl_ray.config import LrFindConfig, TrainConfig, TuneConfig
    from tl_ray.deployable import ExportResult
    from tl_ray.inference import Evaluation
    from tl_ray.sweep import SweepSummary
    from tl_ray.training import LrFinding, TrainResult


def _config(config_class: type, config: Any, options: dict[str, Any]) -> Any:
    from tl_ray.config import merge

    if config is None:
        return merge(config_class, None, options)
    return dataclasses.replace(config, **options) if options else config


def train(config: TrainConfig | None = None, /, **options: Any) -> TrainResult:
    """Run `tl-ray train` from Python; keyword options are the CLI flags with underscores."""
    from tl_ray.config import TrainConfig
    from tl_ray.training import run

    return run(_config(TrainConfig, config, options).validate())


def lr_find(config: LrFindConfig | None = None, /, **options: Any) -> LrFinding:
    """Run `tl-ray lr-find` from Python: the LR range test's suggestion (``.suggestion``), curve and plot."""
    from tl_ray.config import LrFindConfig
    from tl_ray.training import find_lr

    return find_lr(_config(LrFindConfig, config, options).validate())


def tune(config: TuneConfig | None = None, /, **options: Any) -> tuple[SweepSummary, dict[str, str]]:
    """Run `tl-ray tune` from Python: (sweep summary, paths of the report files)."""
    from tl_ray.config import TuneConfig
    from tl_ray.sweep import sweep

    return sweep(_config(TuneConfig, config, options))


def _source_options(options: dict[str, Any]):
    from tl_ray.config import SourceOptions

    return SourceOptions(**options).validate()


def predict(
    checkpoint: str, data: str, out: str | None = None, top_k: int = 3, batch_size: int = 64, **source: Any
) -> pd.DataFrame:
    """`tl-ray predict` from Python: one row per image, sorted by path (and written to ``out``). ``source``: the
    source flags with underscores (``path_column="file"``)."""
    from tl_ray.inference import predict as run_predict

    return run_predict(checkpoint, data, out, top_k, batch_size, options=_source_options(source))


def evaluate(checkpoint: str, data: str, out: str | None = None, batch_size: int = 64, **source: Any) -> Evaluation:
    """`tl-ray evaluate` from Python: metrics, per-image rows and the misclassified ones (``source`` as predict's)."""
    from tl_ray.inference import evaluate as run_evaluate

    return run_evaluate(checkpoint, data, out, batch_size, options=_source_options(source))


def inspect(data: str, val_data: str | None = None, val_fraction: float = 0.2, decode: bool = False, **source: Any):
    """`tl-ray inspect` from Python: an ``inspection.Inspection`` of what a run on ``data`` would train on."""
    from tl_ray.inspection import inspect as run_inspect

    return run_inspect(data, val_fraction, _source_options(source), val_data, decode)


def export(checkpoint: str, out: str, format: str) -> ExportResult:
    """`tl-ray export` from Python: ``checkpoint`` as a torchscript or onnx file at ``out``, metadata at out.json."""
    from tl_ray.deployable import export as run_export

    return run_export(checkpoint, out, format)


def load_checkpoint(path: str, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, meta) from a tl-ray checkpoint directory: all that predicting needs."""
    from tl_ray.checkpoint import load_checkpoint as load

    return load(path, device)


def write_sample_data(out: str, per_class: int = 200, seed: int = 0) -> dict[str, int]:
    """Write the synthetic source/target datasets of `tl-ray sample-data`."""
    from tl_ray.sample import write_sample_data as write

    return write(out, per_class, seed)

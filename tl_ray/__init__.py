"""tl-ray: transfer learning of image classifiers with Ray Data, Ray Train and Ray Tune.

The Python API mirrors the CLI: ``tl_ray.train(data=..., arch=..., epochs=...)``,
``tl_ray.lr_find(...)``, ``tl_ray.tune(...)``, ``tl_ray.predict(...)``, ``tl_ray.evaluate(...)``,
``tl_ray.inspect(...)``, ``tl_ray.export(...)``, ``tl_ray.audit(...)``.
The modules are named apart from these functions (``tl_ray.training``, ``tl_ray.tuning``,
``tl_ray.inference``, ``tl_ray.inputs``, ``tl_ray.auditing``), so importing one never replaces a function.
Every option's default is its declaration's (``tl_ray.options``): these functions take the options as keywords and
repeat none of them.
Importing the package is cheap (``tl-ray --help`` should not wait ~8 s for torch and
Ray); each API function imports what it needs when called.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from tl_ray.version import __version__ as __version__

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from tl_ray.auditing.result import AuditResult
    from tl_ray.inference.evaluate import Evaluation
    from tl_ray.inference.export import ExportResult
    from tl_ray.inputs.inspect import Inspection
    from tl_ray.training.config import LrFindConfig, TrainConfig
    from tl_ray.training.driver import LrFinding, TrainResult
    from tl_ray.tuning.config import TuneConfig
    from tl_ray.tuning.sweep import SweepSummary


def _config(config_class: type, config: Any, options: dict[str, Any]) -> Any:
    from tl_ray.options import merge

    if config is None:
        return merge(config_class, None, options)
    return dataclasses.replace(config, **options) if options else config


def train(config: TrainConfig | None = None, /, **options: Any) -> TrainResult:
    """Run `tl-ray train` from Python; keyword options are the CLI flags with underscores."""
    from tl_ray.training.config import TrainConfig
    from tl_ray.training.driver import run

    return run(_config(TrainConfig, config, options).validate())


def lr_find(config: LrFindConfig | None = None, /, **options: Any) -> LrFinding:
    """Run `tl-ray lr-find` from Python: the LR range test's suggestion (``.suggestion``), curve and plot."""
    from tl_ray.training.config import LrFindConfig
    from tl_ray.training.driver import find_lr

    return find_lr(_config(LrFindConfig, config, options).validate())


def tune(config: TuneConfig | None = None, /, **options: Any) -> tuple[SweepSummary, dict[str, str]]:
    """Run `tl-ray tune` from Python: (sweep summary, paths of the report files)."""
    from tl_ray.tuning.config import TuneConfig
    from tl_ray.tuning.sweep import sweep

    return sweep(_config(TuneConfig, config, options))


def predict(checkpoint: str, data: str, **options: Any) -> pd.DataFrame:
    """`tl-ray predict` from Python: one row per image, sorted by path (and written to ``out`` when given).
    ``options``: predict's other flags with underscores (``top_k=5``, ``path_column="file"``)."""
    from tl_ray.inference.config import PredictConfig
    from tl_ray.inference.predict import predict as run_predict

    return run_predict(_config(PredictConfig, None, {"checkpoint": checkpoint, "data": data, **options}))


def evaluate(checkpoint: str, data: str, **options: Any) -> Evaluation:
    """`tl-ray evaluate` from Python: metrics, per-image rows and the misclassified ones (``options`` as the flags)."""
    from tl_ray.inference.config import EvaluateConfig
    from tl_ray.inference.evaluate import evaluate as run_evaluate

    return run_evaluate(_config(EvaluateConfig, None, {"checkpoint": checkpoint, "data": data, **options}))


def inspect(data: str, **options: Any) -> Inspection:
    """`tl-ray inspect` from Python: what a run on ``data`` would train on (``options`` as the flags)."""
    from tl_ray.inputs.config import InspectConfig
    from tl_ray.inputs.inspect import inspect as run_inspect

    return run_inspect(_config(InspectConfig, None, {"data": data, **options}))


def export(checkpoint: str, out: str, format: str) -> ExportResult:
    """`tl-ray export` from Python: ``checkpoint`` as a torchscript or onnx file at ``out``, metadata at out.json."""
    from tl_ray.inference.config import ExportConfig
    from tl_ray.inference.export import export as run_export

    return run_export(_config(ExportConfig, None, {"checkpoint": checkpoint, "out": out, "format": format}))


def audit(checkpoint: str, data: str, out: str, **options: Any) -> AuditResult:
    """`tl-ray audit` from Python: label suspects, duplicates and leaks, outliers of ``data`` (written into ``out``,
    a new or empty folder) as one record (``options`` as the flags: ``fix_list=True``, ``folds=5``)."""
    from tl_ray.auditing.config import AuditConfig
    from tl_ray.auditing.run import audit as run_audit

    return run_audit(_config(AuditConfig, None, {"checkpoint": checkpoint, "data": data, "out": out, **options}))


def load_checkpoint(path: str, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, meta) from a tl-ray checkpoint directory: all that predicting needs."""
    from tl_ray.checkpoint import load_checkpoint as load

    return load(path, device)


def write_sample_data(out: str, **options: Any) -> dict[str, int]:
    """Write the synthetic source/target datasets of `tl-ray sample-data` (``options``: ``per_class``, ``seed``)."""
    from tl_ray.sample import SampleDataConfig
    from tl_ray.sample import write_sample_data as write

    return write(_config(SampleDataConfig, None, {"out": str(out), **options}))

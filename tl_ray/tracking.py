"""Experiment tracking: TensorBoard event files in every run folder, and ``--logger wandb|mlflow``.

Everything here runs where Ray Train records a report: ``ray.train.UserCallback.after_report`` is called in the
Train controller process once every worker has reported an epoch and its checkpoint is stored. Writing there, and
only then, means an epoch is logged once it counts: a worker failure restarts from the last recorded epoch, whose
successor has not been logged yet. A driver that was killed and rerun (a resume) may have logged an epoch whose
checkpoint it never recorded; its writer is reopened at the epoch the resumed run starts from, with TensorBoard's
``purge_step``, which hides the orphaned later steps (and W&B resumes the same run by id).

The controller is a Ray actor started with Ray's environment, not the user's shell's: the tracker settings
(``WANDB_*``, ``MLFLOW_*``, the tracking URI, the project) are resolved in the driver (``logger_settings``) and
carried to it. This module knows nothing about Tune: a sweep builds Ray Tune's own logger callbacks from the same
``LoggerSettings``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray.train

from tl_ray import location
from tl_ray.errors import UsageError
from tl_ray.training.config import check_logger

TENSORBOARD_DIR = "tensorboard"
DEFAULT_PROJECT = "tl-ray"
ENV_PREFIXES = {"wandb": "WANDB_", "mlflow": "MLFLOW_"}
# Run facts that are not learning curves: they go to a tracker's config/params, not its charts.
NOT_CURVES = {"epoch"}

logger = logging.getLogger(__name__)


def scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric metrics of one report, nested dicts flattened as ``val_recall/<class>`` (Tune's spelling);
    None (a class without validation images), text and booleans left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(scalars(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and name not in NOT_CURVES:
            flat[name] = float(value)
    return flat


@dataclass(frozen=True)
class LoggerSettings:
    """Where a run's metrics go besides TensorBoard, resolved in the driver (see the module's docstring)."""

    kind: str  # "wandb" or "mlflow"
    project: str  # the W&B project or the MLflow experiment
    env: dict[str, str] = field(default_factory=dict)  # the driver's WANDB_* or MLFLOW_* variables
    tracking_uri: str | None = None  # MLflow: absolute, so a process elsewhere writes to the same store


def logger_settings(kind: str, project: str | None) -> LoggerSettings | None:
    """``--logger`` and ``--logger-project`` with the standard variables: WANDB_PROJECT or MLFLOW_EXPERIMENT_NAME
    when no project is given (else "tl-ray"), WANDB_MODE (offline, disabled), WANDB_API_KEY, MLFLOW_TRACKING_URI
    (else MLflow's default, made absolute here). Refuses, before anything trains, a tracker that could not log."""
    check_logger(kind)
    if kind == "none":
        return None
    env = {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIXES[kind])}
    if kind == "wandb":
        settings = LoggerSettings(kind, project or env.get("WANDB_PROJECT") or DEFAULT_PROJECT, env)
        _check_wandb_login()
        return settings
    import mlflow

    # MLFLOW_TRACKING_URI, else what this process set or MLflow's default (a store under this directory).
    uri = env.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # MLflow raises its own and the store's errors: any of them means no logging
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(
            f"--logger mlflow: cannot use the tracking store {uri} (MLFLOW_TRACKING_URI): {first}"
        ) from None
    return LoggerSettings(kind, project or env.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT, env, uri)


def _check_wandb_login() -> None:
    """W&B online needs an API key; without one Ray's integration would fail after the first epoch."""
    from ray.air.integrations.wandb import _set_api_key

    try:
        _set_api_key()  # Ray's own order: WANDB_MODE offline/disabled, WANDB_API_KEY, `wandb login`, its hook
    except ValueError:
        raise UsageError(
            "--logger wandb: no W&B API key: set WANDB_API_KEY, run `wandb login`, or set WANDB_MODE=offline"
        ) from None


def run_id(run_dir: str) -> str:
    """A W&B run id that names the run and is the same each time the run resumes (the same folder)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.rstrip("/").rsplit("/", 1)[-1])[:48]
    return f"{name}-{hashlib.sha1(run_dir.encode()).hexdigest()[:8]}"


class TensorBoardCallback(ray.train.UserCallback):
    """Every recorded epoch's metrics as TensorBoard scalars in ``RUN/tensorboard/``, step = epoch.

    On remote storage (s3://, gs://) the events are written to a local folder and copied up after each epoch,
    through the run's own filesystem object (the endpoint and options the driver resolved).
    """

    def __init__(self, run_dir: location.Location | str, epochs: int) -> None:
        self.folder = location.resolve(run_dir, "--storage").join(TENSORBOARD_DIR)
        self.epochs = epochs
        self._writer = None
        self._local = ""
        self._last_epoch = 0

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        values = scalars(metrics[0]) if metrics else {}
        if not values or "epoch" not in metrics[0]:
            return
        epoch = int(metrics[0]["epoch"])
        if self._writer is None or epoch <= self._last_epoch:
            self._open(purge_step=epoch)
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, epoch)
        self._writer.flush()
        self._last_epoch = epoch
        self._upload()
        if epoch >= self.epochs:
            self._writer.close()
            self._writer = None

    def _open(self, purge_step: int) -> None:
        """A new event file; TensorBoard hides what earlier files logged at ``purge_step`` and after."""
        from torch.utils.tensorboard import SummaryWriter  # its flush() blocks until the events are written

        if self._writer is not None:
            self._writer.close()
        if not self.folder.is_local:
            self._local = self._local or tempfile.mkdtemp(prefix="tl-ray-tensorboard-")
        else:
            self._local = self.folder.path
        # Event files are named by the second they were opened: the suffix keeps a reopened one from overwriting.
        suffix = f".{os.getpid()}.{purge_step}"
        self._writer = SummaryWriter(self._local, purge_step=purge_step, flush_secs=10, filename_suffix=suffix)

    def _upload(self) -> None:
        if self.folder.is_local:
            return
        for name in os.listdir(self._local):
            location.upload(f"{self._local}/{name}", self.folder.join(name))


class TrackerCallback(ray.train.UserCallback):
    """``tl-ray train --logger wandb|mlflow``: each recorded epoch to W&B or MLflow, through Ray's own set-up
    helpers (``setup_wandb``, ``setup_mlflow``), started on the first report and finished after the last epoch.

    A tracker that fails is reported in the log and turned off; the run and its TensorBoard files go on.
    """

    def __init__(
        self, settings: LoggerSettings, run_dir: location.Location | str, epochs: int, params: dict[str, Any]
    ) -> None:
        self.settings, self.epochs, self.params = settings, epochs, params
        self.run_dir = location.resolve(run_dir, "--storage")
        self._session: Any = None
        self._failed = False

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if self._failed or not metrics or "epoch" not in metrics[0]:
            return
        epoch, values = int(metrics[0]["epoch"]), scalars(metrics[0])
        try:
            if self._session is None:
                self._session = self._start()
            if self.settings.kind == "wandb":
                self._session.log(values, step=epoch)
            else:
                self._session.log_metrics({_mlflow_key(key): value for key, value in values.items()}, step=epoch)
            if epoch >= self.epochs:
                self._finish()
        except Exception:  # a tracker's outage must not cost the training run
            logger.exception("--logger %s failed; the run goes on without it", self.settings.kind)
            self._failed = True

    def _start(self) -> Any:
        os.environ.update(self.settings.env)  # this process runs this run's controller only
        name = self.run_dir.name
        if self.settings.kind == "wandb":
            from ray.air.integrations.wandb import setup_wandb

            return setup_wandb(
                config=self.params,
                trial_id=run_id(self.run_dir.base),
                trial_name=name,
                project=self.settings.project,
                dir=self.run_dir.path if self.run_dir.is_local else None,  # offline runs in the run folder: RUN/wandb/
            )
        from ray.air.integrations.mlflow import setup_mlflow

        return setup_mlflow(
            config=self.params,
            tracking_uri=self.settings.tracking_uri,
            experiment_name=self.settings.project,
            run_name=name,
            create_experiment_if_not_exists=True,
            tags={"tl_ray.run_dir": self.run_dir.uri},
        )

    def _finish(self) -> None:
        if self.settings.kind == "wandb":
            self._session.finish()
        else:
            self._session.end_run()
        self._session = None


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_-. /`` only: a class name may have others."""
    return re.sub(r"[^\w\-. /]", "_", key)


def train_callbacks(
    run_dir: location.Location, epochs: int, settings: LoggerSettings | None, params: dict[str, Any]
) -> list[ray.train.UserCallback]:
    """The tracking callbacks of one Train run: TensorBoard always, the ``--logger`` tracker when set."""
    callbacks: list[ray.train.UserCallback] = [TensorBoardCallback(run_dir, epochs)]
    if settings is not None:
        callbacks.append(TrackerCallback(settings, run_dir, epochs, params))
    return callbacks

"""`tl-ray tune`: a Ray Tune sweep over freeze depth x fine-tuning strategy x learning rate.

Each trial is a Tune function trainable that runs the ordinary Ray Train loop
(``train.run``) with Ray's Train-to-Tune callback, so a trial is exactly a
`tl-ray train` run and resumes like one. The search is a grid: every depth and
strategy is tried with the same learning rates (``TuneConfig.search_points``), so
the comparison is fair. ASHA stops weak trials on their best value so far of the monitored
metric (``--monitor``: val_acc, val_loss or macro_f1), from the first epoch after warm-up on.
The Train-to-Tune callback hands Tune a ``checkpoint_path`` per epoch, not a Tune
checkpoint: the best one is found in the reported rows and copied to ``STORAGE/NAME/best``.

One folder per trial: Tune's experiment is ``STORAGE/NAME/trials/`` and each trial's folder is named by its id,
``trials/<trial_id>/``; it holds Tune's records of the trial (params.json, result.json, progress.csv) and, in
``train/``, the trial's Train run (config.yaml, result.json, checkpoints, tensorboard/), kept apart because both
write a result.json.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.basic_variant import BasicVariantGenerator

from tl_ray import classes, cluster, location, model, places, progress, tracking
from tl_ray.checkpoint import META_FILE, MODEL_FILE
from tl_ray.classes import MONITORS
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs import cache, imaging, sources
from tl_ray.location import forbid_world_writable_files
from tl_ray.training.driver import CONFIG_FILE, write_config
from tl_ray.training.driver import run as run_training
from tl_ray.training.schedule import steps_per_epoch
from tl_ray.tuning import report
from tl_ray.tuning.config import TuneConfig

BEST_DIR = "best"
TRIALS_DIR = "trials"  # Tune's experiment: one folder per trial, named by the trial's id
TRIAL_RUN_DIR = "train"  # in a trial's folder, its Train run
TRIAL_DRIVER_CPU = 0.01


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    freeze_depth: int
    strategy: str
    lr: float
    status: str  # "finished", "stopped early", "error", "incomplete"
    epochs: int
    val_acc: float
    val_loss: float
    best_epoch: int
    seconds: float
    images_per_s: float
    checkpoint: str
    history: list[dict[str, float]]  # epoch, val_acc, val_loss, macro_f1 per reported epoch
    macro_f1: float = math.nan  # of the best epoch, like val_acc and val_loss (NaN: a sweep from before macro_f1)
    grid: dict[str, Any] = dataclasses.field(default_factory=dict)  # its values of the sweep's --grid options


@dataclass(frozen=True)
class SweepSummary:
    run_dir: str
    max_epochs: int
    trials: list[TrialSummary]
    wall_seconds: float
    best_checkpoint: str | None  # the copy under run_dir/best, once made
    val_images: int = 0  # validation images every trial is scored on (0: unknown)
    num_classes: int = 0  # (0: unknown)
    monitor: str = "val_acc"  # what ranks the trials and picked each trial's best epoch

    @property
    def best(self) -> TrialSummary | None:
        scored = [t for t in self.trials if t.checkpoint and not math.isnan(getattr(t, self.monitor))]
        return max(scored, key=lambda t: classes.rank_key(vars(t), self.monitor)) if scored else None


def _run_trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One trial: a full Train run whose epochs Tune sees through the callback."""
    progress.mark("trial: entered")
    forbid_world_writable_files()
    config = TuneConfig(**sweep["options"])
    where: places.RunPlaces = sweep["places"]  # as the driver resolved them: its filesystem objects, endpoints
    trial_dir = where.storage.join(tune.get_context().get_trial_id())  # as _trial_dirname names it
    trial_config = config.trial_config(params["point"], trial_dir.uri, TRIAL_RUN_DIR)
    trial_places = dataclasses.replace(where, storage=trial_dir)
    run_training(trial_config, callbacks=[TuneReportCallback()], where=trial_places)
    progress.mark("trial: returned")


def _trial_dirname(trial: Any) -> str:
    """A trial's folder is its id (results.csv's trial_id): short, and known to the trial itself."""
    return trial.trial_id


POINT_KEYS = ("freeze_depth", "strategy", "lr", "weights")  # a point's keys besides --grid's (weights: the baseline)


def is_scratch_baseline(point: dict[str, Any]) -> bool:
    return point.get("weights") == "none"


class _BaselineKeepingASHA(tune.schedulers.ASHAScheduler):
    """ASHA that lets the from-scratch baseline run its whole budget, and leaves it out of the rungs.

    The baseline is the yardstick the transfer trials are measured against, not a contender:
    cut short, it would make transfer look better than it is.
    """

    def on_trial_result(self, tune_controller, trial, result):
        if is_scratch_baseline(trial.config.get("point", {})):
            return tune.schedulers.TrialScheduler.CONTINUE
        if result.get(self._time_attr, 0) >= self._max_t:
            # ASHA puts a rung at the budget too, but stopping a trial at its last epoch saves nothing: it would
            # only kill its Train run before it writes result.json, and while it frees its placement group (see
            # stop_last_trials in sweep()). The trial ends on its own; on_trial_complete still records it.
            return tune.schedulers.TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if is_scratch_baseline(trial.config.get("point", {})):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


class _Progress(tune.Callback):
    """Tells the sweep's ``on_event`` (in the driver, where Tune calls its callbacks) each trial's epochs and
    its end.

    Tune pickles its callbacks with the sweep's state, and a resumed sweep gets them back from there, not
    from the caller: so the listener is looked up when called (``listener``, set by ``sweep``), not held.
    """

    listener: progress.OnEvent | None = None

    def __init__(self, max_epochs: int, monitor: str = "val_acc") -> None:
        self.max_epochs, self.monitor = max_epochs, monitor
        self.best: dict[str, dict[str, Any]] = {}

    def on_event(self, event: Any) -> None:
        if _Progress.listener is not None:
            _Progress.listener(event)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "val_acc" not in result:
            return
        metrics = {key: value for key, value in result.items() if isinstance(value, int | float)}
        best = self.best.get(trial.trial_id)
        # Ranked as load_summary ranks a trial's epochs.
        if best is None or classes.rank_key(metrics, self.monitor) > classes.rank_key(best, self.monitor):
            self.best[trial.trial_id] = metrics
        self.on_event(progress.TrialEpoch(trial.trial_id, trial.config.get("point", {}), metrics))

    def on_trial_start(self, iteration, trials, trial, **info):
        progress.mark("driver: trial started", trial=trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        progress.mark("driver: trial complete", trial=trial.trial_id)
        self._end(trial, "")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, str(trial.error_file or "see the trial's error.txt"))

    def _end(self, trial, error: str) -> None:
        best = self.best.get(trial.trial_id, {})
        epochs = int((trial.last_result or {}).get("epoch", 0))
        status = "error" if error else "finished" if epochs >= self.max_epochs else "stopped early"
        self.on_event(progress.TrialEnd(trial.trial_id, trial.config.get("point", {}), status, epochs, best, error))


def _share_cpus(config: TuneConfig, started_locally: bool) -> TuneConfig:
    """On CPU, trials that run side by side split the workers' CPUs between them (each worker then uses that
    many torch threads); settings that would leave Ray Data no CPU are refused before any trial starts."""
    resources = ray.cluster_resources()
    if config.gpu is not False and resources.get("GPU", 0) > 0:
        return config
    total, concurrent = resources.get("CPU", 1), _max_concurrent(config)
    per_worker = config.cpus_per_worker
    if per_worker is None and concurrent > 1:
        # Trial drivers take a sliver of a node too: a worker as large as a node would then fit on none of them.
        largest = cluster.largest_node_cpus()
        room = None if largest is None else largest - TRIAL_DRIVER_CPU
        per_worker = cluster.cpus_per_worker(total, config.max_workers, concurrent, largest_node=room)
    if started_locally:  # a cluster that was already running may still be adding nodes
        budget = per_worker or cluster.cpus_per_worker(total, config.max_workers)
        overhead = concurrent * TRIAL_DRIVER_CPU
        cluster.check_pipeline_room(total, config.max_workers, budget, concurrent, overhead=overhead)
    return dataclasses.replace(config, cpus_per_worker=per_worker)


def _max_concurrent(config: TuneConfig) -> int:
    if config.max_concurrent:
        return config.max_concurrent
    gpus = ray.cluster_resources().get("GPU", 0)
    if config.gpu is not False and gpus > 0:
        return max(1, int(gpus // config.max_workers))
    return 1  # CPU trials share the machine's cores: one at a time finishes soonest


def sweep(config: TuneConfig, on_event: progress.OnEvent | None = None) -> tuple[SweepSummary, dict[str, str]]:
    """Run (or resume) the sweep named ``config.name`` under ``config.storage``; report on it.

    Returns the summary and the paths of the report files. ``on_event`` is called in this process with
    each ``progress`` event: the cache build, each trial's epochs and each trial's end.
    """
    progress.mark("sweep: start")
    config = config.validate().with_run_name()
    tracker = tracking.logger_settings(config.logger, config.logger_project)  # refused now, not after a trial
    where = places.resolve(config)  # once, here: the trials get these locations, not the options' text
    places.check_outputs(config, where)
    config = dataclasses.replace(config, data=where.data.uri)  # as config.yaml records it: absolute
    if where.val_data is not None:
        config = dataclasses.replace(config, val_data=where.val_data.uri)
    # Listed here, once, not in every trial: a source's mistakes fail the sweep before it starts.
    layout = sources.discover(where.data, config.val_fraction, config.source_options(), where.val_data)
    batch_from_size = config.batch_size is None
    config = config.for_training_set(len(layout.train))  # one batch size for every trial
    storage = where.storage
    run_dir = where.run_dir(config.name)
    config = _share_cpus(config, cluster.ensure_ray())
    progress.mark("sweep: ray ready")
    cluster.check_shared_storage(storage)
    write_config(config, storage)
    cache_root = where.cache
    if cache_root is not None:
        # Decode once, here, before any trial: every trial then finds the cache (trials store elsewhere).
        config = dataclasses.replace(config, cache=cache_root.uri)
        resize = imaging.Resize.for_crop(config.image_size, *model.eval_preprocessing(config.arch, config.weights))
        for split, files in (("train", layout.train), ("val", layout.val)):
            if files:
                cache.prepare(files, layout, config.image_size, cache_root, resize, on_event, split)

    trials_dir = run_dir.join(TRIALS_DIR)
    progress.mark("sweep: cache ready")
    trial_places = dataclasses.replace(where, storage=trials_dir)
    trainable = tune.with_parameters(_run_trial, sweep={"options": dataclasses.asdict(config), "places": trial_places})
    # The trial's own process only waits on its TorchTrainer: CPUs belong to the workers and Ray Data
    # (Tune refuses an empty request, hence a token share).
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPU})
    tune_fs = _tune_filesystem(run_dir)
    if tune.Tuner.can_restore(trials_dir.path, **tune_fs):
        tuner = tune.Tuner.restore(trials_dir.path, trainable, resume_unfinished=True, resume_errored=True, **tune_fs)
        if on_event is not None:
            on_event(_resumed(run_dir, len(config.search_points())))
    elif tune.Tuner.can_restore(run_dir.path, **tune_fs):
        raise UsageError(
            f"{run_dir.uri} is a sweep from an earlier tl-ray (trials beside the report, not in {TRIALS_DIR}/):"
            " it cannot be resumed by this one; `tl-ray report` still reads it. Pass a new --name to start a sweep"
        )
    else:
        scheduler = (
            # stop_last_trials=False: a trial that reached the budget ends on its own. Stopping it there
            # kills its Train controller while it shuts down, after it has released its placement-group
            # cleaner and before it has freed its workers' placement group: the CPUs leak and the next
            # trial waits for them forever. (It does not cover ASHA's rung at the budget, which would stop the
            # weaker trials there just the same: _BaselineKeepingASHA.on_trial_result skips that one.)
            _BaselineKeepingASHA(
                time_attr="epoch",
                max_t=config.max_epochs,
                grace_period=config.grace_epochs(),
                reduction_factor=2,
                stop_last_trials=False,
            )
            if config.scheduler == "asha"
            else tune.schedulers.FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space={
                "point": tune.grid_search(config.search_points()),
                "max_epochs": config.max_epochs,  # constant; recorded so reports know the budget
                "monitor": config.monitor,  # constant; recorded so reports rank trials as Tune did
            },
            tune_config=tune.TuneConfig(
                # The best epoch so far, not the last one: what the report ranks by, so Tune's "current
                # best" line and ASHA agree with it.
                metric=f"best_{config.monitor}",
                mode=MONITORS[config.monitor],
                scheduler=scheduler,
                # A searcher of our own must carry the concurrency limit itself: Tune applies
                # max_concurrent_trials only to the searcher it builds.
                search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=_max_concurrent(config)),
                trial_dirname_creator=_trial_dirname,
                # The next trial runs in the process the last one finished in (tl-ray, torch and Ray Train already
                # imported): a process start less per trial. Not with ASHA: Tune keeps the process of a trial it
                # stops without stopping the trial's Train run, and the next trial then fails to take it over.
                reuse_actors=config.scheduler == "fifo",
            ),
            run_config=tune.RunConfig(
                name=TRIALS_DIR,
                storage_path=run_dir.path,
                storage_filesystem=tune_fs.get("storage_filesystem"),
                verbose=1 if cluster.ray_is_verbose() else 0,
                callbacks=[_Progress(config.max_epochs, config.monitor), *_loggers(tracker, run_dir, config.name)],
            ),
        )
    _Progress.listener = on_event
    if on_event is not None:
        accumulate = config.accumulate
        steps = steps_per_epoch(len(layout.train), config.batch_size, config.max_workers, accumulate)
        on_event(progress.batch_plan(len(layout.train), config.batch_size, steps, batch_from_size, accumulate))
        on_event(progress.Stage("starting the sweep's first trial"))
    try:
        tuner.fit()
    finally:
        _Progress.listener = None
    progress.mark("sweep: tuner finished")
    summary, written = finalize(run_dir)
    progress.mark("sweep: end")
    if was_interrupted(summary):
        # Tune takes the first Ctrl-C itself: it saves the sweep's state and returns. The report is of what ran;
        # the caller learns that the sweep did not finish (`tl-ray tune` exits 130; rerunning resumes it).
        raise KeyboardInterrupt(f"sweep {run_dir.uri} interrupted; its report covers the trials that ran")
    return summary, written


def _resumed(run_dir: location.Location, trials: int) -> progress.Notice:
    """What a resumed sweep picks up: its trials that ended, those it resumes mid-way, those never started."""
    try:
        earlier = load_summary(run_dir).trials
    except TlRayError:
        earlier = []
    done = sum(trial.status in ("finished", "stopped early") for trial in earlier)
    started = sum(trial.status not in ("finished", "stopped early") and trial.epochs > 0 for trial in earlier)
    return progress.resumed_sweep(run_dir, trials, done, started)


def was_interrupted(summary: SweepSummary) -> bool:
    """Whether Tune returned with trials neither finished nor failed: it only does so when interrupted."""
    return any(trial.status == "incomplete" for trial in summary.trials)


def _tune_filesystem(run_dir: location.Location) -> dict[str, pafs.FileSystem]:
    """Tune's ``storage_filesystem`` argument for a sweep folder: its resolved filesystem, none for a local one."""
    return {} if run_dir.is_local else {"storage_filesystem": run_dir.filesystem}


def _loggers(settings: tracking.LoggerSettings | None, run_dir: location.Location, name: str) -> list[tune.Callback]:
    """``--logger``: Ray Tune's own W&B or MLflow callback, one tracker run per trial (in the driver, which has the
    user's environment; W&B's per-trial logging actor does not, so its mode and entity are passed on)."""
    if settings is None:
        return []
    if settings.kind == "wandb":
        from ray.air.integrations.wandb import WandbLoggerCallback

        named = (("mode", "WANDB_MODE"), ("entity", "WANDB_ENTITY"))
        passed = {key: settings.env[var] for key, var in named if var in settings.env}
        local = {"dir": run_dir.path} if run_dir.is_local else {}  # offline runs in the sweep's folder: wandb/
        return [WandbLoggerCallback(project=settings.project, group=name, **passed, **local)]
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    tags = {"tl_ray.sweep": run_dir.uri}
    return [MLflowLoggerCallback(tracking_uri=settings.tracking_uri, experiment_name=settings.project, tags=tags)]


def experiment_dir(run_dir: location.Location | str) -> location.Location:
    """Tune's experiment of a sweep: run_dir/trials, or run_dir itself for sweeps from before one folder per trial."""
    run_dir = location.resolve(run_dir, "run folder")
    trials = run_dir.join(TRIALS_DIR)
    return trials if tune.Tuner.can_restore(trials.path, **_tune_filesystem(trials)) else run_dir


def finalize(run_dir: location.Location | str) -> tuple[SweepSummary, dict[str, str]]:
    """Summarise the sweep as stored, copy its best checkpoint to run_dir/best, write the report.

    Also what `tl-ray report` runs (``run_dir`` a path or URI), so an interrupted sweep can be reported on.
    """
    run_dir = location.resolve(run_dir, "report")
    summary = load_summary(run_dir)
    if summary.best is not None:
        summary = _copy_best(summary, run_dir)
    return summary, write_report(summary, run_dir)


def write_report(summary: SweepSummary, run_dir: location.Location | None = None) -> dict[str, str]:
    """results.csv, report.md and report.png into the sweep's folder, local or remote; where each went (a URI)."""
    run_dir = run_dir or location.resolve(summary.run_dir, "report")
    with tempfile.TemporaryDirectory() as scratch:
        written = report.write_report(summary, scratch)
        for path in written.values():
            target = run_dir.join(path.name)
            location.upload(str(path), target)
    return {kind: run_dir.join(path.name).uri for kind, path in written.items()}


def _copy_best(summary: SweepSummary, run_dir: location.Location) -> SweepSummary:
    """Copy what a user deploys from the best epoch to run_dir/best, so it outlives the trials' folders: the
    model and its meta.json, and the trial's config.yaml (not the optimizer state, which only resuming needs)."""
    filesystem = run_dir.filesystem
    source = run_dir.at(location.resolve(summary.best.checkpoint, "checkpoint").path)
    target = run_dir.join(BEST_DIR)
    filesystem.delete_dir_contents(target.path, missing_dir_ok=True)
    filesystem.create_dir(target.path)
    files = [source.join(MODEL_FILE), source.join(META_FILE), source.parent().join(CONFIG_FILE)]
    for item in files:
        if filesystem.get_file_info(item.path).type == pafs.FileType.File:
            filesystem.copy_file(item.path, target.join(item.name).path)
    return dataclasses.replace(summary, best_checkpoint=target.uri)


def _status(trial: Any, epochs_done: int, max_epochs: int) -> str:
    if trial.status == "ERROR":
        return "error"
    if trial.status != "TERMINATED":
        return "incomplete"
    return "finished" if epochs_done >= max_epochs else "stopped early"


def _steady_rate(rows: list[dict[str, Any]]) -> float:
    """A trial's training images/s: the mean over its epochs after the first, which carries the start-up (a first
    epoch runs ~4x slower, so a trial stopped after one epoch would look slower than one that ran on)."""
    steady = rows[1:] or rows
    return sum(row["images_per_s"] for row in steady) / len(steady) if steady else math.nan


def load_summary(run_dir: location.Location | str) -> SweepSummary:
    """Summarise a sweep from what Tune stored: works on finished and interrupted sweeps alike. Checkpoints are
    named as URIs a user can pass back (with ``run_dir``'s scheme and query)."""
    run_dir = location.resolve(run_dir, "report")
    try:
        experiment = experiment_dir(run_dir)
        analysis = tune.ExperimentAnalysis(experiment.path, **_tune_filesystem(experiment))
    except Exception as error:  # Tune raises ValueError/FileNotFoundError/TuneError for non-sweeps
        raise TlRayError(f"{run_dir.uri} is not a tl-ray tune run folder ({location.describe(error)})") from error
    frames = analysis.trial_dataframes
    trials, starts, ends = [], [], []
    max_epochs = val_images = num_classes = 0
    # Sweeps from before --monitor ranked by val_acc.
    monitor = next((trial.config.get("monitor", "val_acc") for trial in analysis.trials), "val_acc")
    for trial in analysis.trials:
        max_epochs = max(max_epochs, int(trial.config["max_epochs"]))
        # Sweeps from before strategies kept freeze_depth and lr at the top of the config.
        point = trial.config.get("point") or {"strategy": "plain", **trial.config}
        frame = frames.get(trial.trial_id)
        rows = [] if frame is None or frame.empty or "val_acc" not in frame else frame.to_dict("records")
        rows = [row for row in rows if not math.isnan(row.get("val_acc", math.nan))]
        history = [
            {"epoch": int(r["epoch"]), **{key: r.get(key, math.nan) for key in ("val_acc", "val_loss", "macro_f1")}}
            for r in rows
        ]
        with_checkpoint = [r for r in rows if isinstance(r.get("checkpoint_path"), str)]
        epochs_done = max((h["epoch"] for h in history), default=0)
        best = max(with_checkpoint, key=lambda r: classes.rank_key(r, monitor)) if with_checkpoint else None
        for row in rows:
            val_images = max(val_images, int(row.get("val_images", 0)))
            num_classes = max(num_classes, int(row.get("num_classes", 0)))
            ends.append(row["timestamp"])
            starts.append(row["timestamp"] - row.get("epoch_s", 0.0))
        trials.append(
            TrialSummary(
                trial_id=trial.trial_id,
                freeze_depth=int(point["freeze_depth"]),
                strategy=report.SCRATCH if is_scratch_baseline(point) else str(point["strategy"]),
                lr=float(point["lr"]),
                status=_status(trial, epochs_done, int(trial.config["max_epochs"])),
                epochs=epochs_done,
                val_acc=best["val_acc"] if best else math.nan,
                val_loss=best["val_loss"] if best else math.nan,
                best_epoch=int(best["epoch"]) if best else 0,
                seconds=sum(r.get("epoch_s", 0.0) for r in rows),
                images_per_s=_steady_rate(rows),
                checkpoint=run_dir.at(best["checkpoint_path"]).uri if best else "",
                history=history,
                macro_f1=best.get("macro_f1", math.nan) if best else math.nan,
                grid={k: v for k, v in point.items() if k not in POINT_KEYS} if "point" in trial.config else {},
            )
        )
    wall = (max(ends) - min(starts)) if ends else 0.0
    return SweepSummary(run_dir.uri, max_epochs, trials, wall, None, val_images, num_classes, monitor)

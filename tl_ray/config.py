"""Options for every command, as dataclasses, merged from defaults < YAML file < flags.

The YAML file holds the same keys as the command-line flags, with underscores
(``freeze_depth: 3`` for ``--freeze-depth 3``), so a config file and a command line
are interchangeable and one validation covers both.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tl_ray.errors import TlRayError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = ("standard", "none")
NUM_STAGES = 5  # stem, layer1..layer4: see DESIGN.md "freeze depth"


def absolute(location: str) -> str:
    """A local path made absolute (Ray and pyarrow want that); URIs (s3://, gs://) unchanged."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def flag(key: str) -> str:
    """The command-line spelling of a config key, used in every error message."""
    return "--" + key.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything `tl-ray train` needs. Field names are the YAML keys and, with dashes, the flags."""

    data: str | None = None
    arch: str = "resnet50"
    weights: str = "imagenet"
    freeze_depth: int | None = None  # None: 5 (feature extraction), or 0 with --weights none
    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    batch_size: int = 32
    image_size: int = 224
    val_fraction: float = 0.2
    color_jitter: float = 0.0
    augment: str = "standard"  # "none": training images are centre-cropped like validation ones
    num_workers: int = 1
    gpu: bool | None = None
    cpus_per_worker: float | None = None
    storage: str = "./runs"
    cache: str = "auto"  # "auto": STORAGE/.tl-ray-cache; "none": no cache; else a folder or URI
    name: str | None = None
    keep_checkpoints: int = 2
    max_failures: int = 3
    seed: int = 0

    def validate(self) -> TrainConfig:
        """Raise TlRayError naming the first bad option; return the config with defaults resolved.

        Freeze depth defaults to feature extraction, except from random weights
        (``--weights none``), where a frozen backbone would only compute noise.
        """
        if self.freeze_depth is None:
            default_depth = 0 if self.weights == "none" else NUM_STAGES
            return dataclasses.replace(self, freeze_depth=default_depth).validate()
        if not self.data:
            raise TlRayError(f"{flag('data')} is required: a folder with train/<class>/ image sub-folders")
        if self.arch not in ARCHS:
            raise TlRayError(f"{flag('arch')} must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        if self.augment not in AUGMENTS:
            raise TlRayError(f"{flag('augment')} must be one of {', '.join(AUGMENTS)}; got {self.augment!r}")
        if self.optimizer not in OPTIMIZERS:
            raise TlRayError(f"{flag('optimizer')} must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        _check_range("freeze_depth", self.freeze_depth, 0, NUM_STAGES)
        _check_positive("epochs", self.epochs)
        _check_positive("lr", self.lr)
        _check_positive("num_workers", self.num_workers)
        if self.batch_size < 2 * self.num_workers:
            raise TlRayError(
                f"{flag('batch_size')} is the global batch, split over {flag('num_workers')}: it must be at least "
                f"2 per worker ({2 * self.num_workers}); got {self.batch_size}"
            )
        _check_positive("keep_checkpoints", self.keep_checkpoints)
        _check_range("image_size", self.image_size, 16, 4096)
        _check_range("momentum", self.momentum, 0.0, 1.0)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 0.99)
        _check_range("color_jitter", self.color_jitter, 0.0, 1.0)
        _check_range("max_failures", self.max_failures, -1, 1_000_000)
        _check_range("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))
        if not 0.0 < self.val_fraction < 1.0:
            raise TlRayError(f"{flag('val_fraction')} must be between 0 and 1 (exclusive); got {self.val_fraction}")
        if self.cpus_per_worker is not None:
            _check_positive("cpus_per_worker", self.cpus_per_worker)
        if not self.cache:
            raise TlRayError(f"{flag('cache')} must be auto, none, or a folder or URI for the decoded-image cache")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise TlRayError(f"{flag('name')} must be a plain folder name (no '/', not hidden); got {self.name!r}")
        return self

    def with_run_name(self) -> TrainConfig:
        """Fill in a timestamped name, so every run lands in its own folder unless told otherwise."""
        if self.name:
            return self
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return dataclasses.replace(self, name=f"train-{stamp}")


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise TlRayError(f"{flag(key)} must be positive; got {value}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise TlRayError(f"{flag(key)} must be between {low} and {high}; got {value}")


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check one YAML/keyword value against its dataclass field type; ints may stand for floats."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str | Path):
            return str(value)
    names = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in allowed)
    raise TlRayError(f"{source}: {key} must be {names}; got {value!r}")


def merge(config_class: type, yaml_path: str | None, overrides: dict[str, Any]):
    """Build a config: dataclass defaults, then the YAML file, then explicit overrides (flags)."""
    hints = typing.get_type_hints(config_class)
    known = {f.name for f in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    if yaml_path:
        values.update(_read_yaml(yaml_path, known))
        for key, value in values.items():
            values[key] = _coerce(key, value, hints[key], yaml_path)
    for key, value in overrides.items():
        if key not in known:
            raise TlRayError(f"unknown option {key!r}; known: {', '.join(sorted(known))}")
        values[key] = _coerce(key, value, hints[key], flag(key))
    return config_class(**values)


def _read_yaml(path: str, known: set[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise TlRayError(f"--config: cannot read {path}: {error.strerror or error}") from error
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise TlRayError(f"--config: {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise TlRayError(f"--config: {path} must hold a mapping of option: value, got {type(loaded).__name__}")
    normalised = {str(key).replace("-", "_"): value for key, value in loaded.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise TlRayError(f"--config: {path} has unknown keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return normalised


SCHEDULERS = ("asha", "fifo")


@dataclass
class TuneConfig(TrainConfig):
    """`tl-ray tune`: the train options plus the search space and how to search it.

    ``epochs`` is ignored: every trial's budget is ``max_epochs``. ``freeze_depth``
    and ``lr`` are searched, so their train values are ignored too.
    """

    freeze_depths: str = "0,1,2,3,4,5"
    lr_min: float = 1e-4
    lr_max: float = 1e-2
    num_samples: int = 1
    max_epochs: int = 5
    scheduler: str = "asha"
    max_concurrent: int | None = None

    def depths(self) -> list[int]:
        try:
            depths = sorted({int(part) for part in self.freeze_depths.split(",") if part.strip()})
        except ValueError:
            raise TlRayError(
                f"{flag('freeze_depths')} must be comma-separated integers like 0,3,5; got {self.freeze_depths!r}"
            ) from None
        if not depths or not all(0 <= depth <= NUM_STAGES for depth in depths):
            raise TlRayError(
                f"{flag('freeze_depths')} must list depths between 0 and {NUM_STAGES}; got {self.freeze_depths!r}"
            )
        return depths

    def validate(self) -> TuneConfig:
        self.depths()
        _check_positive("lr_min", self.lr_min)
        _check_positive("lr_max", self.lr_max)
        if self.lr_min > self.lr_max:
            raise TlRayError(f"{flag('lr_min')} ({self.lr_min}) must not exceed {flag('lr_max')} ({self.lr_max})")
        _check_positive("num_samples", self.num_samples)
        _check_positive("max_epochs", self.max_epochs)
        if self.scheduler not in SCHEDULERS:
            raise TlRayError(f"{flag('scheduler')} must be one of {', '.join(SCHEDULERS)}; got {self.scheduler!r}")
        if self.max_concurrent is not None:
            _check_positive("max_concurrent", self.max_concurrent)
        trial = dataclasses.replace(self, epochs=self.max_epochs, freeze_depth=NUM_STAGES, lr=self.lr_max)
        TrainConfig.validate(trial)
        return dataclasses.replace(self, epochs=self.max_epochs)

    def with_run_name(self) -> TuneConfig:
        if self.name:
            return self
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return dataclasses.replace(self, name=f"tune-{stamp}")

    def trial_config(self, freeze_depth: int, lr: float, storage: str, name: str) -> TrainConfig:
        """The TrainConfig of one trial: this sweep's train options with one point of the search space."""
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        options = {key: value for key, value in dataclasses.asdict(self).items() if key in train_fields}
        options.update(freeze_depth=freeze_depth, lr=lr, epochs=self.max_epochs, storage=storage, name=name)
        return TrainConfig(**options)


def forbid_world_writable_files() -> None:
    """Clear the umask's "others may write" bit in this process, whatever the shell set.

    A world-writable checkpoint or report is one anybody on the machine can replace.
    Called by every process tl-ray runs code in: the CLI, training workers, sweep trials.
    """
    os.umask(os.umask(0o022) | 0o002)

"""Where a run reads and writes: its --data, --storage and --cache resolved once, in the driver, into locations.

The driver decides; trials and workers get the locations (with their filesystem objects), never the option's text
to parse again, so every process writes where the driver checked it could. Two checks keep a run's output where
its user will look for it, before any work starts:

- the output location can be written (``location.check_writable``: a probe object written and deleted);
- a run started as a Ray job (``ray job submit --working-dir``) with the default ``--storage ./runs`` is refused:
  that folder is inside Ray's temporary copy of the working dir (``runtime_resources/working_dir_files/...``),
  deleted with the job's session. (A node-local folder on a multi-node cluster is refused by
  ``cluster.check_shared_storage``.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from tl_ray import location
from tl_ray.errors import UsageError
from tl_ray.inputs import cache
from tl_ray.training.config import TrainConfig

DEFAULT_STORAGE = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "storage")
# Ray's runtime_env puts a job's working dir under <session>/runtime_resources/working_dir_files/<package>/.
RAY_WORKING_DIR_PARTS = ("runtime_resources", "working_dir_files")
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted entrypoint


@dataclass(frozen=True)
class RunPlaces:
    """A run's locations: what it reads (``data``), where its folder goes (``storage``) and its cache (or None)."""

    data: location.Location
    storage: location.Location
    cache: location.Location | None
    val_data: location.Location | None = None  # --val-data: a validation set stored elsewhere

    def run_dir(self, name: str) -> location.Location:
        return self.storage.join(name)


def resolve(config: TrainConfig) -> RunPlaces:
    """The run's locations from its options; a URI pyarrow refuses is a UsageError naming the option. No I/O."""
    storage = location.resolve(config.storage, "--storage")
    return RunPlaces(
        data=location.resolve(config.data, "--data"),
        storage=storage,
        cache=cache.resolve_root(config.cache, storage),
        val_data=location.resolve(config.val_data, "--val-data") if config.val_data else None,
    )


def check_outputs(config: TrainConfig, places: RunPlaces) -> None:
    """Refuse outputs nobody would find or that cannot be written, in one line naming the option, before any work."""
    check_not_temporary(config.storage, places.storage)
    location.check_writable(places.storage, "--storage")
    if places.cache is not None and config.cache != "auto":
        location.check_writable(places.cache, "--cache")


def ray_job_working_dir() -> str | None:
    """The Ray job's working dir this driver runs in (a submitted job with a runtime_env working_dir), or None."""
    cwd = os.getcwd()
    parts = cwd.split(os.sep)
    if all(part in parts for part in RAY_WORKING_DIR_PARTS):
        return cwd
    try:
        runtime_env = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return cwd if isinstance(runtime_env, dict) and runtime_env.get("working_dir") else None


def check_not_temporary(storage_text: str, storage: location.Location) -> None:
    """A Ray job's default ``./runs`` is inside Ray's temporary copy of the working dir: refused, with what to pass.
    An explicit local --storage (the user knows where it is: an NFS mount, a node's disk) is theirs to choose."""
    if storage_text != DEFAULT_STORAGE or not storage.is_local:
        return
    working_dir = ray_job_working_dir()
    if working_dir is None:
        return
    raise UsageError(
        f"--storage: this run is a Ray job, and the default {DEFAULT_STORAGE} would be {storage.uri}, inside Ray's"
        f" temporary copy of the job's working dir ({working_dir}), deleted with the job: pass --storage"
        " s3://bucket/path (gs://, or a folder on an NFS mount every node shares)"
    )

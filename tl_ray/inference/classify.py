"""The Ray Data pipeline that classifies items with a checkpoint: what predict and evaluate both run.

The checkpoint carries its own preprocessing (image size, resize and its interpolation, mean,
std: ``imaging.Resize.from_meta``), so there is nothing to get wrong. Files are decoded by Ray
Data tasks and classified by a pool of model actors (one GPU each when the cluster has GPUs); a
file that cannot be decoded gets a row with an ``error`` instead of stopping the run. Output rows
are sorted by path, so two runs over the same files give the same file.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import torch
from ray.util.annotations import RayDeprecationWarning

from tl_ray import checkpoint as checkpoints
from tl_ray import cluster, location, model, progress
from tl_ray.backbones import NUM_STAGES
from tl_ray.errors import TlRayError
from tl_ray.inputs import imaging, pipelines, reading
from tl_ray.inputs.sources import Opener

ERROR_COLUMN = "error"
# With ``features=True`` (the audit's pass): each item's pooled backbone output, its bytes' SHA-256 and a thumbnail
# of what the model saw (``imaging.thumbnail``).
FEATURE_COLUMNS = ("features", "digest", "thumbnail")


def _columns(top_k: int) -> list[str]:
    ranked = [f"top{k + 1}_{what}" for k in range(top_k) for what in ("class", "prob")]
    return ["path", "predicted", "probability", *ranked, ERROR_COLUMN]


def _error_rows(rejected: list[tuple[str, str]], columns: list[str]) -> pd.DataFrame:
    """Rows for files the pipeline cannot even carry (names that are not UTF-8): path and reason only."""
    frame = pd.DataFrame({"path": [path for path, _ in rejected], ERROR_COLUMN: [reason for _, reason in rejected]})
    for column in columns:
        if column not in frame:
            frame[column] = np.nan if column.endswith(("prob", "probability")) else ""
    return frame[columns]


def _decode_for_inference(
    batch: dict[str, np.ndarray],
    opener: Opener,
    image_size: int,
    resize: imaging.Resize,
    retry_seconds: float,
    digests: bool = False,
) -> dict[str, np.ndarray]:
    """A block of items decoded for the model; an item that cannot be becomes a row that says why: a bad file, or
    one its storage did not deliver (``reading.StorageError``, whose reason begins ``reading.UNREADABLE``: counted
    apart by ``check_delivered``). ``digests``: each item's bytes' SHA-256 and thumbnail too, from the same read
    (the audit's exact duplicates, and its pixel check of near ones)."""
    transform = imaging.eval_transform(image_size, resize)
    short_side = resize.short_side
    images, errors, hashes = [], [], []
    for path in batch["path"]:
        try:
            if digests:
                data = reading.read_item(opener, path, retry_seconds)
                hashes.append(hashlib.sha256(data).hexdigest())
                images.append(transform(imaging.load_rgb(data, short_side)).numpy())
            else:
                images.append(imaging.decode_item(opener, path, transform, short_side, retry_seconds))
            errors.append("")
        except reading.StorageError as error:
            images.append(np.zeros((3, image_size, image_size), np.uint8))
            errors.append(str(error))
        except Exception as error:  # a bad file becomes a row that says why
            images.append(np.zeros((3, image_size, image_size), np.uint8))
            errors.append(imaging.describe_error(error))
        hashes.extend([""] * (len(images) - len(hashes)))
    decoded = {
        "path": np.asarray([opener.display(p) for p in batch["path"]], dtype=object),
        "image": np.stack(images),
        ERROR_COLUMN: np.asarray(errors, dtype=object),
    }
    if digests:
        decoded["digest"] = np.asarray(hashes, dtype=object)
        decoded["thumbnail"] = np.stack([imaging.thumbnail(image) for image in images])
    return decoded


def class_probabilities(model: torch.nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The softmax of ``model`` on normalised ``images`` (N, 3, S, S); ``tta`` "flip": the mean of the softmax of
    the images and of their horizontal mirrors (timm's and fastai's flip TTA, averaged after the softmax)."""
    with torch.no_grad():
        probabilities = torch.softmax(model(images).float(), dim=1)
        if tta == "flip":
            mirrored = torch.softmax(model(images.flip(-1)).float(), dim=1)
            probabilities = (probabilities + mirrored) / 2
    return probabilities


class _Classifier:
    """One model per actor, loaded once; a Ray Data callable class."""

    def __init__(
        self, checkpoint_dir: str | location.Location, top_k: int, tta: str = "none", features: bool = False
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # A checkpoint in object storage is read from this node's copy: fetched by the first actor here, once.
        self.model, meta = checkpoints.load_checkpoint(checkpoint_dir, self.device)
        self.class_names = np.asarray(meta["class_names"], dtype=object)
        self.mean = torch.tensor(meta["mean"], device=self.device)
        self.std = torch.tensor(meta["std"], device=self.device)
        self.top_k = min(top_k, len(self.class_names))
        self.tta = tta
        # features: the pooled backbone output the head sees, handed back beside the probabilities (one pass)
        self.backbone = model.TransferModel(self.model, NUM_STAGES).eval() if features else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.tensor(batch["image"], device=self.device)  # a copy: Ray hands over read-only arrays
        normalized = imaging.normalize(images, self.mean, self.std)
        pooled = None
        if self.backbone is not None:
            with torch.no_grad():
                pooled = self.backbone.features(normalized)
        if pooled is not None and self.tta == "none":  # the head on the same pass's features
            with torch.no_grad():
                probabilities = torch.softmax(self.backbone.head(pooled).float(), dim=1)
        else:
            probabilities = class_probabilities(self.model, normalized, self.tta)
        top_probs, top_index = probabilities.topk(self.top_k, dim=1)
        top_probs, top_index = top_probs.cpu().numpy(), top_index.cpu().numpy()
        bad = batch[ERROR_COLUMN] != ""
        output: dict[str, np.ndarray] = {"path": batch["path"]}
        output["predicted"] = np.where(bad, "", self.class_names[top_index[:, 0]]).astype(object)
        output["probability"] = np.where(bad, np.nan, top_probs[:, 0])
        for k in range(self.top_k):
            output[f"top{k + 1}_class"] = np.where(bad, "", self.class_names[top_index[:, k]]).astype(object)
            output[f"top{k + 1}_prob"] = np.where(bad, np.nan, top_probs[:, k])
        output[ERROR_COLUMN] = batch[ERROR_COLUMN]
        if pooled is not None:
            output["features"] = pooled.float().cpu().numpy()
            output["digest"] = batch["digest"]
            output["thumbnail"] = batch["thumbnail"]
        return output


# Ray Data takes an actor's max_restarts only among its **ray_remote_args, deprecated (Ray 2.60 warns) and to be
# removed in Ray 2.64.
_MAP_TAKES_REMOTE_ARGS = any(
    parameter.kind is inspect.Parameter.VAR_KEYWORD
    for parameter in inspect.signature(ray.data.Dataset.map_batches).parameters.values()
)


def _pool_restarts(started_here: bool) -> dict[str, int]:
    """The classifier pool's restart setting. Ray Data hands each pool actor its pipeline as an object-store
    reference, and Ray's core worker prints an error-level line to the console for such an actor when it may be
    restarted (ray-project/ray#57733). On a Ray that tl-ray started in this process (one machine: no node to
    lose) the actors are not restarted, so the line does not arise; on a shared cluster Ray's default stands,
    node losses being real there."""
    return {"max_restarts": 0} if started_here and _MAP_TAKES_REMOTE_ARGS else {}


def output_location(out: str | None, suffixes: tuple[str, ...] = ()) -> location.Location | None:
    """--out resolved and checked writable (its folder: a file's), before any image is read."""
    if out is None:
        return None
    where = location.resolve(out, "--out")
    if suffixes and not where.base.endswith(suffixes):
        raise TlRayError(f"--out must end in {' or '.join(suffixes)}; got {out}")
    location.check_writable(where.parent() if suffixes else where, "--out")
    return where


def classify_items(
    checkpoint,
    meta,
    opener,
    items,
    rejected,
    top_k,
    batch_size,
    retry_seconds,
    concurrency=None,
    on_event=None,
    tta: str = "none",
    features: bool = False,
) -> pd.DataFrame:
    """predict's rows for ``items`` and, for ``rejected`` ones, an error row each (``tta``: the test-time
    augmentation, ``class_probabilities``). More than
    ``reading.MAX_UNREADABLE_SHARE`` of the items undelivered by their storage raises ``RunError``
    (``check_delivered``): no report on what an outage left. ``features``: the ``FEATURE_COLUMNS`` too (a
    float32 array, a hex digest and a uint8 thumbnail a row; None and "" for an item that could not be read)."""
    columns = _columns(min(top_k, len(meta["class_names"]))) + (list(FEATURE_COLUMNS) if features else [])
    frame = _run_pipeline(
        checkpoint, meta, opener, items, top_k, batch_size, retry_seconds, concurrency, columns, on_event, tta, features
    )
    check_delivered(frame, len(items))
    if rejected:
        frame = pd.concat([frame, _error_rows(rejected, columns)], ignore_index=True)
        frame = frame.sort_values("path", kind="stable", ignore_index=True)
    return frame


def undelivered(frame: pd.DataFrame) -> pd.Series:
    """Which rows of ``frame`` are items their storage did not deliver (an error reason ``reading.is_unreadable``
    says so of), not bad files."""
    return frame[ERROR_COLUMN].astype(str).str.startswith(reading.UNREADABLE)


def check_delivered(frame: pd.DataFrame, total: int) -> None:
    """Stop (``RunError``) when the storage failed to deliver more than ``reading.MAX_UNREADABLE_SHARE`` of the
    ``total`` items classified into ``frame``; below it, their rows say so in the error column."""
    unreadable = frame.loc[undelivered(frame), ["path", ERROR_COLUMN]]
    after = "nothing was written: rerun when the storage answers"
    reading.check_unreadable(list(unreadable.itertuples(index=False, name=None)), total, "images", after)


def _run_pipeline(
    checkpoint,
    meta,
    opener,
    files,
    top_k,
    batch_size,
    retry_seconds,
    concurrency,
    columns,
    on_event=None,
    tta="none",
    features=False,
) -> pd.DataFrame:
    if not files:
        return pd.DataFrame({column: [] for column in columns})
    started_here = cluster.ensure_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    workers = concurrency or (int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 1)
    dataset = pipelines.file_rows([{"path": path} for path in files])
    dataset = dataset.map_batches(
        _decode_for_inference,
        batch_size=pipelines.BLOCK_ROWS,
        num_cpus=0.5,
        compute=cluster.task_pool(pipelines.row_blocks(len(files))),
        fn_kwargs={
            "opener": opener,
            "image_size": meta["image_size"],
            "resize": imaging.Resize.from_meta(meta),
            "retry_seconds": retry_seconds,
            "digests": features,
        },
    )
    with warnings.catch_warnings():  # see _pool_restarts
        warnings.simplefilter("ignore", RayDeprecationWarning)
        dataset = dataset.map_batches(
            _Classifier,
            fn_constructor_kwargs={
                "checkpoint_dir": _checkpoint_for_actors(checkpoint),
                "top_k": top_k,
                "tta": tta,
                "features": features,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0.5 if not use_gpu else 1,
            **_pool_restarts(started_here),
        )
    tables, done = [], 0
    for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):  # as they come, for progress
        tables.append(table)
        done += table.num_rows
        if on_event is not None:
            on_event(progress.Task("classifying images", done, len(files)))
    frame = pa.concat_tables(tables).to_pandas()[columns]
    return frame.sort_values("path", kind="stable", ignore_index=True)


def _checkpoint_for_actors(checkpoint: str | location.Location) -> str | location.Location:
    """What the model actors load: a local folder's absolute path, or the resolved location (its filesystem
    object, so every node reaches the endpoint the driver resolved)."""
    where = location.resolve(checkpoint, "--checkpoint")
    return str(Path(where.path).resolve()) if where.is_local else where

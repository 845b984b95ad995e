"""`tl-ray predict` and `tl-ray evaluate`: batch inference with Ray Data from any checkpoint.

The checkpoint carries its own preprocessing (image size, mean, std), so there is
nothing to get wrong. Files are decoded by Ray Data tasks and classified by a pool of
model actors (one GPU each when the cluster has GPUs); a file that cannot be decoded
gets a row with an ``error`` instead of stopping the run. Output rows are sorted by
path, so two runs over the same files give the same file.
"""

from __future__ import annotations

import inspect
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.util.annotations import RayDeprecationWarning

from tl_ray import checkpoint as checkpoints
from tl_ray import cluster, location, progress
from tl_ray.config import SourceOptions
from tl_ray.errors import TlRayError
from tl_ray.inputs import class_folders, imaging, pipelines, sources
from tl_ray.inputs.layout import FileOpener, resolve_filesystem

ERROR_COLUMN = "error"


def _input_files(location: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """A single image, or every image under a folder (recursively)."""
    filesystem, path, prefix, where = resolve_filesystem(location)
    info = where.info("--data")
    if info.type == pafs.FileType.NotFound:
        raise TlRayError(f"--data: {location} does not exist")
    if info.type == pafs.FileType.File:
        return filesystem, prefix, [path]
    files = class_folders.list_images(filesystem, path)
    if not files:
        raise TlRayError(f"--data: {location} holds no images ({', '.join(class_folders.IMAGE_EXTENSIONS)})")
    return filesystem, prefix, files


def _input_items(
    data_path: str | location.Location, options: SourceOptions
) -> tuple[sources.Opener, list[str], list[tuple[str, str]]]:
    """What predict classifies: (opener, items, (item, reason) of those it cannot carry). An image or a folder of
    images (recursively), as ever; a manifest, or Parquet files holding images (their labels ignored)."""
    where = location.resolve(data_path, "--data")
    name = where.base.lower()
    tabular = sources.is_glob(where) or name.endswith((*sources.MANIFEST_SUFFIXES, sources.PARQUET_SUFFIX))
    if not tabular and where.info("--data").type == pafs.FileType.Directory:
        tabular = not class_folders.list_images(where.filesystem, where.path) and bool(sources._parquet_files(where))
    if tabular:
        listing = sources.list_source(where, options, labelled=False)
        return listing.opener, listing.items, listing.rejected
    filesystem, prefix, files = _input_files(where)
    files, rejected = class_folders.readable_names(files)
    return FileOpener(filesystem, prefix), files, [(prefix + path, reason) for path, reason in rejected]


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
    batch: dict[str, np.ndarray], opener: sources.Opener, image_size: int, short_side: int
) -> dict[str, np.ndarray]:
    transform = imaging.eval_transform(image_size, short_side)
    images, errors = [], []
    for path in batch["path"]:
        try:
            images.append(imaging.decode_item(opener, path, transform, short_side))
            errors.append("")
        except Exception as error:  # a bad file becomes a row that says why
            images.append(np.zeros((3, image_size, image_size), np.uint8))
            errors.append(imaging.describe_error(error))
    return {
        "path": np.asarray([opener.display(p) for p in batch["path"]], dtype=object),
        "image": np.stack(images),
        ERROR_COLUMN: np.asarray(errors, dtype=object),
    }


class _Classifier:
    """One model per actor, loaded once; a Ray Data callable class."""

    def __init__(self, checkpoint_dir: str | location.Location, top_k: int) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # A checkpoint in object storage is read from this node's copy: fetched by the first actor here, once.
        self.model, meta = checkpoints.load_checkpoint(checkpoint_dir, self.device)
        self.class_names = np.asarray(meta["class_names"], dtype=object)
        self.mean = torch.tensor(meta["mean"], device=self.device)
        self.std = torch.tensor(meta["std"], device=self.device)
        self.top_k = min(top_k, len(self.class_names))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.tensor(batch["image"], device=self.device)  # a copy: Ray hands over read-only arrays
        with torch.no_grad():
            probabilities = torch.softmax(self.model(imaging.normalize(images, self.mean, self.std)).float(), dim=1)
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


def _write(table: pa.Table, out: location.Location) -> None:
    if out.is_local:
        Path(out.path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.filesystem.open_output_stream(out.path) as stream:
            if out.base.endswith(".parquet"):
                pq.write_table(table, stream)
            else:
                pacsv.write_csv(table, stream)
    except OSError as error:
        raise TlRayError(f"--out: cannot write {out.uri}: {location.describe(error)}") from error


def _output(out: str | None, suffixes: tuple[str, ...] = ()) -> location.Location | None:
    """--out resolved and checked writable (its folder: a file's), before any image is read."""
    if out is None:
        return None
    where = location.resolve(out, "--out")
    if suffixes and not where.base.endswith(suffixes):
        raise TlRayError(f"--out must end in {' or '.join(suffixes)}; got {out}")
    location.check_writable(where.parent() if suffixes else where, "--out")
    return where


def predict(
    checkpoint: str,
    data_path: str,
    out: str | None = None,
    top_k: int = 3,
    batch_size: int = 64,
    concurrency: int | None = None,
    on_event: progress.OnEvent | None = None,
    options: SourceOptions | None = None,
) -> pd.DataFrame:
    """Classify every image of ``data_path``: one row per item (a file's path, or a Parquet row's ``FILE#ROW``),
    sorted by it; written to ``out`` if given. ``options`` name a manifest's or Parquet's columns.

    ``on_event`` hears how many images are classified as they are (``progress.Task``)."""
    if top_k < 1 or batch_size < 1:
        raise TlRayError("--top-k and --batch-size must be positive")
    target = _output(out, (".csv", ".parquet"))
    meta = checkpoints.read_meta(checkpoint)
    opener, items, rejected = _input_items(data_path, (options or SourceOptions()).validate())
    frame = _predict_items(checkpoint, meta, opener, items, rejected, top_k, batch_size, concurrency, on_event)
    if target is not None:
        _write(pa.Table.from_pandas(frame, preserve_index=False), target)
    return frame


def _predict_items(
    checkpoint, meta, opener, items, rejected, top_k, batch_size, concurrency=None, on_event=None
) -> pd.DataFrame:
    """predict's rows for ``items`` and, for ``rejected`` ones, an error row each."""
    columns = _columns(min(top_k, len(meta["class_names"])))
    frame = _run_pipeline(checkpoint, meta, opener, items, top_k, batch_size, concurrency, columns, on_event)
    if rejected:
        frame = pd.concat([frame, _error_rows(rejected, columns)], ignore_index=True)
        frame = frame.sort_values("path", kind="stable", ignore_index=True)
    return frame


def _run_pipeline(
    checkpoint, meta, opener, files, top_k, batch_size, concurrency, columns, on_event=None
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
            "short_side": meta.get("resize_size") or imaging.resize_size(meta["image_size"]),
        },
    )
    with warnings.catch_warnings():  # see _pool_restarts
        warnings.simplefilter("ignore", RayDeprecationWarning)
        dataset = dataset.map_batches(
            _Classifier,
            fn_constructor_kwargs={"checkpoint_dir": _checkpoint_for_actors(checkpoint), "top_k": top_k},
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


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    predictions: pd.DataFrame  # predict's rows plus the true class
    misclassified: pd.DataFrame


def evaluate(
    checkpoint: str,
    data_dir: str,
    out_dir: str | None = None,
    batch_size: int = 64,
    on_event: progress.OnEvent | None = None,
    options: SourceOptions | None = None,
) -> Evaluation:
    """Accuracy, per-class precision/recall/F1 and a confusion matrix on labelled images: DIR/<class>/ folders, or
    any source train reads (its every item, scored with its label)."""
    target = _output(out_dir)
    meta = checkpoints.read_meta(checkpoint)
    where = location.resolve(data_dir, "--data")
    listing = sources.list_source(where, (options or SourceOptions()).validate())
    unknown = sorted(set(listing.labels) - set(meta["class_names"]))
    if unknown:
        raise TlRayError(
            f"--data: classes {', '.join(unknown)} in {data_dir} are not among the checkpoint's classes "
            f"({', '.join(meta['class_names'])})"
        )
    if not listing.items:
        raise TlRayError(f"--data: {data_dir} holds no labelled images")
    truth = {listing.opener.display(item): label for item, label in zip(listing.items, listing.labels, strict=True)}
    rows = _predict_items(
        checkpoint, meta, listing.opener, listing.items, listing.rejected, 3, batch_size, on_event=on_event
    )
    rows["true"] = rows["path"].map(truth).fillna("")
    scored = rows[rows[ERROR_COLUMN] == ""]
    classes = meta["class_names"]
    confusion = pd.crosstab(scored["true"], scored["predicted"]).reindex(index=classes, columns=classes, fill_value=0)
    per_class = {}
    for name in classes:
        tp = int(confusion.loc[name, name])
        predicted, actual = int(confusion[name].sum()), int(confusion.loc[name].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    present = [name for name in classes if per_class[name]["support"] > 0]
    metrics = {
        "accuracy": float((scored["true"] == scored["predicted"]).mean()) if len(scored) else 0.0,
        "images": len(scored),
        "undecodable": rows.loc[rows[ERROR_COLUMN] != "", ["path", ERROR_COLUMN]].to_dict("records"),
        "per_class": per_class,
        "macro": {
            key: float(np.mean([per_class[name][key] for name in present])) if present else 0.0
            for key in ("precision", "recall", "f1")
        },
        "confusion": {"classes": classes, "matrix": confusion.to_numpy().tolist()},
        "checkpoint": str(checkpoint),
    }
    misclassified = scored.loc[scored["true"] != scored["predicted"], ["path", "true", "predicted", "probability"]]
    if target is not None:
        _write_evaluation(target, metrics, misclassified, confusion)
    return Evaluation(metrics, rows, misclassified.reset_index(drop=True))


def _write_evaluation(
    target: location.Location, metrics: dict, misclassified: pd.DataFrame, confusion: pd.DataFrame
) -> None:
    """metrics.json, misclassified.csv and confusion.png into ``target``: written there, or (object storage) into
    a scratch folder and uploaded."""
    if target.is_local:
        _write_evaluation_files(Path(target.path), metrics, misclassified, confusion)
        return
    with tempfile.TemporaryDirectory() as scratch:
        _write_evaluation_files(Path(scratch), metrics, misclassified, confusion)
        try:
            pafs.copy_files(scratch, target.path, destination_filesystem=target.filesystem)
        except OSError as error:
            raise TlRayError(f"--out: cannot write {target.uri}: {location.describe(error)}") from error


def _write_evaluation_files(out: Path, metrics: dict, misclassified: pd.DataFrame, confusion: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    misclassified.to_csv(out / "misclassified.csv", index=False)
    size = max(4.0, 0.6 * len(confusion) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(confusion.to_numpy(), cmap="Blues")
    axes.set_xticks(range(len(confusion)), confusion.columns, rotation=45, ha="right")
    axes.set_yticks(range(len(confusion)), confusion.index)
    axes.set(xlabel="predicted", ylabel="true", title=f"accuracy {metrics['accuracy']:.3f}")
    peak = confusion.to_numpy().max(initial=0)
    for (i, j), count in np.ndenumerate(confusion.to_numpy()):
        axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.tight_layout()
    figure.savefig(out / "confusion.png", dpi=100)
    plt.close(figure)

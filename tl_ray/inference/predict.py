"""`tl-ray predict`: every image of a source classified by a checkpoint (``classify``), one row per item, written
as CSV or Parquet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tl_ray import checkpoint as checkpoints
from tl_ray import location, progress
from tl_ray.errors import TlRayError
from tl_ray.inference.classify import classify_items, output_location
from tl_ray.inference.config import PredictConfig
from tl_ray.inputs import class_folders, sources
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.layout import FileOpener, resolve_filesystem


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


def predict(config: PredictConfig, on_event: progress.OnEvent | None = None) -> pd.DataFrame:
    """Classify every image of ``data_path``: one row per item (a file's path, or a Parquet row's ``FILE#ROW``),
    sorted by it; written to ``out`` if given. ``options`` name a manifest's or Parquet's columns.

    ``on_event`` hears how many images are classified as they are (``progress.Task``)."""
    config = config.validate()
    target = output_location(config.out, (".csv", ".parquet"))
    meta = checkpoints.read_meta(config.checkpoint)
    opener, items, rejected = _input_items(config.data, config.source_options())
    frame = classify_items(
        config.checkpoint, meta, opener, items, rejected, config.top_k, config.batch_size, config.concurrency, on_event
    )
    if target is not None:
        _write(pa.Table.from_pandas(frame, preserve_index=False), target)
    return frame

"""`tl-ray predict`: every image of a source classified by a checkpoint (``classify``), one row per item, written
as CSV or Parquet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tl_ray import checkpoint as checkpoints
from tl_ray import location, progress
from tl_ray.errors import TlRayError
from tl_ray.inference.classify import classify_items, output_location
from tl_ray.inference.config import PredictConfig
from tl_ray.inputs import sources
from tl_ray.inputs.config import SourceOptions


def _input_items(
    data_path: str | location.Location, options: SourceOptions
) -> tuple[sources.Opener, list[str], list[tuple[str, str]]]:
    """What predict classifies: (opener, items, (item, reason) of those it cannot carry). An image or a folder of
    images (recursively), as ever; a manifest, or Parquet files holding images (their labels ignored): the sources'
    own recogniser decides which (``sources.recognise``, unlabelled)."""
    listing = sources.list_source(location.resolve(data_path, "--data"), options, labelled=False)
    return listing.opener, listing.items, listing.rejected


def _write(table: pa.Table, out: location.Location) -> None:
    if out.is_local:
        Path(out.path).parent.mkdir(parents=True, exist_ok=True)
    sink = pa.BufferOutputStream()
    if out.base.endswith(".parquet"):
        pq.write_table(table, sink)
    else:
        pacsv.write_csv(table, sink)
    try:
        location.write_bytes(out.filesystem, out.path, sink.getvalue())
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
        config.checkpoint,
        meta,
        opener,
        items,
        rejected,
        config.top_k,
        config.batch_size,
        config.retry_seconds,
        config.concurrency,
        on_event,
        config.tta,
    )
    if target is not None:
        _write(pa.Table.from_pandas(frame, preserve_index=False), target)
    return frame

"""Where the audit writes, and what: --out checked before anything is read (new, or an empty folder: nothing is
ever overwritten), then suspects.csv, duplicates.csv, outliers.csv, a gallery PNG of each finding with rows, and
with --fix-list the manifest of the items that are left (path,label,split: train --data takes it as it is)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from PIL import ImageOps

from tl_ray import figures, location
from tl_ray.auditing.features import Items, Plan
from tl_ray.errors import TlRayError
from tl_ray.inputs import imaging, reading, sources

SUSPECTS, DUPLICATES, OUTLIERS, FIX_LIST = "suspects.csv", "duplicates.csv", "outliers.csv", "fix-list.csv"
GALLERY_ITEMS = 16  # images in the suspects' and outliers' galleries
GALLERY_PAIRS = 8  # pairs in the duplicates' gallery
THUMBNAIL = 96


def check_out(out: str) -> location.Location:
    """--out resolved: a new folder, or an empty one, and writable; else one line, before any image is read."""
    where = location.resolve(out, "--out")
    info = where.info("--out")
    if info.type == pafs.FileType.File:
        raise TlRayError(f"--out: {where.uri} is a file; name a new or empty folder for the audit's files")
    if info.type == pafs.FileType.Directory:
        held = where.filesystem.get_file_info(pafs.FileSelector(where.path, recursive=False))
        if held:
            names = ", ".join(sorted(entry.base_name for entry in held)[:3])
            raise TlRayError(
                f"--out: {where.uri} holds other files ({names}{', ...' if len(held) > 3 else ''}); name a new or"
                " empty folder: nothing was written"
            )
    location.check_writable(where.parent() if info.type == pafs.FileType.NotFound else where, "--out")
    return where


def check_fix_list(planned: Plan, source: str) -> None:
    """--fix-list needs labels and items that are files: a manifest names files, not rows of Parquet or shards."""
    if not planned.labelled:
        raise TlRayError("--fix-list: --data has no labels, and train needs a manifest with them; leave it out")
    if source in (sources.PARQUET, sources.WEBDATASET):
        raise TlRayError(
            f"--fix-list: --data's items are {source} rows, which a manifest cannot name; use duplicates.csv,"
            " suspects.csv and outliers.csv to filter them"
        )


def removed(suspects: pd.DataFrame | None, duplicates: pd.DataFrame, outliers: pd.DataFrame) -> set[str]:
    """The items a fix list leaves out: every suspect and outlier; of a pair within a split its second item, of a
    leak the copy in the earlier split (a train copy of a val image), so the held-out set stays as it was."""
    flagged = set(outliers["item"])
    if suspects is not None:
        flagged |= set(suspects["item"])
    for a, b, kind in duplicates[["a", "b", "kind"]].itertuples(index=False):
        flagged.add(a if kind.startswith("leak") else b)
    return flagged


def fix_list(items: Items, flagged: set[str]) -> pd.DataFrame:
    """The manifest's rows: every decoded item not flagged, with its class name and split (a test item of a class
    training lacks has no class index to name, and is left out with the flagged)."""
    names = np.asarray(items.class_names, dtype=object)
    keep = np.asarray([path not in flagged for path in items.paths], dtype=bool) & (items.labels >= 0)
    paths = [path if location.is_uri(path) else os.path.abspath(path) for path in items.paths[keep]]
    return pd.DataFrame({"path": paths, "label": names[items.labels[keep]], "split": items.splits[keep]})


def write(
    target: location.Location,
    tables: dict[str, pd.DataFrame],
    items: Items,
    retry_seconds: float,
) -> dict[str, str]:
    """The tables (file name -> rows) and a gallery of each finding with rows into ``target``: written there, or
    (object storage) into a scratch folder and uploaded. Returns each written file's location, by file name."""
    if target.is_local:
        names = _write_files(Path(target.path), tables, items, retry_seconds)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            names = _write_files(Path(scratch), tables, items, retry_seconds)
            try:
                location.upload(scratch, target)
            except OSError as error:
                raise TlRayError(f"--out: cannot write {target.uri}: {location.describe(error)}") from error
    return {name: target.join(name).uri for name in names}


def _write_files(out: Path, tables: dict[str, pd.DataFrame], items: Items, retry_seconds: float) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in tables.items():
        rows.to_csv(out / name, index=False)
        written.append(name)
    galleries = {
        SUSPECTS: lambda rows: _gallery(rows["item"], [f"{g} -> {s}\n{v:.3f}" for g, s, v in _cols(rows, SUSPECTS)]),
        OUTLIERS: lambda rows: _gallery(rows["item"], [f"{n}\nz {z:.1f}" for n, z in _cols(rows, OUTLIERS)]),
        DUPLICATES: lambda rows: _pairs(rows),
    }
    for name, draw in galleries.items():
        rows = tables.get(name)
        if rows is None or not len(rows):
            continue
        cells = draw(rows)
        png = name.replace(".csv", ".png")
        _draw(out / png, cells, items, retry_seconds, columns=2 if name == DUPLICATES else 4)
        written.append(png)
    return written


def _cols(rows: pd.DataFrame, name: str):
    if name == SUSPECTS:
        return rows[["given", "suggested", "score"]].itertuples(index=False)
    return rows[["nearest", "z"]].itertuples(index=False)


def _gallery(paths: pd.Series, captions: list[str]) -> list[tuple[list[str], str]]:
    return [([path], caption) for path, caption in list(zip(paths, captions, strict=True))[:GALLERY_ITEMS]]


def _pairs(rows: pd.DataFrame) -> list[tuple[list[str], str]]:
    head = rows.head(GALLERY_PAIRS)
    return [
        ([a, b], f"{kind}{' (exact)' if exact else ''}\n{similarity:.3f}")
        for a, b, similarity, kind, exact in head[["a", "b", "similarity", "kind", "exact"]].itertuples(index=False)
    ]


def _thumbnail(items: Items, path: str, retry_seconds: float) -> np.ndarray:
    """The item as a square thumbnail; a grey square if it cannot be read again."""
    try:
        opener, item = items.where[path]
        image = imaging.load_rgb(reading.read_item(opener, item, retry_seconds))
        image = ImageOps.contain(image, (THUMBNAIL, THUMBNAIL))  # small images scaled up too (8 px digits)
        canvas = np.full((THUMBNAIL, THUMBNAIL, 3), 255, np.uint8)
        pixels = np.asarray(image)
        top, left = (THUMBNAIL - pixels.shape[0]) // 2, (THUMBNAIL - pixels.shape[1]) // 2
        canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        return canvas
    except Exception:  # a gallery shows what it can: the CSV names the item either way
        return np.full((THUMBNAIL, THUMBNAIL, 3), 128, np.uint8)


def _draw(png: Path, cells: list[tuple[list[str], str]], items: Items, retry_seconds: float, columns: int) -> None:
    """A grid of cells, each one image (or a pair side by side) over its caption and the file name."""
    plt = figures.pyplot()
    rows = -(-len(cells) // columns)
    width = len(cells[0][0])
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * width * columns, 2.9 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (paths, caption) in zip(axes.flat, cells, strict=False):
        axis.imshow(np.concatenate([_thumbnail(items, path, retry_seconds) for path in paths], axis=1))
        names = " | ".join(Path(path).name[-24:] for path in paths)
        axis.set_title(f"{caption}\n{names}", fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)

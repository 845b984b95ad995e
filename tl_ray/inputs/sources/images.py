"""The images source, predict's own: one image file, or every image under a folder (recursively), unlabelled.

Training needs labels, so only the unlabelled recogniser (``recognise(..., labelled=False)``) picks it: for predict,
--data is images unless it is a table (a manifest, Parquet files).
"""

from __future__ import annotations

import numpy as np
import pyarrow.fs as pafs

from tl_ray import location
from tl_ray.errors import TlRayError
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.layout import FileOpener
from tl_ray.inputs.sources.listing import IMAGE_EXTENSIONS, Listing, list_images, readable_names, uri_prefix

NAME = "images"


def list_items(
    where: location.Location, options: SourceOptions, labelled: bool = False, option: str = "--data"
) -> Listing:
    """A single image (whatever its name), or every image under a folder (recursively), sorted; a path Ray Data
    cannot carry is rejected. No labels, no splits, no stats: predict reads each item once and caches nothing."""
    info = where.info(option)
    if info.type == pafs.FileType.NotFound:
        raise TlRayError(f"{option}: {where.uri} does not exist")
    if info.type == pafs.FileType.File:
        files = [where.path]
    else:
        files = list_images(where.filesystem, where.path)
        if not files:
            raise TlRayError(f"{option}: {where.uri} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    files, rejected = readable_names(files)
    prefix = uri_prefix(where)
    return Listing(
        NAME,
        where,
        FileOpener(where.filesystem, prefix),
        files,
        [""] * len(files),
        [""] * len(files),
        np.full((len(files), 2), -1, dtype=np.int64),
        list(files),
        rejected=[(prefix + path, reason) for path, reason in rejected],
        split_rule="none: predict classifies every image",
    )

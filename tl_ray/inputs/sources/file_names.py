"""The file-names source (``--label-pattern``): a folder of images whose class is in each file's name
(``cat.0.jpg``, ``circle_0050.png``), as Kaggle's Dogs vs. Cats and many scraped sets come. The pattern is searched
in each name; its group ``label`` (or group 1) is the class. A name it does not match is left out and reported,
never guessed."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow.fs as pafs

from tl_ray import location
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inputs.config import SourceOptions
from tl_ray.inputs.layout import FileOpener, no_stats
from tl_ray.inputs.sources.listing import (
    Listing,
    has_folder,
    list_image_stats,
    readable_stats,
    uri_prefix,
    val_folder,
)

NAME = "file names"


def list_items(
    where: location.Location, options: SourceOptions, labelled: bool = True, option: str = "--data"
) -> Listing:
    """Images whose label is in their file name (``--label-pattern``): ROOT/train/ and an optional ROOT/val/ (or
    valid/, validation/), or
    every image under ROOT; a file whose name does not match is left out, and reported (``labelled`` or not: the
    pattern is what makes this source)."""
    pattern = re.compile(options.validate().label_pattern or "")
    group = "label" if "label" in pattern.groupindex else 1
    if where.info(option).type != pafs.FileType.Directory:
        raise TlRayError(f"{option}: {where.uri} is not a folder; --label-pattern reads the names of a folder's images")
    folders = [("", where.path)]
    rule = f"a held-out share of {where.uri} by each file's hash (--val-fraction)"
    if has_folder(where, "train"):
        folders = [("train", f"{where.path}/train")]
        rule = "train/ and a held-out share of it by each file's hash (--val-fraction)"
        val_name = val_folder(where, option)
        if val_name is not None:
            folders.append(("val", f"{where.path}/{val_name}"))
            rule = f"train/ and {val_name}/"
    prefix = uri_prefix(where)
    items, labels, splits, keys, stats, rejected = [], [], [], [], [no_stats()], []
    names_seen, example = 0, ""
    for split, folder in folders:
        listed, unreadable = readable_stats(list_image_stats(where.filesystem, folder))
        rejected += [(prefix + path, reason) for path, reason in unreadable]
        keep, kept_stats = [], []
        for path, size, mtime in listed:
            names_seen += 1
            name = path.rsplit("/", 1)[-1]
            example = example or name
            found = pattern.search(name)
            label = found.group(group) if found else None
            if not label:
                rejected.append((prefix + path, f"file name does not match --label-pattern '{pattern.pattern}'"))
                continue
            keep.append(path)
            labels.append(label)
            kept_stats.append((size, mtime))
        items += keep
        splits += [split] * len(keep)
        keys += [os.path.relpath(path, folder) for path in keep]
        stats.append(np.asarray(kept_stats, dtype=np.int64).reshape(-1, 2))
    if not items:
        what = f"any of the {names_seen:,} image file names" if names_seen else "anything: there are no images"
        shown = f" (e.g. {example!r})" if example else ""
        raise UsageError(f"--label-pattern '{pattern.pattern}' does not match {what} under {where.uri}{shown}")
    return Listing(
        NAME,
        where,
        FileOpener(where.filesystem, prefix),
        items,
        labels,
        splits,
        np.concatenate(stats),
        keys,
        rejected=rejected,
        split_rule=rule,
    )

"""The dataset options, declared once: the source flags every command that reads --data takes (``SourceOptions``,
a typed value the sources are handed) and `tl-ray inspect`'s (``InspectConfig``), whose --data, --val-data and
--val-fraction train, tune and lr-find take too (``same_option``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Self

from tl_ray.errors import UsageError
from tl_ray.inputs import reading
from tl_ray.options import check_options, check_required, flag, option, same_option

LABEL_PATTERN_HINT = r"^(\w+)\."  # cat.0.jpg -> cat: what the flat-folder error suggests


@dataclass(frozen=True)
class SourceOptions:
    """How a source's items are labelled, split and read (tl_ray.sources): the flags every command that reads --data
    takes."""

    label_pattern: str | None = option(
        None,
        "labels in the file names: a regex searched in each image's name, the label its group 'label' or group 1"
        f" (cat.0.jpg: '{LABEL_PATTERN_HINT}'); files that do not match are skipped and reported",
    )
    path_column: str = option(
        "path", "a manifest's column of image paths (relative to the manifest's folder, absolute, or URIs)"
    )
    label_column: str = option(
        "label", "a manifest's or Parquet's column of labels (a WebDataset .json's key): class names, or integer ids"
    )
    split_column: str = option("split", "a manifest's or Parquet's column of splits, train or val (if it has one)")
    image_column: str | None = option(
        None,
        "Parquet's column of encoded images, binary or {bytes, path} (default: the one named image, else the first"
        " that holds images)",
    )
    retry_seconds: float = option(
        reading.RETRY_SECONDS,
        "how long a read from object storage retries throttling, 5xx answers and dropped connections (backing off,"
        " with jitter) before the image counts as unreadable: never as a bad image; more than"
        f" {reading.MAX_UNREADABLE_SHARE:.0%} of a set unreadable stops the command (seconds)",
        between=(0.0, 3600.0),
    )

    def validate(self) -> SourceOptions:
        if self.label_pattern is not None:
            try:
                compiled = re.compile(self.label_pattern)
            except re.error as error:
                pattern = self.label_pattern
                raise UsageError(f"--label-pattern: {pattern!r} is not a regular expression: {error}") from None
            if "label" not in compiled.groupindex and compiled.groups < 1:
                raise UsageError(
                    f"--label-pattern: {self.label_pattern!r} has no group: the label is the group named 'label' or"
                    f" group 1, as in '{LABEL_PATTERN_HINT}'"
                )
        for key in ("path_column", "label_column", "split_column"):
            if not getattr(self, key):
                raise UsageError(f"{flag(key)} must name a column")
        return self


SOURCE_KEYS = tuple(field.name for field in dataclasses.fields(SourceOptions))


class ReadsSource:
    """What the options of a command that reads a source share: the ``SourceOptions`` its source flags make (all
    of them, or those it declares: predict's two columns), and the checks every such command runs."""

    def source_options(self) -> SourceOptions:
        return SourceOptions(**{key: getattr(self, key) for key in SOURCE_KEYS if hasattr(self, key)})

    def validate(self) -> Self:
        check_options(self)
        check_required(self)
        self.source_options().validate()
        return self


@dataclass
class InspectConfig(ReadsSource):
    """`tl-ray inspect`: what a run on ``data`` would train on (``tl_ray.inputs.inspect``)."""

    data: str | None = option(
        None,
        "the dataset: ROOT/train/<class>/*.jpg (+ optional ROOT/val/); a flat folder with --label-pattern; a"
        " manifest FILE.csv|.tsv|.jsonl|.parquet of path,label[,split]; or Parquet files holding the images (a file,"
        " folder or glob; Hugging Face's train-*/validation-* recognised); WebDataset .tar shards (a folder, a shard,"
        " a glob or a {000000..000009} pattern). A path or a URI (s3://, gs://, abfs://,"
        " hdfs://; an S3-compatible endpoint as ?endpoint_override=HOST:PORT&scheme=http or AWS_ENDPOINT_URL)",
        required="a folder with train/<class>/ image sub-folders",
    )
    val_data: str | None = option(
        None, "a validation set stored elsewhere, any source --data takes (replaces --data's own val split)"
    )
    val_fraction: float = option(0.2, "share of train/ held out for validation when there is no val/ folder")
    label_pattern: str | None = same_option(SourceOptions, "label_pattern")
    path_column: str = same_option(SourceOptions, "path_column")
    label_column: str = same_option(SourceOptions, "label_column")
    split_column: str = same_option(SourceOptions, "split_column")
    image_column: str | None = same_option(SourceOptions, "image_column")
    retry_seconds: float = same_option(SourceOptions, "retry_seconds")
    decode: bool = option(
        False,
        "decode every item (as the cache build will) to list every one that will be skipped; by default only the"
        " listing's checks, and a sample's headers for the sizes",
    )

    def validate(self) -> InspectConfig:
        check_val_fraction(self.val_fraction)
        return super().validate()


def check_val_fraction(value: float) -> None:
    if not 0.0 < value < 1.0:
        raise UsageError(f"{flag('val_fraction')} must be between 0 and 1 (exclusive); got {value}")

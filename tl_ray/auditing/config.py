"""The options of `tl-ray audit`, each declared once (``tl_ray.options``): the source flags are train's."""

from __future__ import annotations

from dataclasses import dataclass

from tl_ray.errors import UsageError
from tl_ray.inference.config import PredictConfig
from tl_ray.inputs.config import InspectConfig, ReadsSource, check_val_fraction
from tl_ray.options import flag, option, same_option

# Measured (BENCHMARKS.md, "Data audit"): on the digits, resized and re-encoded copies of val images score 0.94-0.99
# in the whitened space of a resnet18 trained on them; at 0.95 17 of 18 were found, with 2 other pairs.
DUPLICATE_THRESHOLD = 0.95
# The pixel check (BENCHMARKS.md, "Colour thumbnails"): on rendered letters it drops the look-alike fonts the features
# report (32% of the pairs to 8%, every one left a font file the data holds twice), every copy kept; 600 re-encoded
# copies of the sample shapes (a small shape on a noisy ground, the hardest measured) all pass, the lowest at 0.980:
# a user whose copies are smaller or noisier than that lowers it, and 0 turns it off.
DUPLICATE_PIXEL_THRESHOLD = 0.98


@dataclass
class AuditConfig(ReadsSource):
    """`tl-ray audit`: label suspects, duplicates and leaks, and outliers of a dataset (``auditing.run``)."""

    checkpoint: str | None = option(
        None,
        "a tl-ray checkpoint folder whose backbone gives the features (its classes must be --data's): a path or URI",
        required="a tl-ray checkpoint folder trained on --data's classes",
    )
    data: str | None = same_option(InspectConfig, "data")
    out: str | None = option(
        None,
        "folder or URI to write suspects.csv, duplicates.csv, outliers.csv and their galleries (.png) into: new, or"
        " empty",
        required="a new folder for the audit's files",
    )
    val_data: str | None = same_option(InspectConfig, "val_data")
    val_fraction: float = same_option(InspectConfig, "val_fraction")
    folds: int = option(5, "folds of the out-of-sample label check: a linear head per fold on the others' features")
    duplicate_threshold: float = option(
        DUPLICATE_THRESHOLD,
        "cosine similarity of two images' whitened pooled features at or above which they are reported as near"
        " duplicates",
        between=(0.0, 1.0),
    )
    duplicate_pixel_threshold: float = option(
        DUPLICATE_PIXEL_THRESHOLD,
        "correlation of two near duplicates' 32-pixel colour thumbnails (slightly blurred) at or above which the"
        " pair is reported: it tells a copy from a look-alike the features also call near; 0 reports every pair the"
        " features find",
        between=(0.0, 1.0),
    )
    outlier_z: float = option(
        3.5,
        "an image is an outlier when its distance to the nearest class mean is this many robust deviations (median"
        " absolute deviation) above the median distance",
        positive=True,
    )
    fix_list: bool = option(
        False,
        "also write fix-list.csv: a manifest (path,label,split) of the items without the flagged ones (suspects, the"
        " train-side copy of each duplicate, outliers), which train --data takes as it is",
    )
    seed: int = option(0, "seed of the folds")
    batch_size: int = same_option(PredictConfig, "batch_size")
    label_pattern: str | None = same_option(InspectConfig, "label_pattern")
    path_column: str = same_option(InspectConfig, "path_column")
    label_column: str = same_option(InspectConfig, "label_column")
    split_column: str = same_option(InspectConfig, "split_column")
    image_column: str | None = same_option(InspectConfig, "image_column")
    retry_seconds: float = same_option(InspectConfig, "retry_seconds")

    def validate(self) -> AuditConfig:
        check_val_fraction(self.val_fraction)
        if self.folds < 2:
            raise UsageError(f"{flag('folds')} must be at least 2; got {self.folds}")
        return super().validate()

"""The options of `tl-ray predict`, `tl-ray evaluate` and `tl-ray export`, each declared once (``tl_ray.options``):
the CLI's flags, the YAML keys and the Python API's keywords all come from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from tl_ray.inputs.config import InspectConfig, ReadsSource, SourceOptions
from tl_ray.options import check_options, check_required, option, same_option

FORMATS = ("torchscript", "onnx")
SPLITS = ("train", "val", "test")  # what evaluate's --split names
# Test-time augmentation: none, or the mean of the softmax of each image and its horizontal mirror. Not
# flip+crops: not measured to pay (see docs/training.md, "Test-time augmentation").
TTAS = ("none", "flip")


@dataclass
class PredictConfig(ReadsSource):
    """`tl-ray predict`: classify images with a checkpoint (``inference.predict``)."""

    checkpoint: str | None = option(
        None, "a tl-ray checkpoint folder (e.g. a sweep's best/): a path or URI", required="a tl-ray checkpoint folder"
    )
    data: str | None = option(
        None,
        "an image, a folder of images (recursive), a manifest (.csv, .tsv, .jsonl, .parquet of paths) or Parquet"
        " files holding images (a file, folder or glob; rows written as FILE#ROW); a path or URI",
        required="the images to classify",
    )
    out: str | None = option(
        None, "predictions file: .csv or .parquet, a path or URI (the Python API: none, only returned)"
    )
    top_k: int = option(3, "classes listed per image", positive=True)
    batch_size: int = option(64, "images per model call", positive=True)
    concurrency: int | None = option(None, "model actors (default: one per GPU, or 1 on CPU)", positive=True)
    tta: str = option(
        "none",
        "test-time augmentation: none | flip: the mean of the class probabilities of each image and its horizontal"
        " mirror (twice the model calls); an inference option: the checkpoint and an exported file are unchanged",
        choices=TTAS,
    )
    path_column: str = same_option(SourceOptions, "path_column")
    image_column: str | None = same_option(SourceOptions, "image_column")
    retry_seconds: float = same_option(SourceOptions, "retry_seconds")


@dataclass
class EvaluateConfig(ReadsSource):
    """`tl-ray evaluate`: accuracy, per-class metrics and the confusion matrix on labelled images."""

    checkpoint: str | None = same_option(PredictConfig, "checkpoint")
    data: str | None = option(
        None,
        "labelled images: a folder of <class>/ image folders named as in training, or any source train reads"
        " (every item of it is scored)",
        required="labelled images",
    )
    split: str | None = option(
        None,
        "score one split of --data: its train/, val folder (val/, valid/, validation/) or test/ folder, or the items"
        " its source marks so (default: every item)",
        choices=SPLITS,
    )
    out: str | None = option(
        None,
        "folder or URI: metrics.json, misclassified.csv, confusion.png, per_class.png, reliability.png,"
        " top_losses.png and report.html",
    )
    top_losses: int = option(
        16, "the images with the highest loss shown in top_losses.png and report.html", positive=True
    )
    batch_size: int = same_option(PredictConfig, "batch_size")
    tta: str = same_option(PredictConfig, "tta")
    label_pattern: str | None = same_option(InspectConfig, "label_pattern")
    path_column: str = same_option(InspectConfig, "path_column")
    label_column: str = same_option(InspectConfig, "label_column")
    split_column: str = same_option(InspectConfig, "split_column")
    image_column: str | None = same_option(InspectConfig, "image_column")
    retry_seconds: float = same_option(InspectConfig, "retry_seconds")


@dataclass
class ExportConfig:
    """`tl-ray export`: a checkpoint as one TorchScript or ONNX file and its metadata."""

    checkpoint: str | None = same_option(PredictConfig, "checkpoint")
    format: str | None = option(None, " | ".join(FORMATS), choices=FORMATS, required=" | ".join(FORMATS))
    out: str | None = option(
        None, "file or URI to write: model.ts, model.onnx; OUT.json beside", required="the file to write"
    )

    def validate(self) -> ExportConfig:
        check_options(self)
        check_required(self)
        return self

"""`tl-ray export`: a checkpoint as one TorchScript or ONNX file that runs without tl-ray.

A deployer has decoded images, not tl-ray's preprocessing code, so the file takes what they
hold: a uint8 RGB batch ``(N, 3, image_size, image_size)`` already resized (with the weights' interpolation:
``interpolation``, ``pil_resample``) and centre-cropped.
Scaling to 0-1, the checkpoint's mean/std normalisation, the model and the softmax are inside
the graph, so they cannot be got wrong. The resize and crop are not (they act on images of any
size, before batching): the metadata says how to do them, byte for byte as `tl-ray predict`
does. It is embedded in the file (TorchScript extra file / ONNX metadata property
``tl_ray.json``) and written beside it as ``<out>.json``.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from tl_ray import checkpoint as checkpoints
from tl_ray import location
from tl_ray.errors import TlRayError, UsageError
from tl_ray.inference.config import ExportConfig
from tl_ray.inputs import imaging
from tl_ray.version import __version__

METADATA_KEY = "tl_ray.json"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
ONNX_PACKAGES = ("onnx", "onnxscript")  # torch.onnx's exporter (dynamo) needs both
DOC_STRING = (
    f"tl-ray classifier: uint8 RGB {INPUT_NAME} (N, 3, S, S), resized and centre-cropped as the {METADATA_KEY}"
    f" metadata property says -> softmax {OUTPUT_NAME} (N, classes)"
)


class DeployableClassifier(nn.Module):
    """uint8 RGB images ``(N, 3, S, S)`` -> class probabilities ``(N, classes)``: normalisation, model, softmax."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], image_size: int) -> None:
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Checked here because a traced or scripted model would otherwise accept a float image in 0-1 or a
        # wrongly sized crop and return confident nonsense. (The ONNX graph declares both in its input type.)
        size = self.image_size
        if images.dtype != torch.uint8:
            raise ValueError("images must be uint8 RGB in 0-255 (the model scales and normalises them)")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(f"images must be (N, 3, {size}, {size}): resized and centre-cropped; got {images.shape}")
        # imaging.normalize's arithmetic, in its order: the same floats as `tl-ray predict`.
        normalized = (images.float() / 255.0 - self.mean) / self.std
        return torch.softmax(self.model(normalized).float(), dim=1)


@dataclass(frozen=True)
class ExportResult:
    path: Path | str  # the model file: a local path, or the URI it was uploaded to
    sidecar: Path | str  # <path>.json: the same metadata as inside the file
    format: str
    metadata: dict[str, Any]
    size: int = 0  # the model file's bytes


def export(config: ExportConfig) -> ExportResult:
    """Write the checkpoint as a ``format`` file at ``out`` and its metadata at ``<out>.json``; replaces both."""
    config = config.validate()
    checkpoint, out, format = config.checkpoint, config.out, config.format
    target = location.resolve(out, "--out")
    if target.info("--out").type == pafs.FileType.Directory:
        example = target.join("model.onnx").uri
        raise UsageError(f"--out: {target.uri} is a folder; name the file to write (e.g. {example})")
    if format == "onnx":
        missing = [name for name in ONNX_PACKAGES if not _importable(name)]
        if missing:
            packages = f"{' and '.join(missing)} package" + ("s" if len(missing) > 1 else "")
            raise UsageError(f"--format onnx needs the {packages}: pip install 'tl-ray[export]'")
    if not target.is_local:
        location.check_writable(target.parent(), "--out")  # before the export's minutes, not after
    try:
        model, meta = checkpoints.load_checkpoint(checkpoint, "cpu")
    except TlRayError as error:
        message = str(error)
        raise UsageError(message if message.startswith("--checkpoint") else f"--checkpoint: {message}") from error
    metadata = deployment_metadata(meta, format)
    classifier = DeployableClassifier(model, meta["mean"], meta["std"], meta["image_size"]).eval()
    text = json.dumps(metadata, indent=2) + "\n"
    write = _write_torchscript if format == "torchscript" else _write_onnx
    if target.is_local:
        path = Path(target.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path, lambda temporary: write(classifier, temporary, text))
        sidecar = path.with_name(path.name + ".json")
        _replace(sidecar, lambda temporary: temporary.write_text(text, encoding="utf-8"))
        return ExportResult(path, sidecar, format, metadata, path.stat().st_size)
    # Object storage: written here, then uploaded (an object appears whole once its upload completes).
    sidecar_target = target.parent().join(target.name + ".json")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / target.name
        write(classifier, local, text)
        (Path(scratch) / (target.name + ".json")).write_text(text, encoding="utf-8")
        try:
            for source, destination in ((local, target), (Path(scratch) / (target.name + ".json"), sidecar_target)):
                location.upload(str(source), destination)
        except OSError as error:
            raise TlRayError(f"--out: cannot write {target.uri}: {location.describe(error)}") from error
        size = local.stat().st_size
    return ExportResult(target.uri, sidecar_target.uri, format, metadata, size)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def deployment_metadata(meta: dict[str, Any], format: str) -> dict[str, Any]:
    """What a deployer needs beside the file: the input contract, the preprocessing outside it, the classes."""
    size = meta["image_size"]
    resizing = imaging.Resize.from_meta(meta)
    resize, interpolation = resizing.short_side, resizing.interpolation
    classes = list(meta["class_names"])
    return {
        "format": format,
        "arch": meta["arch"],
        "class_names": classes,
        "image_size": size,
        "resize_size": resize,
        "interpolation": interpolation,  # the resize's filter, the weights' own (bilinear: torchvision's)
        "pil_resample": resizing.pil_filter,  # the same as PIL names it: Image.Resampling[pil_resample]
        "mean": meta["mean"],
        "std": meta["std"],
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["N", 3, size, size],
            "layout": "NCHW",
            "channels": "RGB",
            "range": [0, 255],
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["N", len(classes)],
            "meaning": "softmax probabilities, one column per class_names entry, in that order",
        },
        "preprocessing": {
            "before": [
                "decode to 8-bit RGB, EXIF orientation applied; a JPEG whose short side is at least"
                f" {2 * resize} px is decoded at reduced scale, as tl-ray predict does: PIL Image.draft(None,"
                f" (ceil(width * f), ceil(height * f))) with f = {resize} / short side (a full decode gives crops"
                " under one grey level apart on average, up to ~15 at sharp edges)",
                f"resize so the short side is {resize} px: {interpolation} with antialiasing (PIL Image.resize with"
                f" Image.{resizing.pil_filter}), the long side int({resize} * long / short)",
                f"centre-crop {size}x{size}: left = round((width - {size}) / 2), top = round((height - {size}) / 2),"
                " Python's round",
                "HWC -> CHW, stack into a uint8 batch",
            ],
            "inside": [
                "float(x) / 255",
                "(x - mean) / std per channel",
                f"{meta['arch']}",
                "softmax over classes",
            ],
        },
        "tl_ray_version": __version__,
        "checkpoint_meta": meta,
    }


def _replace(path: Path, write) -> None:
    """Write under a temporary name, then rename: a failed export leaves the previous file, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _write_torchscript(classifier: DeployableClassifier, path: Path, metadata: str) -> None:
    with warnings.catch_warnings():
        # torch deprecates TorchScript in favour of torch.export; the user asked for TorchScript, and cannot act on it.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        try:
            scripted = torch.jit.script(classifier)
        except Exception as error:  # TorchScript's frontend refuses Python it cannot compile (some timm models)
            raise TlRayError(
                f"--format torchscript: this model cannot be scripted ({_first_line(error)}); try --format onnx"
            ) from error
        torch.jit.save(scripted, str(path), _extra_files={METADATA_KEY: metadata})


def _write_onnx(classifier: DeployableClassifier, path: Path, metadata: str) -> None:
    import onnx

    size = classifier.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)  # 2, not 1: export would specialise a batch of 1
    try:
        program = torch.onnx.export(
            classifier,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("N")}},
            dynamo=True,
            verbose=False,
        )
    except Exception as error:  # an operator ONNX has no translation for, a graph torch.export cannot capture
        raise TlRayError(
            f"--format onnx: this model cannot be exported ({_first_line(error)}); try --format torchscript"
        ) from error
    program.model.metadata_props[METADATA_KEY] = metadata
    program.model.doc_string = DOC_STRING
    program.save(path, external_data=False)
    onnx.checker.check_model(str(path), full_check=True)

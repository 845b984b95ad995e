"""Frozen-backbone features, computed once: feature extraction without a backbone pass every epoch.

At freeze depth 5 the backbone is a fixed function, and with ``--augment none`` its
input (the centre crop of each cached image) is fixed too, so its output is fixed.
Computing those features once, with Ray Data, and training only the head on them
gives the model an image-by-image run would train (BatchNorm is in eval mode either
way), at the cost of one backbone pass instead of one per epoch, and every depth-5
trial of a sweep reuses it. Features are stored inside the image cache they came
from, keyed by the arch, the crop size and a digest of the backbone weights and
normalisation; that cache's own key holds the resize (``imaging.Resize``: short side and
interpolation), so features of bicubic crops are never those of bilinear ones.

When a run's features fit in memory (``IN_MEMORY_BYTES`` a worker: ~130,000 images of
resnet50 features), each worker reads them once and deals itself a seeded share each
epoch (``epoch_batches``): a head-only epoch then costs milliseconds, not a streaming
execution. Larger runs stream them through Ray Data (``feature_dataset``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from tl_ray import backbones, location, model, progress
from tl_ray.backbones import NUM_STAGES
from tl_ray.inputs import cache, imaging, pipelines, skiplog, streaming
from tl_ray.inputs.layout import Layout

FEATURES_VERSION = 1
EXTRACT_BATCH = 64
IN_MEMORY_BYTES = 1 << 30  # a worker's copy of both splits' features, at most


@dataclass(frozen=True)
class FeatureSplit:
    filesystem: pafs.FileSystem
    parquet_files: list[str]
    rows: int
    built: bool  # True when this call ran the backbone, False when earlier features were reused
    width: int  # features a row (the backbone's pooled width: 192 for a ViT-Tiny, 3072 for a ConvNeXt-XL)


def applies(freeze_depth: int, augment: str, cache_root: location.Location | None) -> bool:
    """Only then are a run's backbone outputs the same every epoch (and there is a cache to keep them in)."""
    return freeze_depth == NUM_STAGES and augment == "none" and cache_root is not None


def backbone_digest(weights: model.InitialWeights, arch: str) -> str:
    """Changes whenever the features would: any backbone tensor, or the normalisation. (``arch`` names the head's
    keys, which are left out: a ResNet's ``fc.``, as before there were other families.)"""
    digest = hashlib.sha256(json.dumps([FEATURES_VERSION, list(weights.mean), list(weights.std)]).encode())
    head = set(backbones.head_keys(arch, weights.state_dict))
    for key in sorted(weights.state_dict):
        if key not in head:
            digest.update(key.encode())
            digest.update(weights.state_dict[key].detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class _Backbone:
    """A Ray Data callable class: the frozen backbone, loaded once per actor; writes one Parquet file per batch."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        image_size: int,
        weights: list[ray.ObjectRef],  # in a list: Ray Data passes it on unresolved
        mean: list[float],
        std: list[float],
        filesystem: pafs.FileSystem,
        folder: str,
    ) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net = model.create_model(arch, num_classes, image_size)
        net.load_state_dict(ray.get(weights[0]))
        self.backbone = model.TransferModel(net, NUM_STAGES).eval().to(self.device)
        self.mean = torch.tensor(mean, device=self.device)
        self.std = torch.tensor(std, device=self.device)
        self.filesystem, self.folder = filesystem, folder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.tensor(batch["image"], device=self.device)  # a copy: Ray hands over read-only arrays
        with torch.no_grad():
            features = self.backbone.features(imaging.normalize(images, self.mean, self.std)).float().cpu().numpy()
        name = f"{uuid.uuid4().hex}.parquet"
        table = pa.table(
            {
                "label": pa.array(batch["label"], pa.int64()),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1]),
            }
        )
        pq.write_table(table, f"{self.folder}/{name}", filesystem=self.filesystem)
        return {
            "file": np.asarray([name], dtype=object),
            "rows": np.asarray([len(features)]),
            "width": np.asarray([features.shape[1]]),
        }


def prepare(
    split: cache.CachedSplit, image_size: int, arch: str, num_classes: int, weights: model.InitialWeights, use_gpu: bool
) -> FeatureSplit:
    """The backbone features of a cached split: reused when computed before with the same backbone, else built."""
    filesystem = split.filesystem
    folder = f"{split.folder}/features-{arch.replace('/', '-')}-{image_size}-{backbone_digest(weights, arch)}"
    manifest = cache.read_manifest(filesystem, folder, FEATURES_VERSION)
    built = manifest is None
    if manifest is None:
        attempt = uuid.uuid4().hex[:12]
        filesystem.create_dir(f"{folder}/{attempt}", recursive=True)
        images = streaming.cached_dataset(split, image_size, training=False)
        extractors = max(1, int(ray.cluster_resources().get("GPU", 0))) if use_gpu else 1
        outcome = images.map_batches(
            _Backbone,
            fn_constructor_kwargs={
                "arch": arch,
                "num_classes": num_classes,
                "image_size": image_size,
                "weights": [ray.put(weights.state_dict)],
                "mean": list(weights.mean),
                "std": list(weights.std),
                "filesystem": filesystem,
                "folder": f"{folder}/{attempt}",
            },
            batch_size=EXTRACT_BATCH,
            compute=ray.data.ActorPoolStrategy(size=extractors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=1 if use_gpu else 0.5,
        ).take_all()
        manifest = {
            "version": FEATURES_VERSION,
            "files": sorted(f"{attempt}/{row['file']}" for row in outcome),
            "rows": int(sum(row["rows"] for row in outcome)),
            "width": int(outcome[0]["width"]) if outcome else 0,
        }
        cache.write_manifest(filesystem, folder, manifest)
    files = [f"{folder}/{name}" for name in manifest["files"]]
    width = manifest.get("width")
    if width is None:  # written before manifests recorded it: the first file's schema says
        width = pq.read_schema(files[0], filesystem=filesystem).field("features").type.list_size if files else 0
    return FeatureSplit(filesystem, files, manifest["rows"], built, int(width))


def _read_features(batch: dict[str, np.ndarray], filesystem: pafs.FileSystem) -> dict[str, np.ndarray]:
    tables = [pq.read_table(path, filesystem=filesystem) for path in batch["file"]]
    table = pa.concat_tables(tables)
    width = table.schema.field("features").type.list_size
    features = table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, width)
    return {"features": features.astype(np.float32, copy=False), "label": table.column("label").to_numpy()}


def feature_dataset(split: FeatureSplit, training: bool, seed: int = 0) -> ray.data.Dataset:
    """{"features": float32 (D,), "label": int64}, several feature files to a block (``streaming.files_per_task``:
    reading is all a task does), in a new order each epoch."""
    files, filesystem = split.parquet_files, split.filesystem
    return streaming.per_file_dataset(files, filesystem, _read_features, training, seed, rows=split.rows)


def prepare_splits(
    layout: Layout,
    image_size: int,
    cache_root: location.Location,
    skipped: skiplog.Skips,
    arch: str,
    weights: model.InitialWeights,
    use_gpu: bool,
    on_event: progress.OnEvent | None = None,
    resize: imaging.Resize | None = None,
) -> dict[str, FeatureSplit | None]:
    """A run's "train" and "val" backbone features (built from the image cache if need be); None for a split
    with nothing decodable. ``resize``: the run's (the driver's, from the weights); by default the weights' own."""
    resize = resize or imaging.Resize.for_crop(image_size, weights.crop_fraction, weights.interpolation)
    splits: dict[str, FeatureSplit | None] = {}
    for name, split in cache.prepare_splits(layout, image_size, cache_root, skipped, resize, on_event).items():
        if split is not None:
            splits[name] = prepare(split, image_size, arch, len(layout.class_names), weights, use_gpu)
        else:
            splits[name] = None
    return splits


def fit_in_memory(splits: dict[str, FeatureSplit | None]) -> bool:
    """Whether a worker can hold every split's features (float32, at the backbone's own width: a timm model's may
    be far wider or narrower than any torchvision arch's)."""
    return sum(split.rows * split.width * 4 for split in splits.values() if split is not None) <= IN_MEMORY_BYTES


def streaming_datasets(splits: dict[str, FeatureSplit | None], seed: int = 0) -> dict[str, ray.data.Dataset]:
    """The splits as Ray Data datasets, for features too large to hold in each worker's memory."""
    return {
        name: ray.data.from_items([]) if split is None else feature_dataset(split, name == "train", seed)
        for name, split in splits.items()
    }


def load(split: FeatureSplit | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a split's (features, labels), on ``device``."""
    if split is None or not split.parquet_files:
        return torch.zeros((0, 1)), torch.zeros(0, dtype=torch.int64)
    rows = _read_features({"file": split.parquet_files}, split.filesystem)
    # Copies: Ray Data hands over read-only arrays, which torch refuses to wrap.
    features, labels = torch.tensor(rows["features"]), torch.tensor(rows["label"], dtype=torch.int64)
    return features.to(device), labels.to(device)


def epoch_batches(
    features: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    rank: int,
    world: int,
    training: bool,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches of one epoch (``pipelines.deal_rows``)."""
    rows = pipelines.deal_rows(len(labels), rank, world, training, seed, epoch).to(labels.device)
    for start in range(0, len(rows), batch_size):
        chosen = rows[start : start + batch_size]
        yield {"features": features[chosen], "label": labels[chosen]}

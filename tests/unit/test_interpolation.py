"""The weights' resize interpolation (timm's ``pretrained_cfg``: bicubic for most timm weights; torchvision's
bilinear), used by every resize: validation's, predict's, the decoded-image cache's and training's crops
(``imaging.Resize``), with the pixels checked against torchvision's own ``v2.Resize`` at that interpolation."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from tl_ray import checkpoint, model
from tl_ray.inference import classify
from tl_ray.inference import export as deployable
from tl_ray.inputs import cache, imaging, pipelines, sources

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
SHORT = 37  # resize_size(32): bilinear's default short side
BICUBIC = imaging.Resize(SHORT, "bicubic")


def photo(path: Path, seed: int = 0, size: tuple[int, int] = (60, 45)) -> Path:
    """A small 'real' image file: smooth gradients, hard-edged shapes and sensor-like noise, as a JPEG (the filters
    differ most at edges and in fine detail, as in photos)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], axis=-1)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        left, top = int(rng.integers(0, size[0] - 12)), int(rng.integers(0, size[1] - 12))
        draw.rectangle((left, top, left + 10, top + 7), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw.line((0, 0, size[0], size[1]), fill=(255, 255, 255), width=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)
    return path


def torchvision_eval(short_side: int, mode: InterpolationMode) -> v2.Compose:
    """The reference: torchvision's resize at ``mode``, centre crop, to a tensor."""
    resize = v2.Resize(short_side, interpolation=mode, antialias=True)
    return v2.Compose([resize, v2.CenterCrop(SIZE), v2.PILToTensor()])


@pytest.fixture
def image(tmp_path) -> Image.Image:
    return imaging.load_rgb(photo(tmp_path / "photo.jpg").read_bytes())


@pytest.fixture
def layout(tmp_path):
    """Class folders of photos: a source whose opener reads them as every pipeline does."""
    for label in ("a", "b"):
        for index in range(3):
            photo(tmp_path / "data" / "train" / label / f"{index}.jpg", seed=10 * ord(label) + index)
            photo(tmp_path / "data" / "val" / label / f"{index}.jpg", seed=100 + 10 * ord(label) + index)
    return sources.discover(tmp_path / "data")


def test_a_bicubic_resize_is_torchvisions_and_differs_from_bilinear(image):
    bicubic = np.asarray(imaging.Resize(SHORT, "bicubic")(image), dtype=np.int16)
    bilinear = np.asarray(imaging.Resize(SHORT)(image), dtype=np.int16)
    reference = v2.Resize(SHORT, interpolation=InterpolationMode.BICUBIC, antialias=True)(image)
    assert np.array_equal(bicubic, np.asarray(reference))
    assert bicubic.shape == bilinear.shape == (SHORT, 49, 3)
    assert np.abs(bicubic - bilinear).mean() > 0.5  # grey levels: not a rounding difference
    assert imaging.Resize(SHORT, "bicubic").pil_filter == "BICUBIC" and imaging.Resize(SHORT).pil_filter == "BILINEAR"


def test_eval_transform_resizes_as_the_checkpoint_meta_says(image):
    meta = {"image_size": SIZE, "resize_size": SHORT, "interpolation": "bicubic"}
    crops = imaging.eval_transform(SIZE, imaging.Resize.from_meta(meta))(image)
    assert torch.equal(crops, torchvision_eval(SHORT, InterpolationMode.BICUBIC)(image))
    before_timm = {"image_size": SIZE, "resize_size": SHORT}  # a checkpoint without the key: bilinear, as ever
    assert imaging.Resize.from_meta(before_timm) == imaging.Resize(SHORT, "bilinear")
    bilinear = imaging.eval_transform(SIZE, imaging.Resize.from_meta(before_timm))(image)
    assert torch.equal(bilinear, torchvision_eval(SHORT, InterpolationMode.BILINEAR)(image))
    assert torch.equal(imaging.eval_transform(SIZE)(image), bilinear)  # the default
    assert not torch.equal(crops, bilinear)


def test_training_crops_resize_with_the_weights_interpolation(image):
    """timm's transforms_imagenet_train resizes its random crops with the config's interpolation: so do ours."""
    scale, seeds = (0.3, 1.0), [11, 12, 13, 14]
    ours = imaging.augmentation(SIZE, scale, 0.0, BICUBIC)
    crop = v2.RandomResizedCrop(SIZE, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)
    reference = v2.Compose([crop, v2.RandomHorizontalFlip(), v2.PILToTensor()])
    images = [image] * len(seeds)
    assert torch.equal(imaging.seeded_crops(ours, images, seeds), imaging.seeded_crops(reference, images, seeds))
    bilinear = imaging.augmentation(SIZE, scale, 0.0, imaging.Resize(SHORT))
    assert not torch.equal(imaging.seeded_crops(ours, images, seeds), imaging.seeded_crops(bilinear, images, seeds))
    # --augment none trains on validation's crops: the same resize, filter included
    centre = imaging.augmentation(SIZE, None, 0.0, BICUBIC)(image)
    assert torch.equal(centre, torchvision_eval(SHORT, InterpolationMode.BICUBIC)(image))


def test_an_unknown_interpolation_resizes_bilinearly_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="tl_ray.inputs.imaging"):
        resize = imaging.Resize.from_meta({"image_size": SIZE, "interpolation": "random"})
    assert resize == imaging.Resize(SHORT, "bilinear")
    assert "'random'" in caplog.text and "resizing bilinearly" in caplog.text
    with caplog.at_level(logging.WARNING, logger="tl_ray.inputs.imaging"):
        assert imaging.Resize.for_crop(SIZE, 0.875, "no-such-filter").interpolation == "bilinear"
    assert imaging.interpolation_name("BICUBIC") == "bicubic" and imaging.interpolation_name(None) == "bilinear"
    assert imaging.interpolation_name("lanczos") == "lanczos"
    with pytest.raises(ValueError, match="unknown interpolation 'random'"):
        imaging.Resize(SHORT, "random")  # code must go through interpolation_name


def test_the_uncached_pipeline_and_the_cache_resize_with_it(layout, tmp_path):
    files = layout.val
    opener = layout.opener_of(files)
    batch = {"path": np.asarray([p for p, _ in files], dtype=object), "label": np.asarray([y for _, y in files])}
    decoded = pipelines._decode_batch(batch, opener, SIZE, False, None, 0.0, None, BICUBIC, 5.0)
    originals = [imaging.load_rgb(Path(path).read_bytes()) for path, _ in files]
    expected = np.stack([torchvision_eval(SHORT, InterpolationMode.BICUBIC)(image).numpy() for image in originals])
    assert np.array_equal(decoded["image"], expected)

    folder = tmp_path / "cache"
    folder.mkdir()
    summary = cache._decode_to_file(batch, opener, BICUBIC, "raw", pafs.LocalFileSystem(), str(folder), 5.0)
    assert json.loads(summary["skipped"][0]) == [] and int(summary["images"][0]) == len(files)
    stored = pq.read_table(folder / summary["file"][0]).to_pydict()
    order = {Path(path).read_bytes(): index for index, (path, _) in enumerate(files)}
    assert len(order) == len(files)
    cached = sorted(bytes(pixels) for pixels in stored["pixels"])
    resized = sorted(
        np.asarray(v2.Resize(SHORT, interpolation=InterpolationMode.BICUBIC, antialias=True)(image)).tobytes()
        for image in originals
    )
    assert cached == resized
    bilinear = sorted(np.asarray(imaging.Resize(SHORT)(image)).tobytes() for image in originals)
    assert cached != bilinear


def test_the_cache_key_holds_the_interpolation_only_when_not_bilinear(layout):
    """A bilinear cache keeps the key it had before interpolations were told apart (built caches stay valid); a
    bicubic one has its own key and family, so neither is reused for, nor deleted by, the other."""
    files = layout.train
    stats = layout.stats_of(files)

    def key(resize: imaging.Resize, image_format: str = "jpeg") -> str:
        return cache.split_key(files, stats, layout, resize, image_format)

    encoding = ["jpeg", cache.ENCODINGS["jpeg"]]
    digest = hashlib.sha256(json.dumps([cache.CACHE_VERSION, SHORT, encoding, layout.uri_prefix]).encode())
    for (path, label), (size, mtime) in zip(files, stats.tolist(), strict=True):
        digest.update(f"\0{path}\0{label}\0{size}\0{mtime}".encode("utf-8", "surrogateescape"))
    assert key(imaging.Resize(SHORT)) == digest.hexdigest()[:32]  # the formula before this change, by hand
    assert key(BICUBIC) != key(imaging.Resize(SHORT))
    assert key(imaging.Resize(SHORT, "lanczos")) not in (key(BICUBIC), key(imaging.Resize(SHORT)))
    old_family = json.dumps([layout.uri_prefix + layout.root, "train", SHORT])
    assert (
        cache.family_key(layout, "train", imaging.Resize(SHORT)) == hashlib.sha256(old_family.encode()).hexdigest()[:16]
    )
    assert cache.family_key(layout, "train", BICUBIC) != cache.family_key(layout, "train", imaging.Resize(SHORT))


@pytest.fixture
def bicubic_checkpoint(tmp_path) -> tuple[Path, dict]:
    """A checkpoint of a tiny timm model whose weights' cfg says bicubic, its meta.json as training writes it."""
    arch, classes = "test_efficientnet", ["a", "b", "c"]  # timm's tiny test net; its cfg: bicubic
    weights = model.initial_weights(arch, "none", classes, image_size=SIZE)
    assert weights.interpolation == "bicubic"
    meta = {
        "arch": arch,
        "num_classes": len(classes),
        "class_names": classes,
        "image_size": SIZE,
        "resize_size": imaging.resize_size(SIZE, weights.crop_fraction),
        "mean": list(weights.mean),
        "std": list(weights.std),
        "interpolation": weights.interpolation,
    }
    checkpoint.save_checkpoint(tmp_path / "ckpt", weights.state_dict, meta)
    return tmp_path / "ckpt", meta


def test_a_bicubic_checkpoint_predicts_from_bicubic_pixels(bicubic_checkpoint, layout):
    folder, meta = bicubic_checkpoint
    files = [path for path, _ in layout.val]
    opener = layout.opener_of(layout.val)
    resize = imaging.Resize.from_meta(meta)
    assert resize == imaging.Resize(meta["resize_size"], "bicubic")
    decoded = classify._decode_for_inference({"path": np.asarray(files, dtype=object)}, opener, SIZE, resize, 5.0)
    originals = [imaging.load_rgb(Path(path).read_bytes()) for path in files]
    short = meta["resize_size"]
    bicubic = torch.stack([torchvision_eval(short, InterpolationMode.BICUBIC)(image) for image in originals])
    bilinear = torch.stack([torchvision_eval(short, InterpolationMode.BILINEAR)(image) for image in originals])
    assert np.array_equal(decoded["image"], bicubic.numpy())

    rows = classify._Classifier(str(folder), top_k=3)(decoded)
    net, _ = checkpoint.load_checkpoint(folder)
    mean, std = torch.tensor(meta["mean"]), torch.tensor(meta["std"])

    def probabilities(crops: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return (
                torch.softmax(net(imaging.normalize(crops, mean, std)), dim=1).sort(dim=1, descending=True)[0].numpy()
            )

    predicted = np.stack([rows[f"top{k}_prob"] for k in (1, 2, 3)], axis=1)
    assert np.allclose(predicted, probabilities(bicubic), atol=1e-6)
    assert np.abs(probabilities(bilinear) - probabilities(bicubic)).max() > 1e-5  # the filter reaches the output


def test_export_describes_and_records_the_interpolation(bicubic_checkpoint, image):
    _, meta = bicubic_checkpoint
    metadata = deployable.deployment_metadata(meta, "torchscript")
    short = meta["resize_size"]
    assert metadata["interpolation"] == "bicubic" and metadata["checkpoint_meta"]["interpolation"] == "bicubic"
    resize_step = metadata["preprocessing"]["before"][1]
    assert resize_step.startswith(f"resize so the short side is {short} px: bicubic") and "Image.BICUBIC" in resize_step
    # A deployer following the description with PIL alone gets predict's crops.
    width, height = image.size
    resized = image.resize((int(short * width / height), short), Image.Resampling[metadata["pil_resample"]])
    left, top = round((resized.width - SIZE) / 2), round((resized.height - SIZE) / 2)
    theirs = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE))).transpose(2, 0, 1)
    ours = imaging.eval_transform(SIZE, imaging.Resize.from_meta(meta))(image).numpy()
    assert np.array_equal(theirs, ours)
    # A checkpoint from before timm: bilinear, the description as it was.
    old = deployable.deployment_metadata({k: v for k, v in meta.items() if k != "interpolation"}, "onnx")
    assert (old["interpolation"], old["pil_resample"]) == ("bilinear", "BILINEAR")
    assert old["preprocessing"]["before"][1] == (
        f"resize so the short side is {short} px: bilinear with antialiasing (PIL Image.resize with"
        f" Image.BILINEAR), the long side int({short} * long / short)"
    )

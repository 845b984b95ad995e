"""`tl-ray export`: the exported TorchScript and ONNX files, run as a deployer would, without tl-ray.

Real torch, real files, real images (the sample data's shapes, non-square, JPEG and PNG); no Ray.
The deployer is a separate Python process (`python -I`, tl_ray made unimportable) that knows only
the file and its sidecar JSON: it crops the images as the metadata says, runs the file with
`torch.jit.load` or onnxruntime, and its probabilities must be the checkpoint's, computed by
`load_checkpoint` and predict's own preprocessing.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tl_ray import cli, export
from tl_ray.checkpoint import load_checkpoint, save_checkpoint
from tl_ray.errors import UsageError
from tl_ray.inference.config import FORMATS
from tl_ray.inputs import imaging
from tl_ray.sample import SOURCE_CLASSES, render

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]

IMAGE_SIZE, RESIZE_SIZE = 48, 55
ATOL = 1e-4
# (shape, width, height, format): a JPEG at least twice the resize (decoded at reduced scale), tall and
# wide images whose crops are off-centre by half a pixel, one already at the resize.
IMAGES = [
    ("circle", 240, 300, "JPEG"),
    ("square", 61, 90, "PNG"),
    ("star", 131, 57, "JPEG"),
    ("triangle", 55, 55, "PNG"),
]
BATCHES = (1, 3)  # the deployer runs the images in batches of these sizes: the batch axis is dynamic

DEPLOYER = r'''
import json, math, sys
sys.modules["tl_ray"] = None  # any import of tl_ray now fails: this process runs the files on their own
import numpy as np
import onnxruntime
import torch
from PIL import Image, ImageOps

torch.set_num_threads(1)
request = json.loads(sys.argv[1])


def crop(path, resize, size, resample):
    """The preprocessing outside the file, as the sidecar's "preprocessing"/"before" describes it."""
    image = Image.open(path)
    if image.format == "JPEG" and min(image.size) >= 2 * resize:
        f = resize / min(image.size)
        image.draft(None, (math.ceil(image.width * f), math.ceil(image.height * f)))
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    filter = Image.Resampling[resample]
    image = image.resize((resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize), filter)
    left, top = round((image.width - size) / 2), round((image.height - size) / 2)
    return np.asarray(image.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


result = {}
for fmt, path in request["files"].items():
    meta = json.load(open(path + ".json"))
    sizes = (meta["resize_size"], meta["image_size"], meta["pil_resample"])
    images = np.stack([crop(p, *sizes) for p in request["images"]])
    batches = np.split(images, np.cumsum(request["batches"])[:-1])
    if fmt == "torchscript":
        extra = {"tl_ray.json": ""}
        model = torch.jit.load(path, _extra_files=extra)
        embedded = extra["tl_ray.json"]
        with torch.no_grad():
            outputs = [model(torch.from_numpy(batch)).numpy() for batch in batches]
    else:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        embedded = session.get_modelmeta().custom_metadata_map["tl_ray.json"]
        outputs = [session.run([meta["output"]["name"]], {meta["input"]["name"]: batch})[0] for batch in batches]
    result[fmt] = {
        "crops": images.tolist(),
        "shapes": [list(output.shape) for output in outputs],
        "probabilities": np.concatenate(outputs).tolist(),
        "embedded": json.loads(embedded),
    }
result["tl_ray_imported"] = sys.modules.get("tl_ray") is not None
print(json.dumps(result))
'''


def make_checkpoint(directory: Path) -> Path:
    """A resnet18 whose BatchNorm statistics are real (a few forward passes in train mode), saved as tl-ray does.

    Its head is scaled up: a random one gives near-uniform probabilities, against which neither a 1e-4 bound nor
    an argmax comparison would catch much.
    """
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=len(SOURCE_CLASSES)).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1)
        net.fc.weight.mul_(40)
    meta = {
        "arch": "resnet18",
        "num_classes": len(SOURCE_CLASSES),
        "class_names": list(SOURCE_CLASSES),
        "image_size": IMAGE_SIZE,
        "resize_size": RESIZE_SIZE,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    return save_checkpoint(directory, net.state_dict(), meta)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    paths = []
    for shape, width, height, fmt in IMAGES:
        path = folder / f"{shape}.{fmt.lower()}"
        render(shape, rng).resize((width, height)).save(path, format=fmt)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    suffixes = {"torchscript": "ts", "onnx": "onnx"}
    return {fmt: export(checkpoint, folder / f"model.{suffixes[fmt]}", fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def deployed(exported, image_files, tmp_path_factory) -> dict:
    """What the deployer process computed from the exported files alone."""
    request = {"files": {fmt: str(result.path) for fmt, result in exported.items()}}
    request.update(images=image_files, batches=list(BATCHES))
    assert sum(BATCHES) == len(image_files)
    run = subprocess.run(
        [sys.executable, "-I", "-c", DEPLOYER, json.dumps(request)],
        cwd=tmp_path_factory.mktemp("deployer"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def reference(checkpoint, image_files) -> tuple[torch.Tensor, torch.Tensor]:
    """(crops, probabilities) by the checkpoint itself, through predict's preprocessing and normalisation."""
    model, meta = load_checkpoint(checkpoint)
    transform = imaging.eval_transform(meta["image_size"], imaging.Resize.from_meta(meta))
    crops = torch.stack([transform(imaging.load_rgb(Path(p).read_bytes(), meta["resize_size"])) for p in image_files])
    with torch.no_grad():
        logits = model(imaging.normalize(crops, torch.tensor(meta["mean"]), torch.tensor(meta["std"])))
    probabilities = torch.softmax(logits, dim=1)
    top2 = probabilities.topk(2, dim=1).values
    assert ((top2[:, 0] - top2[:, 1]) > 10 * ATOL).all(), "the argmax comparison needs clear winners"
    return crops, probabilities


def test_the_test_images_exercise_the_preprocessing(image_files):
    sizes = [Image.open(path).size for path in image_files]
    assert any(min(size) >= 2 * RESIZE_SIZE for size in sizes), "no JPEG is decoded at reduced scale"
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_deployer_runs_the_file_without_tl_ray(deployed, fmt):
    assert deployed["tl_ray_imported"] is False
    assert deployed[fmt]["shapes"] == [[batch, len(SOURCE_CLASSES)] for batch in BATCHES]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_documented_preprocessing_gives_predicts_crops(deployed, reference, fmt):
    crops, _ = reference
    assert torch.equal(torch.tensor(deployed[fmt]["crops"], dtype=torch.uint8), crops)


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_probabilities_are_the_checkpoints(deployed, reference, fmt):
    _, expected = reference
    actual = torch.tensor(deployed[fmt]["probabilities"])
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    assert torch.equal(actual.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_is_inside_the_file_and_beside_it(exported, deployed, checkpoint, fmt):
    result = exported[fmt]
    sidecar = json.loads(result.sidecar.read_text())
    assert result.sidecar == result.path.with_name(result.path.name + ".json")
    assert deployed[fmt]["embedded"] == sidecar == result.metadata
    assert sidecar["format"] == fmt
    assert sidecar["class_names"] == list(SOURCE_CLASSES)
    assert (sidecar["image_size"], sidecar["resize_size"]) == (IMAGE_SIZE, RESIZE_SIZE)
    assert (sidecar["interpolation"], sidecar["pil_resample"]) == ("bilinear", "BILINEAR")  # torchvision's weights
    assert sidecar["mean"] == [0.485, 0.456, 0.406] and sidecar["std"] == [0.229, 0.224, 0.225]
    assert sidecar["input"] == {
        "name": "images",
        "dtype": "uint8",
        "shape": ["N", 3, IMAGE_SIZE, IMAGE_SIZE],
        "layout": "NCHW",
        "channels": "RGB",
        "range": [0, 255],
    }
    assert sidecar["output"]["name"] == "probabilities"
    assert sidecar["output"]["shape"] == ["N", len(SOURCE_CLASSES)]
    assert sidecar["checkpoint_meta"] == json.loads((checkpoint / "meta.json").read_text())


def test_torchscript_refuses_floats_and_uncropped_images(exported):
    model = torch.jit.load(str(exported["torchscript"].path))
    crops = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    with pytest.raises(torch.jit.Error, match="uint8"):
        model(crops.float() / 255)
    with pytest.raises(torch.jit.Error, match=rf"\(N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}\)"):
        model(torch.zeros(2, 3, RESIZE_SIZE, RESIZE_SIZE, dtype=torch.uint8))


def test_onnx_declares_its_input_and_onnxruntime_refuses_floats(exported):
    import onnx
    import onnxruntime

    graph = onnx.load(str(exported["onnx"].path)).graph
    (images,) = graph.input
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [dim.dim_param or dim.dim_value for dim in images.type.tensor_type.shape.dim]
    assert dims[1:] == [3, IMAGE_SIZE, IMAGE_SIZE] and isinstance(dims[0], str)
    session = onnxruntime.InferenceSession(str(exported["onnx"].path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        session.run(None, {"images": np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)})


def test_cli_export_writes_the_file_and_states_the_contract(checkpoint, tmp_path, capsys):
    out = tmp_path / "deploy" / "model.ts"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and Path(f"{out}.json").is_file()
    assert str(out) in printed and f"{out}.json" in printed
    assert f"uint8 RGB (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE})" in printed
    assert f"short side to {RESIZE_SIZE}, bilinear" in printed and ", ".join(SOURCE_CLASSES) in printed
    assert torch.jit.load(str(out))(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)).shape == (1, 4)


@pytest.mark.parametrize("problem", ["missing", "not a checkpoint"])
def test_cli_refuses_a_bad_checkpoint_in_one_line(problem, tmp_path, capsys):
    path = tmp_path / "nothing-here"
    if problem == "not a checkpoint":
        path.mkdir()
        (path / "model.pt").write_bytes(b"")
    out = tmp_path / "model.ts"
    assert cli.main(["export", "--checkpoint", str(path), "--format", "torchscript", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("tl-ray: error: --checkpoint:") and str(path) in error and "\n" not in error
    assert not out.exists()


@pytest.mark.parametrize(
    ("absent", "needed"), [(["onnx"], "the onnx package"), (["onnx", "onnxscript"], "the onnx and onnxscript packages")]
)
def test_cli_onnx_without_the_onnx_package(absent, needed, checkpoint, tmp_path, capsys, monkeypatch):
    for name in absent:
        monkeypatch.setitem(sys.modules, name, None)  # what `import NAME` does where it is not installed
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"tl-ray: error: --format onnx needs {needed}: pip install 'tl-ray[export]'"
    assert not out.exists()


def test_cli_refuses_a_folder_as_out(checkpoint, tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"tl-ray: error: --out: {tmp_path} is a folder")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_a_usage_error(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="--format must be one of torchscript, onnx; got 'tflite'"):
        export(checkpoint, tmp_path / "model.tflite", "tflite")


def test_python_api_and_help(checkpoint, tmp_path):
    import tl_ray

    result = tl_ray.export(str(checkpoint), str(tmp_path / "model.ts"), "torchscript")
    assert result.path.is_file() and result.sidecar.is_file() and result.format == "torchscript"
    help_text = cli.build_parser().format_help()
    assert "export     write a checkpoint as one TorchScript or ONNX file" in help_text

"""--tta flip in predict and evaluate: the mean of the softmax of each image and its mirror. A model symmetric under
a horizontal flip predicts the same with it; one that is not can change its prediction. Real torch, a real saved
checkpoint through the classifier predict's actors run; no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tl_ray import cli
from tl_ray.checkpoint import save_checkpoint
from tl_ray.inference.classify import ERROR_COLUMN, _Classifier, class_probabilities
from tl_ray.inputs import imaging

pytestmark = pytest.mark.usefixtures("one_thread")


class PooledHead(nn.Module):
    """conv -> ReLU -> global average pool -> linear: a backbone with a head on its pooled features."""

    def __init__(self, classes: int = 4, symmetric: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)
        if symmetric:  # every kernel its own mirror: the pooled features of an image and its mirror are equal
            with torch.no_grad():
                self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(images)).mean(dim=(2, 3)))


class LeftOrRight(nn.Module):
    """Class 0 when the left half is brighter (mildly sure), class 1 when the right half is (very sure)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        half = images.shape[-1] // 2
        lead = images[..., :half].mean(dim=(1, 2, 3)) - images[..., half:].mean(dim=(1, 2, 3))
        return torch.stack([torch.relu(lead), 5 * torch.relu(-lead)], dim=1)


def _images(count: int = 6, size: int = 16) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_flip_tta_of_a_flip_symmetric_model_equals_the_plain_prediction():
    torch.manual_seed(0)
    model = PooledHead().eval()
    images = _images()
    plain, flipped = class_probabilities(model, images), class_probabilities(model, images, "flip")
    torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-6)
    assert not torch.allclose(plain, plain[:1].expand_as(plain))  # the images do get different answers


def test_flip_tta_averages_the_softmax_and_can_change_a_non_symmetric_models_prediction():
    images = torch.zeros(1, 3, 16, 16)
    images[..., :8] = 1.0  # brighter on the left
    model = LeftOrRight()
    plain, flipped = class_probabilities(model, images), class_probabilities(model, images, "flip")
    assert plain.argmax(dim=1).item() == 0 and flipped.argmax(dim=1).item() == 1
    mirrored = torch.softmax(model(images.flip(-1)), dim=1)
    torch.testing.assert_close(flipped, (plain + mirrored) / 2)
    torch.manual_seed(0)
    asymmetric = PooledHead(symmetric=False).eval()
    assert not torch.allclose(
        class_probabilities(asymmetric, _images()), class_probabilities(asymmetric, _images(), "flip")
    )


def test_the_classifier_of_a_checkpoint_applies_flip_tta_to_its_rows(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    meta = {
        "arch": "resnet18",
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "image_size": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    save_checkpoint(tmp_path / "ckpt", net.state_dict(), meta)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    batch = {"path": np.asarray(list("wxyz"), dtype=object), "image": pixels, ERROR_COLUMN: np.asarray([""] * 4)}
    rows = {tta: _Classifier(tmp_path / "ckpt", 3, tta)(dict(batch)) for tta in ("none", "flip")}
    normalised = imaging.normalize(torch.tensor(pixels), torch.tensor(meta["mean"]), torch.tensor(meta["std"]))
    expected = (torch.softmax(net(normalised), 1) + torch.softmax(net(normalised.flip(-1)), 1)) / 2
    np.testing.assert_allclose(rows["flip"]["probability"], expected.max(dim=1).values.detach().numpy(), rtol=1e-5)
    assert not np.allclose(rows["flip"]["probability"], rows["none"]["probability"])


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_an_unknown_tta_exits_2_with_one_line_naming_the_option(capsys, command, tmp_path):
    argv = [command, "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--tta", "sideways"]
    try:
        code = cli.main(argv)
    except SystemExit as exited:
        code = exited.code
    err = capsys.readouterr().err
    assert code == 2 and "--tta" in err and "sideways" in err and "flip" in err
    assert not list(tmp_path.iterdir())  # nothing written

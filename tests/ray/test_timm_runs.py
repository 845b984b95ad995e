"""timm architectures end to end through Ray (issue 40): a ResNet-D, ConvNeXt, EfficientNet, RegNet, MobileNet and
ViT; heads on cached features and on frozen backbones at depth 5, fine-tuning at depth 3, a resume, predict and a
TorchScript export, each run's checkpoint recording the weights' preprocessing.

Tiny: 32 px, 1 epoch, 6 images a class, random weights (no hub). Stages, freezing, weights files and refusals are
the unit tests' (tests/unit/test_timm_backbones.py).
"""

from __future__ import annotations

import pytest
import torch
from timm.data import resolve_data_config

from tl_ray import backbones_timm, checkpoint
from tl_ray.inputs import imaging

SIZE = 32


def _images(root, class_names: str, per_class: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for name in class_names:
            for index in range(count):
                path = root / split / name / f"{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("timm") / "three", "abc", 6)


def _preprocessing_recorded(meta: dict, arch: str) -> None:
    expected = resolve_data_config(pretrained_cfg=backbones_timm.pretrained_cfg(arch).to_dict())
    assert meta["arch"] == arch and meta["weights"] == "none"
    assert meta["mean"] == list(expected["mean"]) and meta["std"] == list(expected["std"])
    assert meta["interpolation"] == expected["interpolation"]
    assert meta["resize_size"] == imaging.resize_size(SIZE, expected["crop_pct"])


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("arch", "depth", "cached"),
    [
        ("convnext_atto", 5, True),  # a head on the feature cache
        # a fine-tune, resumed: extended for make test's 30 minutes (a resume runs in CI in other tests)
        pytest.param("vit_tiny_patch16_224", 3, False, marks=pytest.mark.extended),
        # The other families in the extended tier (make test-extended): make test stays within its 30 minutes.
        pytest.param("resnet18d", 3, False, marks=pytest.mark.extended),
        pytest.param("regnetx_002", 5, True, marks=pytest.mark.extended),
        pytest.param("timm/efficientnet_b0", 5, False, marks=pytest.mark.extended),  # a frozen backbone, augmented
        pytest.param("timm/mobilenetv3_small_050", 3, False, marks=pytest.mark.extended),
        # Each family at its other depth too (extended): 3 fine-tunes the top stages, 5 trains a head alone.
        pytest.param("convnext_atto", 3, False, marks=pytest.mark.extended),
        pytest.param("vit_tiny_patch16_224", 5, True, marks=pytest.mark.extended),
        pytest.param("resnet18d", 5, True, marks=pytest.mark.extended),
        pytest.param("regnetx_002", 3, False, marks=pytest.mark.extended),
        pytest.param("timm/efficientnet_b0", 3, False, marks=pytest.mark.extended),
        pytest.param("timm/mobilenetv3_small_050", 5, True, marks=pytest.mark.extended),
    ],
)
def test_timm_archs_train_resume_predict_and_export(arch, depth, cached, three, tmp_path, ray_cluster):
    import tl_ray

    common = {"image_size": SIZE, "batch_size": 4, "num_workers": 1, "storage": str(tmp_path / "runs"), "lr": 1e-3}
    options = {"data": str(three), "arch": arch, "weights": "none", "freeze_depth": depth, "name": "run", **common}
    # none: the head trains on the backbone's features, computed once; light: on augmented images each epoch
    options["augment"] = "none" if cached else "light"
    result = tl_ray.train(epochs=1, **options)
    meta = checkpoint.read_meta(result.best_checkpoint)
    _preprocessing_recorded(meta, arch)
    state = checkpoint.read_model_state(result.best_checkpoint)
    net, _ = checkpoint.load_checkpoint(result.best_checkpoint)
    assert type(net).__module__.startswith("timm.") and net.get_classifier().out_features == 3
    features = list((tmp_path / "runs" / ".tl-ray-cache").glob(f"*/features-{arch.replace('/', '-')}-{SIZE}-*"))
    assert bool(features) is cached

    if (
        arch.startswith("vit") and depth == 3
    ):  # resumed: a second epoch on the same run; the frozen patch embedding stays
        resumed = tl_ray.train(epochs=2, **options)
        assert [row["epoch"] for row in resumed.history] == [1, 2]
        assert resumed.history[1]["resumed_after_epoch"] == 1
        after = checkpoint.read_model_state(resumed.last_checkpoint)
        assert torch.equal(after["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
        assert not torch.equal(after["blocks.11.mlp.fc1.weight"], state["blocks.11.mlp.fc1.weight"])
        return

    rows = tl_ray.predict(result.best_checkpoint, str(three / "val"))
    assert len(rows) == 6 and set(rows["predicted"]) <= {"a", "b", "c"} and not rows["error"].any()
    exported = tl_ray.export(result.best_checkpoint, str(tmp_path / "model.pt"), "torchscript")
    assert exported.metadata["arch"] == arch and exported.metadata["mean"] == meta["mean"]
    crops = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        normalised = imaging.normalize(crops, torch.tensor(meta["mean"]), torch.tensor(meta["std"]))
        expected = torch.softmax(net(normalised), dim=1)
    assert torch.allclose(torch.jit.load(str(exported.path))(crops), expected, atol=1e-5)

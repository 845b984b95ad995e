"""Unit tests for tl_ray.checkpoint: the model.pt + meta.json (+ train_state.pt) format.

Real torch (resnet18, 32x32 inputs); no Ray.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import assert_same_tensors, payload
from torch import nn

from tl_ray import checkpoint
from tl_ray.checkpoint import (
    FORMAT_VERSION,
    META_FILE,
    MODEL_FILE,
    REQUIRED_META,
    TRAIN_STATE_FILE,
    load_checkpoint,
    read_meta,
    read_model_state,
    read_train_state,
    save_checkpoint,
)
from tl_ray.errors import TlRayError
from tl_ray.model import TransferResNet

NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def make_meta(arch: str = "resnet18", num_classes: int = NUM_CLASSES) -> dict:
    return {
        "arch": arch,
        "num_classes": num_classes,
        "class_names": [f"class_{i}" for i in range(num_classes)],
        "image_size": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }


def images(seed: int = 1, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def trained_resnet18(num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """A resnet18 after two real training steps: weights and BatchNorm statistics away from their init."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model = TransferResNet(net, freeze_depth=2).train()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.05, momentum=0.9)
    for step in range(2):
        optimizer.zero_grad()
        labels = torch.arange(4) % num_classes
        nn.functional.cross_entropy(model(images(seed=10 + step)), labels).backward()
        optimizer.step()
    return net


@pytest.fixture(scope="module")
def net() -> nn.Module:
    """Trained once per module, in eval mode; tests must not modify it."""
    return trained_resnet18().eval()


@pytest.fixture(scope="module")
def other_net() -> nn.Module:
    return trained_resnet18(seed=1).eval()


@pytest.fixture
def saved(tmp_path, net) -> tuple[Path, nn.Module]:
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, net.state_dict(), make_meta())
    return directory, net


# ----------------------------------------------------------------------------- round trip


def test_round_trip_gives_identical_tensors_and_predictions(saved):
    directory, net = saved
    loaded, meta = load_checkpoint(directory)
    assert isinstance(loaded, torchvision.models.ResNet)
    assert_same_tensors(loaded.state_dict(), net.state_dict())
    assert not loaded.training
    assert not any(module.training for module in loaded.modules()), "load_checkpoint must return eval mode"
    net.eval()
    x = images(seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert meta == {"format_version": FORMAT_VERSION, **make_meta()}
    assert loaded.fc.out_features == NUM_CLASSES


def test_batchnorm_statistics_survive_the_round_trip(saved):
    directory, net = saved
    fresh = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES).state_dict()
    stats = [k for k in net.state_dict() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    moved = [k for k in stats if not torch.equal(net.state_dict()[k], fresh[k])]
    assert moved, "the test model should have non-initial BatchNorm statistics"
    state = read_model_state(directory)
    for key in stats:
        assert torch.equal(state[key], net.state_dict()[key]), key


def test_model_file_is_a_plain_torchvision_state_dict_loadable_with_weights_only(saved):
    directory, net = saved
    state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    assert isinstance(state, dict)
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert_same_tensors(state, net.state_dict())
    plain = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    plain.load_state_dict(state)  # strict: exactly torchvision's layout, no prefixes
    assert_same_tensors(read_model_state(directory), state)


def test_save_detaches_parameters(tmp_path, net):
    save_checkpoint(tmp_path, net.state_dict(keep_vars=True), make_meta())  # live Parameters, requires_grad
    state = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    assert all(type(value) is torch.Tensor and not value.requires_grad for value in state.values())
    assert_same_tensors(state, net.state_dict())


def test_meta_json_is_readable_json_with_a_format_version(saved):
    directory, _ = saved
    on_disk = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    assert on_disk["format_version"] == FORMAT_VERSION
    assert {key: on_disk[key] for key in REQUIRED_META} == make_meta()
    assert read_meta(directory) == on_disk


def test_train_state_round_trip(tmp_path):
    net = trained_resnet18()  # its own copy: this test trains it further
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    nn.functional.cross_entropy(net(images()), torch.arange(4) % NUM_CLASSES).backward()
    optimizer.step()
    train_state = {
        "optimizer": optimizer.state_dict(),
        "epoch": 4,
        "history": [{"epoch": 1, "val_acc": 0.5, "train_loss": 1.25}],
        "rng": torch.get_rng_state(),
    }
    save_checkpoint(tmp_path, net.state_dict(), make_meta(), train_state)
    loaded = read_train_state(tmp_path)
    assert loaded is not None
    assert loaded["epoch"] == 4
    assert loaded["history"] == train_state["history"]
    assert torch.equal(loaded["rng"], train_state["rng"])
    saved_opt, loaded_opt = train_state["optimizer"], loaded["optimizer"]
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]
    assert loaded_opt["state"].keys() == saved_opt["state"].keys()
    for index, slots in saved_opt["state"].items():
        for slot, value in slots.items():
            assert torch.equal(loaded_opt["state"][index][slot], value), (index, slot)
    resumed = torch.optim.AdamW(net.parameters(), lr=1e-3)
    resumed.load_state_dict(loaded_opt)  # usable for resuming


def test_no_train_state_reads_as_none(saved):
    directory, _ = saved
    assert not (directory / TRAIN_STATE_FILE).exists()
    assert read_train_state(directory) is None


def test_saving_again_replaces_the_checkpoint_and_leaves_no_temporary_files(tmp_path, net, other_net):
    first, second = net, other_net
    save_checkpoint(tmp_path, first.state_dict(), make_meta())
    save_checkpoint(tmp_path, second.state_dict(), make_meta(), {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MODEL_FILE, META_FILE, TRAIN_STATE_FILE])
    assert_same_tensors(read_model_state(tmp_path), second.state_dict())
    assert read_train_state(tmp_path) == {"epoch": 2}


def test_save_creates_missing_parent_directories(tmp_path, net):
    directory = tmp_path / "runs" / "name" / "checkpoint_epoch001"
    returned = save_checkpoint(directory, net.state_dict(), make_meta())
    assert Path(returned) == directory
    assert read_meta(directory)["arch"] == "resnet18"


@pytest.mark.parametrize("missing", REQUIRED_META)
def test_save_refuses_incomplete_meta_and_writes_no_meta(tmp_path, net, missing):
    meta = make_meta()
    del meta[missing]
    with pytest.raises(ValueError, match=missing):
        save_checkpoint(tmp_path, net.state_dict(), meta)
    assert not (tmp_path / META_FILE).exists()


@pytest.mark.parametrize("arch", ["resnet34", "resnet50"])
def test_round_trip_other_archs(tmp_path, arch):
    torch.manual_seed(0)
    net = torchvision.models.get_model(arch, weights=None, num_classes=5).eval()
    save_checkpoint(tmp_path, net.state_dict(), make_meta(arch, 5))
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["arch"] == arch
    assert_same_tensors(loaded.state_dict(), net.state_dict())
    x = images(n=2)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


# ----------------------------------------------------------------------------- broken checkpoints


def test_missing_meta_json_is_an_error(saved):
    directory, _ = saved
    (directory / META_FILE).unlink()
    with pytest.raises(TlRayError, match=META_FILE):
        read_meta(directory)
    with pytest.raises(TlRayError, match=META_FILE):
        load_checkpoint(directory)


def test_empty_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(TlRayError, match=META_FILE):
        load_checkpoint(tmp_path)


def test_missing_directory_or_a_file_is_an_error(tmp_path):
    with pytest.raises(TlRayError, match="not a directory"):
        read_meta(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TlRayError, match="not a directory"):
        load_checkpoint(tmp_path / "file")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2, 3]", '"resnet18"', "null"])
def test_unreadable_or_non_object_meta_is_an_error(saved, text):
    directory, _ = saved
    (directory / META_FILE).write_text(text)
    with pytest.raises(TlRayError, match=META_FILE):
        read_meta(directory)


@pytest.mark.parametrize("missing", REQUIRED_META)
def test_meta_lacking_a_required_key_is_an_error(saved, missing):
    directory, _ = saved
    meta = json.loads((directory / META_FILE).read_text())
    del meta[missing]
    (directory / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TlRayError, match=missing):
        load_checkpoint(directory)


def test_missing_model_file_is_an_error(saved):
    directory, _ = saved
    (directory / MODEL_FILE).unlink()
    with pytest.raises(TlRayError, match=MODEL_FILE):
        read_model_state(directory)
    with pytest.raises(TlRayError, match=MODEL_FILE):
        load_checkpoint(directory)


def test_truncated_model_file_is_an_error(saved):
    directory, _ = saved
    data = (directory / MODEL_FILE).read_bytes()
    (directory / MODEL_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(TlRayError, match=MODEL_FILE):
        load_checkpoint(directory)


def test_unknown_arch_in_meta_is_an_error(saved):
    directory, _ = saved
    meta = json.loads((directory / META_FILE).read_text())
    meta["arch"] = "vgg17"  # vgg16 is a timm model now
    (directory / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TlRayError, match="unknown arch 'vgg17'"):
        load_checkpoint(directory)


@pytest.mark.parametrize(("arch", "num_classes"), [("resnet18", 7), ("resnet34", NUM_CLASSES)])
def test_model_file_not_matching_meta_is_an_error(saved, arch, num_classes):
    directory, _ = saved
    meta = json.loads((directory / META_FILE).read_text())
    meta.update(arch=arch, num_classes=num_classes)
    (directory / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TlRayError, match="does not match"):
        load_checkpoint(directory)


@pytest.mark.parametrize("filename", [MODEL_FILE, TRAIN_STATE_FILE])
def test_malicious_pickle_in_a_checkpoint_runs_no_code(saved, tmp_path, filename):
    directory, _ = saved
    sentinel = tmp_path / "SENTINEL"
    torch.save({"weight": payload(sentinel)}, directory / filename)
    with pytest.raises(TlRayError, match=filename):
        if filename == MODEL_FILE:
            load_checkpoint(directory)
        else:
            read_train_state(directory)
    with pytest.raises(TlRayError, match=filename):
        (read_model_state if filename == MODEL_FILE else read_train_state)(directory)
    assert not sentinel.exists(), f"loading {filename} ran code from the pickle"
    # The control: without weights_only the same file really does run the command.
    torch.load(directory / filename, weights_only=False)
    assert sentinel.exists()


def test_raw_pickle_model_file_runs_no_code(saved, tmp_path):
    directory, _ = saved
    sentinel = tmp_path / "SENTINEL"
    with (directory / MODEL_FILE).open("wb") as f:
        pickle.dump({"weight": payload(sentinel)}, f, protocol=2)
    with pytest.raises(TlRayError, match=MODEL_FILE):
        load_checkpoint(directory)
    assert not sentinel.exists()


def test_model_file_that_is_not_a_state_dict_is_an_error(saved):
    directory, _ = saved
    torch.save([1, 2, 3], directory / MODEL_FILE)
    with pytest.raises(TlRayError, match=MODEL_FILE):
        load_checkpoint(directory)


def test_checkpoint_module_constants_are_the_documented_names():
    assert (checkpoint.MODEL_FILE, checkpoint.META_FILE) == ("model.pt", "meta.json")

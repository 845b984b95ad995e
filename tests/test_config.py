"""Options: YAML + flag merging, validation, and the one-line errors users see."""

from __future__ import annotations

import pytest

from tl_ray import cli
from tl_ray.config import TrainConfig, merge
from tl_ray.errors import TlRayError


def test_yaml_values_apply_and_flags_override(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("data: /data/dogs\narch: resnet18\nepochs: 4\nlr: 1\nfreeze-depth: 3\n")
    config = merge(TrainConfig, str(config_file), {"epochs": 7})
    assert (config.data, config.arch, config.epochs, config.freeze_depth) == ("/data/dogs", "resnet18", 7, 3)
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: three\n", "epochs must be int; got 'three'"),
        ("freeze_depth: 2.5\n", "freeze_depth must be int or null; got 2.5"),
        ("lr: true\n", "lr must be float or null; got True"),
        ("learning_rate: 0.1\n", "unknown keys: learning_rate"),
        ("- a\n- b\n", "must hold a mapping"),
        ("epochs: [1\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_is_one_clear_error(tmp_path, text, message):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(text)
    with pytest.raises(TlRayError, match=message.replace("[", r"\[").replace("(", r"\(")):
        merge(TrainConfig, str(config_file), {})


def test_missing_yaml_names_the_file(tmp_path):
    with pytest.raises(TlRayError, match=r"--config: cannot read .*nope.yaml"):
        merge(TrainConfig, str(tmp_path / "nope.yaml"), {})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data": None}, "--data is required"),
        ({"freeze_depth": 7}, "--freeze-depth must be between 0 and 5; got 7"),
        ({"lr": -0.1}, "--lr must be positive; got -0.1"),
        ({"arch": "vgg16"}, "--arch must be one of resnet18"),
        ({"optimizer": "lion"}, "--optimizer must be one of sgd, adamw"),
        ({"augment": "heavy"}, "--augment must be one of auto, standard, light, none; got 'heavy'"),
        ({"cache": ""}, "--cache must be auto, none, or a folder or URI"),
        ({"val_fraction": 1.0}, "--val-fraction must be between 0 and 1"),
        ({"batch_size": 3, "num_workers": 2}, "--batch-size is the global batch"),
        ({"name": "a/b"}, "--name must be a plain folder name"),
        ({"epochs": 0}, "--epochs must be positive"),
    ],
)
def test_invalid_values_name_the_option(overrides, message):
    with pytest.raises(TlRayError, match=message):
        merge(TrainConfig, None, {"data": "/data", **overrides}).validate()


def test_freeze_depth_default_depends_on_weights():
    assert merge(TrainConfig, None, {"data": "d"}).validate().freeze_depth == 5
    assert merge(TrainConfig, None, {"data": "d", "weights": "none"}).validate().freeze_depth == 0
    assert merge(TrainConfig, None, {"data": "d", "weights": "none", "freeze_depth": 2}).validate().freeze_depth == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--data", "x", "--freeze-depth", "7"],
            "tl-ray: error: --freeze-depth must be between 0 and 5; got 7",
        ),
        (["train", "--data", "x", "--lr", "-1"], "tl-ray: error: --lr must be positive; got -1.0"),
        (["train", "--data", "x", "--arch", "resnet9"], "tl-ray: error: --arch must be one of"),
        (
            ["train", "--data", "/no/such/folder", "--weights", "none"],
            "tl-ray: error: --data: /no/such/folder does not exist",
        ),
    ],
)
def test_cli_errors_are_one_line_without_traceback(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_wrong_types_through_argparse(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--data", "x", "--epochs", "three"])
    assert exit_info.value.code == 2
    assert "argument --epochs: invalid int value: 'three'" in capsys.readouterr().err


def test_cli_config_file_is_merged_under_flags(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("data: /no/such/folder\nfreeze_depth: 9\n")
    assert cli.main(["train", "--config", str(config_file)]) == 2
    assert "--freeze-depth must be between 0 and 5; got 9" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(config_file), "--freeze-depth", "1", "--weights", "none"]) == 2
    assert "--data: /no/such/folder does not exist" in capsys.readouterr().err


def test_every_train_option_has_help():
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for field in TrainConfig.__dataclass_fields__:
        if field != "gpu":
            assert "--" + field.replace("_", "-") in help_text
    assert "--gpu" in help_text and "--cpu" in help_text and "--config" in help_text

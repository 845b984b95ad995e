"""Options: YAML + flag merging, validation, and the one-line errors users see."""

from __future__ import annotations

import dataclasses

import pytest

from tl_ray import cli
from tl_ray.errors import TlRayError, UsageError
from tl_ray.options import merge, to_yaml
from tl_ray.training.config import TrainConfig
from tl_ray.tuning.config import TuneConfig


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
        ("lr: true\n", "lr must be a number, auto, select or null; got True"),
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
        (
            {"arch": "vgg17"},
            "--arch: no torchvision or timm architecture is named .vgg17.; did you mean vgg19, vgg16, vgg13\\?",
        ),
        ({"optimizer": "lion"}, "--optimizer must be one of auto, adamw, sgd"),
        (
            {"augment": "heavy"},
            "--augment must be one of auto, standard, light, none, trivial, randaugment; got 'heavy'",
        ),
        ({"cache": ""}, "--cache must be auto, none, or a folder or URI"),
        ({"val_fraction": 1.0}, "--val-fraction must be between 0 and 1"),
        ({"batch_size": 3, "num_workers": 2}, "--batch-size is the global batch"),
        ({"name": "a/b"}, "--name must be a plain folder name"),
        ({"epochs": 0}, "--epochs must be positive"),
        ({"monitor": "f1"}, "--monitor must be one of val_acc, val_loss, macro_f1; got 'f1'"),
        ({"class_weights": "balanced"}, "--class-weights must be one of none, auto; got 'balanced'"),
    ],
)
def test_invalid_values_name_the_option(overrides, message):
    with pytest.raises(TlRayError, match=message):
        merge(TrainConfig, None, {"data": "/data", **overrides}).validate()


def test_class_weights_and_monitor_from_yaml_flags_and_a_sweep(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("data: /data\nclass_weights: auto\nmonitor: val_loss\n")
    config = merge(TrainConfig, str(config_file), {}).validate()
    assert (config.class_weights, config.monitor) == ("auto", "val_loss")
    assert merge(TrainConfig, str(config_file), {"monitor": "macro_f1"}).validate().monitor == "macro_f1"
    assert (TrainConfig().class_weights, TrainConfig().monitor) == ("none", "val_acc")
    sweep = merge(TuneConfig, str(config_file), {}).validate()
    trial = sweep.trial_config(sweep.search_points()[0], "/runs", "t")
    assert (trial.class_weights, trial.monitor) == ("auto", "val_loss"), "every trial inherits them"
    with pytest.raises(UsageError, match=r"^--monitor must be one of val_acc, val_loss, macro_f1; got 'val_f1'$"):
        merge(TuneConfig, str(config_file), {"monitor": "val_f1"}).validate()


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
        (
            ["train", "--data", "x", "--arch", "resnet9"],
            "tl-ray: error: --arch: no torchvision or timm architecture is named 'resnet9'; did you mean",
        ),
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
    for field in dataclasses.fields(TrainConfig):
        if field.name != "gpu":
            assert "--" + field.name.replace("_", "-") in help_text
    assert "--gpu" in help_text and "--cpu" in help_text and "--config" in help_text


# ----------------------------------------------------------------------------- values as engineers write them


def _merged(tmp_path, text: str, config_class: type = TrainConfig, **overrides):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(text)
    return merge(config_class, str(config_file), overrides)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("lr: 3e-4", "lr", 3e-4),  # YAML 1.1 (PyYAML) reads this as the text '3e-4'
        ("lr: 1e-3", "lr", 1e-3),
        ("lr: 1E-3", "lr", 1e-3),
        ("lr: 1.0e-3", "lr", 1e-3),  # a float to YAML 1.1 too
        ("lr: +2.5e-4", "lr", 2.5e-4),
        ("lr: '3e-4'", "lr", 3e-4),  # quoted: the same number
        ("lr: 1", "lr", 1.0),  # an int for a float
        ("val_fraction: .5", "val_fraction", 0.5),
        ("label_smoothing: -.0", "label_smoothing", 0.0),
        ("batch_size: 1_000", "batch_size", 1000),
        ("weight_decay: 1_000.5", "weight_decay", 1000.5),
        ("epochs: 1e1", "epochs", 10),  # an integral number for an int
        ("epochs: 12.0", "epochs", 12),
        ("warmup_epochs: 1", "warmup_epochs", 1.0),
        ("train_bn: false", "train_bn", False),
        ("sync_bn: yes", "sync_bn", True),  # YAML 1.1 booleans
        ("gpu: off", "gpu", False),
        ("gpu: null", "gpu", None),
        ("name: 007", "name", "007"),  # a str option keeps the text YAML read as a number (octal 7)
        ("name: 2024", "name", "2024"),
        ("name: 1.10", "name", "1.10"),
    ],
)
def test_numbers_and_booleans_in_any_yaml_spelling(tmp_path, text, key, expected):
    value = getattr(_merged(tmp_path, text + "\n"), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("freeze_depths: [0, 3, 5]\nlrs: [1e-3, 3e-3]\nstrategies: [discriminative, probe]", None),
        ("freeze_depths: 0,3,5\nlrs: 1e-3,3e-3\nstrategies: discriminative,probe", None),  # the flags' form
        ("freeze_depths: '0, 3, 5'\nlrs: '0.001, 0.003'\nstrategies: discriminative, probe", None),
        ("freeze_depths:\n  - 0\n  - 3\n  - 5\nlrs: [0.001, 3.0e-3]\nstrategies: [discriminative, probe]", None),
        ("freeze_depths: 5\nlrs: 1e-3\nstrategies: probe", ("5", "0.001", "probe")),  # one value
        ("freeze_depths: [5]\nlrs: [1]\nstrategies: [probe]", ("5", "1.0", "probe")),
        ("lrs: null", ("0,1,2,3,4,5", None, "auto")),
    ],
)
def test_list_options_take_yaml_lists_or_comma_separated_text(tmp_path, text, expected):
    config = _merged(tmp_path, text + "\n", TuneConfig, data="/data")
    expected = expected or ("0,3,5", "0.001,0.003", "discriminative,probe")
    assert (config.freeze_depths, config.lrs, config.strategies) == expected
    validated = config.validate()
    assert validated.depths() == sorted(int(depth) for depth in expected[0].split(","))
    if expected[1] is not None:
        assert validated.learning_rates() == sorted(float(rate) for rate in expected[1].split(","))


def test_list_options_as_flags_and_keywords():
    from_flags = merge(TuneConfig, None, {"freeze_depths": " 0, 3,5", "lrs": "3e-3, 1e-3", "strategies": "probe"})
    from_keywords = merge(TuneConfig, None, {"freeze_depths": [0, 3, 5], "lrs": [3e-3, 0.001], "strategies": ["probe"]})
    assert from_flags == from_keywords
    assert (from_flags.freeze_depths, from_flags.lrs) == ("0,3,5", "0.003,0.001")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("freeze_depths: [0, a]", "freeze_depths must be a list of integers like [0, 3, 5] (or the same"),
        ("freeze_depths: [0, 2.5]", "freeze_depths must be a list of integers"),
        ("freeze_depths: [true]", "freeze_depths must be a list of integers"),
        ("lrs: [fast]", "lrs must be a list of numbers like [1e-3, 3e-3] (or the same comma-separated: 1e-3,3e-3)"),
        ("lrs: 1e-3,fast", "lrs must be a list of numbers"),
        ("strategies: [probe, 5]", "strategies must be a list of strategy names"),
        ("freeze_depths: {a: 1}", "freeze_depths must be a list of integers"),
    ],
)
def test_bad_list_items_name_the_key_and_the_file(tmp_path, text, message):
    with pytest.raises(UsageError) as raised:
        _merged(tmp_path, text + "\n", TuneConfig)
    assert str(raised.value).startswith(f"{tmp_path / 'run.yaml'}: {message}")
    assert "\n" not in str(raised.value)


def test_bad_list_flag_names_the_flag():
    with pytest.raises(UsageError, match=r"^--lrs must be comma-separated numbers like 1e-3,3e-3; got 'fast'$"):
        merge(TuneConfig, None, {"lrs": "fast"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr: fast", "lr must be a number, auto, select or null; got 'fast'"),
        ("lr: .inf", "lr must be a number, auto, select or null; got inf"),
        ("lr: .nan", "lr must be a number, auto, select or null; got nan"),
        ("epochs: 2.5", "epochs must be int; got 2.5"),
        ("epochs: 1e-3", "epochs must be int; got '1e-3'"),
        ("epochs: true", "epochs must be int; got True"),
        ("epochs:", "epochs must be int; got None"),
        ("train_bn: 1", "train_bn must be bool; got 1"),
        ("train_bn: 'false'", "train_bn must be bool; got 'false'"),
        ("batch_size: [32]", "batch_size must be int or null; got [32]"),
        ("arch: [resnet18]", "arch must be str; got ['resnet18']"),
        ("name: yes", "name must be str or null; got True (YAML reads yes, no, on, off as booleans: quote the text)"),
    ],
)
def test_wrong_types_are_one_line_naming_key_file_and_expected_type(tmp_path, text, expected):
    with pytest.raises(UsageError) as raised:
        _merged(tmp_path, text + "\n")
    assert str(raised.value) == f"{tmp_path / 'run.yaml'}: {expected}"


def test_unknown_and_repeated_keys_name_the_key_and_the_file(tmp_path):
    with pytest.raises(UsageError) as raised:
        _merged(tmp_path, "lr: 1e-3\nfreeze_depths: [0, 5]\n")  # a tune option in a train config
    assert str(raised.value).startswith(f"--config: {tmp_path / 'run.yaml'} has unknown keys: freeze_depths; known: ")
    with pytest.raises(UsageError, match=r"run.yaml sets lr twice \(lines 1 and 3\); keep one$"):
        _merged(tmp_path, "lr: 1e-3\nepochs: 3\nlr: 3e-3\n")
    with pytest.raises(UsageError, match=r"sets freeze_depth twice"):
        _merged(tmp_path, "freeze-depth: 1\nfreeze_depth: 2\n")


def test_yaml_merge_keys_are_not_repeated_keys(tmp_path):
    config = _merged(tmp_path, "<<: {lr: 1e-3, epochs: 3}\nlr: 3e-4\n")
    assert (config.lr, config.epochs) == (3e-4, 3)


def test_invalid_yaml_says_where(tmp_path):
    with pytest.raises(UsageError, match=r"run.yaml is not valid YAML: line 2: expected ',' or '\]'"):
        _merged(tmp_path, "epochs: [1\n")


def test_every_config_mistake_is_a_usage_error(tmp_path):
    assert issubclass(UsageError, TlRayError)
    with pytest.raises(UsageError):
        merge(TrainConfig, None, {"data": "/d", "epochs": 0}).validate()
    with pytest.raises(UsageError):
        merge(TuneConfig, None, {"data": "/d", "scheduler": "pbt"}).validate()
    with pytest.raises(UsageError):
        merge(TrainConfig, str(tmp_path / "missing.yaml"), {})


@pytest.mark.parametrize("config_class", [TrainConfig, TuneConfig])
def test_to_yaml_reads_back_into_an_equal_config(tmp_path, config_class):
    text = "data: /data/dogs\nlr: 3e-4\nname: 007\nweight_decay: 1e-5\n"
    if config_class is TuneConfig:
        text += "freeze_depths: 5,0,3\nlrs: [1e-3, 3e-3]\nstrategies: probe\nscratch_baseline: yes\n"
    config = _merged(tmp_path, text, config_class).validate()
    written = to_yaml(config)
    assert written.count("\n") == len(dataclasses.fields(config_class))  # one option a line
    (tmp_path / "back.yaml").write_text(written)
    assert merge(config_class, str(tmp_path / "back.yaml"), {}) == config
    if config_class is TuneConfig:
        assert "freeze_depths: [5, 0, 3]\n" in written and "lrs: [0.001, 0.003]\n" in written
        assert "strategies: [probe]\n" in written


# ----------------------------------------------------------------------------- --lr auto and tl-ray lr-find


def test_lr_takes_a_number_or_auto_in_every_spelling(tmp_path, capsys):
    assert merge(TrainConfig, None, {"data": "/d", "lr": "auto"}).validate().lr == "auto"
    assert merge(TrainConfig, None, {"data": "/d", "lr": "3e-4"}).validate().lr == pytest.approx(3e-4)
    assert _merged(tmp_path, "data: /d\nlr: auto\n").validate().lr == "auto"
    assert _merged(tmp_path, "data: /d\nlr: 3e-4\n").validate().lr == pytest.approx(3e-4)  # YAML 1.1 reads text
    # auto survives the recipe (nothing fills it in) and the resolved YAML reads back.
    config = merge(TrainConfig, None, {"data": "/d", "lr": "auto", "freeze_depth": 3}).validate()
    (tmp_path / "back.yaml").write_text(to_yaml(config))
    assert merge(TrainConfig, str(tmp_path / "back.yaml"), {}).lr == "auto"
    with pytest.raises(UsageError, match="--lr must be a number, auto or select; got 'fast'"):
        TrainConfig(data="/d", lr="fast").validate()  # the API's dataclass, never coerced
    for bad, message in (("fast", "--lr must be a number, auto or select; got 'fast'"), ("0", "--lr must be positive")):
        assert cli.main(["train", "--data", "x", "--lr", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tl-ray: error: {message}") and len(err.strip().splitlines()) == 1
    assert cli.main(["train", "--data", "x", "--lr", "auto", "--weights", "none", "--print-config"]) == 0
    assert "\nlr: auto\n" in capsys.readouterr().out


def test_lr_find_takes_the_train_options_and_its_own(capsys):
    from tl_ray.training.config import LrFindConfig

    config = merge(LrFindConfig, None, {"data": "/d", "weights": "none", "steps": 50}).validate()
    assert (config.steps, config.start_lr, config.end_lr) == (50, 1e-7, 10.0)
    assert config.with_run_name().name.startswith("lr-find-")
    assert config.freeze_depth == 0 and config.optimizer == "adamw"  # resolved as train resolves them
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["lr-find"].format_help()
    for flag in ("--steps", "--start-lr", "--end-lr", "--data", "--freeze-depth", "--batch-size", "--optimizer"):
        assert flag in help_text
    for ignored in ("--lr LR", "--epochs", "--keep-checkpoints", "--monitor"):
        assert ignored not in help_text
    for argv, message in (
        (["--steps", "3"], "--steps must be at least 6; got 3"),
        (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr (1.0) must be below --end-lr (0.1)"),
        (["--end-lr", "-1"], "--end-lr must be positive; got -1.0"),
    ):
        assert cli.main(["lr-find", "--data", "x", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tl-ray: error: {message}") and len(err.strip().splitlines()) == 1
    assert cli.main(["lr-find", "--data", "x", "--weights", "none", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "\nsteps: 100\n" in printed and "tl-ray lr-find --config FILE" in printed

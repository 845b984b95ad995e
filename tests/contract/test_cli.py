"""The `tl-ray` command's contract without running anything: --print-config, and the exit codes.

Exit codes: 2 for usage errors (bad flags, bad config, inputs tl-ray refuses), 1 for a run that started
and failed, 130 for Ctrl-C. The run itself (tl_ray.training.driver, tl_ray.tuning.sweep) is replaced by a stand-in that
raises, so no Ray cluster starts and nothing trains.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest
import yaml

from tl_ray import cli, errors, options, recipe
from tl_ray.cli import parser as cli_parser
from tl_ray.cli import render
from tl_ray.errors import RunError, TlRayError, UsageError
from tl_ray.inputs.config import InspectConfig, SourceOptions
from tl_ray.inputs.sources import class_folders
from tl_ray.options import flag, merge
from tl_ray.training import driver as training
from tl_ray.training import schedule
from tl_ray.training.config import LrFindConfig, TrainConfig
from tl_ray.tuning import sweep
from tl_ray.tuning.config import TuneConfig

# What Ray raises when training fails (ray.train.TrainingFailedError), without importing Ray here.
TrainingFailedError = type("TrainingFailedError", (Exception,), {"__module__": "ray.train"})


@pytest.fixture
def no_run(monkeypatch):
    """tl_ray.training/tune replaced by stand-ins that record their config and raise ``outcome``, if any."""
    calls: list[tuple[str, object]] = []
    outcome: dict[str, BaseException] = {}

    def stand_in(command):
        def run(config, on_event=None):
            calls.append((command, config))
            if "error" in outcome:
                raise outcome["error"]
            raise AssertionError("the stand-in has no outcome")

        return run

    monkeypatch.setattr(training, "run", stand_in("train"))
    monkeypatch.setattr(training, "find_lr", stand_in("lr-find"))
    monkeypatch.setattr(sweep, "sweep", stand_in("tune"))
    return types.SimpleNamespace(calls=calls, outcome=outcome)


# ----------------------------------------------------------------------------- --print-config


CONFIGS = {"train": TrainConfig, "tune": TuneConfig, "lr-find": LrFindConfig}


@pytest.mark.parametrize("command", ["train", "tune", "lr-find"])
def test_print_config_round_trips_through_config(tmp_path, capsys, no_run, command):
    config_file = tmp_path / "base.yaml"
    lines = ["data: /data/dogs", "lr: 3e-4", "epochs: 7", "train_bn: no", "name: 007", "batch-size: 1_000"]
    if command == "tune":
        lines += ["freeze_depths: [0, 3, 5]", "lrs: [1e-3, 3e-3]", "strategies: discriminative,probe"]
    config_file.write_text("\n".join(lines) + "\n")
    flags = ["--arch", "resnet18", "--weights", "none", "--seed", "3"]
    if command == "tune":
        flags += ["--max-epochs", "4", "--scratch-baseline"]

    assert cli.main([command, "--config", str(config_file), *flags, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert not no_run.calls, "--print-config must not run anything"
    assert isinstance(yaml.safe_load(printed), dict)

    config_class = CONFIGS[command]
    overrides = {"arch": "resnet18", "weights": "none", "seed": 3}
    if command == "tune":
        overrides.update(max_epochs=4, scratch_baseline=True)
    expected = merge(config_class, str(config_file), overrides).validate()
    printed_file = tmp_path / "printed.yaml"
    printed_file.write_text(printed)
    assert merge(config_class, str(printed_file), {}) == expected  # the file is the resolved config, as is
    assert merge(config_class, str(printed_file), {}).validate() == expected

    # ... and running it is running the same config.
    no_run.outcome["error"] = KeyboardInterrupt()
    assert cli.main([command, "--config", str(printed_file)]) == 130
    assert no_run.calls == [(command, expected)]
    assert cli.main([command, "--config", str(printed_file), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_print_config_shows_class_weights_and_monitor(capsys, no_run):
    argv = ["train", "--data", "/d", "--class-weights", "auto", "--monitor", "macro_f1", "--print-config"]
    assert cli.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["class_weights"], printed["monitor"]) == ("auto", "macro_f1")
    assert cli.main(["tune", "--data", "/d", "--monitor", "f1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tl-ray: error: --monitor must be one of val_acc, val_loss, macro_f1; got 'f1'"
    )


def test_print_config_resolves_the_recipe_and_keeps_flags_over_the_file(tmp_path, capsys, no_run):
    config_file = tmp_path / "base.yaml"
    config_file.write_text("data: /data/dogs\nepochs: 20\noptimizer: sgd\n")
    assert (
        cli.main(["train", "--config", str(config_file), "--epochs", "4", "--freeze-depth", "2", "--print-config"]) == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    resolved = TrainConfig(data="/data/dogs", epochs=4, optimizer="sgd", freeze_depth=2).with_recipe()
    assert printed["epochs"] == 4 and printed["freeze_depth"] == 2
    assert printed["strategy"] == "plain"  # auto, from any start
    for key in ("weight_decay", "warmup_epochs", "backbone_lr_mult", "head_epochs"):
        assert printed[key] == getattr(resolved, key) is not None
    # The rate, like the batch, waits for the training set's size (this one cannot be listed).
    assert printed["lr"] is None and printed["batch_size"] is None


def test_print_config_of_a_sweep_states_its_grid(capsys, no_run):
    argv = ["tune", "--data", "/d", "--freeze-depths", "0,5", "--lrs", "1e-3,3e-3", "--strategies", "plain,probe"]
    assert cli.main([*argv, "--scratch-baseline", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert (
        "# the grid: 7 trials: freeze depths 0, 5 x strategies plain, probe x learning rates (depth 5 once), and the"
        " scratch baseline: depth 0 plain 0.001, 0.003; depth 0 probe 0.001, 0.003; depth 5 plain 0.001, 0.003"
    ) in printed
    values = yaml.safe_load(printed)
    assert (values["freeze_depths"], values["lrs"], values["strategies"]) == (
        [0, 5],
        [0.001, 0.003],
        ["plain", "probe"],
    )


def test_print_config_states_the_batch_it_chose_from_the_training_set(tmp_path, capsys, no_run):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "pets" / "train" / name).mkdir(parents=True)
        for index in range(25):
            Image.new("RGB", (8, 8), (index, 0, 0)).save(tmp_path / "pets" / "train" / name / f"{index}.png")
    root = str(tmp_path / "pets")
    assert cli.main(["train", "--data", root, "--weights", "none", "--val-fraction", "0.2", "--print-config"]) == 0
    printed = capsys.readouterr().out
    num_train = len(class_folders.discover(root, 0.2).train)
    batch = recipe.batch_size(num_train)
    steps = schedule.steps_per_epoch(num_train, batch, 1)
    stated = f"# batch_size: from the training set's size: {num_train} training images -> {batch}, {steps} steps"
    assert stated in printed
    assert yaml.safe_load(printed)["batch_size"] == batch
    # A small set: the rate is chosen by validation among five, two at half the batch (--lr select), and the rule
    # says where that stops.
    assert (
        f"# lr: from the training set's size: {num_train} training images -> select (at most"
        f" {recipe.SELECT_MAX_TRAIN} training images: select, trying 0.00033, 0.001, 0.003, and 0.001, 0.003 at half"
        " the batch where that is still 2 images a worker, for all the epochs each, then training at the best; more:"
        " the recipe's 0.001)"
    ) in printed
    assert yaml.safe_load(printed)["lr"] == "select"
    assert cli.main(["train", "--data", root, "--weights", "none", "--lr", "0.01", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "# lr:" not in printed and yaml.safe_load(printed)["lr"] == 0.01
    # Without a listable training set, the rules are stated and the batch and rate left to the run.
    assert cli.main(["train", "--data", str(tmp_path / "none"), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "# batch_size: null: chosen from the training set's size when it runs" in printed
    assert "# lr: null: chosen from the training set's size when it runs (at most 250 training images" in printed
    assert yaml.safe_load(printed)["batch_size"] is None and yaml.safe_load(printed)["lr"] is None


def test_print_config_without_data_is_a_template(tmp_path, capsys, no_run):
    assert cli.main(["train", "--weights", "none", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "# data is not set: fill it in, or pass --data, before running\n" in printed
    assert yaml.safe_load(printed)["data"] is None and yaml.safe_load(printed)["freeze_depth"] == 0
    template = tmp_path / "template.yaml"
    template.write_text(printed)
    assert cli.main(["train", "--config", str(template)]) == 2  # not runnable as it is
    assert capsys.readouterr().err.startswith("tl-ray: error: --data is required")


def test_print_config_refuses_a_bad_config(tmp_path, capsys, no_run):
    assert cli.main(["train", "--data", "/d", "--freeze-depth", "9", "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "tl-ray: error: --freeze-depth must be between 0 and 5; got 9\n"


# ----------------------------------------------------------------------------- exit codes


def test_bad_flags_exit_2_through_argparse(capsys):
    for argv in (
        ["train", "--epochs", "three"],
        ["train", "--no-such-flag"],
        ["nope"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
    capsys.readouterr()
    assert cli.main(["sample-data", "x", "--per-class", "2"]) == 2  # the option's own check, as from --config
    assert "--per-class must be at least 4 (every class needs train and val images); got 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        ("train", "epochs: three\n", "{file}: epochs must be int; got 'three'"),
        ("train", "learning_rate: 1e-3\n", "--config: {file} has unknown keys: learning_rate; known: "),
        ("tune", "freeze_depths: [0, x]\n", "{file}: freeze_depths must be a list of integers like [0, 3, 5]"),
        ("tune", "data: /d\nscheduler: pbt\n", "--scheduler must be one of asha, fifo; got 'pbt'"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, no_run, command, text, expected):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(text)
    assert cli.main([command, "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tl-ray: error: " + expected.format(file=config_file))
    assert len(err.splitlines()) == 1
    assert not no_run.calls, "a usage error is found before anything runs"


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        # An input the run refuses before training (a module's plain TlRayError): a usage error.
        (
            TlRayError("--data: /x/a.jpg is a file; expected a folder"),
            2,
            "--data: /x/a.jpg is a file; expected a folder",
        ),
        (UsageError("--gpu: no GPU"), 2, "--gpu: no GPU"),
        # Training started and failed: what train.run raises from Ray's TrainingFailedError.
        (None, 1, "training failed: worker 0 died"),
        (RunError("training finished without a checkpoint"), 1, "training finished without a checkpoint"),
    ],
)
def test_errors_of_the_run_exit_1_or_2_with_one_line(capsys, no_run, command, error, code, line):
    if error is None:
        try:
            raise TrainingFailedError("worker 0 died")
        except TrainingFailedError as cause:
            try:
                raise TlRayError(f"training failed: {cause}") from cause
            except TlRayError as wrapped:
                error = wrapped
    no_run.outcome["error"] = error
    assert cli.main([command, "--data", "/d"]) == code
    assert capsys.readouterr().err == f"tl-ray: error: {line}\n"
    assert len(no_run.calls) == 1


def test_an_unexpected_exception_exits_1_with_its_traceback(capsys, no_run):
    no_run.outcome["error"] = RuntimeError("CUDA error: an illegal memory access\nmore detail")
    assert cli.main(["train", "--data", "/d"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == "tl-ray: error: unexpected RuntimeError: CUDA error: an illegal memory access"


@pytest.mark.parametrize("command", ["train", "tune"])
def test_ctrl_c_exits_130(capsys, no_run, command):
    no_run.outcome["error"] = KeyboardInterrupt()
    assert cli.main([command, "--data", "/d"]) == 130
    assert capsys.readouterr().err == "tl-ray: interrupted; rerun the same command to resume\n"


def test_ray_trains_ctrl_c_handler_exiting_0_is_an_interruption(capsys, no_run):
    no_run.outcome["error"] = SystemExit(0)  # what Ray Train's SIGINT handler raises from inside fit()
    assert cli.main(["train", "--data", "/d"]) == 130
    assert capsys.readouterr().err == "tl-ray: interrupted; rerun the same command to resume\n"
    no_run.outcome["error"] = SystemExit(15)  # Ray's SIGTERM handler: the code stands
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--data", "/d"])
    assert exited.value.code == 15


def test_a_sweep_in_which_no_trial_finished_exits_1(capsys, monkeypatch):
    summary = types.SimpleNamespace(best=None, run_dir="/runs/sweep")
    monkeypatch.setattr(sweep, "sweep", lambda config, on_event=None: (summary, {}))
    monkeypatch.setattr(render, "sweep", lambda summary, written: print("the table"))
    assert cli.main(["tune", "--data", "/d"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "the table\n"
    assert captured.err == (
        "tl-ray: error: no trial of sweep /runs/sweep finished an epoch; see the trial errors above\n"
    )


def test_exit_code_rules():
    ray_failure = TrainingFailedError("worker died")
    wrapped = TlRayError("training failed: worker died")
    wrapped.__cause__ = ray_failure
    in_context = TlRayError("could not reach the cluster")
    in_context.__context__ = ray_failure
    suppressed = TlRayError("--data: missing")
    suppressed.__context__, suppressed.__suppress_context__ = ray_failure, True
    # Ray re-raises a TlRayError from a task as a class derived from both, in module ray.exceptions.
    from_task = type("RayTaskError(TlRayError)", (TlRayError,), {"__module__": "ray.exceptions"})("traceback text")
    from_task.cause = TlRayError("--data: unreadable")
    assert errors.exit_code(UsageError("x")) == errors.EXIT_USAGE == 2
    assert errors.exit_code(TlRayError("x")) == 2
    assert errors.exit_code(suppressed) == 2
    assert errors.exit_code(RunError("x")) == errors.EXIT_FAILED == 1
    assert errors.exit_code(wrapped) == 1
    assert errors.exit_code(in_context) == 1
    assert errors.exit_code(from_task) == 1 and cli.message(from_task) == "--data: unreadable"
    assert errors.exit_code(ValueError("a bug")) == 1
    assert errors.exit_code(KeyboardInterrupt()) == errors.EXIT_INTERRUPTED == 130
    assert issubclass(UsageError, TlRayError) and issubclass(RunError, TlRayError)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["tune", "--help"], ["lr-find", "--help"]])
def test_help_documents_the_exit_codes_and_print_config(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:\n  0    success" in out
    for code in ("\n  1    the run started and failed", "\n  2    usage error", "\n  130  interrupted (Ctrl-C)"):
        assert code in out
    if argv != ["--help"]:
        assert "--print-config" in out


def test_importing_a_module_keeps_the_api_function_of_its_command():
    import importlib

    import tl_ray

    commands = {"training": "train", "tuning": "tune", "inference": "predict", "inputs": "inspect"}
    for module, function in commands.items():
        imported = importlib.import_module(f"tl_ray.{module}")
        assert imported.__name__ == f"tl_ray.{module}"
        assert callable(getattr(tl_ray, function)) and getattr(tl_ray, function).__module__ == "tl_ray"


# ----------------------------------------------------------------------------- options declared once (options.option)


def _subparser(command: str):
    return cli_parser.build_parser()._subparsers._group_actions[0].choices[command]


@pytest.mark.parametrize(("command", "config_class"), list(CONFIGS.items()))
def test_every_option_is_one_flag_with_its_declared_help(command, config_class):
    """The flags are the config's fields, less its IGNORED ones, plus the command's own; each flag's help is the
    field's, with the dataclass default appended where the help does not state one."""
    parser = _subparser(command)
    actions = {option: action for action in parser._actions for option in action.option_strings}
    own = {"-h", "--help", "--cpu", "--config", "--verbose", "--print-config", "--no-train-bn", "--no-sync-bn"}
    own.add("--no-compile")  # a bool option's negative, as --no-train-bn
    if command == "tune":
        own.add("--no-scratch-baseline")
    fields = [field for field in dataclasses.fields(config_class) if field.name not in config_class.IGNORED]
    assert set(actions) == {flag(field.name) for field in fields} | own
    defaults = config_class()
    for field in dataclasses.fields(config_class):
        text = field.metadata["help"]
        assert text and "%%" not in text, f"{field.name} is declared with option(default, help)"
        if field.name in config_class.IGNORED:
            assert flag(field.name) not in actions
            continue
        shown = actions[flag(field.name)].help.replace("%%", "%")
        default = getattr(defaults, field.name)
        if isinstance(default, bool) or default is None or "default:" in text:
            assert shown == text
        else:
            assert shown == f"{text} (default: {default})"
    help_text = " ".join(parser.format_help().split())
    assert "linear LR warm-up length, in epochs (default: 5% of the run, at most 1 epoch)" in help_text
    assert ("number of epochs (default: 10)" in help_text) is (command == "train")
    assert ("--freeze-depths FREEZE_DEPTHS" in help_text) is (command == "tune")
    assert ("--freeze-depth FREEZE_DEPTH " in help_text) is (command != "tune")
    assert ("--lr LR " in help_text) is (command == "train")


def test_train_takes_the_source_options_as_declared_in_source_options():
    train_fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    train_hints, source_hints = typing.get_type_hints(TrainConfig), typing.get_type_hints(SourceOptions)
    for field in dataclasses.fields(SourceOptions):
        assert train_hints[field.name] == source_hints[field.name]
        assert train_fields[field.name].default == field.default
        assert train_fields[field.name].metadata == field.metadata
    actions = {option: action for action in _subparser("predict")._actions for option in action.option_strings}
    assert actions["--image-column"].help == SourceOptions.__dataclass_fields__["image_column"].metadata["help"]
    assert "--label-pattern" not in actions  # predict takes only some of them


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image-size", "1.5"], "argument --image-size: invalid int value: '1.5'"),
        (["--momentum", "high"], "argument --momentum: invalid float value: 'high'"),
        (["--head-epochs", "two"], "argument --head-epochs: invalid int value: 'two'"),  # int | None: an int
        (["--gpu", "--cpu"], "argument --cpu: not allowed with argument --gpu"),
        (["--train-bn", "yes"], "unrecognized arguments: yes"),  # a switch, as before
    ],
)
def test_flag_types_come_from_the_annotations(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--data", "/d", *argv])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_flags_parse_to_the_declared_types(capsys, no_run):
    argv = ["train", "--data", "/d", "--num-workers", "1-4", "--lr", "3e-4", "--no-train-bn", "--cpu"]
    assert cli.main([*argv, "--image-size", "64", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["num_workers"], printed["lr"], printed["train_bn"], printed["gpu"]) == ("1-4", 3e-4, False, False)
    assert printed["image_size"] == 64
    assert cli.main(["train", "--data", "/d", "--num-workers", "2", "--gpu", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["num_workers"], printed["gpu"]) == (2, True)  # int | str: a number is an int


def _choice_options():
    return [field for field in dataclasses.fields(TuneConfig) if field.metadata["choices"]]


def test_the_options_with_choices_are_the_expected_ones():
    # --arch is not among them: any timm name is one too (its check: tests/unit/test_timm_backbones.py)
    assert {field.name for field in _choice_options()} == {
        "optimizer",
        "strategy",
        "class_weights",
        "monitor",
        "augment",
        "logger",
        "scheduler",
    }


@pytest.mark.parametrize(
    ("config_class", "field"),
    [(TrainConfig, field) for field in _choice_options() if field.name in TrainConfig.__dataclass_fields__]
    + [(TuneConfig, field) for field in _choice_options() if field.name not in TuneConfig.IGNORED],
    ids=lambda value: getattr(value, "name", getattr(value, "__name__", "")),
)
def test_declared_choices_are_checked_with_one_line_naming_the_flag(tmp_path, capsys, no_run, config_class, field):
    expected = f"{flag(field.name)} must be one of {', '.join(field.metadata['choices'])}; got 'nope'"
    with pytest.raises(UsageError, match=f"^{expected}$"):
        merge(config_class, None, {"data": "/d", field.name: "nope"}).validate()
    for choice in field.metadata["choices"]:  # each declared choice passes the check
        options.check_options(config_class(**{field.name: choice}))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"data: /d\n{field.name}: nope\n")
    command = "train" if config_class is TrainConfig else "tune"
    assert cli.main([command, "--config", str(config_file)]) == 2
    assert capsys.readouterr().err == f"tl-ray: error: {expected}\n"
    assert not no_run.calls


def test_tune_checks_no_option_it_ignores():
    """tune takes no flag for the train options it searches (or replaces by --max-epochs), and a --config value
    of one is not used, so not checked: every trial is checked with the grid's values instead."""
    assert set(TuneConfig.IGNORED) == {"freeze_depth", "lr", "epochs", "strategy"}
    sweep_config = merge(TuneConfig, None, {"data": "/d", "strategy": "nope", "epochs": 0, "lr": -1.0}).validate()
    trials = [sweep_config.trial_config(point, "/runs", "t") for point in sweep_config.search_points()]
    assert {trial.strategy for trial in trials} == {"plain"} and {trial.epochs for trial in trials} == {5}
    with pytest.raises(UsageError, match=r"^--max-epochs must be positive; got 0$"):
        merge(TuneConfig, None, {"data": "/d", "max_epochs": 0}).validate()


def _bounded_options():
    declared = dataclasses.fields(TuneConfig)
    return [field for field in declared if field.metadata["between"] or field.metadata["positive"]]


@pytest.mark.parametrize("field", _bounded_options(), ids=lambda field: field.name)
def test_declared_bounds_are_checked_with_one_line_naming_the_flag(capsys, no_run, field):
    config_class = TrainConfig if field.name in TrainConfig.__dataclass_fields__ else TuneConfig
    hint = typing.get_type_hints(config_class)[field.name]
    kind = int if int in (typing.get_args(hint) or (hint,)) else float
    if field.metadata["between"]:
        low, high = field.metadata["between"]
        bad, expected = kind(high) + 1, f"must be between {low} and {high}; got {kind(high) + 1}"
        # positive too (--layer-decay): the low end is refused, values above it are inside
        inside = [kind(high), (low + high) / 2] if field.metadata["positive"] else [kind(low), kind(high)]
    else:
        bad, expected, inside = kind(0), f"must be positive; got {kind(0)}", [kind(1)]
    for value in inside:
        options.check_options(config_class(**{field.name: value}))
    with pytest.raises(UsageError, match=f"^{flag(field.name)} {expected}$".replace("(", r"\(").replace(")", r"\)")):
        merge(config_class, None, {"data": "/d", field.name: bad}).validate()
    command = "train" if config_class is TrainConfig else "tune"
    assert cli.main([command, "--data", "/d", flag(field.name), str(bad), "--print-config"]) == 2
    assert capsys.readouterr().err == f"tl-ray: error: {flag(field.name)} {expected}\n"


def test_source_flags_of_the_commands_that_read_data_reach_source_options():
    parser = cli_parser.build_parser()

    def source_options(argv):
        command = cli_parser.BY_NAME[argv[0]]
        given = cli_parser.given_options(parser.parse_args(argv))
        return merge(command.config_class, None, given).validate().source_options()

    pattern = r"^(\w+)\."
    evaluate = ["evaluate", "--checkpoint", "c", "--data", "d", "--label-column", "y", "--label-pattern", pattern]
    assert source_options(evaluate) == SourceOptions(label_pattern=pattern, label_column="y")
    predict = ["predict", "--checkpoint", "c", "--data", "d", "--out", "o.csv"]
    assert source_options([*predict, "--image-column", "jpg"]) == SourceOptions(image_column="jpg")
    with pytest.raises(SystemExit):  # predict takes only the columns it reads
        parser.parse_args([*predict, "--label-column", "y"])
    assert source_options(["inspect", "--data", "d", "--split-column", "fold"]) == SourceOptions(split_column="fold")
    inspect = merge(InspectConfig, None, {"data": "d"})
    assert inspect.val_fraction == TrainConfig().val_fraction and inspect.val_data is None
    with pytest.raises(UsageError, match="has no group"):
        source_options(["inspect", "--data", "d", "--label-pattern", r"^\w+"])


def test_a_reader_that_leaves_early_ends_nothing_in_a_traceback(tmp_path):
    """`tl-ray inspect ... | head -1`: more output than a pipe holds, its reader gone after the first line."""
    import subprocess
    import sys

    from PIL import Image

    for index in range(3000):  # one line per class: ~130 KB, twice what a pipe buffers
        folder = tmp_path / "data" / "train" / f"class_{index:04d}"
        folder.mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(folder / "a.png")
    command = [sys.executable, "-m", "tl_ray.cli", "inspect", "--data", str(tmp_path / "data")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        first = process.stdout.readline()
        process.stdout.close()  # what head does after its line
        errors = process.stderr.read().decode()
        code = process.wait(timeout=120)
    assert first.startswith(b"data ")
    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors
    assert code == 0

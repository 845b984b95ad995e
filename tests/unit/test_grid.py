"""tl-ray tune --grid OPTION=V1,V2: the product of the swept values with every depth, strategy and rate, the
values coerced and checked by the train option's own declaration, the refusals, the YAML round trip, and the
report grouped by every swept dimension. No Ray."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from tl_ray import cli, recipe
from tl_ray.errors import UsageError
from tl_ray.options import merge, to_yaml
from tl_ray.tuning import report
from tl_ray.tuning.config import TuneConfig
from tl_ray.tuning.sweep import SweepSummary, TrialSummary


def _tune(**options) -> TuneConfig:
    return merge(TuneConfig, None, {"data": "/d", "freeze_depths": "3,5", "lrs": "1e-3,3e-3", **options}).validate()


def test_the_grid_is_the_product_of_every_swept_value_with_every_depth_strategy_and_rate():
    config = _tune(grid=["label-smoothing=0,0.1", "augment=auto,trivial"])
    assert config.grid == {"label_smoothing": "0.0,0.1", "augment": "auto,trivial"}
    assert config.grid_values() == {"label_smoothing": [0.0, 0.1], "augment": ["auto", "trivial"]}
    points = config.search_points()
    assert len(points) == 2 * 2 * 2 * 2  # depths 3 and 5 (once), two rates, two x two grid values
    combos = {(p["freeze_depth"], p["lr"], p["label_smoothing"], p["augment"]) for p in points}
    assert len(combos) == len(points)
    # Every combination gets the same rates, and each trial's config carries its values.
    for depth in (3, 5):
        for combination in ((0.0, "auto"), (0.1, "auto"), (0.0, "trivial"), (0.1, "trivial")):
            rates = sorted(
                p["lr"]
                for p in points
                if (p["freeze_depth"], p["label_smoothing"], p["augment"]) == (depth, *combination)
            )
            assert rates == [1e-3, 3e-3]
    trial = config.trial_config(points[-1], "/runs/t", "train")
    assert (trial.label_smoothing, trial.augment) == (points[-1]["label_smoothing"], points[-1]["augment"])


def test_without_lrs_each_combination_gets_the_recipes_rates_for_it():
    config = merge(TuneConfig, None, {"data": "/d", "freeze_depths": "3", "grid": ["optimizer=adamw,sgd"]}).validate()
    rates = {p["optimizer"]: p["lr"] for p in config.search_points()}
    assert rates == {"adamw": recipe.LR["adamw"], "sgd": recipe.LR["sgd"]}
    assert len(_tune().search_points()) == 4 and _tune().grid is None  # no grid: the sweep it always was


def test_a_yaml_grid_mapping_reads_as_the_flags_and_print_config_round_trips(tmp_path):
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text("data: /d\nfreeze_depths: [3]\ngrid:\n  label_smoothing: [0, 0.1]\n  train_bn: [yes, no]\n")
    from_yaml = merge(TuneConfig, str(config_file), {}).validate()
    from_flags = _tune(freeze_depths="3", lrs=None, grid=["label_smoothing=0,.1", "train_bn=true,false"])
    assert from_yaml.grid == from_flags.grid == {"label_smoothing": "0.0,0.1", "train_bn": "true,false"}
    assert from_yaml.grid_values()["train_bn"] == [True, False]
    printed = tmp_path / "printed.yaml"
    printed.write_text(to_yaml(from_yaml))
    assert yaml.safe_load(printed.read_text())["grid"] == {"label_smoothing": [0.0, 0.1], "train_bn": [True, False]}
    assert merge(TuneConfig, str(printed), {}) == from_yaml == merge(TuneConfig, str(printed), {}).validate()


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["unknown=1,2"], "--grid unknown: not a train option a sweep can vary"),
        (["lr=abc"], "--grid lr: tune searches it with --lrs"),
        (["freeze_depth=0,3"], "--grid freeze_depth: tune searches it with --freeze-depths"),
        (["label_smoothing=abc"], "--grid label_smoothing=abc: --label-smoothing must be float; got 'abc'"),
        (["label_smoothing=0,2"], "--grid label_smoothing=0,2: --label-smoothing must be between 0.0 and 0.99"),
        (["augment=auto,heavy"], "--grid augment=auto,heavy: --augment must be one of auto, standard"),
        (["train_bn=maybe"], "--grid train_bn=maybe: --train-bn must be true or false; got 'maybe'"),
        (["monitor=val_acc,val_loss"], "--grid monitor: not a train option a sweep can vary"),
        (["val_fraction=0.1,0.2"], "--grid val_fraction: not a train option a sweep can vary"),
        (["label_smoothing"], "--grid must be OPTION=V1,V2 like label_smoothing=0,0.1; got 'label_smoothing'"),
        (["seed=1", "seed=2"], "--grid seed is given twice"),
    ],
)
def test_a_bad_grid_is_one_line_naming_the_option(grid, message):
    with pytest.raises(UsageError) as raised:
        _tune(grid=grid)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_the_cli_refuses_a_bad_grid_with_exit_2_and_writes_nothing(tmp_path, capsys):
    for grid in ("unknown=1,2", "lr=abc"):
        assert cli.main(["tune", "--data", str(tmp_path), "--storage", str(tmp_path / "runs"), "--grid", grid]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tl-ray: error: --grid {grid.split('=')[0]}") and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def _trial(trial_id, depth, val_acc, grid, strategy="plain"):
    history = [{"epoch": 1, "val_acc": val_acc, "val_loss": 1.0}]
    return TrialSummary(
        trial_id, depth, strategy, 1e-3, "finished", 1, val_acc, 0.5, 1, 1.0, 10.0, f"/c/{trial_id}", history, 0.5, grid
    )


def test_the_report_groups_by_every_swept_dimension_and_judges_by_the_same_resolution(tmp_path):
    trials = [
        _trial("a", 3, 0.90, {"label_smoothing": 0.1, "augment": "trivial"}),
        _trial("b", 3, 0.80, {"label_smoothing": 0.0, "augment": "trivial"}),
        _trial("c", 3, 0.70, {"label_smoothing": 0.1, "augment": "auto"}),
        _trial("d", 5, 0.60, {"label_smoothing": 0.0, "augment": "auto"}),
        _trial("e", 0, 0.30, {}, strategy=report.SCRATCH),
    ]
    summary = SweepSummary("/runs/sweep", 1, trials, 10.0, None, 100, 4)
    configs = report.best_per_config(summary)
    assert list(configs)[:2] == [
        "depth 3, plain / label_smoothing 0.1, augment trivial",
        "depth 3, plain / label_smoothing 0.0, augment trivial",
    ]
    values = [(name, value, trial.trial_id) for name, value, trial in report.best_per_value(summary)]
    assert values == [
        ("freeze depth", "3", "a"),
        ("freeze depth", "5 (feature extraction)", "d"),
        ("label_smoothing", "0.1", "a"),
        ("label_smoothing", "0.0", "b"),
        ("augment", "trivial", "a"),
        ("augment", "auto", "c"),
    ]
    lines = report.verdict(summary)
    assert lines[1].startswith("- **best: depth 3, plain / label_smoothing 0.1, augment trivial** at 0.900, ahead of")
    paths = report.write_report(summary, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "## Best per freeze depth and strategy, label_smoothing, augment" in markdown
    assert (
        "| augment | auto | 0.700 | 0.200 (20 images) | depth 3, plain / label_smoothing 0.1, augment auto |"
        in markdown
    )
    assert "| trial | freeze depth | strategy | lr | label_smoothing | augment | val_acc |" in markdown
    csv_lines = paths["csv"].read_text().splitlines()
    assert csv_lines[0].endswith(",macro_f1,label_smoothing,augment") and csv_lines[1].endswith(",0.1,trivial")
    assert csv_lines[-1].startswith("e,0,from scratch") and csv_lines[-1].endswith(",,")
    plain = dataclasses.replace(summary, trials=[dataclasses.replace(t, grid={}) for t in trials])
    assert "swept dimension" not in report.markdown(plain)  # a sweep without --grid reports as it always did

"""The shape of the code (docs/architecture.md, "Shape of the code"): rooms of a readable size, imports one way
with no cycle, and every option of every command declared once.

Read from the source (``ast``) and from the built parser: no Ray, no torch.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from argparse import SUPPRESS
from pathlib import Path

import pytest

import tl_ray
from tl_ray.cli import parser as cli_parser

PACKAGE = Path(tl_ray.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _top_level_imports(name: str) -> set[str]:
    """The tl_ray modules ``name`` imports when it is imported (not those its functions import when called, nor
    those under ``if TYPE_CHECKING``)."""
    imported = set()
    for node in ast.parse(MODULES[name].read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tl_ray":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                imported.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name.split(".")[0] == "tl_ray"}
    return imported - {name}


def _all_imports(name: str) -> set[str]:
    """Every tl_ray module ``name`` imports anywhere in its file, functions included."""
    imported = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tl_ray":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                imported.add(full if full in MODULES else node.module)
    return imported - {name}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_500_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines: split it by concern"


def test_no_module_imports_the_package_api():
    """``tl_ray/__init__.py`` is the Python API, the top of the flow: nothing below imports a name from it (the
    version has its own module)."""
    offenders = {name for name in MODULES if name != "tl_ray" and "tl_ray" in _all_imports(name)}
    assert not offenders


def test_module_level_imports_have_no_cycle():
    graph = {name: _top_level_imports(name) & set(MODULES) for name in MODULES}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for child in sorted(graph[name]):
            if state.get(child) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(child) :], child]))
            if child not in state:
                visit(child, [*path, child])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# The modules that run training (not its options, schedule or metrics, which are values and pure functions).
RUNS = tuple(f"tl_ray.training.{name}" for name in ("driver", "worker", "loop", "state", "lr_search", "results"))
# Who may import what, as the data flows: cli -> options -> train/tune -> inputs/model -> checkpoint ->
# report/predict. Each row: modules (by prefix) and the prefixes none of them may import, anywhere in the file.
FORBIDDEN = [
    ("tl_ray.", ("tl_ray.cli",), ("tl_ray.cli",)),  # only the CLI parses arguments or prints
    ("tl_ray.", ("tl_ray.tuning.sweep", "tl_ray.tuning.report"), ("tl_ray.tuning", "tl_ray.cli")),  # Tune: tuning
    ("tl_ray.inference", (*RUNS, "tl_ray.tuning"), ()),
    ("tl_ray.inputs", (*RUNS, "tl_ray.tuning", "tl_ray.inference"), ()),
    ("tl_ray.model", ("tl_ray.training", "tl_ray.tuning", "tl_ray.inputs", "tl_ray.inference"), ()),
    ("tl_ray.checkpoint", ("tl_ray.training", "tl_ray.tuning", "tl_ray.inputs", "tl_ray.inference"), ()),
]
# The option declarations are read by the CLI before torch or Ray load: they import only each other and the base.
CONFIG_MODULES = ("tl_ray.options", "tl_ray.training.config", "tl_ray.tuning.config", "tl_ray.inputs.config")
CONFIG_MODULES += ("tl_ray.training.toolbox",)  # the toolbox options TrainConfig takes (same_option)
CONFIG_MAY_IMPORT = (*CONFIG_MODULES, "tl_ray.inference.config", "tl_ray.errors", "tl_ray.backbones")
CONFIG_MAY_IMPORT += ("tl_ray.recipe", "tl_ray.classes", "tl_ray.version")
CONFIG_MAY_IMPORT += ("tl_ray.inputs.reading",)  # the retry budget's default; the standard library alone


def test_imports_flow_one_way():
    for prefix, forbidden, allowed_inside in FORBIDDEN:
        for name in MODULES:
            if not name.startswith(prefix) or name.startswith(allowed_inside):
                continue
            bad = {module for module in _all_imports(name) if module.startswith(forbidden)}
            assert not bad, f"{name} imports {sorted(bad)}"
    for name in (*CONFIG_MODULES, "tl_ray.inference.config"):
        bad = _top_level_imports(name) - set(CONFIG_MAY_IMPORT)
        assert not bad, f"{name} is read before torch and Ray load; it imports {sorted(bad)}"


# ----------------------------------------------------------------------------- every option declared once

RUN_FLAGS = {"help", cli_parser.CONFIG, cli_parser.PRINT_CONFIG, cli_parser.VERBOSE}


@pytest.mark.parametrize("command", cli_parser.COMMANDS, ids=lambda command: command.name)
def test_every_flag_is_a_declared_option_and_repeats_no_default(command):
    """The parser's flags are the config's fields (less its IGNORED ones) and the run flags; none carries a
    default of its own (SUPPRESS: the field's declared default is the one), and every field is an ``option``."""
    sub = cli_parser.build_parser()._subparsers._group_actions[0].choices[command.name]
    fields = {field.name: field for field in dataclasses.fields(command.config_class)}
    for field in fields.values():
        assert field.metadata.get("help"), f"{command.name}: {field.name} is not declared with options.option"
    dests = set()
    for action in sub._actions:
        if action.dest in RUN_FLAGS:
            continue
        assert action.dest in fields, f"{command.name}: the flag {action.option_strings} is no declared option"
        assert action.default is SUPPRESS, f"{command.name}: {action.dest} has a default besides its declaration"
        dests.add(action.dest)
    assert dests == set(fields) - set(getattr(command.config_class, "IGNORED", ()))


def _api_functions():
    """The Python API and each command's entry function (what the CLI's handlers call)."""
    from tl_ray.inference import evaluate, export, predict
    from tl_ray.inputs import inspect as inspect_module
    from tl_ray.sample import write_sample_data
    from tl_ray.training import driver
    from tl_ray.tuning import sweep

    api = [getattr(tl_ray, name) for name in ("train", "lr_find", "tune", "predict", "evaluate", "inspect")]
    api += [tl_ray.export, tl_ray.write_sample_data]
    commands = [predict.predict, evaluate.evaluate, export.export, inspect_module.inspect, write_sample_data]
    return [*api, *commands, driver.run, driver.find_lr, sweep.sweep]


@pytest.mark.parametrize(
    "function", _api_functions(), ids=lambda function: f"{function.__module__}.{function.__name__}"
)
def test_no_function_repeats_an_options_default(function):
    """An API function takes the options as keywords or as the command's config, never with a default of its own:
    the declaration's is the only one."""
    declared = {field.name for command in cli_parser.COMMANDS for field in dataclasses.fields(command.config_class)}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name in declared:
            assert parameter.default is inspect.Parameter.empty, f"{function.__name__}({parameter.name}=...)"

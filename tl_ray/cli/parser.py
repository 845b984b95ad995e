"""The `tl-ray` parser, built from the commands' declarations: every command is one ``Command`` row naming its
config class, and every flag (or positional argument) is made from a field of that class (``tl_ray.options``).

No default is written here: every flag's default is SUPPRESS, so the namespace holds only the flags given, which
override the --config file, which overrides the field's declared default.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from argparse import SUPPRESS
from dataclasses import dataclass
from typing import Any

from tl_ray.auditing.config import AuditConfig
from tl_ray.errors import EXIT_CODES
from tl_ray.inference.config import EvaluateConfig, ExportConfig, PredictConfig
from tl_ray.inputs.config import InspectConfig
from tl_ray.options import MAPPING, POSITIONAL, flag
from tl_ray.sample import SampleDataConfig
from tl_ray.training.config import ArchsConfig, LrFindConfig, TrainConfig
from tl_ray.tuning.config import ReportConfig, TuneConfig
from tl_ray.version import __version__

# The flags every command takes besides its options: they say how the command runs, not what it does.
CONFIG, PRINT_CONFIG, VERBOSE = "config", "print_config", "verbose"


@dataclass(frozen=True)
class Command:
    """One `tl-ray` command: its name, the config class that declares its options, its --help texts, and whether
    it runs Ray (and so takes --verbose)."""

    name: str
    config_class: type
    help: str
    description: str | None = None
    runs_ray: bool = False


COMMANDS = (
    Command("sample-data", SampleDataConfig, "write synthetic source/ and target/ datasets"),
    Command("train", TrainConfig, "fine-tune a pretrained backbone on your images", runs_ray=True),
    Command(
        "lr-find",
        LrFindConfig,
        "suggest a learning rate: an LR range test on your data (what --lr auto runs), with its plot",
        "Trains from the run's starting weights for up to --steps optimizer steps while the learning"
        " rate grows exponentially from --start-lr to --end-lr, on the batches train would take (same data, cache,"
        " model, freeze depth, optimizer and batch size), and stops when the loss diverges. Suggests fastai's valley"
        " rate and writes lr_find.png (loss against rate) and lr_find.json to STORAGE/NAME. Pass the suggestion to"
        " train as --lr, or let train --lr auto run the same test.",
        runs_ray=True,
    ),
    Command("tune", TuneConfig, "compare freeze depths x learning rates with Ray Tune; report the best", runs_ray=True),
    Command("predict", PredictConfig, "classify images with a checkpoint (Ray Data batch inference)", runs_ray=True),
    Command(
        "evaluate",
        EvaluateConfig,
        "accuracy, per-class metrics and confusion matrix on DIR/<class>/",
        runs_ray=True,
    ),
    Command(
        "inspect",
        InspectConfig,
        "what a run would train on: source, classes and counts per split, skipped items, image sizes",
    ),
    Command(
        "audit",
        AuditConfig,
        "find label suspects, duplicates and leaks, and outliers in a dataset, with a checkpoint's features",
        "Computes every train, val and test item's pooled backbone features once (Ray Data, as predict), then: label"
        " suspects (out-of-sample probabilities of --folds linear heads, ranked by cleanlab's confident learning),"
        " exact and near duplicates within a split and across splits (leaks), and outliers (far from every class)."
        " Writes suspects.csv, duplicates.csv, outliers.csv and a gallery .png of each into --out (new or empty);"
        " --fix-list also writes fix-list.csv, a manifest without the flagged items that train --data takes.",
        runs_ray=True,
    ),
    Command(
        "export",
        ExportConfig,
        "write a checkpoint as one TorchScript or ONNX file that runs without tl-ray",
        "The file takes uint8 RGB images (N, 3, S, S), already resized and centre-cropped, and returns"
        " softmax probabilities (N, classes); scaling, normalisation and softmax are inside it. The metadata (classes,"
        " the resize and crop to do before, the input contract) is embedded in the file and written to OUT.json.",
    ),
    Command("report", ReportConfig, "(re)write the report of a finished or interrupted sweep"),
    Command(
        "archs",
        ArchsConfig,
        "list the backbones --arch takes: torchvision's, then timm's, and which have pretrained weights",
    ),
)
BY_NAME = {command.name: command for command in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-ray",
        description="Transfer learning of torchvision and timm image classifiers (ResNet, ConvNeXt, EfficientNet, ViT,"
        " and any timm model by name) on Ray.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tl-ray {__version__}")
    subparsers = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=functools.partial(
            argparse.ArgumentParser, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
        ),
    )
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.description)
        add_options(sub, command.config_class)
        _add_run_flags(sub, command.runs_ray)
    return parser


def add_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """The flags of a config's options, made from its fields: the type from the annotation, the help from
    ``options.option``, the default shown from the dataclass. Options the class declares itself come first (tune's
    before the train ones it inherits); its IGNORED ones get no flag."""
    hints = typing.get_type_hints(config_class)
    bases = [base for base in config_class.__mro__[1:] if dataclasses.is_dataclass(base)]
    inherited = {field.name for base in bases for field in dataclasses.fields(base)}
    fields = sorted(dataclasses.fields(config_class), key=lambda field: field.name in inherited)
    for field in fields:
        if field.name in getattr(config_class, "IGNORED", ()):
            continue
        _add_flag(parser, field, hints[field.name], field.default)


def _add_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, hint: Any, default: Any) -> None:
    text = help_text(field)
    kinds = set(typing.get_args(hint)) - {type(None)} if isinstance(hint, types.UnionType) else {hint}
    if "negative" in field.metadata:  # --gpu / --cpu
        negative, negative_text = field.metadata["negative"]
        pair = parser.add_mutually_exclusive_group()
        pair.add_argument(flag(field.name), dest=field.name, action="store_true", default=SUPPRESS, help=text)
        pair.add_argument(flag(negative), dest=field.name, action="store_false", default=SUPPRESS, help=negative_text)
    elif bool in kinds:
        parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, default=SUPPRESS, help=text)
    elif field.metadata.get(MAPPING):  # --grid OPTION=V1,V2, repeatable
        parser.add_argument(flag(field.name), action="append", metavar="OPTION=V1,V2", default=SUPPRESS, help=text)
    else:
        kind = str if str in kinds else kinds.pop()  # num_workers: 4 or 1-4, made an int by merge where it is one
        suffix = f" (default: {default})" if default is not None and "default:" not in text else ""
        if field.metadata.get(POSITIONAL):  # optional here: --config may give it; the config's check requires it
            parser.add_argument(
                field.name, metavar=field.name.upper(), nargs="?", type=kind, default=SUPPRESS, help=text
            )
            return
        parser.add_argument(flag(field.name), type=kind, default=SUPPRESS, help=text + suffix)


def help_text(field: dataclasses.Field) -> str:
    return field.metadata["help"].replace("%", "%%")  # argparse formats help with %


def _add_run_flags(parser: argparse.ArgumentParser, runs_ray: bool) -> None:
    """The flags of every command besides its options."""
    parser.add_argument(
        flag(CONFIG),
        dest=CONFIG,
        default=None,
        help="YAML file of the same options (underscores; lists for the list options); flags override it",
    )
    parser.add_argument(
        flag(PRINT_CONFIG),
        dest=PRINT_CONFIG,
        action="store_true",
        help="print the resolved configuration (--config, flags and the defaults) as YAML that --config reads back,"
        " and exit without running",
    )
    if runs_ray:
        parser.add_argument(
            flag(VERBOSE),
            dest=VERBOSE,
            action="store_true",
            help="also show Ray's own output: its workers' logs (per-worker reports, Ray Data's execution plans),"
            " Ray Data's progress bars and Tune's status table",
        )


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given as flags (SUPPRESS left the others out of the namespace)."""
    return {key: value for key, value in vars(args).items() if key not in ("command", CONFIG, PRINT_CONFIG, VERBOSE)}

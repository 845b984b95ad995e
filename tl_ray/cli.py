"""The `tl-ray` command. The only module that parses arguments or prints.

Exit codes (``EXIT_CODES``, also in ``tl-ray --help`` and README.md): 0 success, 1 the run failed,
2 a usage error, 130 interrupted. ``exit_code`` says which an exception gets.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import sys
import traceback
import types
import typing
from argparse import SUPPRESS
from collections.abc import Sequence
from typing import Any

from tl_ray import __version__, recipe
from tl_ray.config import (
    NUM_STAGES,
    SOURCE_KEYS,
    LrFindConfig,
    SourceOptions,
    TrainConfig,
    TuneConfig,
    flag,
    forbid_world_writable_files,
    merge,
    to_yaml,
)
from tl_ray.errors import RunError, TlRayError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EXIT_CODES = """\
exit codes:
  0    success (also --help, --version and --print-config)
  1    the run started and failed: a training worker, a sweep trial or Ray failed ("training failed: ..."),
       no trial of a sweep finished an epoch, or an unexpected error (printed with its traceback)
  2    usage error: a bad flag, a bad --config file (unknown key, wrong type) or option value, or an input
       tl-ray refuses (a --data folder that does not exist, a --weights file that is not a state dict, a
       checkpoint without meta.json, classes whose every file is unreadable, --format onnx without the onnx
       package); the same command fails the same way until the command or the input is fixed
  130  interrupted (Ctrl-C); rerun the same train or tune command to resume
"""


def _add_options(parser: argparse.ArgumentParser, config_class: type, only: Sequence[str] = ()) -> None:
    """The flags of a config's options (``only``: some of them), made from its fields: the type from the
    annotation, the help from ``config.option``, the default from the dataclass. Options the class declares
    itself come first (tune's before the train ones it inherits); its IGNORED ones get no flag.

    Every default is SUPPRESS, so the namespace holds only the flags given: they override the --config file.
    """
    hints = typing.get_type_hints(config_class)
    bases = [base for base in config_class.__mro__[1:] if dataclasses.is_dataclass(base)]
    inherited = {field.name for base in bases for field in dataclasses.fields(base)}
    fields = sorted(dataclasses.fields(config_class), key=lambda field: field.name in inherited)
    defaults = config_class()
    for field in fields:
        if field.name in getattr(config_class, "IGNORED", ()) or (only and field.name not in only):
            continue
        _add_flag(parser, field, hints[field.name], getattr(defaults, field.name))


def _add_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, hint: Any, default: Any) -> None:
    text = _help(field)
    kinds = set(typing.get_args(hint)) - {type(None)} if isinstance(hint, types.UnionType) else {hint}
    if "negative" in field.metadata:  # --gpu / --cpu
        negative, negative_text = field.metadata["negative"]
        pair = parser.add_mutually_exclusive_group()
        pair.add_argument(flag(field.name), dest=field.name, action="store_true", default=SUPPRESS, help=text)
        pair.add_argument(flag(negative), dest=field.name, action="store_false", default=SUPPRESS, help=negative_text)
    elif bool in kinds:
        parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, default=SUPPRESS, help=text)
    else:
        kind = str if str in kinds else kinds.pop()  # num_workers: 4 or 1-4, made an int by merge where it is one
        suffix = f" (default: {default})" if default is not None and "default:" not in text else ""
        parser.add_argument(flag(field.name), type=kind, default=SUPPRESS, help=text + suffix)


def _help(field: dataclasses.Field) -> str:
    return field.metadata["help"].replace("%", "%%")  # argparse formats help with %


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of train and tune besides their options'."""
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of the same options (underscores; lists for the list options); flags override it",
    )
    _add_verbose(parser)
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (--config, flags and the recipe's defaults) as YAML that --config"
        " reads back, and exit without running",
    )


def _source_options(args: argparse.Namespace) -> SourceOptions:
    return SourceOptions(**{key: getattr(args, key) for key in SOURCE_KEYS if hasattr(args, key)}).validate()


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own output: its workers' logs (per-worker reports, Ray Data's execution plans),"
        " Ray Data's progress bars and Tune's status table",
    )


def _per_class(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 4:
        raise argparse.ArgumentTypeError(f"must be at least 4 (every class needs train and val images); got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-ray",
        description="Transfer learning of torchvision image classifiers (ResNet, ConvNeXt, EfficientNet, ViT) on Ray.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tl-ray {__version__}")
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=functools.partial(
            argparse.ArgumentParser, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
        ),
    )

    sample = commands.add_parser("sample-data", help="write synthetic source/ and target/ datasets")
    sample.add_argument("out", help="folder to write OUT/source/ and OUT/target/ into")
    sample.add_argument(
        "--per-class",
        type=_per_class,
        default=200,
        help="images per class of source/; target/ gets a tenth as many training images (default: 200)",
    )
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    train = commands.add_parser("train", help="fine-tune a pretrained backbone on your images")
    _add_options(train, TrainConfig)
    _add_config_flags(train)

    lr_find = commands.add_parser(
        "lr-find",
        help="suggest a learning rate: an LR range test on your data (what --lr auto runs), with its plot",
        description="Trains from the run's starting weights for up to --steps optimizer steps while the learning"
        " rate grows exponentially from --start-lr to --end-lr, on the batches train would take (same data, cache,"
        " model, freeze depth, optimizer and batch size), and stops when the loss diverges. Suggests fastai's valley"
        " rate and writes lr_find.png (loss against rate) and lr_find.json to STORAGE/NAME. Pass the suggestion to"
        " train as --lr, or let train --lr auto run the same test.",
    )
    _add_options(lr_find, LrFindConfig)
    _add_config_flags(lr_find)

    sweep = commands.add_parser("tune", help="compare freeze depths x learning rates with Ray Tune; report the best")
    _add_options(sweep, TuneConfig)
    _add_config_flags(sweep)

    predict = commands.add_parser("predict", help="classify images with a checkpoint (Ray Data batch inference)")
    predict.add_argument("--checkpoint", required=True, help="a tl-ray checkpoint (a sweep's best/): path or URI")
    predict.add_argument(
        "--data",
        required=True,
        help="an image, a folder of images (recursive), a manifest (.csv, .tsv, .jsonl, .parquet of paths) or Parquet"
        " files holding images (a file, folder or glob; rows written as FILE#ROW); a path or URI",
    )
    predict.add_argument("--out", required=True, help="predictions file: .csv or .parquet, a path or URI")
    predict.add_argument("--top-k", type=int, default=3, help="classes listed per image (default: 3)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    predict.add_argument(
        "--concurrency", type=int, default=None, help="model actors (default: one per GPU, or 1 on CPU)"
    )
    _add_options(predict, SourceOptions, ("path_column", "image_column"))
    _add_verbose(predict)

    evaluate = commands.add_parser("evaluate", help="accuracy, per-class metrics and confusion matrix on DIR/<class>/")
    evaluate.add_argument("--checkpoint", required=True, help="a tl-ray checkpoint folder, a path or URI")
    evaluate.add_argument(
        "--data",
        required=True,
        help="labelled images: a folder of <class>/ image folders named as in training, or any source train reads"
        " (every item of it is scored)",
    )
    evaluate.add_argument("--out", default=None, help="folder or URI: metrics.json, confusion.png, misclassified.csv")
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    _add_options(evaluate, SourceOptions)
    _add_verbose(evaluate)

    inspect = commands.add_parser(
        "inspect",
        help="what a run would train on: source, classes and counts per split, skipped items, image sizes",
    )
    train_fields = TrainConfig.__dataclass_fields__
    inspect.add_argument("--data", required=True, help=_help(train_fields["data"]))
    inspect.add_argument("--val-data", default=None, help=_help(train_fields["val_data"]))
    inspect.add_argument(
        "--val-fraction", type=float, default=TrainConfig().val_fraction, help=_help(train_fields["val_fraction"])
    )
    _add_options(inspect, SourceOptions)
    inspect.add_argument(
        "--decode",
        action="store_true",
        help="decode every item (as the cache build will) to list every one that will be skipped; by default only"
        " the listing's checks, and a sample's headers for the sizes",
    )

    export = commands.add_parser(
        "export",
        help="write a checkpoint as one TorchScript or ONNX file that runs without tl-ray",
        description="The file takes uint8 RGB images (N, 3, S, S), already resized and centre-cropped, and returns"
        " softmax probabilities (N, classes); scaling, normalisation and softmax are inside it. The metadata (classes,"
        " the resize and crop to do before, the input contract) is embedded in the file and written to OUT.json.",
    )
    export.add_argument("--checkpoint", required=True, help="a tl-ray checkpoint folder (e.g. a sweep's best/) or URI")
    export.add_argument("--format", required=True, choices=("torchscript", "onnx"), help="torchscript | onnx")
    export.add_argument("--out", required=True, help="file or URI to write: model.ts, model.onnx; OUT.json beside")

    report = commands.add_parser("report", help="(re)write the report of a finished or interrupted sweep")
    report.add_argument("run_dir", help="the sweep's folder: STORAGE/NAME (a path or URI)")
    return parser


def _options(namespace: argparse.Namespace, skip: Sequence[str]) -> dict[str, Any]:
    return {key: value for key, value in vars(namespace).items() if key not in skip}


def _print_train_result(result, rows_printed: int) -> None:
    """The run's outcome; its epochs too when none were printed as they ended (a run resumed after its last)."""
    from tl_ray.console import EPOCH_HEADER, epoch_row

    if not rows_printed:
        print(EPOCH_HEADER)
        for row in result.history:
            print(epoch_row(row, len(result.history), 0.0))
    print()
    if result.monitor != "val_acc":
        print(f"best {result.monitor:<11} {result.metrics[result.monitor]:.3f} (epoch {result.metrics['epoch']})")
        print(f"val_acc          {result.metrics['val_acc']:.3f} (that epoch)")
    else:
        print(f"best val_acc     {result.metrics['val_acc']:.3f} (epoch {result.metrics['epoch']})")
    recall = result.metrics.get("val_recall") or {}
    if recall:
        lowest = sorted(recall.items(), key=lambda item: math.inf if item[1] is None else item[1])
        shown = ", ".join(f"{name} {'-' if value is None else f'{value:.3f}'}" for name, value in lowest[:10])
        more = f"; {len(lowest) - 10} more in result.json" if len(lowest) > 10 else ""
        print(f"val recall       {shown} (lowest first{more})")
    print(f"best checkpoint  {result.best_checkpoint}")
    print(f"run folder       {result.run_dir} (result.json)")
    print(f"tensorboard      {result.tensorboard}")
    print(f"skipped files    {len(result.skipped_files)}")
    for item in result.skipped_files[:20]:
        print(f"  {item['path']}: {item['reason']}")
    if len(result.skipped_files) > 20:
        print(f"  ... and {len(result.skipped_files) - 20} more, listed in result.json")


def _print_lr_finding(finding) -> None:
    curve = finding.curve
    how = "the loss diverged" if curve.stopped == "diverged" else "it reached --end-lr"
    print(f"suggested lr     {finding.suggestion:.2e} (valley; pass it to train as --lr, or use --lr auto)")
    print(f"range test       {len(curve.lrs)} steps, {curve.lrs[0]:.1e} to {curve.lrs[-1]:.1e} ({how})")
    print(f"plot             {finding.plot}")
    print(f"curve            {finding.json}")


def _print_sweep(summary, written: dict[str, str]) -> None:
    from tl_ray.report import table, verdict

    print()
    print(table(summary))
    print()
    best = summary.best
    for line in verdict(summary):
        print(line.removeprefix("- ").replace("**", ""))
    if best is not None:
        score = "" if summary.monitor == "val_acc" else f" {summary.monitor} {getattr(best, summary.monitor):.3f},"
        print(
            f"best trial       freeze depth {best.freeze_depth}, {best.strategy}, lr {best.lr:.2e}:{score}"
            f" val_acc {best.val_acc:.3f}"
        )
        print(f"best checkpoint  {summary.best_checkpoint or best.checkpoint}")
    print(f"report           {written['markdown']}")
    print(f"plot             {written['plot']}")
    print(f"results          {written['csv']}")
    print(f"tensorboard      tensorboard --logdir {summary.run_dir}")


def _print_evaluation(evaluation, out: str | None) -> None:
    metrics = evaluation.metrics
    print(f"{'class':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
    for name, row in metrics["per_class"].items():
        print(f"{name:<20} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>6.3f} {row['support']:>8}")
    macro = metrics["macro"]
    print(
        f"{'macro':<20} {macro['precision']:>9.3f} {macro['recall']:>7.3f} {macro['f1']:>6.3f} {metrics['images']:>8}"
    )
    print()
    print(f"accuracy         {metrics['accuracy']:.4f} on {metrics['images']} images")
    print(f"misclassified    {len(evaluation.misclassified)}")
    if metrics["undecodable"]:
        print(f"undecodable      {len(metrics['undecodable'])}")
    if out:
        print(f"written to       {out}/metrics.json, confusion.png, misclassified.csv")


def _print_inspection(found) -> None:
    from tl_ray.inspection import size_summary

    print(f"data             {found.data}")
    print(f"source           {found.source}")
    print(f"validation       {found.val_rule}")
    train, val = found.counts["train"], found.counts["val"]
    print(f"classes          {len(found.class_names)} (in this order; the checkpoint records it)")
    print(f"  {'class':<24} {'train':>8} {'val':>8}")
    for name in found.class_names:
        print(f"  {name:<24} {train[name]:>8} {val[name]:>8}")
    print(f"  {'total':<24} {sum(train.values()):>8} {sum(val.values()):>8}")
    low = min(train, key=train.get)
    print(f"imbalance        {found.imbalance:.1f}x (largest training class over the smallest, {low})")
    what = "decoded every item" if found.decoded else "the listing's checks; --decode decodes every item"
    print(f"skipped          {len(found.skipped)} ({what})")
    for shown, reason in found.skipped[:20]:
        print(f"  {shown}: {reason}")
    if len(found.skipped) > 20:
        print(f"  ... and {len(found.skipped) - 20} more")
    for note in found.notes:
        print(f"note             {note}")
    sizes = found.sizes
    print(
        f"image sizes      width {size_summary(sizes['width'])}, height {size_summary(sizes['height'])}"
        f" (min / median / max of {len(sizes['width'])} of {found.sampled} {'items' if found.decoded else 'sampled'})"
    )


def _print_export(result) -> None:
    from tl_ray.deployable import METADATA_KEY

    meta = result.metadata
    size, resize, names = meta["image_size"], meta["resize_size"], meta["class_names"]
    print(f"wrote {result.format} {result.path} ({result.size / 1e6:.1f} MB)")
    print(f"input            {meta['input']['name']}: uint8 RGB (N, 3, {size}, {size}), values 0-255")
    print(f"                 (resize the short side to {resize}, centre-crop {size}: not in the file)")
    print(f"output           {meta['output']['name']}: float32 (N, {len(names)}), softmax over {', '.join(names)}")
    print(f"metadata         {result.sidecar} (also inside the file: {METADATA_KEY})")


def exit_code(error: BaseException) -> int:
    """The exit code an exception ends `tl-ray` with (see EXIT_CODES).

    A UsageError is a mistake in the command; a RunError a run that started and failed. A plain TlRayError is an
    input tl-ray refused (a usage error: fixing the input is the only cure), unless it reports a failure inside Ray
    (its cause is one of Ray's exceptions, as in "training failed: ..."). Anything else is unexpected: a failure.
    """
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, TlRayError) and not isinstance(error, RunError) and not _failed_in_ray(error):
        return EXIT_USAGE
    return EXIT_FAILED


def _failed_in_ray(error: BaseException) -> bool:
    """Whether ``error`` or what it was raised from (as a traceback would show) is one of Ray's exceptions."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if type(link).__module__.split(".")[0] == "ray":
            return True
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return False


def _message(error: TlRayError) -> str:
    """The error's one line. Ray re-raises a TlRayError from a task as a class derived from both, whose text is
    Ray's whole traceback; its ``cause`` is the original."""
    cause = getattr(error, "cause", None)
    return str(cause if isinstance(cause, TlRayError) else error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `tl-ray` command; return its exit code (a bad flag: argparse prints the usage and exits 2)."""
    args = build_parser().parse_args(argv)
    forbid_world_writable_files()
    resume = "; rerun the same command to resume" if args.command in ("train", "tune") else ""
    try:
        code = _run(args)
        sys.stdout.flush()  # a reader that left (`tl-ray inspect ... | head`) is found here, not at exit
        return code
    except BrokenPipeError:
        # The reader has what it wanted; the command's work is done (a run's checkpoints are written). Python's
        # own recipe: point stdout at /dev/null so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt as error:
        print(f"tl-ray: interrupted{resume}", file=sys.stderr)
        return exit_code(error)
    except SystemExit as exiting:
        # Ray Train's Ctrl-C handler ends a run with sys.exit(0) from inside fit(): an interruption, not a
        # success. Any other exit (Ray's SIGTERM handler: sys.exit(15)) keeps its code.
        if exiting.code not in (0, None):
            raise
        print(f"tl-ray: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TlRayError as error:
        print(f"tl-ray: error: {_message(error)}", file=sys.stderr)
        return exit_code(error)
    except Exception as error:  # a bug, or a failure nothing above anticipated: the traceback says where
        traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"tl-ray: error: unexpected {type(error).__name__}: {first_line}", file=sys.stderr)
        return exit_code(error)


def _run(args: argparse.Namespace) -> int:
    if args.command == "sample-data":
        import tl_ray

        counts = tl_ray.write_sample_data(args.out, args.per_class, args.seed)
        for task, count in counts.items():
            print(f"wrote {count} images to {args.out}/{task}")
        return EXIT_OK
    if args.command in ("train", "tune", "lr-find"):
        config_class = {"train": TrainConfig, "tune": TuneConfig, "lr-find": LrFindConfig}[args.command]
        config = merge(config_class, args.config, _options(args, ("command", "config", "print_config", "verbose")))
        if args.print_config:
            print(_resolved_yaml(args.command, config), end="")
            return EXIT_OK
        config = config.validate()  # before tl_ray.training/sweep import torch and Ray
        _quiet_ray(args)
        if args.command == "train":
            from tl_ray.training import run as run_training

            with _console() as console:
                result = run_training(config, on_event=console)
            _print_train_result(result, console.rows)
            return EXIT_OK
        if args.command == "lr-find":
            from tl_ray.training import find_lr

            with _console() as console:
                finding = find_lr(config, on_event=console)
            _print_lr_finding(finding)
            return EXIT_OK
        from tl_ray.sweep import sweep

        with _console(len(config.search_points()), config.max_epochs) as console:
            summary, written = sweep(config, on_event=console)
        _print_sweep(summary, written)
        if summary.best is None:
            raise RunError(f"no trial of sweep {summary.run_dir} finished an epoch; see the trial errors above")
        return EXIT_OK
    if args.command == "predict":
        from tl_ray.inference import predict

        _quiet_ray(args)
        with _console() as console:
            rows = predict(
                args.checkpoint,
                args.data,
                args.out,
                args.top_k,
                args.batch_size,
                args.concurrency,
                console,
                _source_options(args),
            )
        errors = int((rows["error"] != "").sum())
        print(f"wrote {len(rows)} predictions to {args.out} ({errors} files could not be decoded)")
        return EXIT_OK
    if args.command == "evaluate":
        from tl_ray.inference import evaluate

        _quiet_ray(args)
        with _console() as console:
            evaluation = evaluate(args.checkpoint, args.data, args.out, args.batch_size, console, _source_options(args))
        _print_evaluation(evaluation, args.out)
        return EXIT_OK
    if args.command == "inspect":
        from tl_ray.inspection import inspect

        _print_inspection(inspect(args.data, args.val_fraction, _source_options(args), args.val_data, args.decode))
        return EXIT_OK
    if args.command == "export":
        from tl_ray.deployable import export

        _print_export(export(args.checkpoint, args.out, args.format))
        return EXIT_OK
    if args.command == "report":
        from tl_ray.sweep import finalize

        _print_sweep(*finalize(args.run_dir))
        return EXIT_OK
    raise AssertionError(f"unhandled command {args.command}")


def _quiet_ray(args: argparse.Namespace) -> None:
    """Ray's own output off unless --verbose: the console shows one row per epoch (or trial) instead."""
    from tl_ray.cluster import quiet_ray

    quiet_ray(args.verbose)


@contextlib.contextmanager
def _console(trials: int = 0, max_epochs: int = 0):
    from tl_ray.console import Console

    console = Console(trials, max_epochs)
    try:
        yield console
    finally:
        console.close()


def _resolved_yaml(command: str, config: TrainConfig) -> str:
    """`--print-config`: the config validated, with what the config resolves by itself filled in (train: the
    recipe's learning rate, weight decay, warm-up and strategy; tune: a trial's epochs), as YAML for --config.

    Without --data the rest is still checked and resolved, and data is written as null: a template to fill in.
    """
    resolved = dataclasses.replace(config, data=config.data or "DATA").validate()
    lines = [f"# tl-ray {command}: the resolved configuration (tl-ray {__version__}); run it with"]
    lines.append(f"#   tl-ray {command} --config FILE")
    rule = f"{recipe.BATCH_SIZE}, or the whole training set when smaller, at least 2 a worker"
    lr_rule = ""
    if resolved.lr is None and "lr" not in resolved.IGNORED:
        rates = ", ".join(f"{rate:.2g}" for rate in recipe.lr_candidates(resolved.recipe_lr()))
        halves = ", ".join(f"{resolved.recipe_lr() * factor:.2g}" for factor in recipe.SELECT_HALF_BATCH_FACTORS)
        lr_rule = (
            f"at most {recipe.SELECT_MAX_TRAIN} training images: select, trying {rates}, and {halves} at half the"
            " batch where that is still 2 images a worker, for all the epochs each, then training at the best; more:"
            f" the recipe's {resolved.recipe_lr():g}"
        )
    if not config.data:
        resolved = dataclasses.replace(resolved, data=None)
        lines.append("# data is not set: fill it in, or pass --data, before running")
        if resolved.batch_size is None:
            lines.append(f"# batch_size: null: chosen from the training set's size when it runs ({rule})")
        if lr_rule:
            lines.append(f"# lr: null: chosen from the training set's size when it runs ({lr_rule})")
    elif resolved.batch_size is None or resolved.lr is None:
        from tl_ray.inputs import sources  # imports Ray: only when the training set must be listed
        from tl_ray.training.schedule import steps_per_epoch

        try:
            options = resolved.source_options()
            num_train = len(sources.discover(resolved.data, resolved.val_fraction, options, resolved.val_data).train)
        except TlRayError as error:  # the run itself will refuse it; the template is still worth printing
            if resolved.batch_size is None:
                lines.append(f"# batch_size: null: chosen from the training set's size when it runs ({rule});")
            if lr_rule:
                lines.append(f"# lr: null: chosen from the training set's size when it runs ({lr_rule});")
            lines.append(f"#   the training set could not be listed: {error}")
        else:
            batch_from_size = resolved.batch_size is None
            resolved = resolved.for_training_set(num_train)
            steps = steps_per_epoch(num_train, resolved.batch_size, resolved.max_workers)
            if batch_from_size:
                lines.append(
                    f"# batch_size: from the training set's size: {num_train} training images ->"
                    f" {resolved.batch_size}, {steps} step{'s' if steps != 1 else ''} an epoch ({rule})"
                )
            if lr_rule:
                chosen = resolved.lr if isinstance(resolved.lr, str) else f"{resolved.lr:g}"
                lines.append(f"# lr: from the training set's size: {num_train} training images -> {chosen} ({lr_rule})")
    if isinstance(resolved, TuneConfig):
        points = resolved.search_points()
        trials: dict[tuple[int, str], list[str]] = {}
        for point in points:
            if "weights" not in point:  # the scratch baseline is named below
                trials.setdefault((point["freeze_depth"], point["strategy"]), []).append(f"{point['lr']:g}")
        depths = ", ".join(str(depth) for depth in resolved.depths())
        lines.append(
            f"# the grid: {len(points)} trials: freeze depths {depths} x strategies"
            f" {', '.join(resolved.strategy_names())} x learning rates"
            + (f" (depth {NUM_STAGES} once)" if NUM_STAGES in resolved.depths() else "")
            + (", and the scratch baseline" if resolved.scratch_baseline else "")
            + ": "
            + "; ".join(f"depth {depth} {strategy} {', '.join(rates)}" for (depth, strategy), rates in trials.items())
        )
    return "\n".join(lines) + "\n" + to_yaml(resolved)


if __name__ == "__main__":
    sys.exit(main())

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
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from tl_ray import __version__, recipe
from tl_ray.config import (
    ARCHS,
    CLASS_WEIGHTS,
    LOGGERS,
    MONITORS,
    NUM_STAGES,
    OPTIMIZERS,
    SourceOptions,
    TrainConfig,
    TuneConfig,
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

SOURCE_HELP: dict[str, tuple[Any, str]] = {
    # How --data's items are labelled and split: every command that reads --data takes these (SourceOptions).
    "label_pattern": (
        str,
        "labels in the file names: a regex searched in each image's name, the label its group 'label' or group 1"
        " (cat.0.jpg: '^(\\w+)\\.'); files that do not match are skipped and reported",
    ),
    "path_column": (str, "a manifest's column of image paths (relative to the manifest's folder, absolute, or URIs)"),
    "label_column": (str, "a manifest's or Parquet's column of labels: class names, or integer ids"),
    "split_column": (str, "a manifest's or Parquet's column of splits, train or val (if it has one)"),
    "image_column": (
        str,
        "Parquet's column of encoded images, binary or {bytes, path} (default: the one named image, else the first"
        " that holds images)",
    ),
}

TRAIN_HELP: dict[str, tuple[Any, str]] = {
    # key: (argparse type, help). Defaults come from TrainConfig so they are stated once.
    "data": (
        str,
        "the dataset: ROOT/train/<class>/*.jpg (+ optional ROOT/val/); a flat folder with --label-pattern; a"
        " manifest FILE.csv|.tsv|.jsonl|.parquet of path,label[,split]; or Parquet files holding the images (a file,"
        " folder or glob; Hugging Face's train-*/validation-* recognised). A path or a URI (s3://, gs://, abfs://,"
        " hdfs://; an S3-compatible endpoint as ?endpoint_override=HOST:PORT&scheme=http or AWS_ENDPOINT_URL)",
    ),
    "val_data": (str, "a validation set stored elsewhere, any source --data takes (replaces --data's own val split)"),
    **SOURCE_HELP,
    "arch": (str, f"backbone: {', '.join(ARCHS)}"),
    "weights": (
        str,
        "imagenet | a torchvision weights name (IMAGENET1K_V1) | none | a .pth state dict | a tl-ray checkpoint dir"
        " (paths or URIs)",
    ),
    "freeze_depth": (
        int,
        f"freeze the first N of the {NUM_STAGES} backbone stages: {NUM_STAGES} = feature extraction, 0 = full"
        f" fine-tuning (default: {NUM_STAGES}; 0 with --weights none)",
    ),
    "epochs": (int, "number of epochs"),
    "lr": (
        float,
        "the head's peak learning rate, after warm-up, then cosine decay (default: the recipe's for the optimizer:"
        f" {recipe.LR['adamw']} for adamw, {recipe.LR['sgd']} for sgd; at --freeze-depth 5"
        f" {recipe.HEAD_ONLY_LR['adamw']} and {recipe.HEAD_ONLY_LR['sgd']}; discriminative and probe"
        f" {recipe.DISCRIMINATIVE_HEAD_LR['adamw']} and {recipe.DISCRIMINATIVE_HEAD_LR['sgd']})",
    ),
    "optimizer": (
        str,
        f"{' | '.join(OPTIMIZERS)} (default: auto: sgd at --freeze-depth {NUM_STAGES}, where a head alone trains, adamw"
        " otherwise; tl_ray/recipe.py says why)",
    ),
    "momentum": (float, "SGD momentum (with --optimizer sgd; Nesterov)"),
    "weight_decay": (
        float,
        "weight decay, never on BatchNorm weights or biases (default: the recipe's for --optimizer:"
        f" {recipe.WEIGHT_DECAY['adamw']} for adamw, {recipe.WEIGHT_DECAY['sgd']} for sgd)",
    ),
    "warmup_epochs": (float, "linear LR warm-up length, in epochs (default: 5%% of the run, at most 1 epoch)"),
    "strategy": (
        str,
        "how the unfrozen backbone trains: plain (one learning rate) | discriminative (backbone at 0.1 x --lr) |"
        " probe (the head alone for a fifth of the epochs, then discriminative) | auto (plain, from any start:"
        " see BENCHMARKS.md)",
    ),
    "backbone_lr_mult": (float, "the backbone's learning rate as a multiple of --lr (default: the strategy's)"),
    "head_epochs": (int, "epochs of the head alone before unfreezing to --freeze-depth (default: the strategy's)"),
    "train_bn": (
        bool,
        "BatchNorm of the fine-tuned stages updates its running statistics (--no-train-bn keeps the starting"
        " ones: for small per-worker batches)",
    ),
    "sync_bn": (bool, "synchronise BatchNorm statistics across GPU workers (SyncBatchNorm)"),
    "label_smoothing": (float, "label smoothing of the cross-entropy loss"),
    "class_weights": (
        str,
        f"{' | '.join(CLASS_WEIGHTS)}: auto weighs each class's training loss by n / (classes x n_class), from the"
        " training images' counts, so rare classes count as much as common ones (validation loss stays unweighted)",
    ),
    "monitor": (
        str,
        f"{' | '.join(MONITORS)}: the validation metric that picks the best checkpoint (val_loss: lowest) and, in"
        " tune, ranks and early-stops trials; macro_f1 (the mean of per-class F1) suits imbalanced classes",
    ),
    "batch_size": (
        int,
        "global batch size, split evenly over the workers (default: chosen once the training set is listed:"
        f" {recipe.BATCH_SIZE}, or the whole set when smaller, and at least 2 a worker)",
    ),
    "image_size": (int, "training crop size in pixels"),
    "val_fraction": (float, "share of train/ held out for validation when there is no val/ folder"),
    "color_jitter": (float, "colour jitter strength for training augmentation (0 = off)"),
    "augment": (
        str,
        f"auto: none at --freeze-depth {NUM_STAGES} (a head alone), else light below 128 px, else standard |"
        " standard: random crops of 25-100%% of the image and flips |"
        " light: crops of 60-100%% and flips | none: training images centre-cropped like validation ones;"
        " at --freeze-depth 5 with the cache on, the backbone's features are then computed once and only the head"
        " trains",
    ),
    "num_workers": (
        str,
        "data-parallel training workers (one GPU each on a GPU cluster); MIN-MAX (1-4): elastic, as many as the"
        " alive nodes fit: a lost node shrinks the group, a new one grows it at the next --resize-interval check,"
        " each time from the last checkpoint",
    ),
    "cpus_per_worker": (
        float,
        "CPUs reserved per worker, and its torch threads on CPU (default: reserve all but one CPU (or half the"
        " machine) for the data pipeline, and use the node's cores, shared by its workers)",
    ),
    "storage": (
        str,
        "where runs are written: a local folder or a URI (s3://bucket/path, gs://..., endpoint as for --data); on a"
        " multi-node cluster or in a Ray job it must be shared storage (a URI or an NFS folder), checked writable"
        " before the run starts",
    ),
    "cache": (
        str,
        "decoded-image cache: auto (under --storage/.tl-ray-cache) | a folder or URI | none (decode every epoch);"
        " images are decoded and resized once, and reused by later epochs, runs and sweep trials",
    ),
    "name": (str, "run name: its folder under --storage; rerunning a name resumes it (default: train-<timestamp>)"),
    "keep_checkpoints": (int, "keep the best N checkpoints by --monitor (the latest is always kept too)"),
    "max_failures": (int, "restart failed training workers from the last checkpoint up to N times (-1: forever)"),
    "resource_timeout": (
        float,
        "seconds a run may wait for its workers' resources (at the start, or after losing a node) before it fails"
        " with an error; 0: wait forever",
    ),
    "resize_interval": (
        float,
        "elastic --num-workers MIN-MAX: seconds between checks for room to grow the worker group (each growth"
        " restarts the group from the last checkpoint)",
    ),
    "seed": (int, "random seed for the new head's initialisation and the workers"),
    "logger": (
        str,
        f"{' | '.join(LOGGERS)}: also log every epoch to Weights & Biases or MLflow (TensorBoard files are always"
        " written to the run folder's tensorboard/), configured by their variables: WANDB_MODE (offline),"
        " WANDB_API_KEY, MLFLOW_TRACKING_URI; tune logs one tracker run per trial",
    ),
    "logger_project": (
        str,
        "the W&B project or MLflow experiment (default: WANDB_PROJECT or MLFLOW_EXPERIMENT_NAME, else tl-ray)",
    ),
}


TUNE_HELP: dict[str, tuple[Any, str]] = {
    # The list options take comma-separated text here; in --config, a YAML list too (freeze_depths: [0, 3, 5]).
    "freeze_depths": (str, "comma-separated freeze depths to compare (0,3,5), each a grid point"),
    "strategies": (
        str,
        "comma-separated fine-tuning strategies to compare (plain,probe; see --strategy); depth 5 runs once",
    ),
    "lrs": (str, "comma-separated learning rates (1e-3,3e-3), each tried at every depth and strategy"),
    "lr_min": (float, "without --lrs: lowest learning rate of the grid (default: the recipe's / 3)"),
    "lr_max": (float, "without --lrs: highest learning rate of the grid (default: the recipe's x 3)"),
    "num_samples": (
        int,
        "without --lrs: learning rates, log-spaced from --lr-min to --lr-max, each tried at every depth and"
        " strategy (1: the recipe's rate)",
    ),
    "max_epochs": (int, "epochs per trial (ASHA may stop a trial sooner)"),
    "scheduler": (str, "asha: stop weak trials early on --monitor | fifo: run every trial to the end"),
    "max_concurrent": (int, "trials at once (default: GPUs / --num-workers on a GPU cluster, else 1)"),
    "scratch_baseline": (
        bool,
        "also train from random weights (full fine-tuning, never stopped early): the report shows what transfer gains",
    ),
}


def _add_option(parser: argparse.ArgumentParser, key: str, kind: Any, text: str, default: Any) -> None:
    suffix = f" (default: {default})" if default is not None and key != "name" and "default:" not in text else ""
    if kind is bool:
        parser.add_argument(
            "--" + key.replace("_", "-"), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
        )
        return
    parser.add_argument("--" + key.replace("_", "-"), type=kind, default=argparse.SUPPRESS, help=text + suffix)


def _add_train_options(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    defaults = TrainConfig()
    for key, (kind, text) in TRAIN_HELP.items():
        if key in skip:
            continue
        _add_option(parser, key, kind, text, getattr(defaults, key))
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="gpu", action="store_true", default=argparse.SUPPRESS, help="train on GPUs")
    device.add_argument("--cpu", dest="gpu", action="store_false", default=argparse.SUPPRESS, help="train on CPUs")
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


def _add_source_options(parser: argparse.ArgumentParser, only: Sequence[str] = ()) -> None:
    """The source flags (SourceOptions) of a command that reads --data without training (``only``: some of them)."""
    defaults = SourceOptions()
    for key, (kind, text) in SOURCE_HELP.items():
        if not only or key in only:
            _add_option(parser, key, kind, text, getattr(defaults, key))


def _source_options(args: argparse.Namespace) -> SourceOptions:
    return SourceOptions(**{key: getattr(args, key) for key in SOURCE_HELP if hasattr(args, key)}).validate()


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
        description="Transfer learning of ResNet image classifiers on Ray (Data, Train, Tune).",
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

    train = commands.add_parser("train", help="fine-tune a pretrained ResNet on a folder of images")
    _add_train_options(train)

    sweep = commands.add_parser("tune", help="compare freeze depths x learning rates with Ray Tune; report the best")
    defaults = TuneConfig()
    for key, (kind, text) in TUNE_HELP.items():
        _add_option(sweep, key, kind, text, getattr(defaults, key))
    _add_train_options(sweep, skip=("freeze_depth", "lr", "epochs", "strategy"))

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
    _add_source_options(predict, ("path_column", "image_column"))
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
    _add_source_options(evaluate)
    _add_verbose(evaluate)

    inspect = commands.add_parser(
        "inspect",
        help="what a run would train on: source, classes and counts per split, skipped items, image sizes",
    )
    inspect.add_argument("--data", required=True, help=TRAIN_HELP["data"][1])
    inspect.add_argument("--val-data", default=None, help=TRAIN_HELP["val_data"][1])
    inspect.add_argument(
        "--val-fraction", type=float, default=TrainConfig().val_fraction, help=TRAIN_HELP["val_fraction"][1]
    )
    _add_source_options(inspect)
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
        return _run(args)
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
    if args.command in ("train", "tune"):
        config_class = TrainConfig if args.command == "train" else TuneConfig
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
    if not config.data:
        resolved = dataclasses.replace(resolved, data=None)
        lines.append("# data is not set: fill it in, or pass --data, before running")
        if resolved.batch_size is None:
            lines.append(f"# batch_size: null: chosen from the training set's size when it runs ({rule})")
    elif resolved.batch_size is None:
        from tl_ray.inputs import sources  # imports Ray: only when the training set must be listed
        from tl_ray.training.schedule import steps_per_epoch

        try:
            options = resolved.source_options()
            num_train = len(sources.discover(resolved.data, resolved.val_fraction, options, resolved.val_data).train)
        except TlRayError as error:  # the run itself will refuse it; the template is still worth printing
            lines.append(f"# batch_size: null: chosen from the training set's size when it runs ({rule});")
            lines.append(f"#   the training set could not be listed: {error}")
        else:
            resolved = resolved.for_training_set(num_train)
            steps = steps_per_epoch(num_train, resolved.batch_size, resolved.max_workers)
            lines.append(
                f"# batch_size: from the training set's size: {num_train} training images -> {resolved.batch_size},"
                f" {steps} steps an epoch ({rule})"
            )
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

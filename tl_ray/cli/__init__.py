"""The `tl-ray` command: the only package that parses arguments or prints.

``parser`` builds the flags from the commands' declarations, ``render`` prints what a command ends with, ``console``
what a run shows while it goes, ``print_config`` the --print-config YAML. The exit codes are ``tl_ray.errors``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from tl_ray.cli import render
from tl_ray.cli.parser import BY_NAME, VERBOSE, build_parser, given_options
from tl_ray.errors import EXIT_INTERRUPTED, EXIT_OK, RunError, TlRayError, UsageError, exit_code
from tl_ray.options import merge


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `tl-ray` command; return its exit code (a bad flag: argparse prints the usage and exits 2)."""
    from tl_ray.location import forbid_world_writable_files

    args = build_parser().parse_args(argv)
    forbid_world_writable_files()
    resume = "; rerun the same command to resume" if args.command in ("train", "tune") else ""
    try:
        code = _run(args)
        sys.stdout.flush()  # a reader that left (`tl-ray inspect ... | head`) is found here, not at exit
        return code
    except BrokenPipeError:
        # The reader has what it wanted; the command's work is done (a run's checkpoints are written).
        from tl_ray.cli.console import reader_left

        reader_left(sys.stdout)
        return EXIT_OK
    except KeyboardInterrupt as error:
        return _interrupted(resume, exit_code(error))
    except SystemExit as exiting:
        # Ray Train's Ctrl-C handler ends a run with sys.exit(0) from inside fit(): an interruption, not a
        # success. Any other exit (Ray's SIGTERM handler: sys.exit(15)) keeps its code.
        if exiting.code not in (0, None):
            raise
        return _interrupted(resume, EXIT_INTERRUPTED)
    except TlRayError as error:
        print(f"tl-ray: error: {message(error)}", file=sys.stderr)
        return exit_code(error)
    except Exception as error:  # a bug, or a failure nothing above anticipated: the traceback says where
        traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"tl-ray: error: unexpected {type(error).__name__}: {first_line}", file=sys.stderr)
        return exit_code(error)


def _interrupted(resume: str, code: int) -> int:
    """Ctrl-C: say so (and how to resume), then stop Ray here, deaf to another Ctrl-C, so that no traceback
    follows: Ray's own shutdown at exit, interrupted, printed one, and its threads could outlive the interpreter."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"tl-ray: interrupted{resume}", file=sys.stderr, flush=True)
    ray = sys.modules.get("ray")
    if ray is not None:
        with contextlib.suppress(BaseException):
            ray.shutdown()
    return code


def message(error: TlRayError) -> str:
    """The error's one line. Ray re-raises a TlRayError from a task as a class derived from both, whose text is
    Ray's whole traceback; its ``cause`` is the original."""
    cause = getattr(error, "cause", None)
    return str(cause if isinstance(cause, TlRayError) else error)


def _run(args: argparse.Namespace) -> int:
    """The command's config (its declared defaults < --config < flags), printed with --print-config, else checked
    (before torch and Ray are imported) and handed to the command."""
    command = BY_NAME[args.command]
    config = merge(command.config_class, args.config, given_options(args))
    if args.print_config:
        from tl_ray.cli.print_config import resolved_yaml

        print(resolved_yaml(args.command, config), end="")
        return EXIT_OK
    config = config.validate()
    if command.runs_ray:
        from tl_ray.cluster import quiet_ray

        quiet_ray(getattr(args, VERBOSE))  # Ray's own output off: the console shows one row per epoch or trial
    HANDLERS[args.command](config)
    return EXIT_OK


@contextlib.contextmanager
def _console(trials: int = 0, max_epochs: int = 0):
    from tl_ray.cli.console import Console

    console = Console(trials, max_epochs)
    try:
        yield console
    finally:
        console.close()


def _sample_data(config) -> None:
    from tl_ray.sample import write_sample_data

    for task, count in write_sample_data(config).items():
        print(f"wrote {count} images to {config.out}/{task}")


def _train(config) -> None:
    from tl_ray.training.driver import run

    with _console() as console:
        result = run(config, on_event=console)
    render.train_result(result, console.rows)


def _lr_find(config) -> None:
    from tl_ray.training.driver import find_lr

    with _console() as console:
        finding = find_lr(config, on_event=console)
    render.lr_finding(finding)


def _tune(config) -> None:
    from tl_ray.tuning.sweep import sweep

    with _console(len(config.search_points()), config.max_epochs) as console:
        summary, written = sweep(config, on_event=console)
    render.sweep(summary, written)
    if summary.best is None:
        raise RunError(f"no trial of sweep {summary.run_dir} finished an epoch; see the trial errors above")


def _predict(config) -> None:
    if config.out is None:  # the Python API may only return the rows; the command writes them
        raise UsageError("--out is required: a predictions file, .csv or .parquet")
    from tl_ray.inference.predict import predict

    with _console() as console:
        rows = predict(config, console)
    errors = int((rows["error"] != "").sum())
    print(f"wrote {len(rows)} predictions to {config.out} ({errors} files could not be decoded)")


def _evaluate(config) -> None:
    from tl_ray.inference.evaluate import evaluate

    with _console() as console:
        evaluation = evaluate(config, console)
    render.evaluation(evaluation, config.out)


def _audit(config) -> None:
    from tl_ray.auditing.run import audit

    with _console() as console:
        result = audit(config, console)
    render.audit(result)


def _inspect(config) -> None:
    from tl_ray.inputs.inspect import inspect

    render.inspection(inspect(config))


def _export(config) -> None:
    from tl_ray.inference.export import export

    render.export_result(export(config))


def _report(config) -> None:
    from tl_ray.tuning.sweep import finalize

    render.sweep(*finalize(config.run_dir))


def _archs(config) -> None:
    from tl_ray.backbones import listing

    rows = [row for row in listing(config.pattern or "") if row[2] or not config.pretrained]
    render.archs(rows)


# What each command does with its validated config (its options: cli.parser.COMMANDS).
HANDLERS: dict[str, Callable[[object], None]] = {
    "sample-data": _sample_data,
    "train": _train,
    "lr-find": _lr_find,
    "tune": _tune,
    "predict": _predict,
    "evaluate": _evaluate,
    "inspect": _inspect,
    "audit": _audit,
    "export": _export,
    "report": _report,
    "archs": _archs,
}

"""The exception types that mean "the user can fix this", and the exit code each gets: the one place the exit
codes are written (``EXIT_CODES`` is also the epilog of ``tl-ray --help``).

A ``UsageError`` exits 2, a ``RunError`` exits 1, and a plain ``TlRayError`` exits 2, unless it reports a failure
inside Ray (its cause is one of Ray's exceptions, as in "training failed: ..."), which exits 1 (``exit_code``).
"""


class TlRayError(Exception):
    """A user mistake or an unusable input: the CLI prints its message as one line, no traceback.

    Messages name the option or file at fault and say what to do about it.
    """


class UsageError(TlRayError):
    """The command line or config is wrong (an unknown key, a value of the wrong type or out of range).

    Raised before anything runs; rerunning the same command fails the same way.
    """


class RunError(TlRayError):
    """The run started and then failed (a worker, a trial, Ray itself): not a mistake in the command."""


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
    if isinstance(error, TlRayError) and not isinstance(error, RunError) and not failed_in_ray(error):
        return EXIT_USAGE
    return EXIT_FAILED


def failed_in_ray(error: BaseException) -> bool:
    """Whether ``error`` or what it was raised from (as a traceback would show) is one of Ray's exceptions."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if type(link).__module__.split(".")[0] == "ray":
            return True
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return False

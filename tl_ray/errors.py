"""The exception types that mean "the user can fix this", and which exit code each gets.

``tl-ray`` maps them (see ``tl_ray.cli``): a ``UsageError`` exits 2, a ``RunError`` exits 1,
and a plain ``TlRayError`` exits 2, unless it reports a failure inside Ray (its cause is one
of Ray's exceptions, as in "training failed: ..."), which exits 1.
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

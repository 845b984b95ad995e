"""The one exception type that means "the user can fix this"."""


class TlRayError(Exception):
    """A user mistake or an unusable input: the CLI prints its message as one line, no traceback.

    Messages name the option or file at fault and say what to do about it.
    """

"""User-facing errors: one line that names the file or value at fault."""


class InputError(ValueError):
    """Bad user input (data, lists, configs, arguments), raised before any long work starts.

    The CLI prints it as a single `error: ...` line and exits with status 2, without a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def check_positive_int(name: str, value) -> None:
    """A count given by the user (None: not given) must be an integer >= 1: 0 never silently means "the default"."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{name} {value!r}: must be a positive integer")

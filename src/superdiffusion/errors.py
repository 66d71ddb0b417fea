"""User-facing errors: one line that names the file or value at fault."""


class InputError(ValueError):
    """Bad user input (data, lists, configs, arguments), raised before any long work starts.

    The CLI prints it as a single `error: ...` line and exits with status 2, without a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

"""The one exception type that the CLI turns into a one-line error message."""


class LmforgeError(Exception):
    """A problem with the user's input or files, reported as one line without a traceback."""

"""The one exception type the data pipeline raises for bad input or bad data."""


class DataError(Exception):
    """A one-line, user-facing problem with a file: missing, corrupt, or not matching.

    The message always names the file, so the CLI prints it as is (no traceback).
    """

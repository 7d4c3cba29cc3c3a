"""The one exception type users see: a one-line message, exit code 2, no traceback."""


class ExaoneError(Exception):
    """Bad input or an unsupported request.

    The message names the file, field or flag and what was expected.
    """

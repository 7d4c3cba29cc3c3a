"""The one exception type users see: a one-line message, exit code 2, no traceback."""

from __future__ import annotations

import json
from pathlib import Path


class ExaoneError(Exception):
    """Bad input or an unsupported request.

    The message names the file, field or flag and what was expected.
    """


def read_json(path: Path):
    """A JSON file's value; a file that is not JSON is a one-line ExaoneError naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExaoneError(f"{path}: not valid JSON ({e})") from None

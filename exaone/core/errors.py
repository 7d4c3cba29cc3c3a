"""The errors the library raises: one-line messages, typed so callers can tell what was wrong.

`ExaoneError` is the base every caller catches (the CLI prints `error: <message>` and exits 2).
Subclasses carry what was wrong as data:
- `OptionError`: a value given for a named option (a library argument; the CLI renders it under the
  flag that sets it, e.g. option `max_new_tokens` as `--max_output_len`).
- `FileError`: a file (or directory) whose content is not what is expected, with the field.
- `Unsupported`: a valid request this version does not do ("not supported: why").
"""

from __future__ import annotations

import json
from pathlib import Path


class ExaoneError(Exception):
    """Bad input or an unsupported request: the message names the file, field or option and what
    was expected."""


class OptionError(ExaoneError):
    """A value given for a named option is wrong.

    `template` may say `{option}` and `{value}` anywhere; `str(e)` names the option as the library
    calls it, `e.render(name)` under another name (the CLI passes the flag)."""

    def __init__(self, option: str, value, problem: str = "", template: str = "{option} {value}: {problem}"):
        self.option, self.value, self.problem, self.template = option, value, problem, template
        super().__init__(self.render(option))

    def render(self, name: str) -> str:
        shown = repr(self.value) if isinstance(self.value, str) else self.value
        return self.template.format(option=name, value=shown, problem=self.problem)


def literal(text) -> str:
    """`text` as it reads, for an OptionError template (its braces escaped)."""
    return str(text).replace("{", "{{").replace("}", "}}")


class FileError(ExaoneError):
    """A file whose content is not what is expected; `field` names the part, when there is one."""

    def __init__(self, path: str | Path, problem: str, field: str | None = None):
        self.path, self.problem, self.field = Path(path), problem, field
        where = f"{path}: field {field!r}: " if field else f"{path}: "
        super().__init__(where + problem)


class Unsupported(ExaoneError):
    """A valid request this version does not do; the message says why and what to do instead."""


def read_json(path: Path):
    """A JSON file's value; a file that is not JSON is a one-line FileError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileError(path, f"not valid JSON ({e})") from None

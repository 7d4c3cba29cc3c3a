"""How library errors read on the command line: one line, `error: ...`, options named by their flags.

The library names an option as its Python argument (`OptionError.option`, e.g. `max_new_tokens`);
the CLI shows the flag a user types (`--max_output_len`), as huggingface_hub's CLI words its
library's typed errors.
"""

from __future__ import annotations

from exaone.core.errors import ExaoneError, OptionError

# Library option name -> the flag that sets it, where the two differ beyond the leading "--".
FLAGS = {
    "max_new_tokens": "--max_output_len",  # Sampling (run)
    "chat": "--apply_chat_template",  # runner.run / tokenizer.encode (run)
    "test_ours": "--test_engine",  # summarize Options
}


def flag_for(option: str) -> str:
    return FLAGS.get(option, f"--{option}")


def message(e: ExaoneError) -> str:
    if isinstance(e, OptionError):
        return e.render(flag_for(e.option))
    return str(e)

"""Subcommands whose issues have not landed yet: they say so and exit 2, and never pretend."""

from __future__ import annotations

import typer

from exaone.core.errors import ExaoneError

PLANNED = {
    "quantize": "Quantize a checkpoint with NVIDIA Model Optimizer (not implemented yet).",
    "convert": "Convert a checkpoint to the TensorRT-LLM checkpoint format (not implemented yet).",
    "build": "Build an engine directory for the fast runtime (not implemented yet).",
    "summarize": "ROUGE / perplexity of the engine against the Hugging Face reference (not implemented yet).",
}


def register(app: typer.Typer, names: list[str] | None = None):
    for name in names or list(PLANNED):
        _add(app, name)


def _add(app: typer.Typer, name: str):
    def command(args: list[str] = typer.Argument(None, hidden=True)):
        raise ExaoneError(f"exaone {name}: not implemented yet in this version")

    app.command(
        name,
        help=PLANNED[name],
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(command)

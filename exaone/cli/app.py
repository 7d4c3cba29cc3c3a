"""The `exaone` typer app: registers one thin module per subcommand and turns errors into one line."""

from __future__ import annotations

import sys

import typer

from exaone import __version__
from exaone.cli.errors import message
from exaone.core.errors import ExaoneError

app = typer.Typer(
    name="exaone",
    help="EXAONE models from a Hugging Face checkpoint to fast quantized inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_debug = {"on": False}


def _version(value: bool):
    if value:
        typer.echo(f"exaone {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
):
    _debug["on"] = debug


def _register():
    from exaone.cli import bench, build, convert, download, inspect, quantize, run, summarize

    download.register(app)
    quantize.register(app)
    convert.register(app)
    run.register(app)
    build.register(app)
    inspect.register(app)
    summarize.register(app)
    bench.register(app)

    from exaone.cli import serve

    serve.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: usage errors and ExaoneError become `error: ...` on stderr with exit code 2."""
    _register()
    _debug["on"] = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = typer.main.get_command(app).main(args=argv, prog_name="exaone", standalone_mode=False)
    except ExaoneError as e:
        _fail(message(e), e)
        return 2
    except (KeyboardInterrupt, *_click_errors("Abort")):
        print("interrupted", file=sys.stderr)
        return 130
    except _click_errors("ClickException") as e:  # bad flags and values: click's UsageError family
        where = f" ({e.ctx.command_path})" if getattr(e, "ctx", None) else ""
        _fail(f"{e.format_message()}{where}".replace("\n", " "), e)
        return e.exit_code
    return rv if isinstance(rv, int) else 0


def _click_errors(name: str) -> tuple[type[BaseException], ...]:
    """The exception class from click and from the copy of click that newer typer versions vendor."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _fail(message: str, exc: BaseException):
    if _debug["on"]:
        import traceback

        traceback.print_exception(exc)
    print(f"error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

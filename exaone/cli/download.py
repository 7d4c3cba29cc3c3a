"""`exaone download`: a hub repository (or short name), a git URL or a local directory -> a verified
checkpoint directory with its manifest; `--list` shows the released EXAONE checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from exaone.cli.options import JsonOpt, flag
from exaone.core.errors import ExaoneError


def download(
    source: Annotated[
        str | None,
        typer.Argument(
            metavar="SOURCE",
            help="Hub repo id (ORG/NAME) or short name (see --list), a git URL, or a local directory.",
        ),
    ] = None,
    revision: Annotated[
        str | None, typer.Option(*flag("revision"), help="Branch, tag or commit (default: main).")
    ] = None,
    local_dir: Annotated[
        Path | None,
        typer.Option(*flag("local_dir"), help="Where the checkpoint goes (default: hf_models/NAME)."),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(*flag("include"), help="Only files matching this glob; repeatable.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(*flag("exclude"), help="Skip files matching this glob; repeatable.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            *flag("token"), help="Hub token (default: HF_TOKEN or the stored login). Never recorded."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(*flag("force"), help="Fetch and verify again even if complete.")
    ] = False,
    list_: Annotated[
        bool, typer.Option("--list", help="List the released EXAONE checkpoints and exit.")
    ] = False,
    json_out: JsonOpt = False,
):
    """Download a checkpoint (or import a local copy), verify it and write its manifest."""
    from exaone.core.hub import download as dl

    if list_:
        _print_list(dl.releases_table(), json_out)
        return
    if source is None:
        raise ExaoneError("give a hub repo id or short name, a git URL or a local directory (or --list)")
    result = dl.download(
        source,
        local_dir=local_dir,
        revision=revision,
        include=include,
        exclude=exclude,
        token=token,
        force=force,
    )
    m = result.manifest
    if json_out:
        summary = {
            "directory": str(result.directory),
            "skipped": result.skipped,
            "manifest": m.model_dump(mode="json"),
        }
        print(json.dumps(summary, indent=2))
    elif result.skipped:
        print(
            f"{result.directory}: already complete and verified ({len(m.files)} files); "
            "nothing to do (--force re-fetches)"
        )
    else:
        size = sum(f.size for f in m.files) / 1e9
        print(
            f"{result.directory}: {m.model.family} checkpoint from {result.source}, {len(m.files)} files "
            f"({size:.2f} GB), {result.report.tensors} tensors verified; manifest written"
        )


def _print_list(rows: list[dict], json_out: bool):
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title="Released EXAONE checkpoints (LG AI Research)", title_justify="left")
    for col in ("short name", "LGAI-EXAONE/...", "family", "params", "format", "bf16", "fp8", "int4"):
        t.add_column(col, justify="right" if col in ("params", "bf16", "fp8", "int4") else "left")
    for r in rows:
        gb = r["weights_gb"]
        t.add_row(
            r["name"], r["repo"].split("/")[1], r["family"], f"{r['params_b']:.3g}B", r["format"],
            *(f"{gb[k]:.1f} GB" for k in ("bf16", "fp8", "int4")),
        )  # fmt: skip
    console = Console(width=max(Console().width, 120))
    console.print(t)
    console.print(
        "GPU memory is for the weights only (parameters x 2 / 1 / 0.5 bytes); add the KV cache and "
        "activations. GGUF repositories are llama.cpp files: exaone downloads their safetensors base."
    )


def register(app: typer.Typer):
    app.command("download")(download)

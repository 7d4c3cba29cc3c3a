"""`exaone inspect`: show (and optionally verify) a directory's manifest, or derive one for a plain HF dir."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from exaone.cli.options import JsonOpt, flag
from exaone.core.errors import ExaoneError
from exaone.core.io import manifest


def inspect(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="A model, checkpoint or engine directory.")
    ],
    json: JsonOpt = False,
    verify: Annotated[
        bool, typer.Option(*flag("verify"), help="Also check the size and sha256 of every file.")
    ] = False,
):
    """Show a directory's exaone-manifest.json (derived on the fly for a plain Hugging Face directory)."""
    if not directory.is_dir():
        raise ExaoneError(f"{directory}: not a directory")
    derived = not (directory / manifest.MANIFEST_NAME).is_file()
    m = manifest.load_or_derive(directory)
    if verify:
        manifest.verify(directory, m, deep=True)
    if json:
        typer.echo(m.model_dump_json(indent=2))
        return
    console = Console()
    console.print(_summary(directory, m, derived))
    console.print(_files(m))
    if verify:
        hashed = sum(f.sha256 is not None for f in m.files)
        console.print(f"verify: OK ({len(m.files)} sizes, {hashed} sha256 checked)")


def _summary(directory: Path, m: manifest.Manifest, derived: bool) -> Table:
    t = Table(title=str(directory), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    where = "derived (no manifest file)" if derived else str(directory / manifest.MANIFEST_NAME)
    rows = [
        ("manifest", f"{where}, schema {m.schema_version}"),
        ("kind", m.kind),
        ("model", f"{m.model.family} / {m.model.architecture} (model_type {m.model.model_type})"),
        ("label", m.model.label),
        ("source", m.model.source),
        ("dtype", m.dtype),
        ("quantization", _quant(m.quantization)),
        ("mapping", f"world {m.mapping.world_size} (tp {m.mapping.tp_size}, pp {m.mapping.pp_size})"),
        ("parent", m.parent),
    ]
    if m.producer:
        p = m.producer
        rows += [
            ("producer", f"{p.tool} {p.version}: {p.command}"),
            ("time", f"{p.started_at} -> {p.finished_at}"),
        ]
    rows.append(("files", f"{len(m.files)} files, {_size(sum(f.size for f in m.files))}"))
    for key, value in rows:
        t.add_row(key, value if value is not None else "-")
    return t


def _quant(q: manifest.Quantization | None) -> str:
    if q is None:
        return "none"
    parts = [q.algorithm]
    if q.kv_cache_dtype:
        parts.append(f"kv cache {q.kv_cache_dtype}")
    if q.group_size:
        parts.append(f"group {q.group_size}")
    if c := q.calibration:
        parts.append(f"calibrated on {c.dataset}: {c.size} x {c.seq} tokens, seed {c.seed}")
    return ", ".join(parts)


def _files(m: manifest.Manifest) -> Table:
    t = Table("path", "size", "sha256", title="files", title_justify="left")
    for f in m.files:
        t.add_row(f.path, _size(f.size), f.sha256[:16] if f.sha256 else "-")
    return t


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def register(app: typer.Typer):
    app.command("inspect")(inspect)

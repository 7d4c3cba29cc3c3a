"""`exaone quantize`: post-training quantization with NVIDIA Model Optimizer, written in its HF export
format under the checkpoint's own tensor names (flags as TensorRT-LLM's examples/quantization/quantize.py)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from exaone.cli.options import Device, DeviceOpt, Dtype, DtypeOpt, JsonOpt, flag
from exaone.core.errors import ExaoneError
from exaone.core.formats.registry import QUANTIZE_FORMATS as FORMATS


def quantize(
    model: Annotated[
        Path | None, typer.Argument(metavar="MODEL_DIR", help="Unquantized Hugging Face EXAONE checkpoint.")
    ] = None,
    model_dir: Annotated[Path | None, typer.Option(*flag("model_dir"), help="Same as MODEL_DIR.")] = None,
    qformat: Annotated[
        str, typer.Option(*flag("qformat"), help=f"Quantization format: {', '.join(FORMATS)}.")
    ] = "fp8",
    kv_cache_dtype: Annotated[
        str,
        typer.Option(
            *flag("kv_cache_dtype"),
            help="KV-cache dtype: auto (unquantized) or fp8; int8 is refused (no INT8 KV in the HF export).",
        ),
    ] = "auto",
    calib_dataset: Annotated[
        str,
        typer.Option(
            *flag("calib_dataset"),
            help="cnn_dailymail (hub, through datasets), a local .txt/.json/.jsonl/.parquet file or "
            "directory, or 'shared' (the offline samples in ../shared/data).",
        ),
    ] = "cnn_dailymail",
    calib_size: Annotated[int, typer.Option(*flag("calib_size"), help="Calibration samples.")] = 512,
    calib_seq: Annotated[int, typer.Option(*flag("calib_seq"), help="Tokens per calibration sample.")] = 512,
    batch_size: Annotated[int, typer.Option(*flag("batch_size"), help="Calibration batch size.")] = 1,
    awq_block_size: Annotated[
        int, typer.Option(*flag("awq_block_size"), help="Group size of int4_awq, w4a8_awq and int4_wo.")
    ] = 128,
    seed: Annotated[int, typer.Option(*flag("seed"), help="Seed for picking the calibration text.")] = 1234,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.auto,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            *flag("output_dir"), help="Where the quantized checkpoint goes (default: MODEL_DIR-QFORMAT)."
        ),
    ] = None,
    export_format: Annotated[
        str,
        typer.Option(
            *flag("export_format"),
            help="hf (Model Optimizer's HF format) or trtllm (through `exaone convert`; not nvfp4).",
        ),
    ] = "hf",
    force: Annotated[
        bool, typer.Option(*flag("force"), help="Redo even if the output is up to date.")
    ] = False,
    json_out: JsonOpt = False,
):
    """Quantize a checkpoint (FP8, INT8 SmoothQuant, INT4/W4A8 AWQ, NVFP4, INT8/INT4 weight-only)."""
    from exaone.quant.quantize import QuantizeOptions
    from exaone.quant.quantize import quantize as run

    src = model or model_dir
    if src is None:
        raise ExaoneError("give the checkpoint directory to quantize (MODEL_DIR)")
    if model and model_dir and model != model_dir:
        raise ExaoneError(f"MODEL_DIR {model} and --model_dir {model_dir} disagree; give one")
    opts = QuantizeOptions(
        qformat=qformat,
        kv_cache_dtype=kv_cache_dtype,
        calib_dataset=calib_dataset,
        calib_size=calib_size,
        calib_seq=calib_seq,
        batch_size=batch_size,
        awq_block_size=awq_block_size,
        seed=seed,
        device=getattr(device, "value", device),
        dtype=getattr(dtype, "value", dtype),
        export_format=export_format,
    )
    err = Console(stderr=True)
    with _progress(err) as progress:
        summary = run(src, opts, output_dir, force=force, say=lambda m: err.print(m, highlight=False),
                      progress=progress)  # fmt: skip
    if json_out:
        print(json.dumps(_as_dict(summary), indent=2))
    elif not summary.skipped:
        _print_summary(summary)


def _as_dict(s) -> dict:
    return {
        "output_dir": str(s.output), "skipped": s.skipped, "qformat": s.qformat,
        "weight_bytes_before": s.bytes_before, "weight_bytes_after": s.bytes_after,
        "compression": round(s.ratio, 3), "seconds": round(s.seconds, 2), "calibration_tokens": s.tokens,
        "experts_without_tokens": s.empty_experts,
    }  # fmt: skip


def _print_summary(s):
    t = Table(title=f"exaone quantize: {s.output}", title_justify="left")
    for col in ("format", "weights before", "weights after", "ratio", "calib tokens", "time"):
        t.add_column(col, justify="left" if col == "format" else "right")
    t.add_row(
        s.qformat, f"{s.bytes_before / 1e6:,.1f} MB", f"{s.bytes_after / 1e6:,.1f} MB",
        f"{s.ratio:.2f}x", f"{s.tokens:,}", f"{s.seconds:.1f} s",
    )  # fmt: skip
    Console().print(t)


@contextmanager
def _progress(console: Console):
    """A rich progress bar per calibration pass on a TTY; None (plain lines) otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )  # fmt: skip
    with bar:

        def progress(total: int, description: str):
            task = bar.add_task(description, total=total)
            return lambda: bar.advance(task)

        yield progress


def register(app: typer.Typer):
    app.command("quantize")(quantize)

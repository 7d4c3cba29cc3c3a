"""`exaone convert`: a Hugging Face EXAONE directory -> a TensorRT-LLM checkpoint (config.json +
rank{N}.safetensors), with the flags of TensorRT-LLM's examples/models/core/llama/convert_checkpoint.py."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from exaone.cli.options import flag
from exaone.core.errors import ExaoneError


class ConvertDtype(str, Enum):
    auto = "auto"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class Precision(str, Enum):
    int8 = "int8"
    int4 = "int4"


def convert(
    model: Annotated[
        Path | None, typer.Argument(metavar="MODEL_DIR", help="Hugging Face EXAONE checkpoint directory.")
    ] = None,
    model_dir: Annotated[Path | None, typer.Option(*flag("model_dir"), help="Same as MODEL_DIR.")] = None,
    output_dir: Annotated[
        Path | None, typer.Option(*flag("output_dir"), help="Where the TensorRT-LLM checkpoint goes.")
    ] = None,
    dtype: Annotated[
        ConvertDtype,
        typer.Option(*flag("dtype"), help="Weight dtype; auto: the checkpoint's, float32 becoming float16."),
    ] = ConvertDtype.auto,
    tp_size: Annotated[int, typer.Option(*flag("tp_size"), min=1, help="Tensor-parallel ranks.")] = 1,
    pp_size: Annotated[int, typer.Option(*flag("pp_size"), min=1, help="Pipeline-parallel stages.")] = 1,
    use_weight_only: Annotated[
        bool, typer.Option(*flag("use_weight_only"), help="Quantize the linear weights (W8A16 / W4A16).")
    ] = False,
    weight_only_precision: Annotated[
        Precision, typer.Option(*flag("weight_only_precision"), help="Weight-only precision.")
    ] = Precision.int8,
    target_sm: Annotated[
        int,
        typer.Option(
            *flag("target_sm"),
            help="GPU the weight-only weights are laid out for: 90 (Hopper) or 75-89 (Turing/Ampere/Ada). "
            "TensorRT-LLM uses the GPU it converts on.",
        ),
    ] = 90,
    per_group: Annotated[
        bool,
        typer.Option(
            *flag("per_group"), help="int4 only: one scale per --group_size inputs (W4A16_AWQ layout)."
        ),
    ] = False,
    group_size: Annotated[
        int, typer.Option(*flag("group_size"), min=1, help="Group size for --per_group.")
    ] = 128,
    int8_kv_cache: Annotated[
        bool,
        typer.Option(*flag("int8_kv_cache"), help="INT8 KV cache, scales calibrated on --calib_dataset."),
    ] = False,
    calib_dataset: Annotated[
        str,
        typer.Option(
            *flag("calib_dataset"),
            help="--int8_kv_cache calibration text: cnn_dailymail (hub), 'shared' (offline) or a path.",
        ),
    ] = "cnn_dailymail",
    calib_size: Annotated[int, typer.Option(*flag("calib_size"), min=1, help="Calibration samples.")] = 512,
    calib_max_seq_length: Annotated[
        int, typer.Option(*flag("calib_max_seq_length"), min=1, help="Tokens per calibration sample.")
    ] = 512,
    workers: Annotated[int, typer.Option(*flag("workers"), min=1, help="Ranks converted in parallel.")] = 1,
    force: Annotated[
        bool, typer.Option(*flag("force"), help="Redo even if the output is up to date.")
    ] = False,
):
    """Convert a checkpoint to the TensorRT-LLM checkpoint format (trtllm-build can build it)."""
    from exaone.core.trtllm import convert as trtllm

    if model is not None and model_dir is not None and model != model_dir:
        raise ExaoneError(f"two model directories given ({model} and --model_dir {model_dir}); give one")
    source = model or model_dir
    if source is None:
        raise ExaoneError("give the model directory (MODEL_DIR or --model_dir)")
    if output_dir is None:
        raise ExaoneError("give --output_dir (where the TensorRT-LLM checkpoint goes)")
    opts = trtllm.ConvertOptions(
        dtype=dtype.value,
        tp_size=tp_size,
        pp_size=pp_size,
        use_weight_only=use_weight_only,
        weight_only_precision=weight_only_precision.value,
        per_group=per_group,
        group_size=group_size,
        int8_kv_cache=int8_kv_cache,
        workers=workers,
        target_sm=target_sm,
        calib_dataset=calib_dataset,
        calib_size=calib_size,
        calib_max_seq_length=calib_max_seq_length,
    )
    if not sys.stderr.isatty():
        out = trtllm.convert(source, output_dir, opts, force=force)
    else:
        console = Console(stderr=True, highlight=False)
        columns = (TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TextColumn("ranks"))
        with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("ranks", total=tp_size * pp_size)

            def say(message: str):
                console.print(message)
                if message.startswith("rank "):
                    bar.advance(task)

            out = trtllm.convert(source, output_dir, opts, force=force, say=say)
    print(f"{out}: TensorRT-LLM checkpoint, {tp_size * pp_size} rank(s) (tp {tp_size}, pp {pp_size})")


def register(app: typer.Typer):
    app.command("convert")(convert)

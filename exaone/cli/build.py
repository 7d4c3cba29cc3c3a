"""`exaone build`: an engine directory for the fast runtime, from an HF, quantized or TensorRT-LLM dir."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from exaone.cli.options import DeviceOpt, DtypeOpt, flag
from exaone.core.errors import ExaoneError


class KVCacheDtype(str, Enum):
    auto = "auto"
    fp16 = "fp16"
    bf16 = "bf16"
    fp8 = "fp8"
    int8 = "int8"


def build(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="Checkpoint directory: Hugging Face, quantized (exaone quantize) or TensorRT-LLM."
        ),
    ] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(*flag("checkpoint_dir"), help="Same as CHECKPOINT (trtllm-build's name).")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option(*flag("output_dir"), help="Engine directory to write.")
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(*flag("max_batch_size"), help="Most sequences decoded together.")
    ] = 256,
    max_input_len: Annotated[
        int, typer.Option(*flag("max_input_len"), help="Longest prompt in tokens.")
    ] = 1024,
    max_seq_len: Annotated[
        int | None,
        typer.Option(*flag("max_seq_len"), help="Longest prompt + output; default: max_position_embeddings."),
    ] = None,
    max_num_tokens: Annotated[
        int, typer.Option(*flag("max_num_tokens"), help="Tokens per forward pass (bounds chunked prefill).")
    ] = 8192,
    kv_cache_dtype: Annotated[
        KVCacheDtype,
        typer.Option(*flag("kv_cache_dtype"), help="KV cache storage; auto: the compute dtype."),
    ] = KVCacheDtype.auto,
    tokens_per_block: Annotated[
        int, typer.Option(*flag("tokens_per_block"), help="Tokens per paged KV cache block.")
    ] = 32,
    tp_size: Annotated[
        int | None,
        typer.Option(*flag("tp_size"), help="Tensor parallelism; default: the checkpoint's (1 only)."),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when up to date.")] = False,
):
    """Build an engine directory: fused runtime weights, build limits, target GPU and versions."""
    from exaone.build.builder import BuildOptions
    from exaone.build.builder import build as do_build

    if checkpoint is not None and checkpoint_dir is not None and checkpoint != checkpoint_dir:
        raise ExaoneError(
            f"two checkpoints given ({checkpoint} and --checkpoint_dir {checkpoint_dir}); give one"
        )
    src = checkpoint or checkpoint_dir
    if src is None:
        raise ExaoneError("no checkpoint given (exaone build CHECKPOINT --output_dir ENGINE_DIR)")
    if output_dir is None:
        raise ExaoneError("--output_dir is required (where to write the engine)")
    err = Console(stderr=True, highlight=False)
    opts = BuildOptions(
        max_batch_size=max_batch_size,
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        kv_cache_dtype=kv_cache_dtype.value,
        tokens_per_block=tokens_per_block,
        tp_size=tp_size,
        device=getattr(device, "value", device),
        dtype=getattr(dtype, "value", dtype),
    )
    do_build(src, output_dir, opts, force=force, say=lambda msg: err.print(msg, markup=False))


def register(app: typer.Typer):
    app.command("build")(build)

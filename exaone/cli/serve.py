"""`exaone serve`: an OpenAI-compatible HTTP server for a model or engine directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from exaone.cli.options import DeviceOpt, DtypeOpt, flag
from exaone.core.errors import ExaoneError


def serve(
    model: Annotated[
        Path | None,
        typer.Argument(
            metavar="[MODEL_OR_ENGINE_DIR]",
            help="A model directory (built into a cached engine first) or an engine directory. "
            "Default: the embedded default model.",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(*flag("host"), help="Address to bind (0.0.0.0 for every interface).")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option(*flag("port"), help="TCP port.")] = 8000,
    backend: Annotated[
        str | None,
        typer.Option(*flag("backend"), help="Accepted for trtllm-serve compatibility; ours is the only one."),
    ] = None,
    tokenizer_dir: Annotated[
        Path | None, typer.Option(*flag("tokenizer_dir", "--tokenizer"), help="Load the tokenizer from here.")
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            *flag("served_model_name"), help="The model id clients use (default: the directory name)."
        ),
    ] = None,
    max_batch_size: Annotated[
        int | None,
        typer.Option(*flag("max_batch_size"), help="Sequences decoded together (build value, or <= built)."),
    ] = None,
    max_num_tokens: Annotated[
        int | None,
        typer.Option(*flag("max_num_tokens"), help="Tokens per forward pass (build value, or <= built)."),
    ] = None,
    max_seq_len: Annotated[
        int | None, typer.Option(*flag("max_seq_len"), help="Prompt + output tokens (when building).")
    ] = None,
    max_input_len: Annotated[
        int | None,
        typer.Option(*flag("max_input_len"), help="Prompt tokens (when building; default max_seq_len - 1)."),
    ] = None,
    kv_cache_dtype: Annotated[
        str | None,
        typer.Option(*flag("kv_cache_dtype"), help="KV cache: auto, fp16, bf16, fp8, int8 (when building)."),
    ] = None,
    kv_cache_free_gpu_memory_fraction: Annotated[
        float | None,
        typer.Option(
            *flag("kv_cache_free_gpu_memory_fraction"), help="Share of free GPU memory for KV (0.9)."
        ),
    ] = None,
    max_tokens_in_paged_kv_cache: Annotated[
        int | None, typer.Option(*flag("max_tokens_in_paged_kv_cache"), help="KV cache size in tokens.")
    ] = None,
    max_attention_window_size: Annotated[
        list[str] | None,
        typer.Option(
            *flag("max_attention_window_size"), help="Per-layer attention window, e.g. 128,128,128,4096."
        ),
    ] = None,
    enable_kv_cache_reuse: Annotated[
        bool | None,
        typer.Option(
            *flag("enable_kv_cache_reuse", *flag("kv_cache_enable_block_reuse")),
            help="Share cached prompt blocks between requests.",
        ),
    ] = None,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda_graphs/--no_cuda_graphs", "--cuda-graphs/--no-cuda-graphs", help="Decode in CUDA graphs."
        ),
    ] = None,
    tp_size: Annotated[
        int | None, typer.Option(*flag("tp_size"), help="Tensor parallelism (not supported yet).")
    ] = None,
    pp_size: Annotated[
        int | None, typer.Option(*flag("pp_size"), help="Pipeline parallelism (not supported yet).")
    ] = None,
    ep_size: Annotated[
        int | None, typer.Option(*flag("ep_size"), help="Expert parallelism (not supported yet).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            *flag("config", *flag("extra_llm_api_options")),
            help="The reference's LLM API option file (YAML): kv_cache_config, cuda_graph_config, ...",
        ),
    ] = None,
    reasoning_parser: Annotated[
        str,
        typer.Option(*flag("reasoning_parser"), help="exaone | none | auto (on when the template thinks)."),
    ] = "auto",
    tool_parser: Annotated[
        str,
        typer.Option(
            *flag("tool_parser"), help="exaone | none | auto (on when the template has tool calls)."
        ),
    ] = "auto",
    api_key: Annotated[
        str | None,
        typer.Option(
            *flag("api_key"),
            help="Require Authorization: Bearer KEY (default: $EXAONE_API_KEY).",
            show_default=False,
        ),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(*flag("max_queue"), help="Requests that may wait beyond a full batch; then 503.")
    ] = 1024,
    request_timeout: Annotated[
        float, typer.Option(*flag("request_timeout"), help="Seconds a request may take before it is aborted.")
    ] = 600.0,
    max_request_bytes: Annotated[
        int, typer.Option(*flag("max_request_bytes"), help="Largest request body; larger ones get 413.")
    ] = 8 << 20,
    shutdown_timeout: Annotated[
        float,
        typer.Option(*flag("shutdown_timeout"), help="On SIGTERM, seconds in-flight requests may drain."),
    ] = 30.0,
    log_level: Annotated[str, typer.Option(*flag("log_level"), help="uvicorn log level.")] = "info",
    access_log: Annotated[bool, typer.Option(*flag("access_log"), help="Log every request line.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
):
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    from exaone.cli.run import _windows
    from exaone.serve.config import ServeOptions
    from exaone.serve.server import prepare
    from exaone.serve.server import serve as run_server

    if config is not None and not config.is_file():
        raise ExaoneError(f"--config {config}: no such file")
    err = Console(stderr=True, highlight=False)

    def say(message: str):
        err.print(f"[dim]{message}[/dim]")

    opts = ServeOptions(
        model=model,
        tokenizer_dir=tokenizer_dir,
        host=host,
        port=port,
        backend=backend,
        served_model_name=served_model_name,
        device=device.value,
        dtype=dtype.value,
        max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens,
        max_seq_len=max_seq_len,
        max_input_len=max_input_len,
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
        max_tokens_in_paged_kv_cache=max_tokens_in_paged_kv_cache,
        max_attention_window_size=_windows(max_attention_window_size),
        enable_kv_cache_reuse=enable_kv_cache_reuse,
        cuda_graphs=cuda_graphs,
        tp_size=tp_size,
        pp_size=pp_size,
        ep_size=ep_size,
        reasoning_parser=reasoning_parser,
        tool_parser=tool_parser,
        api_key=api_key,
        max_queue=max_queue,
        request_timeout=request_timeout,
        max_request_bytes=max_request_bytes,
        shutdown_timeout=shutdown_timeout,
        config_file=config,
        log_level=log_level,
        access_log=access_log,
    )
    return run_server(prepare(opts, say), say)


def register(app: typer.Typer):
    app.command("serve")(serve)

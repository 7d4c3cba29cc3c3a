"""`exaone run`: generate text from a model directory (or the embedded default model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from exaone.cli.options import DeviceOpt, DtypeOpt, JsonOpt, flag
from exaone.core.errors import ExaoneError
from exaone.core.generate import Sampling

DEFAULT_PROMPT = "Born in north-east France, Soyer trained as a"  # the reference run.py's default


def run(
    model: Annotated[
        Path | None,
        typer.Argument(help="Model directory (Hugging Face layout). Default: the embedded model."),
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option(*flag("model_dir"), help="Same as the MODEL argument.")
    ] = None,
    tokenizer_dir: Annotated[
        Path | None, typer.Option(*flag("tokenizer_dir"), help="Load the tokenizer from here instead.")
    ] = None,
    input_text: Annotated[
        list[str] | None, typer.Option(*flag("input_text"), help="A prompt; repeat for several.")
    ] = None,
    input_file: Annotated[
        Path | None, typer.Option(*flag("input_file"), help="Prompts: one a line, or .jsonl with 'prompt'.")
    ] = None,
    max_output_len: Annotated[
        int, typer.Option(*flag("max_output_len"), min=1, help="Most new tokens per prompt.")
    ] = 128,
    temperature: Annotated[
        float, typer.Option(*flag("temperature"), min=0.0, help="0 = greedy (the default); > 0 samples.")
    ] = 0.0,
    top_k: Annotated[int, typer.Option(*flag("top_k"), min=0, help="Sample from the k best (0 = all).")] = 0,
    top_p: Annotated[
        float, typer.Option(*flag("top_p"), min=0.0, max=1.0, help="Nucleus mass; 0 or 1 = off.")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option(*flag("seed"), help="Random seed for sampling.")] = None,
    apply_chat_template: Annotated[
        bool,
        typer.Option(*flag("apply_chat_template"), help="Wrap each prompt in the tokenizer's chat template."),
    ] = False,
    enable_thinking: Annotated[
        bool | None,
        typer.Option(
            "--enable_thinking/--disable_thinking",
            "--enable-thinking/--disable-thinking",
            help="EXAONE-4 reasoning switch passed to the chat template.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(*flag("batch_size"), min=1, help="Prompts generated together.")
    ] = 8,
    engine_dir: Annotated[
        Path | None, typer.Option(*flag("engine_dir"), help="Run through an engine built by `exaone build`.")
    ] = None,
    max_batch_size: Annotated[
        int | None,
        typer.Option(*flag("max_batch_size"), help="Engine: sequences decoded together (<= built)."),
    ] = None,
    max_num_tokens: Annotated[
        int | None, typer.Option(*flag("max_num_tokens"), help="Engine: tokens per forward pass (<= built).")
    ] = None,
    kv_cache_free_gpu_memory_fraction: Annotated[
        float,
        typer.Option(
            *flag("kv_cache_free_gpu_memory_fraction"), help="Engine: share of free GPU memory for KV."
        ),
    ] = 0.9,
    max_tokens_in_paged_kv_cache: Annotated[
        int | None,
        typer.Option(
            *flag("max_tokens_in_paged_kv_cache"),
            help="Engine: KV cache size in tokens (CPU: default 2 GiB).",
        ),
    ] = None,
    max_attention_window_size: Annotated[
        list[str] | None,
        typer.Option(
            *flag("max_attention_window_size"),
            help="Engine: per-layer attention window, e.g. 128,128,128,4096 (repeated over the layers).",
        ),
    ] = None,
    enable_kv_cache_reuse: Annotated[
        bool,
        typer.Option(
            *flag("enable_kv_cache_reuse", *flag("kv_cache_enable_block_reuse")),
            help="Engine: share cached prompt blocks between requests (full-attention models).",
        ),
    ] = False,
    num_beams: Annotated[
        int, typer.Option(*flag("num_beams"), help="Engine: beam search width (1 = off).")
    ] = 1,
    length_penalty: Annotated[
        float, typer.Option(*flag("length_penalty"), help="Beam search: score / length ** length_penalty.")
    ] = 1.0,
    cuda_graphs: Annotated[
        bool,
        typer.Option(
            "--cuda_graphs/--no_cuda_graphs",
            "--cuda-graphs/--no-cuda-graphs",
            help="Engine: decode in CUDA graphs.",
        ),
    ] = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
):
    """Generate text. Greedy by default; streams to the terminal when there is one prompt."""
    from exaone.core import runner

    if model is not None and model_dir is not None and model != model_dir:
        raise ExaoneError(f"two model directories given ({model} and --model_dir {model_dir}); give one")
    engine_flags = {
        "--max_batch_size": max_batch_size is not None,
        "--max_num_tokens": max_num_tokens is not None,
        "--kv_cache_free_gpu_memory_fraction": kv_cache_free_gpu_memory_fraction != 0.9,
        "--max_tokens_in_paged_kv_cache": max_tokens_in_paged_kv_cache is not None,
        "--max_attention_window_size": bool(max_attention_window_size),
        "--num_beams": num_beams != 1,
        "--enable_kv_cache_reuse": enable_kv_cache_reuse,
        "--no_cuda_graphs": not cuda_graphs,
    }
    if engine_dir is None and any(engine_flags.values()):
        used = next(name for name, on in engine_flags.items() if on)
        raise ExaoneError(f"{used} applies to engines: give --engine_dir (made by `exaone build`)")
    if engine_dir is not None and (model or model_dir):
        raise ExaoneError(f"give a model directory or --engine_dir {engine_dir}, not both")
    prompts = list(input_text or [])
    if input_file is not None:
        prompts += runner.read_prompts(input_file)
    if not prompts:
        prompts = [DEFAULT_PROMPT]
    sampling = Sampling(max_output_len, temperature, top_k, top_p, seed)
    sampling.check()
    err = Console(stderr=True, highlight=False)
    directory, label = model or model_dir, None
    if engine_dir is not None:
        report = _run_engine(
            engine_dir, prompts, sampling, tokenizer_dir, apply_chat_template, enable_thinking,
            device.value, dtype.value, json_out, err, max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens,
            kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
            max_tokens_in_paged_kv_cache=max_tokens_in_paged_kv_cache,
            max_attention_window_size=_windows(max_attention_window_size), cuda_graphs=cuda_graphs,
            num_beams=num_beams, length_penalty=length_penalty, enable_kv_cache_reuse=enable_kv_cache_reuse,
        )  # fmt: skip
        _print_report(report, json_out, not json_out and len(prompts) == 1 and num_beams == 1, err)
        return
    if directory is None:
        from exaone.core.hub.default_model import DEFAULT_LABEL, ensure_default_model

        directory, label = ensure_default_model(lambda msg: err.print(msg)), DEFAULT_LABEL
    else:
        label = _manifest_label(directory)
    if not json_out:
        err.print(f"[dim]model: {directory}" + (f" ({label})" if label else "") + "[/dim]")

    stream = not json_out and len(prompts) == 1
    report = runner.run(
        directory,
        prompts,
        sampling,
        tokenizer_dir=tokenizer_dir,
        chat=apply_chat_template,
        enable_thinking=enable_thinking,
        device=device.value,
        dtype=dtype.value,
        batch_size=batch_size,
        label=label,
        on_text=_write if stream else None,
    )
    _print_report(report, json_out, stream, err)


def _print_report(report, json_out: bool, stream: bool, err: Console):
    if json_out:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
        return
    if stream:
        print()
    else:
        for i, r in enumerate(report.results):
            print(f'Input [Text {i}]: "{r.prompt}"')
            print(f'Output [Text {i}]: "{r.text}"')
    total = sum(r.output_tokens for r in report.results)
    rate = ", ".join(f"{r.tokens_per_s:.1f}" for r in report.results[:4])
    err.print(
        f"[dim]{len(report.results)} prompt(s), {total} tokens on {report.device} ({report.dtype}); "
        f"load {report.load_s:.1f}s; decode tok/s: {rate}[/dim]"
    )


def _windows(values: list[str] | None) -> list[int] | None:
    """--max_attention_window_size given repeated and/or comma-separated."""
    if not values:
        return None
    out = []
    for item in values:
        for part in item.replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise ExaoneError(f"--max_attention_window_size {item!r}: expected integers") from None
    return out


def _run_engine(engine_dir, prompts, sampling, tokenizer_dir, chat, enable_thinking, device, dtype, json_out,
                err, num_beams, length_penalty, **options):  # fmt: skip
    from exaone.core import runner
    from exaone.core.engine import RuntimeOptions

    if dtype != "auto":
        raise ExaoneError(
            f"--dtype {dtype}: an engine's dtype is fixed when it is built (exaone build --dtype)"
        )
    if not json_out:
        err.print(f"[dim]engine: {engine_dir}[/dim]")
    stream = not json_out and len(prompts) == 1 and num_beams == 1
    return runner.run_engine(
        engine_dir,
        prompts,
        sampling,
        RuntimeOptions(**options),
        tokenizer_dir=tokenizer_dir,
        chat=chat,
        enable_thinking=enable_thinking,
        device=device,
        num_beams=num_beams,
        length_penalty=length_penalty,
        label=_manifest_label(engine_dir),
        on_text=_write if stream else None,
    )


def _write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def _manifest_label(directory: Path) -> str | None:
    from exaone.core.io.manifest import read_manifest

    try:
        m = read_manifest(directory)
    except ExaoneError:
        return None
    return m.model.label if m else None


def register(app: typer.Typer):
    app.command("run")(run)

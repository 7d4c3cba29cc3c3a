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
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
):
    """Generate text. Greedy by default; streams to the terminal when there is one prompt."""
    from exaone.core import runner

    if model is not None and model_dir is not None and model != model_dir:
        raise ExaoneError(f"two model directories given ({model} and --model_dir {model_dir}); give one")
    prompts = list(input_text or [])
    if input_file is not None:
        prompts += runner.read_prompts(input_file)
    if not prompts:
        prompts = [DEFAULT_PROMPT]
    sampling = Sampling(max_output_len, temperature, top_k, top_p, seed)
    sampling.check()
    err = Console(stderr=True, highlight=False)
    directory, label = model or model_dir, None
    if directory is None:
        from exaone.core.default_model import DEFAULT_LABEL, ensure_default_model

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


def _write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def _manifest_label(directory: Path) -> str | None:
    try:
        from exaone.core.manifest import read_manifest

        m = read_manifest(directory)
    except (ImportError, ExaoneError):
        return None
    return m.model.label if m else None


def register(app: typer.Typer):
    app.command("run")(run)

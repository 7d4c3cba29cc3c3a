"""`exaone summarize`: ROUGE / perplexity of exaone against the Hugging Face reference (summarize.py)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from exaone.cli.options import DeviceOpt, JsonOpt, flag
from exaone.core.errors import ExaoneError

DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPES = ("auto", "float32", "float16", "bfloat16")


class Task(str, Enum):
    summarize = "summarize"
    eval_context_ppl = "eval_context_ppl"


def _dtype(value: str) -> str:
    value = DTYPE_ALIASES.get(value, value)
    if value not in DTYPES:
        raise typer.BadParameter(f"{value!r}: expected one of {', '.join(DTYPES)} (or fp32, fp16, bf16)")
    return value


def _opt(name: str, *extra: str, **kw):
    return typer.Option(*flag(name), *extra, **kw)


def summarize(
    model_dir: Annotated[
        Path | None,
        _opt(
            "model_dir",
            help="Model directory for exaone (HF, quantized or TRT-LLM checkpoint); also the "
            "Hugging Face reference unless --hf_model_dir. Default: the embedded model.",
        ),
    ] = None,
    engine_dir: Annotated[
        Path | None, _opt("engine_dir", help="Evaluate an engine directory (exaone build).")
    ] = None,
    hf_model_dir: Annotated[
        Path | None, _opt("hf_model_dir", help="Checkpoint for --test_hf (default: --model_dir).")
    ] = None,
    tokenizer_dir: Annotated[
        Path | None, _opt("tokenizer_dir", help="Tokenizer (default: the model directory).")
    ] = None,
    test_engine: Annotated[
        bool,
        typer.Option(
            "--test_engine",
            "--test-engine",
            "--test_trt_llm",
            "--test-trt-llm",
            help="Evaluate exaone (the default when no side is named).",
        ),
    ] = False,
    test_hf: Annotated[
        bool, _opt("test_hf", help="Evaluate the Hugging Face transformers reference on the same tokens.")
    ] = False,
    dataset: Annotated[
        str | None,
        _opt(
            "dataset",
            help="cnn_dailymail (default; 3.0.0 test), xsum, slimpajama, a hub repo id, a "
            ".json/.jsonl/.parquet file (article/highlights or document/summary), a directory of .story "
            "files, or (eval_context_ppl) a plain text file.",
        ),
    ] = None,
    dataset_cache_dir: Annotated[
        str | None, _opt("dataset_cache_dir", help="Cache directory for hub data sets.")
    ] = None,
    eval_task: Annotated[Task, _opt("eval_task", help="What to measure.")] = Task.summarize,
    max_ite: Annotated[int, _opt("max_ite", min=1, help="Number of batches evaluated.")] = 20,
    batch_size: Annotated[int, _opt("batch_size", min=1, help="Samples per batch.")] = 1,
    output_len: Annotated[int, _opt("output_len", min=1, help="Most new tokens per summary.")] = 100,
    max_input_length: Annotated[
        int, _opt("max_input_length", min=1, help="Prompts keep their last N tokens.")
    ] = 923,
    min_input_length: Annotated[
        int, _opt("min_input_length", min=0, help="Skip prompts of at most N tokens.")
    ] = 0,
    num_beams: Annotated[int, _opt("num_beams", min=1, help="Beam search when > 1.")] = 1,
    length_penalty: Annotated[float, _opt("length_penalty", help="Beam search length penalty.")] = 1.0,
    early_stopping: Annotated[
        int, _opt("early_stopping", help="Beam search: 1 early stopping, 0 none, other: never.")
    ] = 1,
    temperature: Annotated[float, _opt("temperature", min=0.0, help="Sampling temperature.")] = 1.0,
    top_k: Annotated[int, _opt("top_k", min=0, help="1 (the default) is greedy.")] = 1,
    top_p: Annotated[float, _opt("top_p", min=0.0, max=1.0, help="Nucleus mass; 0 = off.")] = 0.0,
    random_seed: Annotated[int, _opt("random_seed", help="Data set shuffle and sampling seed.")] = 0,
    no_add_special_tokens: Annotated[
        bool, _opt("no_add_special_tokens", help="Tokenize prompts without special tokens.")
    ] = False,
    eval_ppl: Annotated[
        bool, _opt("eval_ppl", help="Also the per-token perplexity of prompt + summary.")
    ] = False,
    check_accuracy: Annotated[
        bool, _opt("check_accuracy", help="Exit 1 when ROUGE-1 / perplexity miss their thresholds.")
    ] = False,
    rouge1_threshold: Annotated[
        float, _opt("rouge1_threshold", "--tensorrt_llm_rouge1_threshold", help="ROUGE-1 must exceed this.")
    ] = 15.0,
    ppl_threshold: Annotated[
        float, _opt("ppl_threshold", "--tensorrt_llm_ppl_threshold", help="Perplexity must stay below this.")
    ] = 15.0,
    json_out: JsonOpt = False,
    output_json: Annotated[Path | None, _opt("output_json", help="Also write the JSON report here.")] = None,
    output_dir: Annotated[
        Path | None,
        _opt(
            "output_dir",
            "--save_outputs",
            "--save-outputs",
            help="Write per-sample outputs: exaone.out, hf.out, samples.jsonl, report.json.",
        ),
    ] = None,
    force: Annotated[bool, _opt("force", help="Replace an existing --output_dir.")] = False,
    no_warmup: Annotated[bool, _opt("no_warmup", help="Skip the untimed first-sample run.")] = False,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            "--data_type",
            "--data-type",
            "--hf_data_type",
            "--hf-data-type",
            callback=_dtype,
            help="auto, float32|fp32, float16|fp16, bfloat16|bf16 (both sides).",
        ),
    ] = "auto",
):
    """ROUGE or perplexity of exaone and/or the Hugging Face reference on the same inputs."""
    from exaone.eval.report import render, write_outputs
    from exaone.eval.sides import GenParams
    from exaone.eval.summarize import Options, evaluate

    err = Console(stderr=True, highlight=False)
    if output_dir is not None and output_dir.exists() and not force:
        raise ExaoneError(f"--output_dir {output_dir} exists (use --force to replace it)")
    label = None
    if engine_dir is None and model_dir is None:
        model_dir = hf_model_dir
    if engine_dir is None and model_dir is None:
        from exaone.core.hub.default_model import DEFAULT_LABEL, ensure_default_model

        model_dir, label = ensure_default_model(lambda msg: err.print(msg)), DEFAULT_LABEL
    gen = GenParams(
        output_len, temperature, top_k, top_p, random_seed, num_beams, length_penalty, early_stopping
    )
    opts = Options(
        model_dir=model_dir,
        engine_dir=engine_dir,
        hf_model_dir=hf_model_dir,
        tokenizer_dir=tokenizer_dir,
        test_ours=test_engine or not test_hf,
        test_hf=test_hf,
        dataset=dataset,
        dataset_cache_dir=dataset_cache_dir,
        eval_task=eval_task.value,
        max_ite=max_ite,
        batch_size=batch_size,
        output_len=output_len,
        max_input_length=max_input_length,
        min_input_length=min_input_length,
        add_special_tokens=not no_add_special_tokens,
        eval_ppl=eval_ppl,
        gen=gen,
        random_seed=random_seed,
        device=device.value,
        dtype=dtype,
        warmup=not no_warmup,
        check_accuracy=check_accuracy,
        rouge1_threshold=rouge1_threshold,
        ppl_threshold=ppl_threshold,
        label=label,
    )
    if not json_out:
        shown = engine_dir or model_dir
        err.print(f"[dim]model: {shown}" + (f" ({label})" if label else "") + "[/dim]")
    with _Progress(err) as progress:
        evaluation = evaluate(opts, progress)
    text = json.dumps(evaluation.report, indent=2, ensure_ascii=False)
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(text + "\n")
    if output_dir is not None:
        write_outputs(evaluation, output_dir, force=force)
    if json_out:
        print(text)
    else:
        render(evaluation, Console(highlight=False))
    check = evaluation.report["accuracy_check"]
    if check["enabled"] and not check["passed"]:
        if json_out:  # the table printed them otherwise
            for failure in check["failures"]:
                err.print(f"[FAILED] {failure}")
        raise typer.Exit(code=1)


class _Progress:
    """Batches done per side: a rich bar on a terminal, one plain line per batch otherwise."""

    def __init__(self, console: Console):
        self.console, self.bar, self.tasks = console, None, {}

    def __enter__(self):
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self.bar = Progress(
                "{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()
        return self

    def __call__(self, side: str, done: int, total: int):
        if self.bar is None:
            if done:
                self.console.print(f"{side}: batch {done}/{total}")
            return
        if side not in self.tasks:
            self.tasks[side] = self.bar.add_task(side, total=total)
        self.bar.update(self.tasks[side], completed=done)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def register(app: typer.Typer):
    app.command("summarize")(summarize)

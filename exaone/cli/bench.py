"""`exaone bench latency|throughput`: engine speed beside transformers, against measured ceilings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from exaone.cli.options import JsonOpt, flag

bench_app = typer.Typer(
    help="Measure decode latency and throughput (and transformers' on the same weights).",
    no_args_is_help=True,
)

ModelArg = Annotated[
    Path | None,
    typer.Argument(metavar="[MODEL_DIR]", help="A checkpoint (HF or quantized); default: a random --shape."),
]
ShapeOpt = Annotated[
    str,
    typer.Option(*flag("shape"), help="Random-weight model of a real shape: exaone-3.5-7.8b, "
                 "exaone-3.5-2.4b, exaone-4.0-1.2b, exaone-4.0-32b, k-exaone-reduced."),  # fmt: skip
]
LayersOpt = Annotated[int | None, typer.Option(*flag("layers"), help="Fewer layers of the shape.")]
FormatsOpt = Annotated[
    list[str] | None,
    typer.Option(*flag("formats"), help="Weight formats side by side: bf16 fp8 int4_awq ... (repeat/comma)."),
]
KvOpt = Annotated[str, typer.Option(*flag("kv_cache_dtype"), help="KV cache: auto, fp8, int8, ...")]
CompareOpt = Annotated[
    list[str] | None, typer.Option(*flag("compare"), help="Also run: transformers (eager and static cache).")
]
WorkdirOpt = Annotated[
    Path, typer.Option(*flag("workdir"), help="Where random checkpoints and engines are written and reused.")
]
PlotOpt = Annotated[Path | None, typer.Option(*flag("plot"), help="Write tokens/s vs batch size (PNG).")]
OutputOpt = Annotated[Path | None, typer.Option(*flag("output"), help="Also write the JSON report here.")]
TtftOpt = Annotated[int, typer.Option(*flag("ttft_len"), help="Prompt of the time-to-first-token run.")]
GraphsOpt = Annotated[
    bool,
    typer.Option("--cuda_graphs/--no_cuda_graphs", "--cuda-graphs/--no-cuda-graphs", help="CUDA graphs."),
]


def _options(model, shape, layers, formats, kv, lengths, batches, ttft_len, compare, workdir, graphs, output):
    from exaone.eval.bench import BenchOptions, parse_batches, parse_lengths

    fmts = [f for v in (formats or ["bf16"]) for f in v.replace(",", " ").split()]
    return BenchOptions(
        model_dir=model, shape=None if model else shape, layers=layers, formats=fmts, kv_cache_dtype=kv,
        lengths=parse_lengths(lengths), batches=parse_batches(batches), ttft_len=ttft_len,
        compare=[c for v in (compare or []) for c in v.replace(",", " ").split()], workdir=workdir,
        cuda_graphs=graphs, output=output,
    )  # fmt: skip


def _finish(report: dict, json_out: bool, plot: Path | None, output: Path | None, err: Console):
    from exaone.eval.bench import plot as draw

    if output is not None:
        output.write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None:
        draw(report, plot)
    if json_out:
        print(json.dumps(report, indent=2))
        return
    c = report["ceilings"]
    err.print(f"[dim]{report['device']}; copy {c['copy_bandwidth_gb_s'] or 0:.0f} GB/s, "
              f"bf16 matmul {c['bf16_matmul_tflop_s'] or 0:.0f} TFLOP/s[/dim]")  # fmt: skip
    table = Table("format", "impl", "batch", "in/out", "output tok/s", "decode tok/s", "% roofline",
                  "TTFT s", "ITL p50/p99 ms")  # fmt: skip
    for e in report["results"]:
        for r in e["runs"] + e.get("transformers", []):
            if "error" in r:
                table.add_row(e["format"], r["impl"], str(r["batch"]), "", r["error"], "", "", "", "")
                continue
            frac = r.get("fraction_of_roofline")
            itl = r.get("inter_token_latency_ms_p50")
            table.add_row(
                e["format"], r["impl"], str(r["batch"]), f"{r['input_len']}/{r['output_len']}",
                f"{r['output_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] or 0:.1f}",
                f"{100 * frac:.0f}%" if frac else "", f"{r['time_to_first_token_s'] or 0:.3f}",
                f"{itl:.2f}/{r['inter_token_latency_ms_p99']:.2f}" if itl else "",
            )  # fmt: skip
    Console().print(table)
    for e in report["results"]:
        t = e.get("ttft")
        if t:
            ratio = f", {t['ratio_to_bound']:.2f}x its FLOP bound" if t.get("ratio_to_bound") else ""
            n, took = t["tokens"], t["time_s"]
            err.print(f"{e['format']}: first token of a {n}-token prompt {took:.3f} s{ratio}")
        err.print(f"[dim]{e['format']}: build {e['build_s']:.1f} s, load {e['load_s']:.1f} s, KV cache "
                  f"{e['kv_cache_tokens']} tokens, weights {e['weight_bytes'] / 1e9:.2f} GB[/dim]")


def bench(
    ctx: typer.Context,
    model: ModelArg = None,
    shape: ShapeOpt = "exaone-3.5-7.8b",
    layers: LayersOpt = None,
    formats: FormatsOpt = None,
    kv_cache_dtype: KvOpt = "auto",
    lengths: Annotated[
        list[str] | None, typer.Option(*flag("lengths"), help="INPUT/OUTPUT pairs, e.g. 128/128,1024/256.")
    ] = None,
    batch: Annotated[
        list[str] | None,
        typer.Option(*flag("batch"), help="throughput: batch sizes, e.g. 1,8,64,256,max (max: what fits)."),
    ] = None,
    ttft_len: Annotated[
        int | None,
        typer.Option(*flag("ttft_len"), min=0, help="Also time a prompt this long (latency: 2048)."),
    ] = None,
    compare: CompareOpt = None,
    workdir: WorkdirOpt = Path("/tmp/exaone-bench"),
    cuda_graphs: GraphsOpt = True,
    plot: PlotOpt = None,
    output: OutputOpt = None,
    json_out: JsonOpt = False,
):
    from exaone.core.errors import OptionError
    from exaone.eval.bench import benchmark

    kind = ctx.info_name
    if kind == "latency" and batch:
        raise OptionError("batch", batch[0], "latency measures one sequence; use `exaone bench throughput`")
    ttft = ttft_len if ttft_len is not None else (2048 if kind == "latency" else 0)
    batches = ["1"] if kind == "latency" else (batch or ["1,8,64,256,max"])
    opts = _options(model, shape, layers, formats, kv_cache_dtype, lengths or ["128/128"], batches, ttft,
                    compare, workdir, cuda_graphs, output)  # fmt: skip
    err = Console(stderr=True, highlight=False)
    report = benchmark(opts, kind, say=lambda m: err.print(f"[dim]{m}[/dim]"))
    _finish(report, json_out, plot, output, err)


bench_app.command(
    "latency", help="One sequence: decode tokens/s, time to first token, inter-token latency p50/p99."
)(bench)
bench_app.command(
    "throughput", help="Output tokens/s of batches started together, at each batch size and length pair."
)(bench)


def register(app: typer.Typer):
    app.add_typer(bench_app, name="bench")


@bench_app.command("serving")
def serving(
    url: Annotated[str, typer.Option(*flag("url"), help="The server: http://HOST:PORT (or .../v1).")],
    endpoint: Annotated[str, typer.Option(*flag("endpoint"), help="completions or chat.")] = "completions",
    model: Annotated[str | None, typer.Option(*flag("model"), help="Model id (default: the listed).")] = None,
    concurrency: Annotated[
        list[str] | None, typer.Option(*flag("concurrency"), help="In flight, e.g. 1,16,64 (0: no limit).")
    ] = None,
    request_rate: Annotated[
        float | None, typer.Option(*flag("request_rate"), help="Poisson arrivals (requests/s) instead.")
    ] = None,
    num_prompts: Annotated[
        int | None, typer.Option(*flag("num_prompts"), help="Requests per level (4 x concurrency, >= 8).")
    ] = None,
    input_len: Annotated[int, typer.Option(*flag("input_len"), min=1, help="Prompt tokens.")] = 128,
    output_len: Annotated[int, typer.Option(*flag("output_len"), min=1, help="Tokens per request.")] = 128,
    dataset: Annotated[str, typer.Option(*flag("dataset"), help="random (ids), words, file.")] = "random",
    prompt_file: Annotated[
        Path | None, typer.Option(*flag("prompt_file"), help="Prompts: one a line, or .jsonl.")
    ] = None,
    vocab_size: Annotated[
        int, typer.Option(*flag("vocab_size"), help="Random prompt token ids are drawn below this.")
    ] = 32000,
    stream: Annotated[bool, typer.Option("--stream/--no_stream", "--stream/--no-stream", help="SSE.")] = True,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore_eos/--no_ignore_eos", "--ignore-eos/--no-ignore-eos", help="Fixed.")
    ] = True,
    temperature: Annotated[float, typer.Option(*flag("temperature"), help="0 = greedy.")] = 0.0,
    warmup: Annotated[
        int | None, typer.Option(*flag("warmup"), help="Unmeasured requests first (default: concurrency).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(*flag("api_key"), help="Bearer key ($EXAONE_API_KEY, $OPENAI_API_KEY).")
    ] = None,
    seed: Annotated[int, typer.Option(*flag("seed"), help="Prompt and arrival randomness.")] = 0,
    output: OutputOpt = None,
    json_out: JsonOpt = False,
):
    """Load an OpenAI-compatible server: TTFT, ITL, end-to-end latency p50/p90/p99, throughput."""
    import os

    from exaone.eval.serving_bench import ServingOptions, benchmark

    err = Console(stderr=True, highlight=False)
    given = concurrency or ["0" if request_rate else "1"]
    levels = [int(c) for v in given for c in v.replace(",", " ").split()]
    opts = ServingOptions(
        url=url, endpoint=endpoint, model=model, concurrency=levels, request_rate=request_rate,
        num_prompts=num_prompts, input_len=input_len, output_len=output_len, dataset=dataset,
        prompt_file=prompt_file, vocab_size=vocab_size, stream=stream, ignore_eos=ignore_eos,
        temperature=temperature, warmup=warmup, seed=seed,
        api_key=api_key or os.environ.get("EXAONE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
    )  # fmt: skip
    report = benchmark(opts, say=lambda m: err.print(f"[dim]{m}[/dim]"))
    if output is not None:
        output.write_text(json.dumps(report, indent=2) + "\n")
    if json_out:
        print(json.dumps(report, indent=2))
        return
    err.print(f"[dim]{report['url']} {report['endpoint']} model {report['model']}[/dim]")
    table = Table("concurrency", "ok/all", "req/s", "output tok/s", "TTFT p50/p90/p99 ms",
                  "ITL p50/p90/p99 ms", "E2E p50/p90/p99 ms")  # fmt: skip

    def three(s: dict) -> str:
        return "/".join("-" if s[k] is None else f"{s[k]:.1f}" for k in ("p50", "p90", "p99"))

    for lv in report["levels"]:
        table.add_row(
            str(lv["concurrency"] or "-"), f"{lv['completed']}/{lv['requests']}",
            f"{lv['request_throughput']:.2f}", f"{lv['output_tokens_per_s']:.1f}", three(lv["ttft_ms"]),
            three(lv["itl_ms"]), three(lv["e2e_ms"]),
        )  # fmt: skip
    Console().print(table)

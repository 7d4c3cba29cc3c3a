"""`exaone bench`: decode latency and throughput of the engine, beside transformers in the same run.

Everything a claim needs is measured in the run itself: the device's copy bandwidth and bf16 matmul
rate (the two ceilings), the bytes one decoded token reads (weights + KV cache), so each result is
also a fraction of its roofline; peak memory, KV-cache capacity, build and load times, versions,
commit, command and date go in the report.

- latency: one sequence; time to first token, inter-token latency p50/p99, decode tokens/s.
- throughput: `batch` sequences of `input_len` tokens started together, `output_len` tokens each;
  output tokens/s over the whole run (prefill included, as transformers' generate is timed).
- ttft: one `ttft_len`-token prompt, against its FLOP bound at the measured matmul rate.
`--compare transformers` runs transformers' generate on the same weights and prompts: eager, and
with its static cache (which compiles the forward), each warmed up on the same shapes first.
"""

from __future__ import annotations

import gc
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from exaone import __version__
from exaone.build.builder import BuildOptions, build
from exaone.core.config import load_config
from exaone.core.engine import RuntimeOptions, load_engine
from exaone.core.errors import ExaoneError, OptionError
from exaone.core.formats.registry import FORMATS
from exaone.core.generate import Sampling
from exaone.eval import shapes


@dataclass
class BenchOptions:
    model_dir: Path | None = None  # a checkpoint (HF or quantized); None: a random --shape model
    shape: str | None = "exaone-3.5-7.8b"
    layers: int | None = None  # fewer layers of the shape (K-EXAONE reduced depth)
    formats: list[str] = field(default_factory=lambda: ["bf16"])
    kv_cache_dtype: str = "auto"
    lengths: list[tuple[int, int]] = field(default_factory=lambda: [(128, 128)])
    batches: list[int | str] = field(default_factory=lambda: [1, 8, 64])  # "max": what the cache holds
    ttft_len: int = 2048
    compare: list[str] = field(default_factory=list)  # ["transformers"]
    workdir: Path = Path("/tmp/exaone-bench")
    kv_cache_free_gpu_memory_fraction: float = 0.9
    cuda_graphs: bool = True
    output: Path | None = None  # the JSON report, rewritten after every format (a cut run keeps its part)


def measure_ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written per second) and dense bf16 matmul rate, measured here."""
    if device.type != "cuda":
        return {"copy_bandwidth_gb_s": None, "bf16_matmul_tflop_s": None}
    n = 1 << 30
    t_copy = _copy_ms(n, device)
    t_mm = _matmul_ms(8192, device)
    torch.cuda.empty_cache()
    return {"copy_bandwidth_gb_s": 2 * n / t_copy / 1e6, "bf16_matmul_tflop_s": 2 * 8192**3 / t_mm / 1e9}


def _copy_ms(nbytes: int, device) -> float:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return _median_ms(lambda: dst.copy_(src), 20)


def _matmul_ms(n: int, device) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)  # random, not zeros: zeros run faster
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return _median_ms(lambda: a @ b, 10)


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def weight_bytes(engine) -> int:
    """Bytes of every tensor a decode step reads: the model's parameters and buffers but the embedding
    table (one row a token) and the RoPE frequencies."""
    seen, total = set(), 0
    for name, t in [*engine.model.named_parameters(), *engine.model.named_buffers()]:
        if t.data_ptr() in seen or name in ("inv_freq", "model.embed_tokens.weight"):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if engine.cfg.tie_word_embeddings:  # the head is the embedding, read whole
        w = engine.model.lm_head.weight
        total += w.numel() * w.element_size()
    return total


def kv_bytes_per_token(engine, context: int) -> int:
    """KV-cache bytes one decode step reads for one sequence of `context` cached tokens."""
    cfg, cache = engine.cfg, engine.cache
    per = cfg.num_kv_heads * cfg.head_dim * engine.kv_dtype.itemsize * 2
    if cache.quantized:
        per += cfg.num_kv_heads * 4 * 2
    return sum(per * (context if w is None else min(context, w)) for w in engine.windows)


def prefill_flops(cfg, tokens: int, params: int) -> float:
    """2 x parameters x tokens (linear layers) + causal attention (q.k and p.v over the prompt)."""
    attn = 0.0
    for layer in range(cfg.num_layers):
        w = cfg.window(layer) or tokens
        keys = sum(min(i + 1, w) for i in range(tokens))
        attn += 4 * keys * cfg.num_heads * cfg.head_dim
    return 2.0 * params * tokens + attn


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (batch, length), generator=g).tolist()


def run_engine(engine, batch: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """One batch through engine.generate: output tokens/s over the run, TTFT, inter-token latencies."""
    prompts = _prompts(batch, input_len, engine.cfg.vocab_size, seed)
    stamps: dict[int, list[float]] = {i: [] for i in range(batch)}

    def on_token(i: int, token: int):
        stamps[i].append(time.perf_counter())

    params = Sampling(max_new_tokens=output_len)
    engine.generate(prompts[: min(batch, 2)], Sampling(max_new_tokens=2))  # warm
    _sync(engine.device)
    start = time.perf_counter()
    out = engine.generate(prompts, params, on_token=on_token)
    _sync(engine.device)
    wall = time.perf_counter() - start
    tokens = sum(len(g.output_ids) for g in out)
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:], strict=False)]
    first = [s[0] - start for s in stamps.values() if s]
    last_first = max(first) if first else 0.0
    decode_tokens = sum(max(0, len(s) - 1) for s in stamps.values())
    return {
        "batch": batch, "input_len": input_len, "output_len": output_len, "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "decode_tokens_per_s": decode_tokens / (wall - last_first) if wall > last_first else None,
        "time_to_first_token_s": statistics.median(first) if first else None,
        "inter_token_latency_ms_p50": 1e3 * statistics.median(gaps) if gaps else None,
        "inter_token_latency_ms_p99": 1e3 * _percentile(gaps, 99) if gaps else None,
    }  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_transformers(model_dir: Path, mode: str, batch: int, input_len: int, output_len: int, device) -> dict:
    """transformers' generate on the same weights: eager (DynamicCache) or static cache (compiled)."""
    from transformers import GenerationConfig

    from exaone.core.reference import load_reference

    model = _HF_CACHE.get(str(model_dir))
    if model is None:
        _HF_CACHE.clear()
        t = time.perf_counter()
        model = load_reference(model_dir, torch.bfloat16, device)
        _HF_CACHE[str(model_dir)] = model
        _HF_CACHE["load_s"] = time.perf_counter() - t
    cfg = load_config(model_dir)
    ids = torch.tensor(_prompts(batch, input_len, cfg.vocab_size, 0), device=device)
    settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if mode == "static":
        settings["cache_implementation"] = "static"

    def go(n: int):
        conf = GenerationConfig(max_new_tokens=n, min_new_tokens=n, **settings)
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=conf)

    go(output_len)  # warm-up on the same shapes (static: compiles here, not in the timed run)
    go(1)
    _sync(device)
    t = time.perf_counter()
    go(1)
    _sync(device)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    out = go(output_len)
    _sync(device)
    wall = time.perf_counter() - t
    tokens = (out.shape[1] - input_len) * batch
    return {
        "batch": batch, "input_len": input_len, "output_len": output_len, "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "decode_tokens_per_s": batch * (output_len - 1) / (wall - prefill) if wall > prefill else None,
        "time_to_first_token_s": prefill,
    }  # fmt: skip


_HF_CACHE: dict = {}


def _checkpoint(opts: BenchOptions, fmt: str, say) -> tuple[Path, str]:
    if opts.model_dir is not None:
        if fmt != "bf16" and len(opts.formats) > 1:
            raise OptionError("formats", fmt, "several formats need a --shape (random weights per format)")
        return Path(opts.model_dir), str(opts.model_dir)
    raw = shapes.shape_config(opts.shape, opts.layers)
    name = f"{opts.shape}{f'-{opts.layers}l' if opts.layers else ''}-{fmt}"
    directory = shapes.write_random_checkpoint(opts.workdir / "checkpoints" / name, raw, fmt, say=say)
    depth = f", {opts.layers} layers" if opts.layers else ""
    return directory, f"random-weight {opts.shape}{depth} ({fmt})"


def _max_batch(engine, length: int) -> int:
    chunk = min(engine.max_num_tokens, engine.max_input_len)
    per = engine.cache.needs(length, chunk)
    held = min((g.num_blocks - 1) // n for g, n in zip(engine.cache.groups, per, strict=True) if n)
    return max(1, min(engine.max_batch_size, held))


def benchmark(opts: BenchOptions, kind: str, say=print) -> dict:
    """Run the benchmark `kind` ("latency" or "throughput") for every format; the report."""
    if kind not in ("latency", "throughput"):
        raise OptionError("kind", kind, "expected latency or throughput")
    for fmt in opts.formats:
        if fmt != "bf16" and fmt not in FORMATS:
            raise OptionError("formats", fmt, f"expected bf16 or one of {', '.join(FORMATS)}")
    if not torch.cuda.is_available():
        say("note: no CUDA device; measuring the CPU path (no ceilings, no CUDA graphs)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = _header(opts, kind, device)
    report["ceilings"] = measure_ceilings(device)
    say(f"ceilings: {report['ceilings']}")
    lengths = opts.lengths[:1] if kind == "latency" else opts.lengths
    batches = [1] if kind == "latency" else opts.batches
    longest = max(i + o for i, o in opts.lengths)
    for fmt in opts.formats:
        ckpt, label = _checkpoint(opts, fmt, say)
        # One engine serves every run (and is reused by later runs): generous fixed limits.
        seq = max(4096, longest, opts.ttft_len + 1)
        engine_dir = opts.workdir / "engines" / f"{ckpt.name}-{opts.kv_cache_dtype}-{seq}"
        bopts = BuildOptions(
            max_batch_size=1024, max_input_len=max(2048, opts.ttft_len, max(i for i, _ in opts.lengths)),
            max_seq_len=seq, max_num_tokens=max(8192, opts.ttft_len),
            kv_cache_dtype=opts.kv_cache_dtype, device=device.type, dtype="bfloat16",
        )  # fmt: skip
        t = time.perf_counter()
        build(ckpt, engine_dir, bopts, force=False, say=say)
        build_s = time.perf_counter() - t
        _free()
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        t = time.perf_counter()
        runtime = RuntimeOptions(
            kv_cache_free_gpu_memory_fraction=opts.kv_cache_free_gpu_memory_fraction,
            cuda_graphs=opts.cuda_graphs,
        )
        engine = load_engine(engine_dir, options=runtime)
        load_s = time.perf_counter() - t
        wbytes = weight_bytes(engine)
        entry = {
            "format": fmt, "model": label, "build_s": build_s, "load_s": load_s, "weight_bytes": wbytes,
            "kv_cache_tokens": _kv_tokens(engine), "runs": [],
            "cuda_graphs": engine.graphs.sizes if engine.graphs else None,
        }  # fmt: skip
        for input_len, output_len in lengths:
            context = input_len + output_len // 2  # the average context a decode step reads
            for b in batches:
                batch = _max_batch(engine, input_len + output_len) if b == "max" else int(b)
                say(f"{fmt}: exaone batch {batch}, {input_len}/{output_len} ...")
                run = {"impl": "exaone", **run_engine(engine, batch, input_len, output_len)}
                run.update(_roofline(report, wbytes, kv_bytes_per_token(engine, context), batch, run))
                entry["runs"].append(run)
        if opts.ttft_len:
            entry["ttft"] = _ttft(engine, opts.ttft_len, report)
        entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        del engine
        _free()
        if "transformers" in opts.compare and fmt == "bf16":
            entry["transformers"] = _compare(ckpt, lengths, batches, entry, device, say)
        report["results"].append(entry)
        if opts.output is not None:
            Path(opts.output).write_text(json.dumps(report, indent=2) + "\n")
    report["finished_at"] = _now()
    return report


def _compare(ckpt, lengths, batches, entry, device, say) -> list[dict]:
    runs = []
    for mode in ("eager", "static"):
        for input_len, output_len in lengths:
            for b in batches:
                batch = next((r["batch"] for r in entry["runs"] if r["input_len"] == input_len
                              and (b == "max" or r["batch"] == b)), b)  # fmt: skip
                if b == "max":
                    continue  # transformers has no paged cache to fill: compare at the fixed sizes
                say(f"transformers ({mode}) batch {batch}, {input_len}/{output_len} ...")
                impl = f"transformers-{mode}"
                try:
                    run = run_transformers(ckpt, mode, batch, input_len, output_len, device)
                    runs.append({"impl": impl, **run})
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    runs.append({"impl": impl, "batch": batch, "error": str(e).splitlines()[0]})
    entry["transformers_load_s"] = _HF_CACHE.pop("load_s", None)
    _HF_CACHE.clear()
    _free()
    return runs


def _roofline(report, wbytes: int, kv_per_seq: int, batch: int, run: dict) -> dict:
    bw = report["ceilings"]["copy_bandwidth_gb_s"]
    step_bytes = wbytes + batch * kv_per_seq
    out = {"bytes_per_step": step_bytes, "bytes_per_token": step_bytes / batch}
    if bw and run.get("decode_tokens_per_s"):
        roofline = batch * bw * 1e9 / step_bytes
        out.update(roofline_tokens_per_s=roofline, fraction_of_roofline=run["decode_tokens_per_s"] / roofline)
    return out


def _ttft(engine, length: int, report: dict) -> dict:
    prompt = _prompts(1, length, engine.cfg.vocab_size, 1)
    engine.generate(prompt, Sampling(max_new_tokens=1))  # warm (kernels for this shape)
    times = []
    for _ in range(3):
        _sync(engine.device)
        t = time.perf_counter()
        engine.generate(prompt, Sampling(max_new_tokens=1))
        _sync(engine.device)
        times.append(time.perf_counter() - t)
    params = sum(p.numel() for n, p in engine.model.named_parameters() if "embed_tokens" not in n)
    flops = prefill_flops(engine.cfg, length, params)
    rate = report["ceilings"]["bf16_matmul_tflop_s"]
    bound = flops / (rate * 1e12) if rate else None
    best = min(times)
    return {"tokens": length, "time_s": best, "flops": flops, "flop_bound_s": bound,
            "ratio_to_bound": best / bound if bound else None}  # fmt: skip


def _kv_tokens(engine) -> int:
    """Tokens the KV cache holds for full-attention layers (the binding group)."""
    g = engine.cache.groups[-1] if engine.cache.groups[-1].window is None else engine.cache.groups[0]
    return (g.num_blocks - 1) * g.block_size


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _header(opts: BenchOptions, kind: str, device: torch.device) -> dict:
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "benchmark": kind, "command": shlex.join(sys.argv), "started_at": _now(), "commit": commit,
        "device": name,
        "versions": {"exaone": __version__, "torch": torch.__version__, "triton": version("triton"),
                     "transformers": version("transformers"), "python": platform.python_version()},
        "options": json.loads(json.dumps(asdict(opts), default=str)), "results": [],
    }  # fmt: skip


def parse_lengths(values: list[str]) -> list[tuple[int, int]]:
    out = []
    for v in values:
        for part in v.replace(",", " ").split():
            try:
                i, o = (int(x) for x in part.split("/"))
            except ValueError:
                raise OptionError("lengths", part, "expected INPUT/OUTPUT, e.g. 128/128") from None
            if i < 1 or o < 1:
                raise OptionError("lengths", part, "token counts must be at least 1")
            out.append((i, o))
    return out


def parse_batches(values: list[str]) -> list[int | str]:
    out: list[int | str] = []
    for v in values:
        for part in v.replace(",", " ").split():
            if part == "max":
                out.append("max")
                continue
            try:
                b = int(part)
            except ValueError:
                raise OptionError("batch", part, "expected a batch size or 'max'") from None
            if b < 1:
                raise OptionError("batch", part, "must be at least 1")
            out.append(b)
    return out


def plot(report: dict, path: Path):
    """Output tokens/s against batch size, ours and transformers', one line per format and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExaoneError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in report["results"]:
        for impl in sorted({r["impl"] for r in entry["runs"] + entry.get("transformers", [])}):
            rows = sorted((r for r in entry["runs"] + entry.get("transformers", []) if r["impl"] == impl
                           and "output_tokens_per_s" in r), key=lambda r: r["batch"])  # fmt: skip
            if rows:
                label = f"{impl} {entry['format']}" if impl == "exaone" else impl
                xs, ys = [r["batch"] for r in rows], [r["output_tokens_per_s"] for r in rows]
                ax.plot(xs, ys, "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{report['device']} - {report['results'][0]['model'] if report['results'] else ''}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

"""`exaone run` as a library call: load a model directory, encode prompts, generate, decode."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from exaone.core.errors import ExaoneError, OptionError
from exaone.core.generate import Sampling, generate
from exaone.core.io.tokenizer import encode, load_tokenizer, stop_ids
from exaone.core.loader import load_model, resolve_device
from exaone.core.model.layers import CausalLM


@dataclass
class Result:
    prompt: str
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    time_to_first_token_s: float
    total_s: float
    tokens_per_s: float
    output_ids: list[int]


@dataclass
class Report:
    model_dir: str
    label: str | None
    family: str
    device: str
    dtype: str
    load_s: float
    results: list[Result] = field(default_factory=list)
    engine: dict | None = None  # the engine's KV cache and runtime facts when run from --engine_dir

    def to_json(self) -> dict:
        return asdict(self)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line, or JSONL with a `prompt`/`input`/`text` field (or a JSON string) a line."""
    path = Path(path)
    if not path.is_file():
        raise OptionError("input_file", path, "no such file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise ExaoneError(
                f"{path}:{n}: not valid JSON (a .jsonl prompt file has one JSON value a line)"
            ) from None
        if isinstance(item, dict):
            item = next((item[k] for k in ("prompt", "input", "text") if isinstance(item.get(k), str)), None)
        if not isinstance(item, str):
            raise ExaoneError(f"{path}:{n}: expected a string or an object with a 'prompt' field")
        prompts.append(item)
    return prompts


@dataclass
class Loaded:
    """A model with what generating from it needs: tokenizer, stop ids, pad id."""

    model: CausalLM
    tokenizer: object
    stops: set[int]
    pad_id: int
    device: torch.device
    load_s: float

    @property
    def dtype(self) -> str:
        return str(self.model.lm_head.weight.dtype).removeprefix("torch.")


def load(
    model_dir: str | Path, tokenizer_dir: str | Path | None = None, device: str = "auto", dtype: str = "auto"
) -> Loaded:
    """Load a model directory and its tokenizer (from tokenizer_dir when given), timing the load."""
    start = time.perf_counter()
    dev = resolve_device(device)
    model = load_model(model_dir, dtype, dev)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    cfg = model.cfg
    stops = stop_ids(tokenizer, cfg, model_dir)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (tokenizer.pad_token_id or 0)
    return Loaded(model, tokenizer, stops, pad, dev, time.perf_counter() - start)


def run(
    model_dir: str | Path,
    prompts: list[str],
    sampling: Sampling,
    tokenizer_dir: str | Path | None = None,
    chat: bool = False,
    enable_thinking: bool | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    label: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Report:
    """Generate for every prompt; `on_text` streams the decoded text of a single prompt as it grows."""
    sampling.check()
    if batch_size < 1:
        raise OptionError("batch_size", batch_size, "expected at least 1")
    if not prompts:
        raise OptionError("prompts", prompts, "no prompts given", "{problem}")
    loaded = load(model_dir, tokenizer_dir, device, dtype)
    model, tokenizer, stops, pad = loaded.model, loaded.tokenizer, loaded.stops, loaded.pad_id
    report = Report(str(model_dir), label, model.cfg.family, str(loaded.device), loaded.dtype, loaded.load_s)
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        ids = [encode(tokenizer, p, chat, enable_thinking) for p in chunk]
        streamer = _Streamer(tokenizer, on_text) if on_text and len(prompts) == 1 else None
        gens = generate(model, ids, sampling, stops, pad, streamer)
        for prompt, g in zip(chunk, gens, strict=True):
            report.results.append(_result(tokenizer, prompt, g))
    return report


class _Streamer:
    """Decodes the growing output and passes on only the new characters (multi-byte safe)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, row: int, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.on_text(text[len(self.shown) :])
        self.shown = text


def run_engine(
    engine_dir: str | Path,
    prompts: list[str],
    sampling: Sampling,
    options=None,
    tokenizer_dir: str | Path | None = None,
    chat: bool = False,
    enable_thinking: bool | None = None,
    device: str = "auto",
    num_beams: int = 1,
    length_penalty: float = 1.0,
    label: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Report:
    """`run` through an engine directory (`exaone build`): all prompts go to its batching scheduler."""
    from exaone.core.engine import load_engine

    sampling.check()
    if not prompts:
        raise OptionError("prompts", prompts, "no prompts given", "{problem}")
    start = time.perf_counter()
    engine = load_engine(engine_dir, device, options)
    tokenizer = load_tokenizer(tokenizer_dir or engine_dir)
    load_s = time.perf_counter() - start
    cfg = engine.cfg
    stops = stop_ids(tokenizer, cfg, engine_dir)
    ids = [encode(tokenizer, p, chat, enable_thinking) for p in prompts]
    streamer = _Streamer(tokenizer, on_text) if on_text and len(prompts) == 1 and num_beams == 1 else None
    gens = engine.generate(ids, sampling, stops, streamer, num_beams, length_penalty)
    report = Report(str(engine_dir), label, cfg.family, str(engine.device), engine.build.dtype, load_s)
    report.engine = {
        **engine.kv_stats(),
        "cuda_graphs": engine.graphs.sizes if engine.graphs is not None else None,
        "max_batch_size": engine.max_batch_size,
        "max_num_tokens": engine.max_num_tokens,
        "num_beams": num_beams,
    }
    for prompt, g in zip(prompts, gens, strict=True):
        report.results.append(_result(tokenizer, prompt, g))
    return report


def _result(tokenizer, prompt: str, g) -> Result:
    """One prompt's Result; decode tokens/s counts the tokens after the first."""
    n = len(g.output_ids)
    decode_s = g.total_s - g.time_to_first_token_s
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    text = tokenizer.decode(g.output_ids, skip_special_tokens=True)
    return Result(
        prompt, text, len(g.prompt_ids), n, g.finish_reason, g.time_to_first_token_s, g.total_s, rate,
        g.output_ids,
    )  # fmt: skip

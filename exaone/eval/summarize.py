"""`exaone summarize` as a library call: the evaluation protocol of TensorRT-LLM's summarize.py.

Per sample (summarize): prompt = (article + " TL;DR: ").strip() with " n't" -> "n't", tokenized
with the tokenizer's special tokens and truncated from the LEFT to max_input_length tokens (the
reference loads its tokenizer with truncation_side="left"); prompts of at most min_input_length
tokens are skipped. The data set is read in batches of batch_size, max_ite batches, the same token
ids for every side. Each side first generates for the first sample once, untimed (the reference's
warm-up, also what it prints), then the timed batches: latency is the wall time of the loop, tokens/s
counts generated tokens (stop tokens excluded). ROUGE: see rouge.py. eval_context_ppl: per-sample
per-token perplexity of the context (see ppl.context_nll), plus the corpus perplexity of the
context tokens alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from exaone.core.errors import OptionError, literal
from exaone.eval import data as data_mod
from exaone.eval import ppl as ppl_mod
from exaone.eval.report import build_report
from exaone.eval.sides import GenParams, HFReference, Side, open_ours, stop_and_pad

TASKS = ("summarize", "eval_context_ppl")
APPEND = " TL;DR: "


@dataclass
class Options:
    model_dir: Path | None = None
    engine_dir: Path | None = None
    hf_model_dir: Path | None = None
    tokenizer_dir: Path | None = None
    test_ours: bool = True
    test_hf: bool = False
    dataset: str | None = None
    dataset_cache_dir: str | None = None
    eval_task: str = "summarize"
    max_ite: int = 20
    batch_size: int = 1
    output_len: int = 100
    max_input_length: int = 923
    min_input_length: int = 0
    add_special_tokens: bool = True
    eval_ppl: bool = False
    gen: GenParams = field(default_factory=lambda: GenParams(100))
    random_seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    warmup: bool = True
    check_accuracy: bool = False
    rouge1_threshold: float = 15.0  # summarize.py's --tensorrt_llm_rouge1_threshold default
    ppl_threshold: float = 15.0  # summarize.py's --tensorrt_llm_ppl_threshold default
    label: str | None = None  # shown beside the model directory (e.g. the default model's notice)

    def check(self):
        if self.eval_task not in TASKS:
            raise OptionError("eval_task", self.eval_task, f"expected one of {', '.join(TASKS)}")
        for name in ("max_ite", "batch_size", "output_len", "max_input_length"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), "expected at least 1")
        if self.min_input_length < 0:
            raise OptionError("min_input_length", self.min_input_length, "expected >= 0")
        if self.gen.num_beams < 1:
            raise OptionError("num_beams", self.gen.num_beams, "expected at least 1")
        if self.gen.num_beams > 1 and not self.gen.greedy:
            template = "{option} > 1 is beam search: {problem}"
            raise OptionError("num_beams", self.gen.num_beams, "leave top_k at 1 (no sampling)", template)
        self.gen.sampling.check()
        if self.gen.num_beams > 1 and self.test_ours and self.engine_dir is None:
            raise OptionError(
                "num_beams",
                self.gen.num_beams,
                "not supported for a model directory (exaone's reference runtime decodes greedily or by "
                "sampling); evaluate an engine (engine_dir), or the Hugging Face reference alone (test_hf)",
                "{option} > 1: {problem}",
            )
        if not (self.test_ours or self.test_hf):
            template = "{problem}: set {option} and/or test_hf"
            raise OptionError("test_ours", self.test_ours, "nothing to evaluate", template)
        for name in ("model_dir", "engine_dir", "hf_model_dir", "tokenizer_dir"):
            d = getattr(self, name)
            if d is not None and not Path(d).is_dir():
                raise OptionError(name, d, "not a directory")


@dataclass
class Item:
    index: int  # position in the (shuffled) data set
    id: str
    ids: list[int]
    reference: str
    text: str


@dataclass
class SideRun:
    side: Side
    outputs: dict[int, list[int]] = field(default_factory=dict)  # item index -> generated ids
    texts: dict[int, str] = field(default_factory=dict)
    ppl: dict[int, float] = field(default_factory=dict)  # per-sample per-token perplexity
    context_nll: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    warmup_text: str | None = None
    tokens_scored: int = 0

    @property
    def output_tokens(self) -> int:
        return sum(len(o) for o in self.outputs.values())


Progress = Callable[[str, int, int], None]


def evaluate(opts: Options, progress: Progress | None = None):
    """Run every requested side over the same inputs; return the report (see report.py)."""
    from exaone.core.io.tokenizer import load_tokenizer

    opts.check()
    if opts.eval_task == "eval_context_ppl":
        opts = replace(opts, output_len=1)  # as summarize.py: only the context's perplexity is wanted
    ours_dir = opts.engine_dir or opts.model_dir
    hf_dir = opts.hf_model_dir or opts.model_dir
    if opts.test_hf and hf_dir is None:
        problem = "test_hf needs a Hugging Face checkpoint"
        raise OptionError("hf_model_dir", None, problem, "{problem}: give {option} (or model_dir)")
    tok_dir = opts.tokenizer_dir or opts.model_dir or opts.hf_model_dir or opts.engine_dir
    dataset = data_mod.load(opts.dataset, opts.eval_task, opts.random_seed, opts.dataset_cache_dir)
    tokenizer = load_tokenizer(tok_dir)
    batches = make_batches(dataset, tokenizer, opts)
    if not batches:
        template = f"dataset {literal(dataset.source)}: no sample is longer than {{option}} {{value}}"
        raise OptionError("min_input_length", opts.min_input_length, template=template)
    stops, pad_id = stop_and_pad(tokenizer, Path(hf_dir or ours_dir))
    gen = replace(opts.gen, max_new_tokens=opts.output_len)
    runs: dict[str, SideRun] = {}
    if opts.test_ours:
        side, _ = open_ours(opts.model_dir, opts.engine_dir, opts.tokenizer_dir, opts.device, opts.dtype)
        side.stops, side.pad_id = stops, pad_id
        runs["exaone"] = run_side(side, batches, tokenizer, gen, opts, progress)
        side.close()
    if opts.test_hf:
        side = HFReference(hf_dir, stops, pad_id, opts.device, opts.dtype)
        runs["hf"] = run_side(side, batches, tokenizer, gen, opts, progress)
        side.close()
    return build_report(opts, dataset, batches, runs, tokenizer)


def summarize_prompt(article: str) -> str:
    return (article + APPEND).strip().replace(" n't", "n't")


def make_batches(dataset: data_mod.Dataset, tokenizer, opts: Options) -> list[list[Item]]:
    """At most max_ite non-empty batches of batch_size consecutive samples (short ones dropped)."""
    if opts.eval_task == "eval_context_ppl" and dataset.format == "text":
        return _text_windows(dataset, tokenizer, opts)
    tokenizer.truncation_side = "left"
    batches: list[list[Item]] = []
    for start in range(0, len(dataset.samples), opts.batch_size):
        if len(batches) == opts.max_ite:
            break
        batch = []
        for offset, s in enumerate(dataset.samples[start : start + opts.batch_size]):
            text = summarize_prompt(s.text) if opts.eval_task == "summarize" else s.text.strip()
            ids = tokenizer(
                text,
                add_special_tokens=opts.add_special_tokens,
                truncation=True,
                max_length=opts.max_input_length,
            )["input_ids"]
            if len(ids) > opts.min_input_length:
                batch.append(Item(start + offset, s.id, list(ids), s.reference, text))
        if batch:
            batches.append(batch)
    return batches


def _text_windows(dataset: data_mod.Dataset, tokenizer, opts: Options) -> list[list[Item]]:
    """A plain-text corpus (e.g. WikiText-2) cut into consecutive max_input_length-token windows."""
    ids: list[int] = []
    for s in dataset.samples:
        ids += tokenizer(s.text, add_special_tokens=False)["input_ids"]
    size, needed = opts.max_input_length, opts.max_ite * opts.batch_size
    windows = [ids[i : i + size] for i in range(0, len(ids), size)][:needed]
    items = [
        Item(i, f"window-{i}", w, "", "")
        for i, w in enumerate(windows)
        if len(w) > max(1, opts.min_input_length)
    ]
    return [items[i : i + opts.batch_size] for i in range(0, len(items), opts.batch_size)]


def run_side(
    side: Side, batches, tokenizer, gen: GenParams, opts: Options, progress: Progress | None
) -> SideRun:
    run = SideRun(side)
    context_task = opts.eval_task == "eval_context_ppl"
    if opts.warmup and not context_task:
        first = batches[0][0]
        out = side.generate([first.ids], gen)[0]
        run.warmup_text = tokenizer.decode(out, skip_special_tokens=True)
    if progress:
        progress(side.name, 0, len(batches))
    start = time.perf_counter()
    for n, batch in enumerate(batches, 1):
        if context_task:
            for item in batch:
                nll, picked = ppl_mod.context_nll(side.logits(item.ids), item.ids)
                run.outputs[item.index] = [picked]
                run.ppl[item.index] = ppl_mod.perplexity(nll)
                run.context_nll += nll[:-1].tolist()
                run.tokens_scored += len(item.ids)
        else:
            outs = side.generate([item.ids for item in batch], gen)
            for item, out in zip(batch, outs, strict=True):
                run.outputs[item.index] = out
                run.texts[item.index] = tokenizer.decode(out, skip_special_tokens=True)
                if opts.eval_ppl:
                    seq = item.ids + out
                    run.ppl[item.index] = ppl_mod.perplexity(ppl_mod.sequence_nll(side.logits(seq), seq))
        if progress:
            progress(side.name, n, len(batches))
    run.latency_s = time.perf_counter() - start
    return run

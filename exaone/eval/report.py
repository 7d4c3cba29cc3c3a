"""The summarize report: a JSON document CI can diff, a rich table for people, per-sample outputs.

Everything that changes from run to run on the same inputs (timings, paths, date, library versions)
lives under "run"; the rest is a function of the inputs, the model and the numerics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from exaone.eval import ppl as ppl_mod
from exaone.eval.rouge import ROUGE_TYPES, rouge

ROUND = 4  # digits kept in the deterministic part of the report

REPORT_VERSION = 1
SIDE_TITLES = {"exaone": "exaone", "hf": "Hugging Face"}


@dataclass
class Evaluation:
    report: dict
    samples: list[dict]  # one per evaluated sample: inputs, reference, each side's output
    first: dict | None  # the warm-up sample as summarize.py prints it


def build_report(opts, dataset, batches, runs: dict, tokenizer) -> Evaluation:
    task = opts.eval_task
    items = [item for batch in batches for item in batch]
    sides = {}
    for name, run in runs.items():
        s = run.side
        sides[name] = {"kind": s.kind, "family": s.family, "device": s.device.split(":")[0], "dtype": s.dtype}
        sides[name].update(side_metrics(run, batches, task))
    comparison = {}
    if {"exaone", "hf"} <= set(sides):
        ours, ref = sides["exaone"], sides["hf"]
        for key in (*ROUGE_TYPES, "per_token_ppl", "context_ppl"):
            if key in ours and key in ref:
                comparison[f"{key}_delta"] = round(ours[key] - ref[key], ROUND)
        if task == "summarize":
            same = sum(runs["exaone"].outputs[i.index] == runs["hf"].outputs[i.index] for i in items)
            comparison["identical_outputs"] = same
    report = {
        "report": "exaone-summarize",
        "version": REPORT_VERSION,
        "task": task,
        "dataset": {
            "source": _portable(dataset.source),
            "format": dataset.format,
            "samples_available": len(dataset.samples),
            "samples_evaluated": len(items),
            "batches": len(batches),
            "shuffle_seed": opts.random_seed,
        },
        "settings": {
            "max_ite": opts.max_ite,
            "batch_size": opts.batch_size,
            "output_len": opts.output_len,
            "max_input_length": opts.max_input_length,
            "min_input_length": opts.min_input_length,
            "add_special_tokens": opts.add_special_tokens,
            "num_beams": opts.gen.num_beams,
            "temperature": opts.gen.temperature,
            "top_k": opts.gen.top_k,
            "top_p": opts.gen.top_p,
            "eval_ppl": opts.eval_ppl or task == "eval_context_ppl",
            "input_tokens": sum(len(i.ids) for i in items),
        },
        "sides": sides,
        "comparison": comparison,
        "accuracy_check": accuracy_check(opts, sides),
        "run": _run_section(opts, runs),
    }
    samples = []
    for item in items:
        row = {"index": item.index, "id": item.id, "input_tokens": len(item.ids), "reference": item.reference}
        for name, run in runs.items():
            if item.index in run.texts:
                row[name] = run.texts[item.index]
                row[f"{name}_tokens"] = len(run.outputs[item.index])
            if item.index in run.ppl:
                row[f"{name}_ppl"] = run.ppl[item.index]
        samples.append(row)
    first = None
    warm = {name: run.warmup_text for name, run in runs.items() if run.warmup_text is not None}
    if warm:
        first_item = batches[0][0]
        first = {"input": first_item.text, "reference": first_item.reference, "outputs": warm}
    return Evaluation(report, samples, first)


def _portable(source: str) -> str:
    """A local path as its last two parts (CI machines keep data in different places)."""
    p = Path(source)
    return "/".join(p.parts[-2:]) if p.is_absolute() else source


def accuracy_check(opts, sides: dict) -> dict:
    """summarize.py's --check_accuracy: ROUGE-1 above and perplexity below the thresholds (our side)."""
    target = "exaone" if "exaone" in sides else "hf"
    check = {
        "enabled": opts.check_accuracy,
        "side": target,
        "rouge1_threshold": opts.rouge1_threshold,
        "ppl_threshold": opts.ppl_threshold,
        "failures": [],
    }
    if not opts.check_accuracy:
        check["passed"] = None
        return check
    got = sides[target]
    if "rouge1" in got and not got["rouge1"] > opts.rouge1_threshold:
        check["failures"].append(
            f"rouge1 ({got['rouge1']}) is smaller than threshold ({opts.rouge1_threshold})"
        )
    if "per_token_ppl" in got and not got["per_token_ppl"] < opts.ppl_threshold:
        check["failures"].append(
            f"average PPL ({got['per_token_ppl']}) is larger than threshold ({opts.ppl_threshold})"
        )
    check["passed"] = not check["failures"]
    return check


def _run_section(opts, runs: dict) -> dict:
    import datetime

    import torch
    import transformers

    timings = {}
    for name, run in runs.items():
        s = run.side
        counted = run.output_tokens if opts.eval_task == "summarize" else run.tokens_scored
        timings[name] = {
            "model_dir": s.model_dir,
            "load_s": round(s.load_s, 3),
            "latency_s": round(run.latency_s, 3),
            "tokens": counted,
            "tokens_per_s": round(counted / run.latency_s, 2) if run.latency_s > 0 else None,
        }
    device = "cpu"
    if any(r.side.device.startswith("cuda") for r in runs.values()) and torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": device,
        "label": opts.label,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timings": timings,
    }


def write_outputs(evaluation: Evaluation, directory: Path, force: bool = False):
    """summarize.py's --output_dir files (exaone.out / hf.out: `[index] [Beam 0] text`), plus
    samples.jsonl and report.json; written into a temporary sibling and renamed into place."""
    from exaone.core.io.manifest import atomic_output_dir

    report = evaluation.report
    with atomic_output_dir(directory, force=force) as tmp:
        for name, info in report["run"]["timings"].items():
            lines = [f"Model path: {info['model_dir']}"]
            lines += [f"[{row['index']}] [Beam 0] {row[name]}" for row in evaluation.samples if name in row]
            (tmp / f"{name}.out").write_text("\n".join(lines) + "\n", encoding="utf-8")
        with (tmp / "samples.jsonl").open("w", encoding="utf-8") as f:
            for row in evaluation.samples:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def render(evaluation: Evaluation, console, show_first: bool = True):
    """The results table (and the warm-up sample, as summarize.py logs it) on a rich console."""
    from rich.table import Table

    report = evaluation.report
    sides, timings = report["sides"], report["run"]["timings"]
    if show_first and evaluation.first:
        first = evaluation.first
        console.rule("first sample")
        console.print(f"[bold]Input:[/bold] {_clip(first['input'])}", highlight=False)
        console.print(f"[bold]Reference:[/bold] {first['reference']}", highlight=False)
        for name, text in first["outputs"].items():
            console.print(f"[bold]{SIDE_TITLES[name]} output:[/bold] {text}", highlight=False)
        console.rule()
    ds = report["dataset"]
    counts = f"{ds['samples_evaluated']} samples, {ds['batches']} batches"
    table = Table(title=f"{report['task']} on {ds['source']} ({counts})")
    table.add_column("metric")
    names = list(sides)
    for name in names:
        s = sides[name]
        table.add_column(f"{SIDE_TITLES[name]}\n{s['kind']} {s['dtype']} {s['device']}", justify="right")
    both = len(names) == 2
    if both:
        table.add_column("delta", justify="right")
    rows = [
        ("samples", "samples", None),
        ("output tokens", "output_tokens", None),
        ("tokens scored", "tokens_scored", None),
    ]
    rows += [(k, k, f"{k}_delta") for k in ROUGE_TYPES]
    rows += [("per-token perplexity", "per_token_ppl", "per_token_ppl_delta"),
             ("context perplexity", "context_ppl", "context_ppl_delta")]  # fmt: skip
    for title, key, delta in rows:
        if not any(key in sides[n] for n in names):
            continue
        cells = [_fmt(sides[n].get(key)) for n in names]
        if both:
            cells.append(_fmt(report["comparison"].get(delta), signed=True) if delta else "")
        table.add_row(title, *cells)
    table.add_section()
    for title, key in (
        ("load (s)", "load_s"),
        ("total latency (s)", "latency_s"),
        ("tokens per second", "tokens_per_s"),
    ):
        table.add_row(title, *[_fmt(timings[n].get(key)) for n in names], *([""] if both else []))
    if "identical_outputs" in report["comparison"]:
        table.add_row(
            "identical outputs",
            "",
            "",
            f"{report['comparison']['identical_outputs']}/{ds['samples_evaluated']}",
        )
    console.print(table)
    check = report["accuracy_check"]
    if check["enabled"]:
        side = SIDE_TITLES[check["side"]]
        if check["passed"]:
            console.print(
                f"[green]accuracy check passed[/green] ({side}: rouge1 > {check['rouge1_threshold']})"
            )
        for failure in check["failures"]:
            console.print(f"[red][FAILED][/red] {side}: {failure}", highlight=False)


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.3f}" if signed else f"{value:.3f}"
    return str(value)


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


def side_metrics(run, batches: list, task: str) -> dict:
    """The deterministic results of one side (no timings)."""
    items = [item for batch in batches for item in batch]
    result: dict = {"samples": len(items)}
    if task == "summarize":
        preds = [run.texts[i.index] for i in items]
        scores = rouge(preds, [i.reference for i in items])
        result["output_tokens"] = run.output_tokens
        result.update({k: round(scores[k], ROUND) for k in ROUGE_TYPES})
        digest = hashlib.sha256("\n\x00".join(preds).encode()).hexdigest()
        result["outputs_sha256"] = digest
    else:
        result["tokens_scored"] = run.tokens_scored
    if run.ppl:
        values = [run.ppl[i.index] for i in items]
        result["per_token_ppl"] = round(sum(values) / len(values), ROUND)
    if run.context_nll:
        result["context_ppl"] = round(ppl_mod.perplexity(run.context_nll), ROUND)
    return result

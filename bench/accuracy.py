"""Accuracy of every quantization format against the unquantized model; writes docs/ACCURACY.md.

    python bench/accuracy.py [--model_dir DIR] [--formats fp8,int8_sq,...] [--xsum_samples 1000]
                             [--wikitext_windows 64] [--batch_size 16] [--device auto] [--work_dir DIR]

For the unquantized model ("baseline": the checkpoint's dtype on a GPU, float32 compute on a CPU)
and for each format that `exaone quantize` accepts (called through its CLI:
`exaone quantize --model_dir M --qformat F --output_dir W/F ...`), it measures
  - ROUGE-1/2/L/Lsum of `exaone summarize` on the shared XSum pairs (summarize.py's protocol:
    "<article> TL;DR: ", greedy, --output_len tokens, prompts cut to their last 923 tokens), and
  - WikiText-2 perplexity (the raw test text in consecutive --max_input_length-token windows;
    corpus perplexity of the windows' own next tokens),
and writes the table with deltas against the baseline. Results accumulate in --work_dir
(results/<name>.json), so formats can be run in separate invocations (e.g. under a time limit);
every run rewrites docs/ACCURACY.md from all results present. Formats that quantize rejects (no
FP8 hardware, NVFP4 on a CPU, the command missing) are listed with quantize's own message.
The model defaults to the embedded default model (SmolLM2-135M weights, EXAONE-3 layout).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EXAONE_SHARED_DATA", ROOT.parent / "shared" / "data"))
FORMATS = ("fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4", "int8_wo", "int4_wo")
BASELINE = "baseline"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", type=Path, help="unquantized checkpoint (default: the embedded model)")
    p.add_argument(
        "--formats", default=",".join(FORMATS), help="comma-separated; 'none' for the baseline only"
    )
    p.add_argument("--no_baseline", action="store_true", help="reuse the baseline already in --work_dir")
    p.add_argument("--xsum", type=Path, default=SHARED / "xsum" / "xsum_0shot.jsonl")
    p.add_argument("--wikitext", type=Path, default=SHARED / "wikitext2" / "raw" / "wiki.test.raw")
    p.add_argument("--xsum_samples", type=int, default=1000, help="XSum pairs evaluated (max 1000)")
    p.add_argument("--wikitext_windows", type=int, default=64, help="WikiText-2 windows scored")
    p.add_argument("--max_input_length", type=int, default=923)
    p.add_argument("--output_len", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--calib_dataset", default=str(SHARED / "cnn_dailymail_stories"))
    p.add_argument("--calib_size", type=int, default=32)
    p.add_argument("--awq_block_size", type=int, default=64, help="int4 group size (SmolLM2: 576 = 9 x 64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "exaone-accuracy")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "ACCURACY.md")
    p.add_argument("--force", action="store_true", help="re-quantize and re-evaluate")
    return p.parse_args(argv)


def evaluate(model_dir: Path, args, task: str) -> dict:
    from exaone.eval.sides import GenParams
    from exaone.eval.summarize import Options
    from exaone.eval.summarize import evaluate as run

    if task == "summarize":
        dataset, n = args.xsum, args.xsum_samples
    else:
        dataset, n = args.wikitext, args.wikitext_windows
    batch = args.batch_size if task == "summarize" else 1
    opts = Options(
        model_dir=model_dir,
        dataset=str(dataset),
        eval_task=task,
        max_ite=-(-n // batch),
        batch_size=batch,
        output_len=args.output_len,
        max_input_length=args.max_input_length,
        gen=GenParams(args.output_len),
        device=args.device,
        warmup=False,
    )

    def progress(side, done, total):
        if done:
            print(f"  {task} {model_dir.name}: batch {done}/{total}", file=sys.stderr, flush=True)

    report = run(opts, progress).report
    side = report["sides"]["exaone"]
    side["samples_evaluated"] = report["dataset"]["samples_evaluated"]
    side["latency_s"] = report["run"]["timings"]["exaone"]["latency_s"]
    return side


def quantize(model_dir: Path, fmt: str, out: Path, args) -> tuple[bool, str]:
    """Through the CLI, as a user would; (ok, message)."""
    cmd = [sys.executable, "-m", "exaone.cli.app", "quantize", "--model_dir", str(model_dir),
           "--qformat", fmt, "--output_dir", str(out), "--calib_dataset", args.calib_dataset,
           "--calib_size", str(args.calib_size), "--device", args.device]  # fmt: skip
    if fmt in ("int4_awq", "w4a8_awq", "int4_wo"):
        cmd += ["--awq_block_size", str(args.awq_block_size)]
    if args.force:
        cmd.append("--force")
    print(f"$ {shlex.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return False, (lines[-1] if lines else f"exit code {proc.returncode}")
    return True, ""


def measure(name: str, model_dir: Path, args) -> dict:
    started = time.perf_counter()
    result = {"name": name, "model_dir": str(model_dir)}
    result["summarize"] = evaluate(model_dir, args, "summarize")
    result["wikitext"] = evaluate(model_dir, args, "eval_context_ppl")
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def environment(args) -> dict:
    import torch

    from exaone.core.loader import resolve_device

    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "command": "python " + shlex.join(["bench/accuracy.py", *sys.argv[1:]]),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from exaone.core.hub.default_model import DEFAULT_LABEL, ensure_default_model

    label = None
    if args.model_dir is None:
        args.model_dir, label = ensure_default_model(lambda m: print(m, file=sys.stderr)), DEFAULT_LABEL
    formats = [] if args.formats == "none" else [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        print(
            f"error: --formats: unknown {', '.join(unknown)} (expected {', '.join(FORMATS)})", file=sys.stderr
        )
        return 2
    results = args.work_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("output_len", "max_input_length", "batch_size", "calib_size")}
    settings["calib_dataset"] = args.calib_dataset
    settings["awq_block_size"] = args.awq_block_size
    env = {**environment(args), "model": label or str(args.model_dir), "settings": settings}

    def save(result: dict):
        (results / f"{result['name']}.json").write_text(json.dumps({**result, **env}, indent=2) + "\n")
        write_markdown(results, args.out)  # after every row, so a cut-off run still leaves its table

    if not args.no_baseline:
        save(measure(BASELINE, args.model_dir, args))
    for fmt in formats:
        out = args.work_dir / "models" / fmt
        ok, message = quantize(args.model_dir, fmt, out, args)
        if not ok:
            print(f"  {fmt}: quantize rejected it: {message}", file=sys.stderr)
            save({"name": fmt, "skipped": message})
            continue
        save(measure(fmt, out, args))
    write_markdown(results, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def write_markdown(results: Path, out: Path):
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    base = rows.get(BASELINE)
    lines = [
        "# Accuracy of the quantization formats",
        "",
        "Generated by `bench/accuracy.py` (do not edit by hand). Each format is produced by",
        "`exaone quantize` from the same checkpoint and evaluated by `exaone summarize`'s library",
        "call, our runtime only; deltas are against the unquantized baseline.",
        "",
        "- ROUGE: XSum pairs from `shared/data/xsum` (HELM prompt wrapper stripped), summarize.py's",
        "  protocol: `<article> TL;DR: `, greedy decoding, prompts cut to their last tokens; evaluate's",
        "  rouge (rouge_score, no stemmer, bootstrap mid F-measure x 100).",
        "- WikiText-2: raw test text in consecutive windows; corpus perplexity of their own next tokens.",
        "",
    ]
    if base is None:
        lines += ["No baseline result yet: run `python bench/accuracy.py`.", ""]
        out.write_text("\n".join(lines))
        return
    bs, bw = base["summarize"], base["wikitext"]
    lines += [
        f"- Model: {base['model']}",
        f"- Device: {base['device']}; torch {base['torch']}; date {base['date']}",
        f"- XSum samples: {bs['samples_evaluated']} (of 1000); output tokens per summary at most "
        f"{base['settings']['output_len']}",
        f"- WikiText-2: {bw['samples']} windows, {bw['tokens_scored']} tokens",
        f"- Baseline compute dtype: {bs['dtype']} on {bs['device']}; prompts cut to "
        f"{base['settings']['max_input_length']} tokens; quantize calibration: "
        f"{base['settings']['calib_size']} samples of {Path(base['settings']['calib_dataset']).name}",
        "",
        "| format | ROUGE-1 | Δ | ROUGE-2 | Δ | ROUGE-L | Δ | ROUGE-Lsum | Δ | WikiText-2 ppl | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = [BASELINE, *FORMATS]
    for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order)):
        r = rows[name]
        if "skipped" in r:
            lines.append(f"| {name} | not run: {r['skipped'].replace('|', '/')} |  |  |  |  |  |  |  |  |  |")
            continue
        s, w = r["summarize"], r["wikitext"]
        cells = []
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            cells += [f"{s[key]:.2f}", "" if name == BASELINE else f"{s[key] - bs[key]:+.2f}"]
        cells += [
            f"{w['context_ppl']:.3f}",
            "" if name == BASELINE else f"{w['context_ppl'] - bw['context_ppl']:+.3f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    commands = sorted({r["command"] for r in rows.values() if "command" in r})
    lines += ["", "Produced by:", "", "```bash", *commands, "```", ""]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

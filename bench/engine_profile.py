"""One device call's worth of engine measurements on a random-weight model, with a profile.

    python bench/engine_profile.py --shape exaone-3.5-7.8b --workdir /tmp/eb --out DIR

Writes (or reuses) the random checkpoint, builds and loads the engine (timed), measures the ceilings,
batch-1 and batch-64 decode at 128/128, the time to first token of a 2048-token prompt, and a torch
profiler table of 16 batch-1 decode steps (kernels by GPU time) into DIR/profile.txt; the JSON report
into DIR/engine.json. `exaone bench` is the user-facing harness; this adds the profile.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from exaone.build.builder import BuildOptions, build
from exaone.core.engine import load_engine
from exaone.core.generate import Sampling
from exaone.eval import bench, shapes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="exaone-3.5-7.8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--format", default="bf16")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/eb"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"ceilings": bench.measure_ceilings(torch.device("cuda"))}
    print(report, flush=True)
    t = time.perf_counter()
    raw = shapes.shape_config(args.shape, args.layers)
    ckpt = shapes.write_random_checkpoint(args.workdir / f"{args.shape}-{args.format}", raw, args.format)
    report["write_s"] = time.perf_counter() - t
    t = time.perf_counter()
    opts = BuildOptions(max_batch_size=256, max_input_len=2048, max_seq_len=2304, max_num_tokens=8192,
                        device="cuda", dtype="bfloat16")  # fmt: skip
    engine_dir = build(ckpt, args.workdir / f"engine-{args.shape}-{args.format}", opts)
    report["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    engine = load_engine(engine_dir)
    report["load_s"] = time.perf_counter() - t
    print({k: v for k, v in report.items() if k != "ceilings"}, flush=True)
    wbytes = bench.weight_bytes(engine)
    report["weight_bytes"] = wbytes
    report["runs"] = []
    for b in [int(x) for x in args.batches.split(",")]:
        run = bench.run_engine(engine, b, 128, 128)
        run.update(bench._roofline(report, wbytes, bench.kv_bytes_per_token(engine, 192), b, run))
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
    report["ttft"] = bench._ttft(engine, 2048, report)
    print(json.dumps(report["ttft"]), flush=True)
    # profile 16 batch-1 decode steps (graph replays: kernels still show on the GPU timeline)
    prompt = bench._prompts(1, 128, engine.cfg.vocab_size, 5)
    from torch.profiler import ProfilerActivity, profile

    engine.generate(prompt, Sampling(max_new_tokens=4))
    for graphs in (True, False):
        saved = engine.graphs
        if not graphs:
            engine.graphs = None
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.generate(prompt, Sampling(max_new_tokens=17))
            torch.cuda.synchronize()
        engine.graphs = saved
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        (args.out / f"profile-{'graphs' if graphs else 'eager'}.txt").write_text(table)
        print(table[:6000] if not graphs else table[:3000], flush=True)
    (args.out / "engine.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

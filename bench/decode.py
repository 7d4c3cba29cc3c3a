"""Decode tokens/s of the engine on a random-weight EXAONE-3.5-7.8B-shape model (a thin wrapper).

    python bench/decode.py [--format bf16|fp8|int4_awq|...] [--batch 1,64] [extra `exaone bench` flags]

Equivalent to `exaone bench throughput --shape exaone-3.5-7.8b --lengths 128/128 --batch ...`; the
random checkpoints are written by exaone/eval/shapes.py, the measurement is exaone/eval/bench.py's.
"""

from __future__ import annotations

import argparse
import sys

from exaone.cli.app import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="bf16")
    ap.add_argument("--batch", default="1,64")
    args, rest = ap.parse_known_args()
    sys.exit(main(["bench", "throughput", "--shape", "exaone-3.5-7.8b", "--lengths", "128/128",
                   "--formats", args.format, "--batch", args.batch, *rest]))  # fmt: skip

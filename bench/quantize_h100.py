"""Quantize a random-weight model of EXAONE-3.5-7.8B's shape on the GPU and record time and memory.

    python bench/quantize_h100.py RESULT.json [--formats fp8 int4_awq] [--calib_size 512] [--calib_seq 512]
        [--batch_size 1] [--workdir /tmp/exaone-bench] [--calib_file FILE]

Writes a bf16 EXAONE-3 checkpoint (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate
14336, vocab 102400) with random weights, then runs `exaone quantize` once per format in this process,
and records wall time, peak GPU memory (torch.cuda.max_memory_allocated) and the weight bytes before
and after as JSON. Random weights measure cost, not accuracy. Calibration text: --calib_file, else
generated word salad written beside the checkpoint (the GPU hosts reach no hub).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

SHAPE = dict(
    vocab_size=102400, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_attention_heads=32, num_key_value_heads=8,
)  # fmt: skip


def write_checkpoint(directory: Path, layers: int) -> None:
    """Random bf16 EXAONE-3 checkpoint, one shard per layer (drawn on the GPU when there is one)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    h, i, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"] * 128
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=dev) * std).to(torch.bfloat16).cpu()

    weight_map = {}
    shards = [("embed", {"transformer.wte.weight": rand(SHAPE["vocab_size"], h),
                         "transformer.ln_f.weight": torch.ones(h, dtype=torch.bfloat16),
                         "lm_head.weight": rand(SHAPE["vocab_size"], h)})]  # fmt: skip
    for n in range(layers):
        p = f"transformer.h.{n}."
        shards.append((f"layer{n}", {
            p + "ln_1.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "ln_2.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "attn.attention.q_proj.weight": rand(h, h), p + "attn.attention.k_proj.weight": rand(kv, h),
            p + "attn.attention.v_proj.weight": rand(kv, h), p + "attn.attention.out_proj.weight": rand(h, h),
            p + "mlp.c_fc_0.weight": rand(i, h), p + "mlp.c_fc_1.weight": rand(i, h),
            p + "mlp.c_proj.weight": rand(h, i),
        }))  # fmt: skip
    for k, (_name, tensors) in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        "model_type": "exaone", "architectures": ["ExaoneForCausalLM"], "vocab_size": SHAPE["vocab_size"],
        "hidden_size": h, "intermediate_size": i, "num_layers": layers,
        "num_attention_heads": SHAPE["num_attention_heads"],
        "num_key_value_heads": SHAPE["num_key_value_heads"],
        "layer_norm_epsilon": 1e-5, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "activation_function": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 361, "pad_token_id": 0,
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {f"w{n}": n for n in range(SHAPE["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w361").save_pretrained(directory)


def word_salad(path: Path, tokens: int) -> None:
    rng = random.Random(0)
    lines = [" ".join(f"w{rng.randrange(400, 102400)}" for _ in range(512)) for _ in range(tokens // 512 + 8)]
    path.write_text("\n\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", type=Path, help="Where the JSON result goes.")
    ap.add_argument("--formats", nargs="+", default=["fp8", "int4_awq"])
    ap.add_argument("--calib_size", type=int, default=512)
    ap.add_argument("--calib_seq", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=1, help="Calibration batch size (as quantize: 1).")
    ap.add_argument("--layers", type=int, default=SHAPE["num_layers"], help="Fewer layers for a smoke run.")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/exaone-bench"))
    ap.add_argument("--calib_file", type=Path, default=None)
    args = ap.parse_args()

    from exaone.quant.quantize import QuantizeOptions, quantize

    src = args.workdir / "exaone35-7.8b-shape-random"
    t0 = time.monotonic()
    if not (src / "config.json").is_file():
        write_checkpoint(src, args.layers)
    made = time.monotonic() - t0
    calib = args.calib_file or args.workdir / "calib.txt"
    if args.calib_file is None:
        word_salad(calib, args.calib_size * args.calib_seq)
    result = {
        "model": f"random EXAONE-3.5-7.8B shape ({args.layers} layers), bfloat16",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "calib_size": args.calib_size, "calib_seq": args.calib_seq, "batch_size": args.batch_size,
        "checkpoint_write_s": round(made, 1), "runs": [],
    }  # fmt: skip
    for qformat in args.formats:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        opts = QuantizeOptions(
            qformat=qformat, calib_dataset=str(calib), calib_size=args.calib_size,
            calib_seq=args.calib_seq, batch_size=args.batch_size, device="cuda",
        )  # fmt: skip
        start = time.monotonic()
        s = quantize(src, opts, output_dir=args.workdir / f"out-{qformat}", force=True)
        result["runs"].append({
            "qformat": qformat, "wall_s": round(time.monotonic() - start, 1),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "weight_bytes_before": s.bytes_before, "weight_bytes_after": s.bytes_after,
        })  # fmt: skip
        args.result.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["runs"][-1]), flush=True)


if __name__ == "__main__":
    main()

"""Decode throughput of the engine on a random-weight EXAONE-3.5-7.8B-shape model; JSON on stdout.

    python bench/decode.py [--workdir /tmp/exaone-bench] [--layers 32] [--batch 1 64] [--graphs_only]
                           [--format bf16|fp8|int8_sq|int8_wo|int4_awq|w4a8_awq|nvfp4]

Writes a random bf16 checkpoint (EXAONE-3 names, 7.8B shape), builds it with `exaone build` for
the GPU, then generates `--output_len` tokens after `--input_len`-token prompts at each batch
size, with CUDA graphs on and (unless --graphs_only) off. Decode tokens/s counts every sequence's
tokens after its first over the time after the last first token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=102400)


ALGO = {"fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int8_wo": "W8A16", "int4_awq": "W4A16_AWQ",
        "w4a8_awq": "W4A8_AWQ", "nvfp4": "NVFP4"}  # fmt: skip
GROUP = 128


def quantize_linear(module: str, w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Model Optimizer export tensors of one random linear (weights only matter for speed here)."""
    from exaone.core import qmath as F

    w = w.float()
    out = {}
    if fmt in ("int8_sq", "int4_awq", "w4a8_awq"):
        out[module + ".pre_quant_scale"] = torch.ones(w.shape[1], device=w.device)
    if fmt == "fp8":
        scale = w.abs().amax() / 448.0
        out[module + ".weight"], out[module + ".weight_scale"] = F.quantize_fp8(w, scale), scale
    elif fmt in ("int8_sq", "int8_wo"):
        scale = w.abs().amax(1) / 127
        out[module + ".weight"], out[module + ".weight_scale"] = F.quantize_int8(w, scale), scale
    elif fmt in ("int4_awq", "w4a8_awq"):
        scale = F.int4_block_scale(w, GROUP)
        out[module + ".weight"] = F.quantize_int4(w, scale, GROUP)
        if fmt == "w4a8_awq":
            s2 = scale.amax() / 448.0
            scale = scale / s2
            out[module + ".weight_scale_2"] = s2
        out[module + ".weight_scale"] = scale
    else:
        s2 = F.nvfp4_scale_2(w.abs().amax())
        scale = F.nvfp4_block_scale(w, s2)
        out[module + ".weight"], out[module + ".weight_scale"] = F.quantize_nvfp4(w, scale, s2), scale
        out[module + ".weight_scale_2"] = s2
    if fmt in ("fp8", "int8_sq", "w4a8_awq", "nvfp4"):
        out[module + ".input_scale"] = torch.tensor(0.05)
    return {k: v.cpu().contiguous() for k, v in out.items()}


def write_checkpoint(directory: Path, layers: int, fmt: str = "bf16", seed: int = 0):
    if (directory / "config.json").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    s = SHAPE
    head_dim = s["hidden"] // s["heads"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)

    def rand(*shape, std=0.02):
        return (torch.randn(shape, generator=gen, device=dev) * std).to(torch.bfloat16).cpu()

    def linear(name, out, inn):
        if fmt == "bf16":
            add(name + ".weight", rand(out, inn))
            return
        w = (torch.randn((out, inn), generator=gen, device=dev) * 0.02).to(torch.bfloat16)
        for k, t in quantize_linear(name, w, fmt).items():
            add(k, t)

    shard, index, n = {}, {}, 0

    def add(name, tensor):
        nonlocal shard, n
        shard[name] = tensor
        if sum(t.nbytes for t in shard.values()) > 4 << 30:
            flush()

    def flush():
        nonlocal shard, n
        if shard:
            file = f"model-{n:05d}.safetensors"
            save_file(shard, str(directory / file))
            index.update({k: file for k in shard})
            shard, n = {}, n + 1

    h, kv = s["hidden"], s["kv_heads"] * head_dim
    add("transformer.wte.weight", rand(s["vocab"], h))
    for i in range(layers):
        p = f"transformer.h.{i}."
        add(p + "ln_1.weight", torch.ones(h, dtype=torch.bfloat16))
        add(p + "ln_2.weight", torch.ones(h, dtype=torch.bfloat16))
        for name, out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("out_proj", h)):
            linear(p + f"attn.attention.{name}", out, h)
        linear(p + "mlp.c_fc_0", s["intermediate"], h)
        linear(p + "mlp.c_fc_1", s["intermediate"], h)
        linear(p + "mlp.c_proj", h, s["intermediate"])
    add("transformer.ln_f.weight", torch.ones(h, dtype=torch.bfloat16))
    add("lm_head.weight", rand(s["vocab"], h))
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = {
        "model_type": "exaone", "architectures": ["ExaoneForCausalLM"], "vocab_size": s["vocab"],
        "hidden_size": h, "intermediate_size": s["intermediate"], "num_layers": layers,
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "layer_norm_epsilon": 1e-5,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "activation_function": "silu",
        "torch_dtype": "bfloat16", "tie_word_embeddings": False, "eos_token_id": 361, "pad_token_id": 0,
    }  # fmt: skip
    if fmt != "bf16":
        quant = {"quant_algo": ALGO[fmt], "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
        if fmt in ("int4_awq", "w4a8_awq"):
            quant["group_size"] = GROUP
        config["quantization_config"] = {"quant_method": "modelopt", **quant}
        hf_quant = {"producer": {"name": "modelopt"}, "quantization": quant}
        (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def measure(engine, batch: int, input_len: int, output_len: int) -> dict:
    from exaone.core.generate import Sampling

    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1000, 100000, (batch, input_len), generator=g).tolist()
    params = Sampling(max_new_tokens=output_len)
    engine.generate(prompts[:1], Sampling(max_new_tokens=min(4, output_len)))  # warm-up
    torch.cuda.synchronize() if engine.device.type == "cuda" else None
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    first = max(r.time_to_first_token_s for r in out)
    last = max(r.total_s for r in out)
    tokens = sum(len(r.output_ids) - 1 for r in out)
    return {
        "batch": batch,
        "decode_tokens_per_s": tokens / (last - first) if last > first else None,
        "per_sequence_tokens_per_s": (output_len - 1) / (last - first) if last > first else None,
        "time_to_first_token_s": first,
        "wall_s": wall,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/exaone-bench"))
    ap.add_argument("--layers", type=int, default=SHAPE["layers"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--input_len", type=int, default=128)
    ap.add_argument("--output_len", type=int, default=128)
    ap.add_argument("--kv_cache_dtype", default="auto")
    ap.add_argument(
        "--format", default="bf16", choices=["bf16", *ALGO], help="weight format of the random model"
    )
    ap.add_argument("--graphs_only", action="store_true", help="skip the eager (no CUDA graphs) runs")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    from exaone.build.builder import BuildOptions, build
    from exaone.core.engine import RuntimeOptions, load_engine

    ckpt = args.workdir / f"random-7.8b-{args.layers}l-{args.format}"
    engine_dir = args.workdir / f"engine-{args.layers}l-{args.format}-{args.kv_cache_dtype}"
    t = time.perf_counter()
    write_checkpoint(ckpt, args.layers, args.format)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    opts = BuildOptions(
        max_batch_size=max(args.batch),
        max_input_len=args.input_len,
        max_seq_len=args.input_len + args.output_len,
        max_num_tokens=max(8192, args.input_len),
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        dtype="bfloat16",
    )
    build(ckpt, engine_dir, opts, say=lambda m: print(m, file=sys.stderr))
    build_s = time.perf_counter() - t
    report = {
        "model": f"random EXAONE-3.5-7.8B shape, {args.layers} layers, {args.format} weights, bf16 compute",
        "format": args.format,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "kv_cache_dtype": args.kv_cache_dtype,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "checkpoint_write_s": write_s,
        "build_s": build_s,
        "runs": [],
    }
    for graphs in [True] if args.graphs_only else [True, False]:
        t = time.perf_counter()
        engine = load_engine(engine_dir, args.device, RuntimeOptions(cuda_graphs=graphs))
        load_s = time.perf_counter() - t
        for b in args.batch:
            run = measure(engine, b, args.input_len, args.output_len)
            report["runs"].append({"cuda_graphs": engine.graphs is not None, "load_s": load_s, **run})
            print(json.dumps(report["runs"][-1]), file=sys.stderr)
        del engine
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

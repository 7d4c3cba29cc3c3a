"""`exaone convert`: write a TensorRT-LLM checkpoint (`config.json` + one `rank{N}.safetensors` per rank).

The source is a Hugging Face EXAONE directory, unquantized or a Model Optimizer export from
`exaone quantize`, read through the one loader; names, splits and packing come from names.py,
linear.py and weight_only.py, config.json from config.py. reader.py reads the result back.
Decisions and the EXAONE-4 / K-EXAONE extensions: docs/convert.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from exaone.core import qmath
from exaone.core.config import ModelConfig, load_config
from exaone.core.errors import ExaoneError, OptionError
from exaone.core.formats.registry import trtllm_algos
from exaone.core.io import manifest as mf
from exaone.core.io.checkpoint import SIDE_FILES
from exaone.core.loader import open_checkpoint, read_state
from exaone.core.trtllm import kv_calib
from exaone.core.trtllm import linear as tl
from exaone.core.trtllm import names as tn
from exaone.core.trtllm import weight_only as wo
from exaone.core.trtllm.config import ConvertOptions, Source, trtllm_config
from exaone.core.trtllm.names import DTYPES, is_trtllm_checkpoint, unshared

MODELOPT_ALGOS = trtllm_algos()  # Model Optimizer quant_algo values `convert` maps onto TensorRT-LLM tensors


def resolve_dtype(opts: ConvertOptions, cfg: ModelConfig) -> str:
    """convert_utils.infer_dtype: 'auto' takes the checkpoint's dtype, float32 becomes float16."""
    if opts.dtype == "auto":
        found = cfg.torch_dtype if cfg.torch_dtype in DTYPES else "float16"
        return "float16" if found == "float32" else found
    if opts.dtype not in DTYPES:
        raise OptionError("dtype", opts.dtype, f"expected auto, {', '.join(DTYPES)}")
    return opts.dtype


def validate(cfg: ModelConfig, opts: ConvertOptions, quant: dict | None):
    tp, pp = opts.tp_size, opts.pp_size
    if tp < 1 or pp < 1:
        option = "tp_size" if tp < 1 else "pp_size"
        raise OptionError(option, getattr(opts, option), "must be at least 1")
    if cfg.num_heads % tp:
        problem = f"does not divide num_attention_heads {cfg.num_heads}"
        raise OptionError("tp_size", tp, problem, "{option} {value} {problem}")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise OptionError(
            "tp_size",
            tp,
            f"does not divide num_key_value_heads {cfg.num_kv_heads} "
            "(nor is it a multiple of it, which would duplicate kv heads as TensorRT-LLM does)",
            "{option} {value} {problem}",
        )
    if cfg.num_layers % pp:
        problem = f"does not divide the {cfg.num_layers} layers"
        raise OptionError("pp_size", pp, problem, "{option} {value} {problem}")
    if cfg.intermediate_size % tp:
        problem = f"does not divide intermediate_size {cfg.intermediate_size}"
        raise OptionError("tp_size", tp, problem, "{option} {value} {problem}")
    if cfg.family == "exaone_moe" and cfg.moe_intermediate_size % tp:
        problem = f"does not divide moe_intermediate_size {cfg.moe_intermediate_size}"
        raise OptionError("tp_size", tp, problem, "{option} {value} {problem}")
    if opts.workers < 1:
        raise OptionError("workers", opts.workers, "must be at least 1")
    if opts.use_weight_only:
        if quant is not None:
            problem = "the input is already quantized (hf_quant_config.json)"
            raise OptionError("use_weight_only", True, problem, "{option}: {problem}")
        if opts.weight_only_precision not in tn.WEIGHT_ONLY_ALGO:
            raise OptionError("weight_only_precision", opts.weight_only_precision, "expected int8 or int4")
        if cfg.family == "exaone_moe":
            raise ExaoneError(
                "not supported: weight-only quantization of K-EXAONE experts (TensorRT-LLM preprocesses "
                "MoE weights with another interleave); quantize with `exaone quantize` instead"
            )
        if opts.per_group and opts.weight_only_precision != "int4":
            problem = "only int4 has a group-wise format (W4A16_AWQ) in TensorRT-LLM"
            raise OptionError("per_group", True, problem, "{option}: {problem}")
        if opts.per_group:
            _check_groups(cfg, opts)
        else:
            wo.layout_for_sm(opts.target_sm)
    elif opts.per_group:
        raise ExaoneError("--per_group needs --use_weight_only --weight_only_precision int4")
    if opts.int8_kv_cache:
        if quant is not None and quant.get("kv_cache_quant_algo"):
            problem = "the input already has a quantized KV cache (hf_quant_config.json)"
            raise OptionError("int8_kv_cache", True, problem, "{option}: {problem}")
        if opts.calib_size < 1 or opts.calib_max_seq_length < 1:
            option = "calib_size" if opts.calib_size < 1 else "calib_max_seq_length"
            raise OptionError(option, getattr(opts, option), "must be at least 1")


def _check_groups(cfg: ModelConfig, opts: ConvertOptions):
    g, tp = opts.group_size, opts.tp_size
    ins = {
        "hidden_size": cfg.hidden_size,
        "num_attention_heads * head_dim / tp_size": cfg.num_heads * cfg.head_dim // tp,
        "intermediate_size / tp_size": cfg.intermediate_size // tp,
    }
    for what, n in ins.items():
        if n % g:
            problem = f"does not divide {what} ({n}): int4 groups cannot straddle it"
            raise OptionError("group_size", g, problem, "{option} {value} {problem}")


def _source_quantization(src: Path, raw: dict) -> dict | None:
    path = src / "hf_quant_config.json"
    if not path.is_file():
        method = (raw.get("quantization_config") or {}).get("quant_method")
        if method:
            raise ExaoneError(
                f"{src}: not supported yet: converting a {method!r}-quantized checkpoint to the TensorRT-LLM "
                "format (Model Optimizer exports from `exaone quantize` are)"
            )
        return None
    try:
        quant = json.loads(path.read_text())["quantization"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ExaoneError(f"{path}: expected a JSON object with a 'quantization' block") from None
    algo = quant.get("quant_algo")
    if algo not in MODELOPT_ALGOS and algo is not None:
        raise ExaoneError(
            f"{path}: not supported yet: converting quant_algo {algo!r} "
            f"(supported: {', '.join(MODELOPT_ALGOS)})"
        )
    if quant.get("kv_cache_quant_algo") not in (None, "FP8", "INT8"):
        raise ExaoneError(
            f"{path}: kv_cache_quant_algo {quant.get('kv_cache_quant_algo')!r} is not supported"
        )
    return quant


# --- reading the source ----------------------------------------------------------------------


def load_source(src: str | Path) -> Source:
    """Config and every tensor under our module names (not cast), through the one loader."""
    src = Path(src)
    if is_trtllm_checkpoint(src):
        raise ExaoneError(
            f"{src}: already a TensorRT-LLM checkpoint (config.json has 'architecture' and 'mapping')"
        )
    ck = open_checkpoint(src)
    quant = _source_quantization(src, ck.cfg.raw)
    state = read_state(ck)
    if quant is not None:
        quantized = {n.rsplit(".", 1)[0] for n in state if n.endswith(".weight_scale")}
        bad = sorted(n for n in quantized if ".experts." in n or n.startswith(("lm_head", "mtp.")))
        if bad:
            raise ExaoneError(
                f"{src}: not supported yet: converting quantized {bad[0]} (experts, lm_head, MTP)"
            )
    return Source(ck.cfg, state, quant)


# --- writing one rank ------------------------------------------------------------------------


def rank_weights(source: Source, opts: ConvertOptions, dtype: str, rank: int) -> dict[str, torch.Tensor]:
    cfg, state = source.cfg, source.state
    tp, pp = opts.tp_size, opts.pp_size
    tp_rank, pp_rank = rank % tp, rank // tp
    dt = DTYPES[dtype]
    per_stage = cfg.num_layers // pp
    out: dict[str, torch.Tensor] = {}

    def get(name, to=dt):
        if name not in state:
            raise ExaoneError(f"source checkpoint lacks tensor {name}")
        return state[name].to(to)

    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = get("model.embed_tokens.weight")
    if pp_rank == pp - 1:
        head = get("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
        out["lm_head.weight"] = tn.chunk(tn.pad_rows(head, tp), tp, tp_rank)
        out["transformer.ln_f.weight"] = get("model.norm.weight")
        for name in sorted(n for n in state if n.startswith("mtp.")):
            out[name] = get(name, torch.float32 if name.endswith("e_score_correction_bias") else dt)
    for layer in range(pp_rank * per_stage, (pp_rank + 1) * per_stage):
        src, dst = f"model.layers.{layer}.", f"transformer.layers.{layer - pp_rank * per_stage}."
        linears = tn.ATTENTION + (tn.DENSE_MLP if src + "mlp.gate_proj.weight" in state else tn.SHARED_EXPERT)
        for target, parts, column, kv in linears:
            srcs = [_source_linear(state, src + p, dt, opts) for p in parts]
            tensors = tl.build(srcs, column, tp, tp_rank, kv, cfg.num_kv_heads, name=src + parts[0])
            out.update({f"{dst}{target}.{k}": v for k, v in _to_trt(tensors, dt, opts, dst + target).items()})
        if source.kv_scales is not None:  # --int8_kv_cache
            out[dst + "attention.kv_cache_scaling_factor"] = source.kv_scales[layer]
        k_scale, v_scale = (
            state.get(src + "self_attn.k_proj.k_scale"),
            state.get(src + "self_attn.v_proj.v_scale"),
        )
        if k_scale is not None and v_scale is not None:  # modelopt: kv_cache_scaling_factor = max(k, v)
            out[dst + "attention.kv_cache_scaling_factor"] = torch.maximum(
                k_scale.float(), v_scale.float()
            ).reshape(1)
        for suffix, target in tn.NORMS.items():
            if src + suffix in state:
                out[dst + target] = get(src + suffix)
        if src + "mlp.gate.weight" in state:
            out.update(_moe_weights(cfg, get, src, dst, tp, tp_rank))
    return out


def _source_linear(
    state: dict, prefix: str, dt: torch.dtype, opts: ConvertOptions
) -> dict[str, torch.Tensor]:
    found = {s: state[f"{prefix}.{s}"] for s in tl.TRT_SUFFIX if f"{prefix}.{s}" in state}
    if "weight" not in found:
        raise ExaoneError(f"source checkpoint lacks tensor {prefix}.weight")
    if "weight_scale" not in found:  # unquantized: cast, and group-quantize for --per_group
        w = found["weight"].to(dt)
        if opts.use_weight_only and opts.per_group:
            scale = qmath.int4_block_scale(w, opts.group_size)
            return {"weight": qmath.quantize_int4(w, scale, opts.group_size), "weight_scale": scale.to(dt)}
        return {"weight": w}
    if "pre_quant_scale" in found:
        found["pre_quant_scale"] = found["pre_quant_scale"].to(dt)  # Int8SmoothQuantLinear / AWQ: model dtype
    return found


def _to_trt(tensors: dict[str, torch.Tensor], dt, opts: ConvertOptions, name: str) -> dict[str, torch.Tensor]:
    w = tensors["weight"]
    if "weight_scale" not in tensors and opts.use_weight_only or w.dtype == torch.int8:
        layout = wo.layout_for_sm(opts.target_sm)
    if "weight_scale" not in tensors and opts.use_weight_only:  # TensorRT-LLM's own W8A16 / W4A16
        bits = tn.ALGO_BITS[tn.WEIGHT_ONLY_ALGO[opts.weight_only_precision]]
        wo.check_shape(w.shape[0], w.shape[1], bits, layout, name)
        q, scale = wo.symmetric_quantize(w, bits)
        return {"weight": wo.preprocess(q, bits, layout), "per_channel_scale": scale}
    if w.dtype == torch.int8 and "input_scale" not in tensors:  # modelopt int8_wo -> TensorRT-LLM W8A16
        wo.check_shape(w.shape[0], w.shape[1], 8, layout, name)
        return {"weight": wo.preprocess(w, 8, layout), "per_channel_scale": tensors["weight_scale"].to(dt)}
    return tl.to_trt(tensors)


def _moe_weights(cfg: ModelConfig, get, src: str, dst: str, tp: int, tp_rank: int) -> dict:
    out = {
        dst + "mlp.router.weight": get(src + "mlp.gate.weight", torch.float32),
        dst + "mlp.router.e_score_correction_bias": get(
            src + "mlp.gate.e_score_correction_bias", torch.float32
        ),
    }
    fc, proj = [], []
    for e in range(cfg.num_experts):
        p = f"{src}mlp.experts.{e}."
        up = tn.chunk(get(p + "up_proj.weight"), tp, tp_rank)
        gate = tn.chunk(get(p + "gate_proj.weight"), tp, tp_rank)
        fc.append(torch.cat([up, gate]))  # Mixtral's cat([w3, w1]): up first
        proj.append(tn.chunk(get(p + "down_proj.weight"), tp, tp_rank, 1))
    out[dst + "mlp.fc.weight"] = torch.stack(fc)
    out[dst + "mlp.proj.weight"] = torch.stack(proj)
    return out


# --- convert ---------------------------------------------------------------------------------


def convert(src: str | Path, out: str | Path, opts: ConvertOptions, force: bool = False, say=None) -> Path:
    """Write a TensorRT-LLM checkpoint for src into out; a no-op when out already records the same job."""
    src, out = Path(src), Path(out)
    say = say or (lambda msg: print(msg, file=sys.stderr))
    started = mf.now()
    if is_trtllm_checkpoint(src):
        raise ExaoneError(f"{src}: already a TensorRT-LLM checkpoint; give the Hugging Face directory")
    parent_manifest = mf.load_or_derive(src)
    if parent_manifest.kind == "trtllm-checkpoint":
        raise ExaoneError(f"{src}: already a TensorRT-LLM checkpoint; give the Hugging Face directory")
    cfg = load_config(src)
    validate(cfg, opts, _source_quantization(src, cfg.raw))
    dtype = resolve_dtype(opts, cfg)
    parent = mf.manifest_hash(parent_manifest)
    arguments = {"source": str(src.resolve()), **asdict(opts), "dtype": dtype}
    if not opts.int8_kv_cache:
        for key in ("calib_dataset", "calib_size", "calib_max_seq_length"):
            arguments.pop(key)
    if not force and mf.is_up_to_date(out, parent, arguments):
        say(f"{out}: already converted from {src} with the same options; nothing to do (--force redoes)")
        return out
    source = load_source(src)
    if opts.int8_kv_cache:
        source.kv_scales, source.calib_tokens = kv_calib.calibrate(
            src, opts.calib_dataset, opts.calib_size, opts.calib_max_seq_length, 0, say
        )
    world = opts.tp_size * opts.pp_size
    with mf.atomic_output_dir(out, force=force) as tmp:
        config = trtllm_config(source, opts, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")

        def write(rank: int):
            t0 = time.monotonic()
            weights = rank_weights(source, opts, dtype, rank)
            save_file(unshared(weights), str(tmp / f"rank{rank}.safetensors"), metadata={"format": "pt"})
            size = sum(t.numel() * t.element_size() for t in weights.values()) / 2**20
            say(
                f"rank {rank + 1}/{world}: {len(weights)} tensors, {size:.1f} MiB "
                f"({time.monotonic() - t0:.1f} s)"
            )

        with ThreadPoolExecutor(max_workers=min(opts.workers, world)) as pool:
            list(pool.map(write, range(world)))
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
        _write_manifest(tmp, source, parent_manifest, parent, dtype, opts, config, arguments, started)
    return out


def _calibration(source: Source, opts: ConvertOptions, parent_manifest):
    if opts.int8_kv_cache:
        return mf.Calibration(
            dataset=opts.calib_dataset, size=opts.calib_size, seq=opts.calib_max_seq_length, seed=0,
            tokens=source.calib_tokens,
        )  # fmt: skip
    return parent_manifest.quantization.calibration if parent_manifest.quantization else None


def _write_manifest(tmp, source, parent_manifest, parent, dtype, opts, config, arguments, started):
    q = config["quantization"]
    quant = None
    if q["quant_algo"] or q["kv_cache_quant_algo"]:
        if opts.use_weight_only:
            algorithm = f"{opts.weight_only_precision}_wo"
        else:
            algorithm = parent_manifest.quantization.algorithm if parent_manifest.quantization else None
            algorithm = algorithm or MODELOPT_ALGOS.get(q["quant_algo"], "none")  # none: only the KV cache
        extra = {"trtllm_quant_algo": q["quant_algo"], "trtllm_kv_cache_quant_algo": q["kv_cache_quant_algo"]}
        if q["quant_algo"] in ("W8A16", "W4A16"):
            extra["weight_layout"] = wo.layout_for_sm(opts.target_sm)
        quant = mf.Quantization(
            algorithm=algorithm,
            kv_cache_dtype=(q["kv_cache_quant_algo"] or "").lower() or None,
            group_size=q["group_size"] if q["quant_algo"] in ("W4A16_AWQ", "W4A8_AWQ") else None,
            calibration=_calibration(source, opts, parent_manifest),
            extra=extra,
        )
    model = parent_manifest.model.model_copy(update={"architecture": tn.ARCHITECTURES[source.cfg.family]})
    m = mf.Manifest(
        kind="trtllm-checkpoint",
        model=model,
        dtype=dtype,
        quantization=quant,
        mapping=mf.ParallelMapping(
            world_size=opts.tp_size * opts.pp_size, tp_size=opts.tp_size, pp_size=opts.pp_size
        ),
        files=mf.list_files(tmp),
        parent=parent,
        producer=mf.make_producer(arguments, started),
    )
    mf.write_manifest(tmp, m)



"""Random-weight checkpoints of the real EXAONE shapes, for benchmarks (speed does not depend on the
values, only on the shapes and formats): written once under a work directory and reused.

Each shape is the config.json of the released model (sizes from the Hugging Face configs), written
as an ordinary checkpoint of its family with random bf16 weights, or in a quantized format as Model
Optimizer exports it (the scales are computed from the random weights with exaone/core/qmath.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from exaone.core import model as models
from exaone.core import qmath
from exaone.core.config import FULL, SLIDING, parse_config
from exaone.core.errors import OptionError
from exaone.core.formats.registry import FORMATS

_EXAONE3 = dict(model_type="exaone", architectures=["ExaoneForCausalLM"], vocab_size=102400,
                layer_norm_epsilon=1e-5, activation_function="silu", rope_theta=1000000.0,
                torch_dtype="bfloat16", eos_token_id=361, pad_token_id=0, bos_token_id=1)  # fmt: skip
_EXAONE4 = dict(model_type="exaone4", architectures=["Exaone4ForCausalLM"], vocab_size=102400,
                rms_norm_eps=1e-5, hidden_act="silu", rope_theta=1000000.0, torch_dtype="bfloat16",
                eos_token_id=361, pad_token_id=0, bos_token_id=1)  # fmt: skip


def _layer_types(n: int, window: int | None) -> list[str]:
    return [FULL if window is None or (i + 1) % 4 == 0 else SLIDING for i in range(n)]


SHAPES = {
    "exaone-3.5-7.8b": {**_EXAONE3, "hidden_size": 4096, "intermediate_size": 14336, "num_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
                        "tie_word_embeddings": False},
    "exaone-3.5-2.4b": {**_EXAONE3, "hidden_size": 2560, "intermediate_size": 7168, "num_layers": 30,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 80,
                        "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "exaone-4.0-1.2b": {**_EXAONE4, "hidden_size": 2048, "intermediate_size": 4096, "num_hidden_layers": 30,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                        "max_position_embeddings": 65536, "tie_word_embeddings": True,
                        "layer_types": _layer_types(30, None), "sliding_window": None},
    "exaone-4.0-32b": {**_EXAONE4, "hidden_size": 5120, "intermediate_size": 27392, "num_hidden_layers": 64,
                       "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                       "max_position_embeddings": 131072, "tie_word_embeddings": False,
                       "sliding_window": 4096, "layer_types": _layer_types(64, 4096)},
    "k-exaone-reduced": {"model_type": "exaone_moe", "architectures": ["ExaoneMoeForCausalLM"],
                         "vocab_size": 153600, "hidden_size": 6144, "intermediate_size": 18432,
                         "moe_intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 64,
                         "num_key_value_heads": 8, "head_dim": 128, "num_experts": 128,
                         "num_experts_per_tok": 8, "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
                         "routed_scaling_factor": 2.5, "norm_topk_prob": True, "rms_norm_eps": 1e-5,
                         "hidden_act": "silu", "rope_theta": 1000000.0, "max_position_embeddings": 262144,
                         "sliding_window": 128, "layer_types": _layer_types(8, 128),
                         "mlp_layer_types": ["dense"] + ["sparse"] * 7, "tie_word_embeddings": False,
                         "torch_dtype": "bfloat16", "eos_token_id": 53, "pad_token_id": 0},
}  # fmt: skip
QUANT_GROUP = 128


def shape_config(name: str, layers: int | None = None) -> dict:
    if name not in SHAPES:
        raise OptionError("shape", name, f"unknown (expected one of {', '.join(SHAPES)})")
    raw = json.loads(json.dumps(SHAPES[name]))
    if layers is not None:
        key = "num_layers" if raw["model_type"] == "exaone" else "num_hidden_layers"
        raw[key] = layers
        if "layer_types" in raw:
            raw["layer_types"] = _layer_types(layers, raw.get("sliding_window"))
        if "mlp_layer_types" in raw:
            raw["mlp_layer_types"] = ["dense"] + ["sparse"] * (layers - 1)
    return raw


def _quantized(name: str, w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Model Optimizer export tensors of one random linear [out, in] in `fmt`."""
    w = w.float()
    out = {}
    if fmt in ("int8_sq", "int4_awq", "w4a8_awq"):
        out[name + ".pre_quant_scale"] = torch.ones(w.shape[1], device=w.device)
    if fmt == "fp8":
        scale = w.abs().amax() / qmath.E4M3_MAX
        out[name + ".weight"], out[name + ".weight_scale"] = qmath.quantize_fp8(w, scale), scale
    elif fmt in ("int8_sq", "int8_wo"):
        scale = w.abs().amax(1) / qmath.INT8_MAX
        out[name + ".weight"], out[name + ".weight_scale"] = qmath.quantize_int8(w, scale), scale
    elif fmt in ("int4_awq", "int4_wo", "w4a8_awq"):
        scale = qmath.int4_block_scale(w, QUANT_GROUP)
        out[name + ".weight"] = qmath.quantize_int4(w, scale, QUANT_GROUP)
        if fmt == "w4a8_awq":
            s2 = scale.amax() / qmath.E4M3_MAX
            scale = scale / s2
            out[name + ".weight_scale_2"] = s2
        out[name + ".weight_scale"] = scale
    elif fmt == "nvfp4":
        s2 = qmath.nvfp4_scale_2(w.abs().amax())
        scale = qmath.nvfp4_block_scale(w, s2)
        out[name + ".weight"], out[name + ".weight_scale"] = qmath.quantize_nvfp4(w, scale, s2), scale
        out[name + ".weight_scale_2"] = s2
    else:
        raise OptionError("format", fmt, f"expected bf16 or one of {', '.join(FORMATS)}")
    if FORMATS[fmt].activations is not None:
        out[name + ".input_scale"] = torch.tensor(0.05)
    return {k: v.cpu().contiguous() for k, v in out.items()}


def write_random_checkpoint(directory: Path, raw: dict, fmt: str = "bf16", seed: int = 0, say=print) -> Path:
    """A checkpoint of config `raw` with random weights (std 0.02, norms 1), in `fmt`; reused when the
    directory already holds one for the same config and format."""
    directory = Path(directory)
    stamp = {"config": raw, "format": fmt, "seed": seed}
    marker = directory / "random-checkpoint.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(raw)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.device("meta"):
        skeleton = models.build(cfg)
    linears = {n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    shard, index, n = {}, {}, [0]
    quantize = fmt != "bf16"

    def flush():
        if shard:
            file = f"model-{n[0]:05d}.safetensors"
            save_file(dict(shard), str(directory / file), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, file))
            shard.clear()
            n[0] += 1

    expected = models.expected_tensors(cfg)
    say(f"writing a random {fmt} checkpoint of {sum(_numel(s) for s in expected.values()) / 1e9:.2f}B "
        f"parameters to {directory} ...")  # fmt: skip
    for name, shape in expected.items():
        module = name.removesuffix(".weight")
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith("e_score_correction_bias"):
            t = torch.zeros(shape, dtype=torch.float32)
        else:
            t = (torch.randn(shape, generator=gen, device=dev) * 0.02).to(torch.bfloat16)
        if quantize and module in linears and not module.startswith(("lm_head", "mtp")):
            tensors = _quantized(module, t, fmt)
        else:
            tensors = {name: t.cpu()}
        for k, v in tensors.items():
            shard[_checkpoint_name(k, cfg)] = v
        if sum(v.nbytes for v in shard.values()) > 4 << 30:
            flush()
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = dict(raw)
    if quantize:
        quant = {"quant_algo": FORMATS[fmt].modelopt_algo, "kv_cache_quant_algo": None,
                 "exclude_modules": ["lm_head"]}  # fmt: skip
        if FORMATS[fmt].block == "awq":
            quant["group_size"] = QUANT_GROUP
        config["quantization_config"] = {"quant_method": "modelopt", **quant}
        (directory / "hf_quant_config.json").write_text(
            json.dumps({"producer": {"name": "modelopt"}, "quantization": quant})
        )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps(stamp))
    return directory


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _checkpoint_name(name: str, cfg) -> str:
    return models.rename(name, models.family(cfg).RENAME_BACK)

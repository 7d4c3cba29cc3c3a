"""Build a family's model from a checkpoint directory: config -> empty (meta) model -> tensors.

Each family module provides `Model` (a CausalLM), `RENAME` (checkpoint name -> module name
regexes), `RENAME_BACK` (its inverse, for writing checkpoints) and optionally
`prepare_state_dict(state_dict, cfg)` for layouts a rename cannot express (e.g. fused expert
tensors) and `FP32_PARAMS` (regexes of parameters kept in fp32).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import torch

from exaone.core import checkpoint
from exaone.core.config import ModelConfig, load_config
from exaone.core.errors import ExaoneError
from exaone.core.layers import CausalLM, rope_inv_freq

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def family_module(cfg: ModelConfig) -> ModuleType:
    return importlib.import_module(f"exaone.core.{cfg.family}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExaoneError("--device cuda: no CUDA device is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ExaoneError(f"--device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: float32 on the CPU (fast and exact there), the checkpoint's dtype on a GPU."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    if dtype not in DTYPES:
        raise ExaoneError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def load_model(
    model_dir: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> CausalLM:
    """Load any supported EXAONE checkpoint directory into an inference model (eval mode)."""
    model_dir = Path(model_dir)
    from exaone.core import trtllm  # a TensorRT-LLM checkpoint is read back as an HF directory

    if trtllm.is_trtllm_checkpoint(model_dir):
        model_dir = trtllm.as_hf_dir(model_dir)
    cfg = load_config(model_dir)
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, cfg, device) if isinstance(dtype, str) else dtype
    fam = family_module(cfg)
    infos = checkpoint.scan(model_dir)

    with torch.device("meta"):
        model: CausalLM = fam.Model(cfg)
    # Quantized checkpoints (Model Optimizer export, AutoAWQ): their linears become QuantLinear.
    from exaone.quant.load import swap_quantized_linears

    renamed = {rename(n, fam.RENAME): info for n, info in infos.items()}
    quant_fp32 = swap_quantized_linears(model, renamed, model_dir)
    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    expected.pop("inv_freq")
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    fp32_params = [re.compile(p) for p in (*getattr(fam, "FP32_PARAMS", ()), *quant_fp32)]
    for name, tensor in checkpoint.iter_tensors(infos):
        if IGNORED.search(name):
            continue
        target = rename(name, fam.RENAME)
        if target == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head
        if tensor.is_floating_point() and tensor.element_size() >= 2:
            keep_fp32 = any(p.search(target) for p in fp32_params)
            tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
        state[target] = tensor.to(device)
        origin[target] = f"{infos[name].file.name}:{name}"
    if hasattr(fam, "prepare_state_dict"):
        state = fam.prepare_state_dict(state, cfg)

    missing = [n for n in expected if n not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ExaoneError(
            f"{model_dir}: checkpoint lacks tensor for {missing[0]}{more}; does config.json match?"
        )
    unexpected = [n for n in state if n not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        where = origin.get(unexpected[0], unexpected[0])
        raise ExaoneError(f"{model_dir}: unexpected tensor {where}{more} for a {cfg.architecture} checkpoint")
    for name, param in expected.items():
        if tuple(state[name].shape) != tuple(param.shape):
            where = origin.get(name, name)
            raise ExaoneError(
                f"{model_dir}: tensor {where} has shape {list(state[name].shape)}, "
                f"expected {list(param.shape)} from config.json"
            )
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.tie_weights()
    return model.eval()

"""The Hugging Face transformers reference for a checkpoint directory, with transformers' own classes.

EXAONE-3.x has no transformers class (its own needs remote code, which we never run); it is the Llama
computation under other names, so the reference is `LlamaForCausalLM` holding the checkpoint's
tensors renamed by `exaone3.RENAME`. EXAONE-4.0 and K-EXAONE load into transformers'
`Exaone4ForCausalLM` / `ExaoneMoeForCausalLM` from their own safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exaone.core import checkpoint
from exaone.core.config import ModelConfig, load_config
from exaone.core.errors import ExaoneError
from exaone.core.model import IGNORED, rename


def check_plain_checkpoint(model_dir: Path):
    """The reference reads unquantized HF checkpoints only (what summarize.py's --hf_model_dir is)."""
    config = model_dir / "config.json"
    raw = json.loads(config.read_text()) if config.is_file() else {}
    if (model_dir / "hf_quant_config.json").is_file() or raw.get("quantization_config"):
        raise ExaoneError(
            f"--test_hf: {model_dir} is a quantized checkpoint; the Hugging Face reference needs the "
            "original one: pass --hf_model_dir"
        )
    if (model_dir / "rank0.safetensors").is_file() or ("architecture" in raw and "model_type" not in raw):
        raise ExaoneError(
            f"--test_hf: {model_dir} is a TensorRT-LLM checkpoint; "
            "pass the Hugging Face one with --hf_model_dir"
        )


def load_reference(model_dir: str | Path, dtype: torch.dtype, device: torch.device):
    """A transformers causal LM (eval mode) computing what our model for model_dir computes."""
    model_dir = Path(model_dir)
    check_plain_checkpoint(model_dir)
    cfg = load_config(model_dir)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # "Loading weights" bars are noise beside our own progress
    if cfg.family == "exaone3":
        model = _llama(model_dir, cfg, dtype, device)
    else:
        model = _native(model_dir, cfg, dtype, device)
    return model.eval()


def llama_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(**cfg.transformers_kwargs(), hidden_act="silu", attention_bias=False, mlp_bias=False)


def _llama(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaForCausalLM

    from exaone.core import exaone3

    config = llama_config(cfg)
    state = {}
    for name, tensor in checkpoint.iter_tensors(checkpoint.scan(model_dir), dtype, device):
        if IGNORED.search(name):
            continue
        target = rename(name, exaone3.RENAME)
        if target == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        state[target] = tensor
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise ExaoneError(f"{model_dir}: tensors do not map onto LlamaForCausalLM (e.g. {odd[0]!r})")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _rebuild_rotary(model, device)
    return model


def _rebuild_rotary(model, device: torch.device):
    """Rotary tables are computed at construction, not loaded: rebuild the ones made on `meta`."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=child.config).to(device))


def _native(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    import transformers

    names = {
        "exaone4": ("Exaone4Config", "Exaone4ForCausalLM"),
        "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM"),
    }
    config_name, model_name = names[cfg.family]
    if not hasattr(transformers, model_name):
        raise ExaoneError(
            f"--test_hf: transformers {transformers.__version__} has no {model_name}; upgrade transformers"
        )
    raw = dict(cfg.raw)
    # transformers' config breaks when layer_types is missing: give it the pattern we derived.
    raw["layer_types"] = list(cfg.layer_types)
    if cfg.family == "exaone_moe":
        raw.setdefault("mlp_layer_types", list(cfg.mlp_layer_types))
    for key in ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype"):
        raw.pop(key, None)
    config = getattr(transformers, config_name)(**raw)
    try:
        model = getattr(transformers, model_name).from_pretrained(
            str(model_dir), config=config, dtype=dtype, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExaoneError(
            f"--test_hf: transformers cannot load {model_dir} as {model_name} ({first})"
        ) from None
    return model.to(device)

"""Model math: one module per family, and the one mapping from checkpoint tensor names to modules.

Each family module (exaone3, exaone4, exaone_moe) provides `Model` (a CausalLM), `RENAME`
(checkpoint name -> module name regexes), `RENAME_BACK` (its inverse, for writing checkpoints),
optionally `prepare_state_dict(state, cfg)` for layouts a rename cannot express (fused expert
tensors) and `FP32_PARAMS` (regexes of parameters kept in float32). Module names follow
transformers' Llama / Exaone4 / ExaoneMoe layouts, so a module-named state dict also loads into
transformers' own classes.
"""

from __future__ import annotations

import re
from types import ModuleType

import torch

from exaone.core.config import ModelConfig
from exaone.core.errors import ExaoneError
from exaone.core.model import exaone3, exaone4, exaone_moe
from exaone.core.model.layers import CausalLM

FAMILIES: dict[str, ModuleType] = {"exaone3": exaone3, "exaone4": exaone4, "exaone_moe": exaone_moe}
# Tensors some checkpoints carry that no model needs (computed buffers, masks).
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def family(cfg: ModelConfig) -> ModuleType:
    return FAMILIES[cfg.family]


def build(cfg: ModelConfig) -> CausalLM:
    """The family's model for cfg, on the current default device (use torch.device('meta') for a skeleton)."""
    return family(cfg).Model(cfg)


def rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def fp32_params(cfg: ModelConfig) -> list[str]:
    return list(getattr(family(cfg), "FP32_PARAMS", ()))


def module_state(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, origin: dict[str, str] | None = None, prepare=True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Checkpoint-named tensors -> module-named ones (renamed, computed buffers dropped, a tied head
    dropped, and with `prepare` re-laid out by the family, e.g. fused experts split); also where each
    came from (`origin`: checkpoint name -> description, for error messages). Works on meta tensors."""
    fam = family(cfg)
    state, where = {}, {}
    for name, t in tensors.items():
        if IGNORED.search(name):
            continue
        target = rename(name, fam.RENAME)
        if target == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the embedding is the head
        state[target] = t
        where[target] = (origin or {}).get(name, name)
    if prepare and hasattr(fam, "prepare_state_dict"):
        state = fam.prepare_state_dict(state, cfg)
    return state, where


def checkpoint_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Module-named tensors -> the family's checkpoint names."""
    table = family(cfg).RENAME_BACK
    return {rename(n, table): t for n, t in state.items()}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Module name -> shape of every tensor a checkpoint must provide for this config."""
    with torch.device("meta"):
        model = build(cfg)
    expected = {n: tuple(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    expected.pop("inv_freq", None)  # computed from the config, never stored
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return expected


def check_tensors(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    origin: dict[str, str],
    cfg: ModelConfig,
    where: str,
    hint: str = "does config.json match?",
):
    """Raise unless `found` (module name -> shape) holds exactly the `expected` tensors and shapes."""
    missing = [n for n in expected if n not in found]
    if missing:
        raise ExaoneError(f"{where}: checkpoint lacks tensor for {missing[0]}{_more(missing)}; {hint}")
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        at = origin.get(unexpected[0], unexpected[0])
        arch = cfg.architecture
        raise ExaoneError(f"{where}: unexpected tensor {at}{_more(unexpected)} for a {arch} checkpoint")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ExaoneError(
                f"{where}: tensor {origin.get(name, name)} has shape {list(found[name])}, "
                f"expected {list(shape)} from config.json"
            )


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""

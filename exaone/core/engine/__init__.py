"""The engine runtime: paged KV cache, continuous batching, sampling, beam search, CUDA graphs.

`load_engine(engine_dir)` reads what `exaone build` wrote and returns an `Engine` with
`generate(prompts_token_ids, sampling)` and `logits(input_ids)`.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from exaone.core.config import load_config
from exaone.core.engine.layout import fuse
from exaone.core.engine.runtime import BuildConfig, Engine, RuntimeOptions
from exaone.core.engine.store import (
    CHECKPOINT_DIR,
    WEIGHTS,
    check_compatible,
    read_engine_json,
)
from exaone.core.errors import ExaoneError
from exaone.core.layers import CausalLM, rope_inv_freq

__all__ = ["BuildConfig", "Engine", "RuntimeOptions", "load_engine"]


def load_engine(
    engine_dir: str | Path, device: str = "auto", options: RuntimeOptions | None = None
) -> Engine:
    """Load an engine directory on `device` (auto: where it was built for)."""
    engine_dir = Path(engine_dir)
    info = read_engine_json(engine_dir)
    built = info.get("build", {})
    build = BuildConfig(**{f.name: built[f.name] for f in fields(BuildConfig) if f.name in built})
    dev = torch.device(build.device if device == "auto" else device)
    check_compatible(engine_dir, info, dev)
    if info.get("weights") == "checkpoint":
        from exaone.core.model import load_model

        model = load_model(engine_dir / CHECKPOINT_DIR, build.dtype, dev)
    else:
        model = _load_runtime_weights(engine_dir, dev, info.get("packed") or {})
    return Engine(model, build, options, dev)


def _load_runtime_weights(engine_dir: Path, device: torch.device, packed: dict[str, str]) -> CausalLM:
    from exaone.core.model import family_module

    cfg = load_config(engine_dir)
    with torch.device("meta"):
        model: CausalLM = family_module(cfg).Model(cfg)
    path = engine_dir / WEIGHTS
    if not path.is_file():
        raise ExaoneError(f"{path}: missing (the engine directory is incomplete: rebuild it)")
    state = load_file(str(path), device=str(device))
    if packed:
        from exaone.core.engine.packed import place_packed

        place_packed(model, packed, state)  # before fusing: packed projections stay separate
    fuse(model)
    expected = {n for n, t in model.state_dict().items() if t.device.type == "meta"}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        what = "lacks" if missing else "has unexpected"
        raise ExaoneError(f"{path}: {what} tensor {name}: rebuild the engine")
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.tie_weights()
    return model.eval()

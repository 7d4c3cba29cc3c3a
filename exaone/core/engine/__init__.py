"""The engine runtime: paged KV cache, continuous batching, sampling, beam search, CUDA graphs.

`load_engine(engine_dir)` reads what `exaone build` wrote and returns an `Engine` with
`generate(prompts_token_ids, sampling)` and `logits(input_ids)`.
"""

from exaone.core.engine.runtime import BuildConfig, Engine, RuntimeOptions
from exaone.core.engine.store import load_engine

__all__ = ["BuildConfig", "Engine", "RuntimeOptions", "load_engine"]

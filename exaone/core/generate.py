"""Token generation on the reference runtime: batched prefill, then one decode step per token.

Prompts of different lengths are left-padded; padding columns get position -1 and are masked
out by attention, so a batched prompt computes the same thing as the prompt alone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from exaone.core import sampling
from exaone.core.errors import ExaoneError, OptionError
from exaone.core.model.kv_cache import KVCache
from exaone.core.model.layers import CausalLM


@dataclass(frozen=True)
class Sampling:
    """Greedy unless temperature > 0 (then top_k / top_p filter the distribution)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit; 1: greedy
    top_p: float = 1.0  # 0 or 1: off (0 is the reference run.py's "off")
    seed: int | None = None

    def check(self):
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", self.max_new_tokens, "expected at least 1")
        if self.temperature < 0:
            raise OptionError("temperature", self.temperature, "expected >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise OptionError("top_k", self.top_k, "expected >= 0 (0 means no limit)")
        if not 0 <= self.top_p <= 1:
            raise OptionError("top_p", self.top_p, "expected a value in [0, 1] (0 or 1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" when a stop token ended it
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0


def sample(logits: torch.Tensor, params: Sampling, seeds: torch.Tensor, step: int) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; row b draws with seed seeds[b] at `step`
    (exaone/core/sampling.py: the engine draws the same tokens from the same logits)."""
    if params.greedy:
        return logits.argmax(-1)
    n = logits.shape[0]

    def full(value, dtype):
        return torch.full((n,), value, dtype=dtype, device=logits.device)

    return sampling.sample(
        logits, full(params.temperature, torch.float32), full(params.top_k, torch.long),
        full(params.top_p, torch.float32), seeds, full(step, torch.long),
    )  # fmt: skip


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompts: list[list[int]],
    params: Sampling,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Generate for a batch of token-id prompts; `on_token(row, token_id)` sees each new token."""
    params.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ExaoneError("every prompt must have at least one token")
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    longest = max(len(p) for p in prompts)
    limit = model.cfg.max_position_embeddings
    if longest + params.max_new_tokens > limit:
        raise OptionError(
            "max_new_tokens",
            params.max_new_tokens,
            template=f"prompt of {longest} tokens + {{option}} {{value}} exceeds the model's "
            f"max_position_embeddings ({limit})",
        )
    b = len(prompts)
    ids = torch.full((b, longest), pad_id, dtype=torch.long)
    pos = torch.full((b, longest), -1, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = torch.tensor(p)
        pos[row, longest - len(p) :] = torch.arange(len(p))
    ids, pos = ids.to(device), pos.to(device)
    cache = KVCache(model.cfg, b, longest + params.max_new_tokens, dtype, device)
    # Row b draws from seed S + b (a random S when none is given), as the engine's request b does.
    base = params.seed if params.seed is not None else random.getrandbits(62)
    seeds = base + torch.arange(b, device=device)

    results = [Generation(list(p)) for p in prompts]
    done = [False] * b
    start = time.perf_counter()
    logits = model(ids, pos, cache, last_only=True)[:, -1]
    next_pos = pos[:, -1:] + 1
    for step in range(params.max_new_tokens):
        token = sample(logits, params, seeds, step)
        now = time.perf_counter() - start
        for row, t in enumerate(token.tolist()):
            if done[row]:
                continue
            if step == 0:
                results[row].time_to_first_token_s = now
            if t in stop_ids:
                done[row] = True
                results[row].finish_reason = "stop"
            else:
                results[row].output_ids.append(t)
                if on_token is not None:
                    on_token(row, t)
            results[row].total_s = now
        if all(done) or step == params.max_new_tokens - 1:
            break
        logits = model(token[:, None], next_pos, cache)[:, -1]
        next_pos = next_pos + 1
    return results

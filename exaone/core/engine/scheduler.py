"""Continuous batching: requests join as KV blocks allow, prefill in chunks, decode together.

Each iteration runs one decode pass over every request that has its first token (at most
max_num_tokens of them), then spends what is left of the max_num_tokens budget on prompt chunks
of the requests still in prefill, left-padded into one pass. Requests are admitted in order while
the batch has room and the paged cache can reserve their worst case, so a queue of thousands of
prompts holds only token ids until its turn.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from exaone.core.errors import ExaoneError
from exaone.core.generate import Generation, Sampling, sample


@dataclass
class Request:
    index: int
    prompt: list[int]
    fed: int = 0  # prompt tokens whose keys/values are cached
    next_token: int | None = None
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    ttft: float | None = None
    result: Generation | None = None


def run_batching(
    engine,
    prompts: list[list[int]],
    params: Sampling,
    stop_ids: set[int] | frozenset[int],
    on_token: Callable[[int, int], None] | None,
) -> list[Generation]:
    cache, device = engine.cache, engine.device
    reqs = [Request(i, list(p)) for i, p in enumerate(prompts)]
    if params.seed is not None and not params.greedy:
        for r in reqs:  # one stream per request: a result does not depend on what it was batched with
            r.generator = torch.Generator(device=device).manual_seed(params.seed + r.index)
    waiting, running = deque(reqs), []
    start = time.perf_counter()

    def emit(r: Request, token: int):
        now = time.perf_counter() - start
        if r.ttft is None:
            r.ttft = now
        if token in stop_ids:
            finish(r, "stop", now)
            return
        r.output.append(token)
        if on_token is not None:
            on_token(r.index, token)
        if len(r.output) >= params.max_new_tokens:
            finish(r, "length", now)
        else:
            r.next_token = token

    def finish(r: Request, reason: str, now: float):
        r.result = Generation(r.prompt, r.output, reason, r.ttft, now)
        cache.release(r.index)
        running.remove(r)

    while waiting or running:
        while waiting and len(running) < engine.max_batch_size:
            length = len(waiting[0].prompt) + params.max_new_tokens
            if not cache.can_admit(length):
                if not running:  # cannot happen once the pool holds one max_seq_len sequence
                    raise ExaoneError(f"KV cache too small for a request of {length} tokens")
                break
            r = waiting.popleft()
            r.fed = cache.admit(r.index, length, r.prompt)
            running.append(r)
        budget = engine.max_num_tokens
        decodes = [r for r in running if r.next_token is not None][:budget]
        prefills = [r for r in running if r.next_token is None]
        if decodes:
            ids = torch.tensor([[r.next_token] for r in decodes])
            pos = torch.tensor([[len(r.prompt) + len(r.output) - 1] for r in decodes])
            logits = engine.decode([r.index for r in decodes], ids, pos)
            for r, t in zip(decodes, _sample(logits, params, decodes), strict=True):
                emit(r, t)
            budget -= len(decodes)
        chunks, width = [], 0
        for r in prefills:
            n = min(len(r.prompt) - r.fed, budget)
            if n <= 0 or (chunks and (len(chunks) + 1) * max(width, n) > budget):
                break
            chunks.append((r, n))
            width = max(width, n)
        if chunks:
            ids = torch.zeros((len(chunks), width), dtype=torch.long)
            pos = torch.full((len(chunks), width), -1, dtype=torch.long)
            for row, (r, n) in enumerate(chunks):
                ids[row, width - n :] = torch.tensor(r.prompt[r.fed : r.fed + n])
                pos[row, width - n :] = torch.arange(r.fed, r.fed + n)
            logits = engine.prefill([(r.index, n) for r, n in chunks], ids, pos)
            done = []
            for row, (r, n) in enumerate(chunks):
                r.fed += n
                if r.fed == len(r.prompt):
                    done.append((row, r))
            if done:
                rows = torch.tensor([row for row, _ in done], device=logits.device)
                tokens = _sample(logits[rows], params, [r for _, r in done])
                for (_, r), t in zip(done, tokens, strict=True):
                    emit(r, t)
    return [r.result for r in reqs]


def _sample(logits: torch.Tensor, params: Sampling, reqs: list[Request]) -> list[int]:
    """Next tokens on the device (greedy: one argmax over the batch; else one draw per request)."""
    if params.greedy:
        return logits.argmax(-1).tolist()
    return torch.cat([sample(logits[i : i + 1], params, r.generator) for i, r in enumerate(reqs)]).tolist()

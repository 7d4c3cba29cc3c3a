"""Continuous batching on the CPU: which requests run, and a StepPlan for each forward pass.

Requests are admitted in order while the batch has room and the paged cache can reserve their worst
case, so a queue of thousands of prompts holds only token ids until its turn. Each step feeds one
token of every request that is decoding (at most max_num_tokens of them), then spends what is left
of the max_num_tokens budget on prompt chunks, packed into the same forward with no padding
(chunked prefill). The scheduler owns block allocation; the executor only runs plans; `update`
applies the tokens a plan sampled.

Plans can be made one step ahead of the results: a decode whose input is the token the previous
step sampled names that step's output row (`src`), so the GPU feeds it without the CPU waiting for
it. A request that stops at an EOS token is then fed once more, and that extra token is dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from exaone.core.engine.paged import PagedKVCache
from exaone.core.engine.step import StepPlan
from exaone.core.errors import ExaoneError
from exaone.core.generate import Generation, Sampling


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: Sampling
    stop_ids: frozenset[int]
    seed: int
    on_token: Callable[[Request, int], None] | None = None
    logprobs: int | None = None  # also return the chosen token's log-probability and this many top ones
    fed: int = 0  # prompt tokens scheduled into the cache
    output: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    sampled: int = 0  # tokens scheduled to be sampled (output plus the one in flight)
    pending: int = 0  # tokens sampled on the device that update() has not applied yet
    finish_reason: str | None = None
    admitted: bool = False
    start: float = field(default_factory=time.perf_counter)
    ttft: float | None = None
    end: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens

    def generation(self) -> Generation:
        end = self.end if self.end is not None else time.perf_counter()
        return Generation(self.prompt, self.output, self.finish_reason or "length", self.ttft or 0.0,
                          end - self.start)  # fmt: skip


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch_size: int, max_num_tokens: int):
        if max_batch_size < 1 or max_num_tokens < 1:
            raise ExaoneError(
                f"scheduler: max_batch_size {max_batch_size} and max_num_tokens {max_num_tokens} must be >= 1"
            )
        self.cache, self.max_batch_size, self.max_num_tokens = cache, max_batch_size, max_num_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prev_rows: dict[int, int] = {}  # request id -> its sampled row in the last plan

    def add(self, r: Request):
        self.waiting.append(r)

    def abort(self, r: Request):
        """Stop a request now (a client went away): its blocks go back at once."""
        if r in self.waiting:
            self.waiting.remove(r)
        if r in self.running:
            self.running.remove(r)
        if r.admitted and r.id in self.cache.seqs:
            self.cache.release(r.id)
        if not r.finished:
            r.finish_reason, r.end = "abort", time.perf_counter()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self):
        while self.waiting and len(self.running) < self.max_batch_size:
            r = self.waiting[0]
            chunk = min(len(r.prompt), self.max_num_tokens)
            if not self.cache.can_admit(r.length, chunk):
                if not self.running:  # cannot happen once the pool holds one max_seq_len sequence
                    raise ExaoneError(f"KV cache too small for a request of {r.length} tokens")
                break
            self.waiting.popleft()
            r.fed = self.cache.admit(r.id, r.length, r.prompt, chunk)
            r.admitted = True
            self.running.append(r)

    def schedule(self) -> StepPlan | None:
        self._admit()
        budget = self.max_num_tokens
        decodes = [r for r in self.running if r.fed == len(r.prompt) and r.sampled
                   and r.sampled < r.params.max_new_tokens][:budget]  # fmt: skip
        budget -= len(decodes)
        chunks = []
        for r in self.running:
            if budget <= 0:
                break
            if r.fed < len(r.prompt):
                n = min(len(r.prompt) - r.fed, budget)
                chunks.append((r, n))
                budget -= n
        if not decodes and not chunks:
            return None
        seqs = [r.id for r in decodes] + [r.id for r, _ in chunks]
        lens = [1] * len(decodes) + [n for _, n in chunks]
        t = sum(lens)
        input_ids = np.zeros(t, dtype=np.int64)
        src = np.full(t, -1, dtype=np.int64)
        positions = np.zeros(t, dtype=np.int64)
        slots = [np.zeros(t, dtype=np.int64) for _ in self.cache.groups]
        rows, row_reqs = [], []
        at = 0
        for r in decodes:
            if r.pending:
                src[at] = self.prev_rows[r.id]
            else:
                input_ids[at] = r.output[-1]
            positions[at] = len(r.prompt) + r.sampled - 1
            rows.append(at)
            row_reqs.append(r)
            at += 1
        for r, n in chunks:
            input_ids[at : at + n] = r.prompt[r.fed : r.fed + n]
            positions[at : at + n] = np.arange(r.fed, r.fed + n)
            r.fed += n
            if r.fed == len(r.prompt):
                rows.append(at + n - 1)
                row_reqs.append(r)
            at += n
        at = 0
        for sid, n in zip(seqs, lens, strict=True):
            for g, s in enumerate(self.cache.allocate(sid, n)):
                slots[g][at : at + n] = s
            at += n
        tables = self.cache.tables(seqs)
        seq_lens = np.array([self.cache.seqs[s].written for s in seqs], dtype=np.int32)
        query_start = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
        self.cache.end_step()
        for r in row_reqs:
            r.sampled += 1
            r.pending += 1
        self.prev_rows = {r.id: i for i, r in enumerate(row_reqs)}
        p = [r.params for r in row_reqs]
        return StepPlan(
            seqs, len(decodes), input_ids, src, positions, slots, tables, seq_lens, query_start,
            np.asarray(rows, dtype=np.int64), [r.id for r in row_reqs],
            temperature=np.array([x.temperature for x in p], dtype=np.float32),
            top_k=np.array([x.top_k for x in p], dtype=np.int64),
            top_p=np.array([x.top_p for x in p], dtype=np.float32),
            seed=np.array([r.seed for r in row_reqs], dtype=np.int64),
            step=np.array([r.sampled - 1 for r in row_reqs], dtype=np.int64),
            logprobs=np.array([-1 if r.logprobs is None else r.logprobs for r in row_reqs], dtype=np.int64),
        )  # fmt: skip

    def update(
        self, plan: StepPlan, tokens: list[int], requests: dict[int, Request], logprobs=None
    ) -> list[Request]:
        """Apply the tokens a plan sampled (and their log-probabilities, when asked: per row the
        chosen token's and the top ones); return the requests that finished."""
        now = time.perf_counter()
        done = []
        for row, (sid, token) in enumerate(zip(plan.row_seqs, tokens, strict=True)):
            r = requests.get(sid)
            if r is None or r.finished:  # ran one step past its EOS (plans run ahead), or aborted
                continue
            r.pending -= 1
            if r.ttft is None:
                r.ttft = now - r.start
            if token in r.stop_ids:
                self._finish(r, "stop", now)
                done.append(r)
                continue
            r.output.append(token)
            if r.logprobs is not None and logprobs is not None:
                chosen, top_ids, top_lp = logprobs
                n = r.logprobs
                top = list(zip(top_ids[row][:n], top_lp[row][:n], strict=True))
                r.token_logprobs.append((chosen[row], top))
            if r.on_token is not None:
                r.on_token(r, token)
            if len(r.output) >= r.params.max_new_tokens:
                self._finish(r, "length", now)
                done.append(r)
        return done

    def _finish(self, r: Request, reason: str, now: float):
        r.finish_reason, r.end = reason, now
        self.running.remove(r)
        self.cache.release(r.id)

"""One engine step: the plan the scheduler makes on the CPU, and what the model sees on the device.

A `StepPlan` lists, for one forward pass, the sequences it feeds (decodes first, then prefill
chunks, all packed into one run of tokens with no padding), their tokens (or, for a decode whose
input is the token the previous step sampled and the CPU has not seen yet, the row of that step's
output to take it from), positions, the cache slot of every new token and the block tables, and the
rows whose next token is sampled with their sampling parameters.

`PagedStep` is the attention context the model's layers call during that forward: per layer, one
kernel normalizes q/k, applies RoPE and stores k/v in the paged cache, one attends over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from exaone.core.kernels import ops
from exaone.core.kernels.backend import tile_rows
from exaone.core.model.layers import Context


@dataclass
class StepPlan:
    seq_ids: list[int]  # the sequences this step feeds, decodes first
    num_decode: int
    input_ids: np.ndarray  # int64 [T]; ignored where src >= 0
    src: np.ndarray  # int64 [T]: row of the previous step's sampled tokens to feed, or -1
    positions: np.ndarray  # int64 [T]
    slots: list[np.ndarray]  # per KV group: int64 [T] flat cache slot of each new token
    block_tables: list[np.ndarray]  # per KV group: int32 [S, width]
    seq_lens: np.ndarray  # int32 [S]: tokens cached once this step has run
    query_start: np.ndarray  # int32 [S + 1]: first token of each sequence in the step
    rows: np.ndarray  # int64 [R]: tokens whose logits are sampled (a sequence's last token)
    row_seqs: list[int]  # the sequence of each sampled row
    temperature: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [R]
    top_k: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    top_p: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    seed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    step: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [R] top-n asked; -1: none

    @property
    def wants_logprobs(self) -> int:
        """The most top log-probabilities a row asks for (0: only the chosen token's), -1: none."""
        return int(self.logprobs.max()) if len(self.logprobs) else -1

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def decode_only(self) -> bool:
        return self.num_decode == len(self.seq_ids)

    @property
    def greedy(self) -> bool:
        return bool(((self.temperature <= 0) | (self.top_k == 1)).all())

    def tiles(self, group_heads: int) -> np.ndarray:
        """int32 [N, 3] (sequence, first token, tokens) tiles of at most the tokens one attention
        program takes (kernels/backend.tile_rows)."""
        per = max(1, tile_rows(group_heads, decode=False) // group_heads)
        out = []
        for s in range(len(self.seq_ids)):
            a, b = int(self.query_start[s]), int(self.query_start[s + 1])
            out += [(s, t, min(per, b - t)) for t in range(a, b, per)]
        return np.asarray(out, dtype=np.int32).reshape(-1, 3)


@dataclass
class StepTensors:
    """A plan's index tensors on the device (the static buffers a CUDA graph replays, or fresh ones)."""

    positions: torch.Tensor
    slots: list[torch.Tensor]
    block_tables: list[torch.Tensor]
    seq_lens: torch.Tensor
    query_start: torch.Tensor
    tiles: torch.Tensor | None  # None: decode, one query per sequence
    rows: torch.Tensor


class PagedStep(Context):
    """What the model's attention layers see as their cache for one engine step."""

    def __init__(self, cache, t: StepTensors, cos_sin: torch.Tensor, num_splits: int = 1, workspace=None):
        self.cache, self.t, self.cos_sin = cache, t, cos_sin
        self.num_splits, self.workspace = num_splits, workspace

    def rope(self, positions, inv_freq, dtype):
        return None  # the fused kernel reads the engine's cos/sin table

    def attention(self, attn, q, k, v, positions, rope) -> torch.Tensor:
        cache, t = self.cache, self.t
        layer = attn.layer
        g = cache.where[layer]
        qn, kn = (attn.q_norm, attn.k_norm) if attn.q_norm is not None else (None, None)
        q = ops.qk_rope_store(
            q, k, v, positions, self.cos_sin, qn.weight if qn else None, kn.weight if kn else None,
            qn.eps if qn else 0.0, attn.rope, cache.k[layer], cache.v[layer], cache.k_scale[layer],
            cache.v_scale[layer], t.slots[g],
        )  # fmt: skip
        return ops.paged_attention(
            q, cache.k[layer], cache.v[layer], cache.k_scale[layer], cache.v_scale[layer],
            t.block_tables[g], t.seq_lens, t.query_start, cache.groups[g].block_size, attn.window, attn.scale,
            t.tiles, self.num_splits, workspace=self.workspace,
        )  # fmt: skip

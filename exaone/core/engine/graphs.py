"""Decode steps replayed from CUDA graphs: the whole step, sampling included, one graph per batch size.

A decode step has static shapes: B sequences, one token each; the attention kernel reads each
sequence's length and block table from tensors, so one graph serves every context length. Token
ids (or the rows of the previous step's output to take them from), positions, cache slots, block
tables, lengths and sampling parameters live in static buffers that each step overwrites before
replaying. A batch is padded up to the next captured size (padding rows have length 0 and store
nothing). Attention splits long contexts across programs (split-KV) only where a sequence is long
enough to need it: each size has a graph without splits (contexts up to LONG tokens) and one with
them. Greedy short-context graphs are captured when the engine loads; the others (the full sampler:
sort, top-k / top-p, Gumbel noise; long contexts) the first time a step needs them. On the CPU the
same static-buffer path runs eagerly (how the tests check it). K-EXAONE's MoE layers run the fused
kernels (layout.FusedSparseMoE), whose routing never synchronizes with the host; only MoE layers with
quantized experts (the per-expert path) keep an engine eager.
"""

from __future__ import annotations

import numpy as np
import torch

from exaone.core import sampling
from exaone.core.engine.step import PagedStep, StepPlan, StepTensors
from exaone.core.kernels import ops
from exaone.core.model.exaone_moe import SparseMoE

LONG = 512  # contexts up to this many tokens decode without split-KV (its reduction costs more)


def decode_splits(batch: int, kv_heads: int, sms: int) -> int:
    """Split-KV factor for a decode batch: enough programs to fill the GPU twice over (at most 16)."""
    return max(1, min(16, -(-2 * sms // (batch * kv_heads))))


class DecodeGraphs:
    @classmethod
    def capture(cls, engine, batch_sizes: list[int]) -> DecodeGraphs | None:
        if any(isinstance(m, SparseMoE) for m in engine.model.modules()):
            engine.graphs_off_reason = "MoE layers with quantized experts route on the host"
            return None
        sizes = sorted({b for b in batch_sizes if 0 < b <= engine.max_batch_size})
        if not sizes:
            return None
        try:
            return cls(engine, sizes)
        except RuntimeError as e:  # a module that cannot be captured (e.g. a host sync): run eagerly
            engine.graphs_off_reason = str(e).splitlines()[0]
            torch.cuda.synchronize()
            return None

    @torch.inference_mode()
    def __init__(self, engine, sizes: list[int]):
        self.engine, self.sizes = engine, sizes
        cache, dev = engine.cache, engine.device
        top = self.max_batch = sizes[-1]
        cfg = engine.cfg
        self.ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.src = torch.full((top,), -1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.slots = [torch.full((top,), -1, dtype=torch.long, device=dev) for _ in cache.groups]
        self.tables = [torch.zeros((top, cache.width), dtype=torch.int32, device=dev) for _ in cache.groups]
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(top, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(top, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(top, dtype=torch.long, device=dev)
        self.top_p = torch.ones(top, dtype=torch.float32, device=dev)
        self.seed = torch.zeros(top, dtype=torch.long, device=dev)
        self.step_no = torch.zeros(top, dtype=torch.long, device=dev)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 8
        self.splits = {b: decode_splits(b, cfg.num_kv_heads, sms) for b in sizes}
        self.workspace = {
            b: ops.attention_workspace(self.splits[b], b, cfg.num_heads, cfg.head_dim, dev)
            for b in sizes
            if self.splits[b] > 1
        }
        self.long = LONG
        self.pool = None
        self.graphs: dict[tuple[int, bool, bool], tuple] = {}  # (batch, greedy, long) -> (graph, output)
        for b in reversed(sizes):  # largest first: smaller graphs reuse its memory
            self._capture(b, greedy=True, long=False)

    def _step(self, b: int, greedy: bool, long: bool) -> torch.Tensor:
        e = self.engine
        t = StepTensors(
            self.positions[:b], [s[:b] for s in self.slots], [tb[:b] for tb in self.tables],
            self.seq_lens[:b], self.query_start[: b + 1], None, self.rows[:b],
        )  # fmt: skip
        ids = torch.where(self.src[:b] >= 0, e.last_tokens[self.src[:b].clamp(min=0)], self.ids[:b])
        splits = self.splits[b] if long else 1
        ctx = PagedStep(e.cache, t, e.cos_sin, splits, self.workspace.get(b) if long else None)
        logits = e.model(ids, t.positions, ctx, rows=t.rows)
        if greedy:
            return ops.argmax(logits)
        return sampling.sample(
            logits, self.temperature[:b], self.top_k[:b], self.top_p[:b], self.seed[:b], self.step_no[:b]
        )

    def _capture(self, b: int, greedy: bool, long: bool):
        dev = self.engine.device
        key = (b, greedy, long)
        if dev.type != "cuda":  # tests: the same static-buffer path, replayed eagerly
            self.graphs[key] = (None, lambda: self._step(*key))
            return
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the Triton kernels, warms cuBLAS
                self._step(*key)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._step(*key)
        self.pool = graph.pool()
        self.graphs[key] = (graph, out)

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """Replay the step for a decode-only plan; None when no captured size fits it."""
        n = len(plan.seq_ids)
        b = next((s for s in self.sizes if s >= n), None)
        if b is None:
            return None
        key = (b, plan.greedy, self.splits[b] > 1 and int(plan.seq_lens.max()) > self.long)
        if key not in self.graphs:
            self._capture(*key)
        self._fill(plan, n, b)
        graph, out = self.graphs[key]
        if graph is None:
            return out()[:n].clone()
        graph.replay()
        return out[:n]

    def _fill(self, plan: StepPlan, n: int, b: int):
        def put(static: torch.Tensor, values: np.ndarray, pad):
            static[:n].copy_(torch.from_numpy(values), non_blocking=True)
            if b > n:
                static[n:b].fill_(pad)

        put(self.ids, plan.input_ids, 0)
        put(self.src, plan.src, -1)
        put(self.positions, plan.positions, 0)
        for static, slots in zip(self.slots, plan.slots, strict=True):
            put(static, slots, -1)
        for static, table in zip(self.tables, plan.block_tables, strict=True):
            put(static, table, 0)
        put(self.seq_lens, plan.seq_lens, 0)
        if not plan.greedy:
            put(self.temperature, plan.temperature, 0.0)
            put(self.top_k, plan.top_k, 0)
            put(self.top_p, plan.top_p, 1.0)
            put(self.seed, plan.seed, 0)
            put(self.step_no, plan.step, 0)

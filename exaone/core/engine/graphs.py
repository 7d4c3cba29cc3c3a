"""Decode steps replayed from CUDA graphs, one graph per batch size, sharing one memory pool.

A decode step has static shapes once the number of KV blocks read per sequence is fixed: graphs
are captured per batch size and per context bucket (max_seq_len, a quarter of it, ... down to
~256 tokens; sliding layers read at most a window's worth). Token ids, positions and the
block-table index tensors live in static buffers that each step overwrites before replaying.
A batch is padded up to the next captured size and bucket (padding rows have position -1 and
write to the null block). MoE models route tokens with data-dependent control flow and run eagerly.
"""

from __future__ import annotations

import torch

from exaone.core.engine.paged import Plan, StepView

GATHER_LIMIT = 2 << 30  # bytes of one layer's gathered keys and values (as float32) in a captured step


class DecodeGraphs:
    @classmethod
    def capture(cls, engine, batch_sizes: list[int]) -> DecodeGraphs | None:
        if engine.cfg.family == "exaone_moe":
            engine.graphs_off_reason = "MoE routing is data-dependent"
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
    def __init__(self, engine, sizes: list[int], buckets: list[int] | None = None):
        cache, dev = engine.cache, engine.device
        self.groups = cache.groups
        self.caps = [g.blocks_for(engine.max_seq_len) for g in cache.groups]
        # Context buckets (tokens already cached): max_seq_len, then quarters down to ~256 tokens, so a
        # short context does not pay for reading max_seq_len worth of blocks.
        if buckets is None:
            buckets = [engine.max_seq_len]
            while buckets[-1] > 256:
                buckets.append(-(-buckets[-1] // 4))
        self.buckets = sorted(set(buckets) | {engine.max_seq_len})
        # Skip (batch, bucket) pairs whose per-layer gathered keys/values would be too large: those
        # batches decode eagerly, reading only the blocks they need.
        per_token = 2 * 4 * engine.cfg.num_kv_heads * engine.cfg.head_dim
        self.captured = [
            (b, bucket)
            for bucket in self.buckets
            for b in sizes
            if b * self.tokens_read(bucket) * per_token <= GATHER_LIMIT
        ]
        if not self.captured:
            raise RuntimeError("no batch size fits the CUDA graph gather limit")
        self.sizes = sorted({b for b, _ in self.captured})
        self.max_batch = top = self.sizes[-1]
        widest = self.widths(max(bucket for _, bucket in self.captured))
        self.ids = torch.zeros((top, 1), dtype=torch.long, device=dev)
        self.pos = torch.full((top, 1), -1, dtype=torch.long, device=dev)
        self.plans = [
            Plan(
                torch.zeros((top, w * g.block_size), dtype=torch.long, device=dev),
                torch.full((top, w * g.block_size), -1, dtype=torch.long, device=dev),
                torch.zeros(top, dtype=torch.long, device=dev),
            )
            for g, w in zip(cache.groups, widest, strict=True)
        ]
        self.graphs: dict[tuple[int, int], tuple] = {}  # (batch, bucket) -> (graph, its output)
        pool = None
        for b, bucket in reversed(self.captured):  # largest first: smaller graphs reuse its memory
            cols = [w * g.block_size for g, w in zip(cache.groups, self.widths(bucket), strict=True)]
            plans = [
                Plan(p.gather_idx[:b, :c], p.gather_pos[:b, :c], p.write_idx[:b])
                for p, c in zip(self.plans, cols, strict=True)
            ]
            view = StepView(cache, plans)

            def step(b=b, view=view):
                return engine.model(self.ids[:b], self.pos[:b], view, last_only=True)[:, -1]

            if dev.type != "cuda":  # tests: the same static-buffer path, replayed eagerly
                self.graphs[(b, bucket)] = (None, step)
                continue
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = step()
            pool = graph.pool()
            self.graphs[(b, bucket)] = (graph, out)

    def widths(self, bucket: int) -> list[int]:
        """Blocks read per sequence and group when at most `bucket` tokens are cached."""
        return [min(cap, -(-bucket // g.block_size)) for g, cap in zip(self.groups, self.caps, strict=True)]

    def tokens_read(self, bucket: int) -> int:
        return sum(w * g.block_size for g, w in zip(self.groups, self.widths(bucket), strict=True))

    def pick(self, n: int, cached: int) -> tuple[int, int] | None:
        """The captured (batch, bucket) for n sequences with at most `cached` tokens cached, if any."""
        bucket = next(b for b in self.buckets if b >= cached)
        return next(((b, k) for b, k in self.captured if k == bucket and b >= n), None)

    @torch.inference_mode()
    def run(
        self, plans: list[Plan], key: tuple[int, int], ids: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        n, (b, bucket) = ids.shape[0], key
        self.ids[:n].copy_(ids, non_blocking=True)
        self.ids[n:b].zero_()
        self.pos[:n].copy_(pos, non_blocking=True)
        self.pos[n:b].fill_(-1)
        for static, plan in zip(self.plans, plans, strict=True):
            c = plan.gather_idx.shape[1]
            static.gather_idx[:n, :c].copy_(plan.gather_idx)
            static.gather_idx[n:b, :c].zero_()
            static.gather_pos[:n, :c].copy_(plan.gather_pos)
            static.gather_pos[n:b, :c].fill_(-1)
            static.write_idx[:n].copy_(plan.write_idx)
            static.write_idx[n:b].zero_()
        graph, out = self.graphs[(b, bucket)]
        if graph is None:
            return out()[:n].clone()
        graph.replay()
        return out[:n].clone()

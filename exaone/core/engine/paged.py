"""A paged KV cache: fixed-size blocks in per-layer pools, a block table per sequence.

Layers are grouped by attention window (full layers in one group, each distinct sliding window in
another); each group has its own pool of blocks and its own block tables, so a sliding layer keeps
only the blocks that still intersect its window: once a block falls out of the window it returns
to the free list. Block 0 of every pool is the null block: padding reads it (masked out by
position -1) and writes there (never read).

Admission reserves, per group, the most blocks a request can ever hold (its whole length for full
layers, one window's worth for sliding ones); blocks are then taken lazily and given back as the
window slides or the request ends. A request never waits for a block once admitted, so no
preemption is needed, and thousands of queued requests cost nothing but their token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from exaone.core import qmath
from exaone.core.config import ModelConfig
from exaone.core.engine.prefix import PrefixIndex, block_keys
from exaone.core.errors import ExaoneError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Group:
    window: int | None  # None: full attention
    layers: list[int]
    block_size: int
    num_blocks: int = 0  # including the null block
    free: list[int] = field(default_factory=list)
    reserved: int = 0
    peak_used: int = 0  # most blocks in use at once (tests and stats)

    def blocks_for(self, length: int) -> int:
        """Most blocks one sequence of `length` tokens holds at once."""
        full = cdiv(length, self.block_size)
        if self.window is None:
            return full
        return min(full, cdiv(self.window - 1, self.block_size) + 1)

    @property
    def used(self) -> int:
        return self.num_blocks - 1 - len(self.free)


def make_groups(windows: list[int | None], block_size: int) -> list[Group]:
    """One group per distinct window (None = full), in order of first appearance."""
    groups: dict[int | None, Group] = {}
    for layer, w in enumerate(windows):
        groups.setdefault(w, Group(w, [], block_size)).layers.append(layer)
    return list(groups.values())


def bytes_per_block(group: Group, cfg: ModelConfig, kv_dtype: torch.dtype) -> int:
    scale = 4 if qmath.is_quantized_kv(kv_dtype) else 0  # a float32 scale per stored vector
    per_token = cfg.num_kv_heads * (cfg.head_dim * kv_dtype.itemsize + scale)
    return 2 * len(group.layers) * group.block_size * per_token


@dataclass
class Plan:
    """Index tensors for one group in one forward pass."""

    gather_idx: torch.Tensor  # [B, S] flat slots to read (old keys)
    gather_pos: torch.Tensor  # [B, S] their positions, -1 where nothing valid
    write_idx: torch.Tensor  # [B * T] flat slot for every new token (0: discard)


@dataclass
class Seq:
    reserved: list[int]
    blocks: list[list[int]]  # per group: logical block -> physical block (0 once freed)
    written: int = 0  # positions < written have keys/values computed
    keys: list[bytes] = field(default_factory=list)  # prefix reuse: names of the full prompt blocks
    registered: int = 0  # prompt blocks registered for reuse so far


class PagedKVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        groups: list[Group],
        num_blocks: list[int],
        kv_dtype: torch.dtype,
        compute_dtype: torch.dtype,
        device: torch.device,
        reuse: bool = False,
    ):
        self.cfg, self.groups, self.kv_dtype, self.compute_dtype = cfg, groups, kv_dtype, compute_dtype
        self.device = device
        self.quantized = qmath.is_quantized_kv(kv_dtype)
        self.where: dict[int, int] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.k_scale: dict[int, torch.Tensor] = {}
        self.v_scale: dict[int, torch.Tensor] = {}
        for gi, (g, n) in enumerate(zip(groups, num_blocks, strict=True)):
            g.num_blocks = n + 1
            g.free = list(range(n, 0, -1))  # pop() hands out low ids first
            slots = g.num_blocks * g.block_size
            for layer in g.layers:
                self.where[layer] = gi
                shape = (slots, cfg.num_kv_heads, cfg.head_dim)
                self.k[layer] = torch.zeros(shape, dtype=kv_dtype, device=device)
                self.v[layer] = torch.zeros(shape, dtype=kv_dtype, device=device)
                if self.quantized:
                    self.k_scale[layer] = torch.zeros(shape[:2], dtype=torch.float32, device=device)
                    self.v_scale[layer] = torch.zeros(shape[:2], dtype=torch.float32, device=device)
        self.seqs: dict[int, Seq] = {}
        self.prefix = None
        if reuse:
            if len(groups) != 1 or groups[0].window is not None:
                raise ExaoneError(
                    "--enable_kv_cache_reuse: not supported with sliding-window layers (their cache drops "
                    "the blocks a later request would reuse)"
                )
            self.prefix = PrefixIndex()

    # -- capacity -------------------------------------------------------------------------------
    def layer_nbytes(self, layer: int) -> int:
        """Bytes this layer's pool holds (keys, values and their scales)."""
        n = self.k[layer].nbytes + self.v[layer].nbytes
        if self.quantized:
            n += self.k_scale[layer].nbytes + self.v_scale[layer].nbytes
        return n

    def needs(self, length: int) -> list[int]:
        return [g.blocks_for(length) for g in self.groups]

    def can_admit(self, length: int) -> bool:
        return all(
            g.reserved + n <= g.num_blocks - 1 for g, n in zip(self.groups, self.needs(length), strict=True)
        )

    def admit(self, seq_id: int, length: int, prompt: list[int] | None = None) -> int:
        """Reserve for a sequence of `length` tokens; with prefix reuse, return how many of the prompt's
        tokens are already cached (its prefill starts there)."""
        need = self.needs(length)
        for g, n in zip(self.groups, need, strict=True):
            g.reserved += n
        seq = self.seqs[seq_id] = Seq(need, [[] for _ in self.groups])
        if self.prefix is None or prompt is None:
            return 0
        bs = self.groups[0].block_size
        seq.keys = block_keys(prompt, bs)
        seq.blocks[0] = self.prefix.match(seq.keys, (len(prompt) - 1) // bs)  # keep one token to compute
        seq.registered = len(seq.blocks[0])
        seq.written = seq.registered * bs
        self.prefix.reused_tokens += seq.written
        return seq.written

    def release(self, seq_id: int):
        seq = self.seqs.pop(seq_id)
        for g, n, blocks in zip(self.groups, seq.reserved, seq.blocks, strict=True):
            g.reserved -= n
            for b in reversed(blocks):
                if b and (self.prefix is None or self.prefix.unref(b)):
                    g.free.append(b)

    def _alloc(self, g: Group) -> int:
        if g.free:
            return g.free.pop()
        return self.prefix.evict()  # reservations guarantee a cached block nobody holds exists

    # -- one forward pass -----------------------------------------------------------------------
    def plan(self, rows: list[tuple[int, int]], t: int, gather_blocks: list[int] | None = None):
        """Plans for a forward over `rows` = (seq_id, new tokens), left-padded to `t` columns.

        Reads are computed from the current block tables first, then blocks that leave the window
        are freed and blocks for the new tokens taken: within a layer every read precedes every
        write, so a block freed and reused in the same pass is read before it is overwritten.
        `gather_blocks` fixes the number of blocks read per group (static shapes for CUDA graphs).
        """
        plans = []
        for gi, g in enumerate(self.groups):
            bs = g.block_size
            reads: list[list[int]] = []
            for seq_id, _ in rows:
                seq = self.seqs[seq_id]
                first = 0 if g.window is None else max(0, seq.written - g.window + 1) // bs
                reads.append(list(range(first, cdiv(seq.written, bs))))
            width = gather_blocks[gi] if gather_blocks else max((len(r) for r in reads), default=0)
            phys = torch.zeros((len(rows), width), dtype=torch.long)
            logical = torch.full((len(rows), width), -1, dtype=torch.long)
            limit = torch.zeros((len(rows), 1), dtype=torch.long)
            for r, ((seq_id, _), blocks) in enumerate(zip(rows, reads, strict=True)):
                table = self.seqs[seq_id].blocks[gi]
                blocks = blocks[len(blocks) - width :] if len(blocks) > width else blocks
                if blocks:
                    phys[r, : len(blocks)] = torch.tensor([table[b] if b < len(table) else 0 for b in blocks])
                    logical[r, : len(blocks)] = torch.tensor(blocks)
                limit[r] = self.seqs[seq_id].written
            offs = torch.arange(bs)
            gather_idx = (phys[:, :, None] * bs + offs).reshape(len(rows), -1)
            pos = (logical[:, :, None] * bs + offs).reshape(len(rows), -1)
            valid = (phys[:, :, None] > 0).expand(-1, -1, bs).reshape(len(rows), -1) & (pos < limit)
            gather_pos = torch.where(valid, pos, -1)
            write_idx = torch.zeros((len(rows), t), dtype=torch.long)
            for r, (seq_id, n) in enumerate(rows):
                write_idx[r, t - n :] = self._take(gi, seq_id, n)
            plans.append(
                Plan(
                    gather_idx.to(self.device, non_blocking=True),
                    gather_pos.to(self.device, non_blocking=True),
                    write_idx.reshape(-1).to(self.device, non_blocking=True),
                )
            )
        for seq_id, n in rows:
            seq = self.seqs[seq_id]
            seq.written += n
            if self.prefix is not None:  # full prompt blocks computed by this pass become reusable
                done = min(len(seq.keys), seq.written // self.groups[0].block_size)
                for b in range(seq.registered, done):
                    self.prefix.register(seq.blocks[0][b], seq.keys[b])
                seq.registered = max(seq.registered, done)
        for g in self.groups:
            g.peak_used = max(g.peak_used, g.used)
        return plans

    def _take(self, gi: int, seq_id: int, n: int) -> torch.Tensor:
        """Free what leaves the window after these n tokens, take blocks for the kept ones; their slots."""
        g, seq = self.groups[gi], self.seqs[seq_id]
        bs, table, start = g.block_size, seq.blocks[gi], seq.written
        end = start + n
        keep_from = 0 if g.window is None else max(0, end - g.window + 1)
        for b in range(min(keep_from // bs, len(table))):
            if table[b]:
                g.free.append(table[b])
                table[b] = 0
        first = max(start, keep_from)
        if first < end:
            table.extend([0] * (cdiv(end, bs) - len(table)))
            for b in range(first // bs, cdiv(end, bs)):
                if not table[b]:
                    table[b] = self._alloc(g)
        pos = torch.arange(start, end)
        phys = torch.tensor(table + [0], dtype=torch.long)[(pos // bs).clamp(max=len(table))]
        return torch.where(pos >= keep_from, phys * bs + pos % bs, 0)

    # -- reads and writes, called from the model's attention through StepView ------------------
    def read(self, layer: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at slots idx [B, S] as [B, Hkv, S, D] in the compute dtype."""
        k, v = _raw(self.k[layer])[idx], _raw(self.v[layer])[idx]
        if self.quantized:
            k, v = k.view(self.kv_dtype), v.view(self.kv_dtype)
            k = qmath.dequantize_kv(k, self.k_scale[layer][idx], self.compute_dtype)
            v = qmath.dequantize_kv(v, self.v_scale[layer][idx], self.compute_dtype)
        return k.transpose(1, 2), v.transpose(1, 2)

    def write(self, layer: int, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, Hkv, T, D] at flat slots idx [B * T]."""
        k = k.transpose(1, 2).reshape(-1, *k.shape[1:2], k.shape[-1])
        v = v.transpose(1, 2).reshape(-1, *v.shape[1:2], v.shape[-1])
        if self.quantized:
            ks, vs = qmath.kv_token_scale(k, self.kv_dtype), qmath.kv_token_scale(v, self.kv_dtype)
            k, v = qmath.quantize_kv(k, ks, self.kv_dtype), qmath.quantize_kv(v, vs, self.kv_dtype)
            self.k_scale[layer].index_copy_(0, idx, ks)
            self.v_scale[layer].index_copy_(0, idx, vs)
        _raw(self.k[layer]).index_copy_(0, idx, _raw(k.to(self.kv_dtype)))
        _raw(self.v[layer]).index_copy_(0, idx, _raw(v.to(self.kv_dtype)))

    def reorder(self, seq_ids: list[int], parents: list[int]):
        """Beam search: sequence seq_ids[i] takes the cached keys/values of seq_ids[parents[i]].

        Beams run in lockstep, so their block tables have the same shape; every source is read
        before any destination is written, so any permutation is safe.
        """
        pairs = [(seq_ids[p], seq_ids[i]) for i, p in enumerate(parents) if p != i]
        if not pairs:
            return
        for gi, g in enumerate(self.groups):
            src, dst = [], []
            for s, d in pairs:
                for sb, db in zip(self.seqs[s].blocks[gi], self.seqs[d].blocks[gi], strict=True):
                    if sb:
                        src.append(sb)
                        dst.append(db)
            if not src:
                continue
            offs = torch.arange(g.block_size)
            s_idx = (torch.tensor(src)[:, None] * g.block_size + offs).reshape(-1).to(self.device)
            d_idx = (torch.tensor(dst)[:, None] * g.block_size + offs).reshape(-1).to(self.device)
            pools = [self.k, self.v] + ([self.k_scale, self.v_scale] if self.quantized else [])
            for layer in g.layers:
                for pool in pools:
                    raw = _raw(pool[layer])
                    raw.index_copy_(0, d_idx, raw[s_idx])


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 as bytes: index_copy_/indexing lack fp8 kernels on some devices; copying bytes is exact."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


class StepView:
    """What the model's Attention sees as its cache for one forward pass (KVCache's interface)."""

    length = 0  # positions are always given explicitly

    def __init__(self, cache: PagedKVCache, plans: list[Plan]):
        self.cache, self.plans = cache, plans

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        plan = self.plans[self.cache.where[layer]]
        old_k, old_v = self.cache.read(layer, plan.gather_idx)
        self.cache.write(layer, plan.write_idx, k, v)
        return (
            torch.cat((old_k, k), dim=2),
            torch.cat((old_v, v), dim=2),
            torch.cat((plan.gather_pos, positions), dim=1),
        )

    def advance(self, t: int):
        pass

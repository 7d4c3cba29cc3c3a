"""A paged KV cache: fixed-size blocks in per-layer pools, a block table per sequence.

Layers are grouped by attention window (full layers in one group, each distinct sliding window in
another); each group has its own pool of blocks and its own block tables, so a sliding layer keeps
only the blocks that still intersect its window. Block 0 of every pool is the null block: freed and
unallocated entries of a block table point there, and nothing ever reads it (attention reads only
the positions a query can see).

A step first writes the new tokens' keys and values, then attends; so blocks that fall out of a
window during a step are freed only when the step is over (`end_step`), never reused within it. A
sliding layer therefore holds at most its window plus the tokens of the step being computed.

Admission reserves, per group, the most blocks a request can ever hold at once; blocks are then
taken lazily and given back as the window slides or the request ends. A request never waits for a
block once admitted, so no preemption is needed, and thousands of queued requests cost nothing but
their token ids. Block tables live on the CPU (numpy); each step uploads the rows it uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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

    def blocks_for(self, length: int, chunk: int = 1) -> int:
        """Most blocks a sequence of `length` tokens holds at once, fed at most `chunk` tokens a step."""
        full = cdiv(length, self.block_size)
        if self.window is None:
            return full
        return min(full, cdiv(self.window - 1 + chunk, self.block_size) + 1)

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
class Seq:
    reserved: list[int]
    tables: list[np.ndarray]  # per group: logical block -> physical block (0: none)
    written: int = 0  # positions < written have keys/values stored
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
        max_seq_len: int,
        reuse: bool = False,
    ):
        self.cfg, self.groups, self.kv_dtype, self.compute_dtype = cfg, groups, kv_dtype, compute_dtype
        self.device = device
        self.quantized = qmath.is_quantized_kv(kv_dtype)
        self.width = cdiv(max_seq_len, groups[0].block_size)  # block table entries per sequence
        self.where: dict[int, int] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.k_scale: dict[int, torch.Tensor | None] = {}
        self.v_scale: dict[int, torch.Tensor | None] = {}
        for gi, (g, n) in enumerate(zip(groups, num_blocks, strict=True)):
            g.num_blocks = n + 1
            g.free = list(range(n, 0, -1))  # pop() hands out low ids first
            slots = g.num_blocks * g.block_size
            for layer in g.layers:
                self.where[layer] = gi
                shape = (slots, cfg.num_kv_heads, cfg.head_dim)
                self.k[layer] = torch.zeros(shape, dtype=kv_dtype, device=device)
                self.v[layer] = torch.zeros(shape, dtype=kv_dtype, device=device)
                for scales in (self.k_scale, self.v_scale):  # a float32 scale per stored vector
                    scales[layer] = None
                    if self.quantized:
                        scales[layer] = torch.zeros(shape[:2], dtype=torch.float32, device=device)
        self.seqs: dict[int, Seq] = {}
        self.pending_free: list[tuple[int, int, int]] = []  # (group, logical block, seq) freed after the step
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

    def needs(self, length: int, chunk: int = 1) -> list[int]:
        return [g.blocks_for(length, chunk) for g in self.groups]

    def can_admit(self, length: int, chunk: int = 1) -> bool:
        return all(
            g.reserved + n <= g.num_blocks - 1
            for g, n in zip(self.groups, self.needs(length, chunk), strict=True)
        )

    def admit(self, seq_id: int, length: int, prompt: list[int] | None = None, chunk: int = 1) -> int:
        """Reserve for a sequence of `length` tokens fed at most `chunk` a step; with prefix reuse,
        return how many of the prompt's tokens are already cached (its prefill starts there)."""
        need = self.needs(length, chunk)
        for g, n in zip(self.groups, need, strict=True):
            g.reserved += n
        tables = [np.zeros(self.width, dtype=np.int32) for _ in self.groups]
        seq = self.seqs[seq_id] = Seq(need, tables)
        if self.prefix is None or prompt is None:
            return 0
        bs = self.groups[0].block_size
        seq.keys = block_keys(prompt, bs)
        matched = self.prefix.match(seq.keys, (len(prompt) - 1) // bs)  # keep one token to compute
        seq.tables[0][: len(matched)] = matched
        seq.registered = len(matched)
        seq.written = seq.registered * bs
        self.prefix.reused_tokens += seq.written
        return seq.written

    def release(self, seq_id: int):
        seq = self.seqs.pop(seq_id)
        for g, n, table in zip(self.groups, seq.reserved, seq.tables, strict=True):
            g.reserved -= n
            for b in table[table > 0][::-1].tolist():
                if self.prefix is None or self.prefix.unref(b):
                    g.free.append(b)

    def _alloc(self, g: Group) -> int:
        if g.free:
            return g.free.pop()
        return self.prefix.evict()  # reservations guarantee a cached block nobody holds exists

    # -- one step -------------------------------------------------------------------------------
    def allocate(self, seq_id: int, n: int) -> list[np.ndarray]:
        """Blocks for the sequence's next n tokens; per group, the flat slot of each of them. Blocks
        leaving a window are queued to be freed when the step ends."""
        seq = self.seqs[seq_id]
        start, end = seq.written, seq.written + n
        pos = np.arange(start, end)
        slots = []
        for gi, g in enumerate(self.groups):
            bs, table = g.block_size, seq.tables[gi]
            for b in range(start // bs, cdiv(end, bs)):
                if not table[b]:
                    table[b] = self._alloc(g)
            slots.append(table[pos // bs].astype(np.int64) * bs + pos % bs)
            if g.window is not None:  # blocks no query after this step can see
                for b in range(max(0, end - g.window + 1) // bs):
                    if table[b]:
                        self.pending_free.append((gi, b, seq_id))
        seq.written = end
        if self.prefix is not None:  # full prompt blocks computed by this step become reusable
            done = min(len(seq.keys), seq.written // self.groups[0].block_size)
            for b in range(seq.registered, done):
                self.prefix.register(int(seq.tables[0][b]), seq.keys[b])
            seq.registered = max(seq.registered, done)
        return slots

    def end_step(self):
        """The step's reads are over: blocks that left a window go back to the free list."""
        for gi, b, seq_id in self.pending_free:
            seq = self.seqs.get(seq_id)
            if seq is not None and seq.tables[gi][b]:
                self.groups[gi].free.append(int(seq.tables[gi][b]))
                seq.tables[gi][b] = 0
        self.pending_free.clear()
        for g in self.groups:
            g.peak_used = max(g.peak_used, g.used)

    def note_peak(self):
        for g in self.groups:
            g.peak_used = max(g.peak_used, g.used)

    def tables(self, seq_ids: list[int], rows: int | None = None) -> list[np.ndarray]:
        """Per group, the block tables of seq_ids [rows, width] (rows beyond them: zeros)."""
        out = []
        for gi in range(len(self.groups)):
            t = np.zeros((rows or len(seq_ids), self.width), dtype=np.int32)
            for r, s in enumerate(seq_ids):
                t[r] = self.seqs[s].tables[gi]
            out.append(t)
        return out

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
                pair = zip(self.seqs[s].tables[gi].tolist(), self.seqs[d].tables[gi].tolist(), strict=True)
                for sb, db in pair:
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

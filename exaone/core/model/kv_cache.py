"""A static KV cache with per-layer sizes: a sliding-window layer stores only its window.

Slots are indexed by column (the n-th token fed for a batch row), not by position, so left
padding needs no special case: a padding column holds position -1 and attention masks it out.
Full layers keep `max_seq_len` slots; sliding layers keep a ring of `window` slots (a query at
position p sees keys p-window+1 .. p, so older entries are never needed again).
"""

from __future__ import annotations

import torch

from exaone.core.config import ModelConfig
from exaone.core.kernels import ops
from exaone.core.model.layers import Context


class KVCache(Context):
    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.max_seq_len = max_seq_len
        self.length = 0  # columns written so far, the same for every row
        self.windows: list[int | None] = []
        self.k, self.v, self.pos = [], [], []
        for layer in range(cfg.num_layers):
            window = cfg.window(layer)
            ring = window is not None and window < max_seq_len
            slots = window if ring else max_seq_len
            self.windows.append(window if ring else None)
            shape = (batch_size, cfg.num_kv_heads, slots, cfg.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
            self.pos.append(torch.full((batch_size, slots), -1, dtype=torch.long, device=device))

    def slots(self, layer: int) -> int:
        return self.k[layer].shape[2]

    def nbytes(self, layer: int) -> int:
        return self.k[layer].nbytes + self.v[layer].nbytes

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store new keys/values [B, Hkv, T, D] at positions [B, T]; return what attention must see."""
        t = k.shape[2]
        if self.length + t > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} tokens; {self.length + t} requested")
        kc, vc, pc = self.k[layer], self.v[layer], self.pos[layer]
        if self.windows[layer] is None:
            end = self.length + t
            kc[:, :, self.length : end] = k
            vc[:, :, self.length : end] = v
            pc[:, self.length : end] = positions
            return kc[:, :, :end], vc[:, :, :end], pc[:, :end]
        # Ring: attend over the old ring plus the new tokens, then keep the newest `window` of them.
        k_all = torch.cat((kc, k), dim=2)
        v_all = torch.cat((vc, v), dim=2)
        p_all = torch.cat((pc, positions), dim=1)
        size = kc.shape[2]
        keep = min(t, size)
        cols = torch.arange(self.length + t - keep, self.length + t, device=kc.device) % size
        kc[:, :, cols] = k[:, :, t - keep :]
        vc[:, :, cols] = v[:, :, t - keep :]
        pc[:, cols] = positions[:, t - keep :]
        return k_all, v_all, p_all

    def attention(self, attn, q, k, v, positions, rope) -> torch.Tensor:
        """q [B, T, H, D], k, v [B, T, Hkv, D]: store k, v and attend over what the cache holds."""
        q, k = attn.reference_qk(q, k, rope)
        k_all, v_all, k_pos = self.update(attn.layer, k.transpose(1, 2), v.transpose(1, 2), positions)
        out = ops.masked_attention(q.transpose(1, 2), k_all, v_all, positions, k_pos, attn.window, attn.scale)
        return out.transpose(1, 2)

    def advance(self, t: int):
        self.length += t

"""Prefix reuse (`--enable_kv_cache_reuse`): full prompt blocks are shared between requests.

A block of `tokens_per_block` prompt tokens is named by a sha256 chained over every token before
it, so equal names mean equal prefixes. Once computed, a block is registered under its name; a new
request whose prompt starts with registered blocks takes them (reference counted) and starts its
prefill after them. A registered block nobody holds stays cached until the pool needs it back
(least recently released first). Only full-attention caches take part: a sliding layer drops the
blocks a later request would need.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def block_keys(prompt: list[int], block_size: int) -> list[bytes]:
    """Names of the prompt's full blocks."""
    keys, h = [], hashlib.sha256()
    for b in range(len(prompt) // block_size):
        h.update(array("q", prompt[b * block_size : (b + 1) * block_size]).tobytes())
        keys.append(h.copy().digest())
    return keys


class PrefixIndex:
    def __init__(self):
        self.block_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.refs: dict[int, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # registered, held by nobody: evictable
        self.reused_tokens = 0

    def match(self, keys: list[bytes], limit: int) -> list[int]:
        """Take (reference) the registered blocks for the first keys, at most `limit` of them."""
        blocks = []
        for key in keys[:limit]:
            b = self.block_of.get(key)
            if b is None:
                break
            self.refs[b] += 1
            self.idle.pop(b, None)
            blocks.append(b)
        return blocks

    def register(self, block: int, key: bytes):
        if key not in self.block_of and block not in self.key_of:
            self.block_of[key], self.key_of[block], self.refs[block] = block, key, 1

    def unref(self, block: int) -> bool:
        """Drop one holder; True when the block is unregistered and can go back to the free list."""
        if block not in self.refs:
            return True
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.idle[block] = None
        return False

    def evict(self) -> int:
        """A cached block nobody holds, forgotten and handed back for reuse."""
        block, _ = self.idle.popitem(last=False)
        del self.block_of[self.key_of.pop(block)]
        del self.refs[block]
        return block

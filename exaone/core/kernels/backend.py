"""Which implementation a kernel call takes: the CUDA path or the CPU reference path."""

from __future__ import annotations

import importlib.util
import os

import torch

from exaone.core.errors import ExaoneError

BACKENDS = ("auto", "reference", "triton", "cuda")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose(x: torch.Tensor, backend: str, cpu_ok: bool = False) -> str:
    """ "reference" or the fast path ("triton"/"cuda") for this input.

    ``cpu_ok``: the fast path is a torch library kernel that also runs on the CPU (``_scaled_mm``,
    ``_int_mm``), so tests can drive its padding and scaling code without a GPU."""
    if backend not in BACKENDS:
        raise ExaoneError(f"kernel backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "cuda" if x.is_cuda else "reference"
    if backend in ("triton", "cuda") and not x.is_cuda and not cpu_ok and not triton_interpreting():
        raise ExaoneError(
            f"kernel backend {backend!r} needs a CUDA tensor (or TRITON_INTERPRET=1 for Triton)"
        )
    return backend


def flatten(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x [..., K] -> ([M, K] contiguous, leading shape)."""
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]).contiguous(), lead


def check_weight(name: str, t: torch.Tensor, dtype: torch.dtype, ndim: int) -> None:
    if t.dtype != dtype or t.dim() != ndim:
        raise ExaoneError(f"{name}: expected a {ndim}-D {dtype} tensor, got {t.dim()}-D {t.dtype}")


def tile_rows(group: int, decode: bool) -> int:
    """Rows of one paged-attention tile: the query heads sharing a KV head times as many query tokens
    as fit (one token in decode; up to 16 in prefill), at least 16 (the smallest tl.dot). Measured on
    an H200 (2026-12-02): 16-token prefill tiles gave a 2048-token first token 6% sooner than 32."""
    rows = max(16, 1 << ((group if decode else group * 16) - 1).bit_length())
    return rows if decode else min(128, rows)


def same(parts: list[dict], name: str) -> bool:
    """Whether every part holds an equal tensor `name` (or none does)."""
    have = [name in p for p in parts]
    if not any(have):
        return True
    return all(have) and all(torch.equal(p[name], parts[0][name]) for p in parts[1:])

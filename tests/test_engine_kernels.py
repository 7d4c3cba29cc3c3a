"""The engine's fused Triton kernels (exaone/core/kernels/ops.py) against their torch references,
run under the Triton interpreter on the CPU in a child process (TRITON_INTERPRET=1 must be set before
triton is imported); GPU runs of the same checks: tests/test_gpu_kernels.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from conftest import interpreted_checks, interpreted_test

REPO = Path(__file__).resolve().parents[1]
BF, F32 = torch.bfloat16, torch.float32
DEV = "cpu"  # tests/test_gpu_kernels.py runs the same checks with "cuda"


def d(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEV)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _norms(dtype):
    from exaone.core.kernels import ops

    g = torch.Generator().manual_seed(0)
    for n in (64, 80, 576):
        x = d(torch.randn(5, n, generator=g).to(dtype))
        r = d(torch.randn(5, n, generator=g).to(dtype))
        w = d((torch.rand(n, generator=g) + 0.5).to(dtype))
        exact = dtype == F32
        for got, want in (
            (ops.rms_norm(x, w, 1e-5, "triton"), ops.rms_norm(x, w, 1e-5, "reference")),
            (ops.rms_norm_add(x, r, w, 1e-5, "triton"), ops.rms_norm_add(x, r, w, 1e-5, "reference")),
            *zip(ops.add_rms_norm(x, r, w, 1e-5, "triton"), ops.add_rms_norm(x, r, w, 1e-5, "reference"),
                 strict=True),
        ):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert rel(got, want) < (1e-6 if exact else 4e-3), (n, rel(got, want))
        strided = d(torch.randn(5, 2 * n, generator=g).to(dtype))[:, :n]  # a view, as the engine passes
        want = ops.rms_norm(strided, w, 1e-5, "reference")
        assert rel(ops.rms_norm(strided, w, 1e-5, "triton"), want) < 4e-3


def _silu_mul():
    from exaone.core.kernels import ops

    x = d(torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(BF))
    assert rel(ops.silu_mul(x, "triton"), ops.silu_mul(x, "reference")) < 4e-3


def _pools(slots, hkv, dim, kv):
    dtype = {"bf16": BF, "fp32": F32, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[kv]
    k = torch.zeros(slots, hkv, dim, dtype=dtype, device=DEV)
    v = torch.zeros(slots, hkv, dim, dtype=dtype, device=DEV)
    quant = kv in ("int8", "fp8")
    ks = torch.zeros(slots, hkv, device=DEV) if quant else None
    vs = torch.zeros(slots, hkv, device=DEV) if quant else None
    return k, v, ks, vs


def _rope_store(dim: int, qk_norm: bool, rope: bool, kv: str, dtype=BF):
    from exaone.core.kernels import ops

    g = torch.Generator().manual_seed(2)
    t, h, hkv = 7, 6, 2
    qkv = d(torch.randn(t, (h + 2 * hkv) * dim, generator=g).to(dtype))  # strided views, as the engine has
    q, k, v = qkv.split([h * dim, hkv * dim, hkv * dim], dim=-1)
    q, k, v = q.view(t, h, dim), k.view(t, hkv, dim), v.view(t, hkv, dim)
    positions = d(torch.tensor([0, 5, 9, 3, 17, -1, 30]))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    table = d(ops.cos_sin_table(inv_freq, 64))
    qw = d((torch.rand(dim, generator=g) + 0.5).to(dtype)) if qk_norm else None
    kw = d((torch.rand(dim, generator=g) + 0.5).to(dtype)) if qk_norm else None
    slots = d(torch.tensor([3, 0, 11, 7, 2, -1, 9]))
    outs = []
    for backend in ("triton", "reference"):
        pools = _pools(16, hkv, dim, kv)
        qo = ops.qk_rope_store(q, k, v, positions, table, qw, kw, 1e-6, rope, *pools, slots, backend=backend)
        outs.append((qo, pools))
    (q1, p1), (q2, p2) = outs
    tol = 1e-6 if dtype == F32 else 4e-3
    assert rel(q1, q2) < tol, rel(q1, q2)
    keep = slots[slots >= 0]
    for a, b in ((p1[0], p2[0]), (p1[1], p2[1])):
        assert rel(a[keep].float(), b[keep].float()) < (tol if kv in ("bf16", "fp32") else 3e-2), kv
    if p1[2] is not None:
        assert rel(p1[2][keep], p2[2][keep]) < 1e-2
        assert not p1[2][[1, 4, 5, 6, 8, 10]].any()  # no token stored there (slot -1 stores nothing)
    assert not p1[0][[1, 4, 5, 6, 8, 10]].float().any()  # slots no token names stay untouched


def _attention_case(g_heads: int, dim: int, bs: int, window, kv: str, decode: bool, splits: int = 1, seed=3):
    from exaone.core.kernels import ops

    gen = torch.Generator().manual_seed(seed)
    hkv, dtype = 2, BF
    h = hkv * g_heads
    lens = [1, 37, 64, 5] if decode else [9, 40, 23]
    qlens = [1] * len(lens) if decode else [9, 17, 1]  # prefill: a whole prompt, a chunk, a decode row
    width = -(-max(lens) // bs)
    blocks = torch.randperm(len(lens) * width, generator=gen)[: len(lens) * width].view(len(lens), width) + 1
    slots_total = (len(lens) * width + 1) * bs
    kp, vp, ks, vs = _pools(slots_total, hkv, dim, kv)
    for s, n in enumerate(lens):  # fill the cache through the reference store
        pos = torch.arange(n)
        sl = d(blocks[s, pos // bs] * bs + pos % bs)
        ops.store_kv(kp, ks, sl, d(torch.randn(n, hkv, dim, generator=gen).to(dtype)))
        ops.store_kv(vp, vs, sl, d(torch.randn(n, hkv, dim, generator=gen).to(dtype)))
    q = d(torch.randn(sum(qlens), h, dim, generator=gen).to(dtype))
    seq_lens = d(torch.tensor(lens, dtype=torch.int32))
    query_start = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    table = d(blocks.to(torch.int32))
    tiles = None
    if not decode:
        from exaone.core.engine.step import StepPlan

        plan = StepPlan([0] * len(lens), 0, *[None] * 6, query_start.numpy(), None, [])
        tiles = d(torch.from_numpy(plan.tiles(g_heads)))
    args = (q, kp, vp, ks, vs, table, seq_lens, d(query_start), bs, window, dim**-0.5)
    ref = ops.paged_attention(*args, backend="reference")
    got = ops.paged_attention(*args, tiles=tiles, num_splits=splits, backend="triton")
    assert rel(got, ref) < 2e-2, (g_heads, d, bs, window, kv, decode, splits, rel(got, ref))


def _moe(dtype, t: int = 9, experts: int = 8, top_k: int = 3, hidden: int = 64, inter: int = 48):
    """The fused MoE kernels against the per-expert reference: some experts get no token, some many."""
    from exaone.core.kernels import ops

    g = torch.Generator().manual_seed(6)
    x = d(torch.randn(t, hidden, generator=g).to(dtype))
    w13 = d((torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1).to(dtype))
    w2 = d((torch.randn(experts, hidden, inter, generator=g) * 0.1).to(dtype))
    choice = torch.stack([torch.randperm(experts - 2, generator=g)[:top_k] for _ in range(t)])  # 2 unused
    choice[0] = torch.tensor([0, 1, 2])
    weights = d(torch.rand(t, top_k, generator=g))
    choice = d(choice)
    got = ops.fused_moe(x, w13, w2, choice, weights, backend="triton")
    want = ops.fused_moe(x, w13, w2, choice, weights, backend="reference")
    assert got.dtype == x.dtype and rel(got, want) < (1e-5 if dtype == F32 else 1e-2), rel(got, want)


def _engine_end_to_end(family: str, kv: str = "auto"):
    """The whole engine on the Triton kernels (norms, RoPE + store, paged attention, silu) equals the
    reference generate(), greedy, with chunked prefill, batching and CUDA-graph-style decode steps."""
    import tempfile

    os.environ["EXAONE_KERNELS"] = "triton"
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import exaone3_checkpoint, exaone4_checkpoint, exaone_moe_reference

    from exaone.build.builder import BuildOptions, build
    from exaone.core.engine import load_engine
    from exaone.core.engine.graphs import DecodeGraphs
    from exaone.core.generate import Sampling, generate
    from exaone.core.loader import load_model

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        if family == "exaone_moe":
            exaone_moe_reference().save_pretrained(ckpt)
        else:
            (exaone3_checkpoint if family == "exaone3" else exaone4_checkpoint)(ckpt)
        opts = BuildOptions(max_batch_size=4, max_input_len=40, max_seq_len=64, max_num_tokens=24,
                            tokens_per_block=8, kv_cache_dtype=kv)  # fmt: skip
        engine = load_engine(build(ckpt, Path(tmp) / "engine", opts, say=lambda _: None))
        engine.graphs = DecodeGraphs(engine, [1, 2, 4])
        g = torch.Generator().manual_seed(4)
        ps = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 3, 17, 9, 12)]
        got = [r.output_ids for r in engine.generate(ps, Sampling(max_new_tokens=8))]
        model = load_model(ckpt, "float32", "cpu")
        want = [generate(model, [p], Sampling(max_new_tokens=8))[0].output_ids for p in ps]
        if kv == "auto":
            assert got == want, (got, want)
        else:  # a quantized cache: most tokens agree
            same = sum(a == b for x, y in zip(got, want, strict=True) for a, b in zip(x, y, strict=True))
            assert same >= 0.7 * sum(len(x) for x in want), (got, want)
    os.environ.pop("EXAONE_KERNELS")


_CHECKS = {
    "norms_fp32": lambda: _norms(F32),
    "norms_bf16": lambda: _norms(BF),
    "silu_mul": _silu_mul,
    "rope_store_fp32": lambda: _rope_store(64, True, True, "fp32", F32),
    "rope_store_qk_norm": lambda: _rope_store(64, True, True, "bf16"),
    "rope_store_no_rope_head80": lambda: _rope_store(80, False, False, "bf16"),
    "rope_store_int8": lambda: _rope_store(64, True, True, "int8"),
    "rope_store_fp8": lambda: _rope_store(64, False, True, "fp8"),
    "decode_gqa4": lambda: _attention_case(4, 64, 16, None, "bf16", True),
    "decode_gqa3_head80_split": lambda: _attention_case(3, 80, 4, None, "bf16", True, splits=4),
    "decode_window_split": lambda: _attention_case(4, 64, 16, 6, "bf16", True, splits=3),
    "decode_gqa5_fp8": lambda: _attention_case(5, 64, 16, None, "fp8", True),
    "decode_int8_split": lambda: _attention_case(2, 64, 32, None, "int8", True, splits=2),
    "prefill_gqa4": lambda: _attention_case(4, 64, 16, None, "bf16", False),
    "prefill_gqa3_window_bs4": lambda: _attention_case(3, 64, 4, 5, "bf16", False),
    "prefill_gqa5_head80_int8": lambda: _attention_case(5, 80, 16, None, "int8", False),
    "moe_fp32": lambda: _moe(F32),
    "moe_bf16_many_tokens": lambda: _moe(BF, t=40),
    "engine_exaone3": lambda: _engine_end_to_end("exaone3"),
    "engine_k_exaone_fused_moe": lambda: _engine_end_to_end("exaone_moe"),
    "engine_exaone4_sliding_nope": lambda: _engine_end_to_end("exaone4"),
    "engine_exaone4_fp8_kv": lambda: _engine_end_to_end("exaone4", "fp8"),
}


test_fused_kernel_interpreted = interpreted_test(_CHECKS, __file__)


if __name__ == "__main__":  # the child: TRITON_INTERPRET=1 is set before triton is imported
    interpreted_checks(_CHECKS)

"""The engine on a CUDA device: parity with the in-memory path, CUDA graphs, batching, KV sizing."""

from __future__ import annotations

import pytest
import torch
from conftest import exaone3_checkpoint, exaone4_checkpoint, exaone_moe_reference

from exaone.build.builder import BuildOptions, build
from exaone.core.engine import RuntimeOptions, load_engine
from exaone.core.errors import ExaoneError
from exaone.core.generate import Sampling, generate
from exaone.core.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = dict(max_batch_size=64, max_input_len=96, max_seq_len=160, max_num_tokens=128, tokens_per_block=16)


def _moe(directory):
    model = exaone_moe_reference()
    model.save_pretrained(directory)
    return model


BUILDERS = {"exaone3": exaone3_checkpoint, "exaone4": exaone4_checkpoint, "exaone_moe": _moe}


def prompts(n: int, seed: int = 0, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lengths]


def one_by_one(model, ps, n, stops=frozenset()):
    return [generate(model, [p], Sampling(max_new_tokens=n), stops)[0].output_ids for p in ps]


def assert_same_greedy(model, prompt, ours, ref, tie=0.02):
    """Token-for-token equality; at a first difference, the reference must have been at a near-tie there
    (bf16 rounding differs between fused and separate GEMMs and between kernel shapes), measured on
    teacher-forced float32 logits relative to their spread. Nothing after it is compared."""
    if ours == ref:
        return
    assert len(ours) == len(ref), f"different lengths: {ours} vs {ref}"
    t = next(i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:t]], device="cuda"))[0, -1]
    gap = (logits[ref[t]] - logits[ours[t]]).abs() / (logits.max() - logits.min())
    assert gap < tie, f"outputs differ at token {t} where the reference is not near a tie ({gap:.3f})"


def _agreement(outputs, truth) -> float:
    """Share of tokens equal to the reference's, each sequence compared up to its first difference."""
    same = total = 0
    for a, b in zip(outputs, truth, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same, total = same + n, total + len(b)
    return same / max(total, 1)


@pytest.fixture(params=list(BUILDERS), scope="module")
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ref = BUILDERS[request.param](root / "ckpt")
    engines = {
        dtype: build(
            root / "ckpt", root / dtype, BuildOptions(**SMALL, dtype=dtype, device="cuda"), say=print
        )
        for dtype in ("bfloat16", "float32")
    }
    return request.param, root / "ckpt", engines, ref


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_equals_the_in_memory_run_path(family, dtype):
    name, ckpt, engines, _ = family
    engine = load_engine(engines[dtype])
    assert engine.device.type == "cuda"
    if name != "exaone_moe":  # decode runs in CUDA graphs
        assert engine.graphs is not None and engine.graphs.sizes[0] == 1, engine.graphs_off_reason
    model = load_model(ckpt, dtype, "cuda")
    ps = prompts(8, seed=1, longest=90)
    got = [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=16))]
    expected = one_by_one(model, ps, 16)
    if dtype == "float32":
        assert got == expected
        return
    exact = sum(a == b for a, b in zip(got, expected, strict=True))
    print(f"{name} bf16: {exact}/{len(ps)} prompts identical token for token")
    fp32 = load_model(ckpt, "float32", "cuda")
    if name == "exaone_moe":
        # bf16 rounding flips top-k expert choices somewhere in either bf16 path (a choice between
        # near-equal router scores), after which outputs part without a near-tie in the logits. So
        # both bf16 paths are held to the float32 reference: ours must agree with it as well.
        truth = one_by_one(fp32, ps, 16)
        assert _agreement(got, truth) >= _agreement(expected, truth) - 0.1
        return
    for p, a, b in zip(ps, got, expected, strict=True):
        assert_same_greedy(fp32, p, a, b)


def test_cuda_graphs_on_and_off_agree(family):
    _, _, engines, _ = family
    ps = prompts(24, seed=2)
    on = load_engine(engines["float32"])
    off = load_engine(engines["float32"], options=RuntimeOptions(cuda_graphs=False))
    assert off.graphs is None
    params = Sampling(max_new_tokens=12)
    assert [g.output_ids for g in on.generate(ps, params)] == [g.output_ids for g in off.generate(ps, params)]


def test_256_prompts_continuous_batching_equal_one_by_one(family):
    name, ckpt, engines, _ = family
    if name == "exaone_moe":
        pytest.skip("covered on the CPU; MoE runs eagerly")
    engine = load_engine(engines["float32"])
    ps = prompts(256, seed=3)
    got = [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=8), stop_ids={7})]
    assert got == one_by_one(load_model(ckpt, "float32", "cuda"), ps, 8, {7})


def test_sliding_layers_hold_only_their_window_on_cuda(family):
    name, _, engines, _ = family
    if name == "exaone3":
        pytest.skip("no sliding layers")
    engine = load_engine(engines["bfloat16"])
    engine.generate([list(range(1, 81))], Sampling(max_new_tokens=60))
    sliding = next(g for g in engine.cache.groups if g.window is not None)
    assert sliding.peak_used <= -(-(sliding.window - 1) // 16) + 1


def test_kv_pool_is_sized_from_free_memory_and_says_when_it_cannot_fit(family):
    _, _, engines, _ = family
    engine = load_engine(engines["bfloat16"])
    assert all(g.num_blocks - 1 >= g.blocks_for(160) for g in engine.cache.groups)
    with pytest.raises(ExaoneError, match=r"needs .* available .*kv_cache_free_gpu_memory_fraction"):
        load_engine(engines["bfloat16"], options=RuntimeOptions(kv_cache_free_gpu_memory_fraction=1e-12))


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_quantized_kv_cache_on_cuda(family, tmp_path, kv):
    _, ckpt, _, _ = family
    opts = BuildOptions(**SMALL, dtype="bfloat16", device="cuda", kv_cache_dtype=kv)
    engine = load_engine(build(ckpt, tmp_path / kv, opts, say=print))
    out = engine.generate(prompts(4, seed=4), Sampling(max_new_tokens=8))
    assert all(len(g.output_ids) == 8 for g in out)


def test_beam_search_matches_transformers_on_cuda(family):
    name, _, engines, ref = family
    if name != "exaone4":
        pytest.skip("one family is enough")
    engine = load_engine(engines["float32"])
    ref = ref.cuda()
    for p in prompts(3, seed=5, longest=12):
        hf = ref.generate(
            torch.tensor([p], device="cuda"), max_new_tokens=8, num_beams=3, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, len(p) :].tolist()  # fmt: skip
        assert engine.generate([p], Sampling(max_new_tokens=8), num_beams=3)[0].output_ids == hf


def test_bf16_default_model_engine_equals_run_path(tmp_path):
    from exaone.core.hub import default_model as dm
    from exaone.core.io.tokenizer import encode, load_tokenizer

    try:
        directory = dm.ensure_default_model(print)
    except ExaoneError as e:
        pytest.skip(f"default model unavailable: {e}")
    opts = BuildOptions(max_batch_size=8, max_input_len=64, max_seq_len=128, dtype="bfloat16", device="cuda")
    engine = load_engine(build(directory, tmp_path / "engine", opts, say=print))
    tok = load_tokenizer(directory)
    ps = [encode(tok, "The capital of France is"), encode(tok, "Water boils at a temperature of")]
    got = [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=24))]
    assert got == one_by_one(load_model(directory, "bfloat16", "cuda"), ps, 24)  # trained weights: no ties


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq", "int8_wo", "int4_awq", "w4a8_awq", "nvfp4"])
def test_packed_quantized_kernels_match_the_reference_on_cuda(tmp_path, fmt):
    """Engine logits (packed kernels, bf16) vs the reference QuantLinear path (bf16) on the same GPU."""
    from test_engine import quantized_dir

    src = tmp_path / "wide"
    exaone3_checkpoint(src, hidden_size=128, intermediate_size=256)
    qdir = quantized_dir(src, tmp_path / fmt, fmt)
    opts = BuildOptions(**SMALL, dtype="bfloat16", device="cuda")
    engine = load_engine(build(qdir, tmp_path / "engine", opts, say=print))
    assert engine.graphs is not None, f"{fmt}: decode not captured: {engine.graphs_off_reason}"
    ids = torch.tensor([prompts(1, seed=8, longest=1)[0] + list(range(20, 60))], device="cuda")
    with torch.no_grad():
        ref = load_model(qdir, "bfloat16", "cuda")(ids).float()
        ref32 = load_model(qdir, "float32", "cuda")(ids).float()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    err, noise = rel(engine.logits(ids), ref), rel(ref, ref32)
    print(f"{fmt}: |engine - reference| {err:.2e}, |bf16 reference - fp32 reference| {noise:.2e}")
    # The bf16 reference rounds dequantized weights and fake-quantized activations to bf16; the kernels
    # do not. With int8 activations that rounding flips quantization levels, and this 2-layer random
    # model amplifies the flips (its own bf16 reference is ~17% from fp32 there), so the bound is
    # that noise, not a fixed number; the fp32 check below is the exact one for int8.
    assert err < max(5e-2, 1.5 * noise)
    if fmt == "int8_sq":  # exact integer GEMM: in fp32 the engine equals the reference to rounding
        opts32 = BuildOptions(**SMALL, dtype="float32", device="cuda")
        engine32 = load_engine(build(qdir, tmp_path / "engine32", opts32, say=print))
        assert rel(engine32.logits(ids), ref32) < 1e-4
    out = engine.generate(prompts(4, seed=9), Sampling(max_new_tokens=8))  # decode through CUDA graphs
    assert all(len(g.output_ids) == 8 for g in out)

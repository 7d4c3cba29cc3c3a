"""The engine (exaone build + the paged, continuously batched runtime) against the reference generate()."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import exaone3_checkpoint, exaone4_checkpoint, exaone_moe_reference, write_modelopt_config

from exaone.build.builder import BuildOptions, build
from exaone.core.engine import RuntimeOptions, load_engine
from exaone.core.errors import ExaoneError
from exaone.core.generate import Sampling, generate
from exaone.core.loader import load_model

QUIET = dict(say=lambda _: None)
SMALL = dict(max_batch_size=16, max_input_len=96, max_seq_len=160, max_num_tokens=48, tokens_per_block=4)


def _moe(directory):
    model = exaone_moe_reference()
    model.save_pretrained(directory)
    return model


BUILDERS = {"exaone3": exaone3_checkpoint, "exaone4": exaone4_checkpoint, "exaone_moe": _moe}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and immune to other processes on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    out = {}
    for name, make in BUILDERS.items():
        ckpt = root / name
        make(ckpt)
        engine_dir = root / f"{name}-engine"
        build(ckpt, engine_dir, BuildOptions(**SMALL), **QUIET)
        out[name] = (ckpt, engine_dir)
    return out


def prompts(n: int, seed: int = 0, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (k,), generator=g).tolist() for k in lengths]


def one_by_one(model, ps, new_tokens, stops=frozenset()):
    return [generate(model, [p], Sampling(max_new_tokens=new_tokens), stops)[0].output_ids for p in ps]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_greedy_equals_reference_generate(checkpoints, family):
    ckpt, engine_dir = checkpoints[family]
    engine = load_engine(engine_dir)
    model = load_model(ckpt, "float32", "cpu")
    ps = prompts(6, seed=1, longest=70)  # longer than max_num_tokens: chunked prefill
    got = [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=10))]
    assert got == one_by_one(model, ps, 10)
    ids = torch.tensor([ps[0]])
    assert torch.allclose(engine.logits(ids), model(ids), atol=1e-5)


def test_256_prompts_continuous_batching_equal_one_by_one(checkpoints):
    ckpt, engine_dir = checkpoints["exaone4"]  # sliding and full layers
    engine = load_engine(engine_dir)
    ps = prompts(256, seed=2)
    stop = {7}
    got = engine.generate(ps, Sampling(max_new_tokens=6), stop_ids=stop)
    model = load_model(ckpt, "float32", "cpu")
    assert [g.output_ids for g in got] == one_by_one(model, ps, 6, stop)
    assert all(not engine.cache.seqs for _ in [0]) and all(g.used == 0 for g in engine.cache.groups)


def test_sliding_window_layers_store_only_their_window(checkpoints):
    _, engine_dir = checkpoints["exaone4"]  # window 5, layers 0-2 sliding, layer 3 full; 4-token blocks
    engine = load_engine(engine_dir)
    window, bs, chunk = 5, 4, 48  # prompts are fed in chunks of at most max_num_tokens (48)
    engine.generate([list(range(1, 61))], Sampling(max_new_tokens=40))
    sliding, full = engine.cache.groups
    assert sliding.window == window and full.window is None
    # the window's blocks plus the tokens of the step being computed, nothing older
    assert sliding.peak_used <= -(-(window - 1 + chunk) // bs) + 1 < full.peak_used
    assert full.peak_used == -(-100 // bs)
    engine.generate([list(range(1, 4))], Sampling(max_new_tokens=80))  # decoding: the window alone
    decode = -(-window // bs) + 1
    assert engine.cache.groups[0].blocks_for(83) == decode
    stats = engine.kv_stats()["layers"]
    batch, per_seq_sliding, per_seq_full = 16, sliding.blocks_for(160, chunk), 160 // bs  # + the null block
    assert stats[0]["bytes"] * (batch * per_seq_full + 1) == stats[3]["bytes"] * (batch * per_seq_sliding + 1)


def test_max_attention_window_narrows_full_layers(checkpoints):
    ckpt, engine_dir = checkpoints["exaone3"]
    engine = load_engine(engine_dir, options=RuntimeOptions(max_attention_window_size=[8, 1000]))
    assert engine.windows == [8, None, 8]
    model = load_model(ckpt, "float32", "cpu")
    for i in (0, 2):
        model.model.layers[i].self_attn.window = 8  # the reference masks the same window over a full cache
    ps = prompts(4, seed=3, longest=30)
    got = [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=12))]
    assert got == one_by_one(model, ps, 12)
    assert engine.cache.groups[0].peak_used <= 4 * (-(-7 // 4) + 1)


def test_pool_smaller_than_the_batch_still_completes(checkpoints):
    ckpt, engine_dir = checkpoints["exaone3"]
    engine = load_engine(engine_dir, options=RuntimeOptions(max_tokens_in_paged_kv_cache=2 * 160))
    (group,) = engine.cache.groups
    assert group.num_blocks - 1 == 2 * 40  # two sequences of max_seq_len
    ps = prompts(12, seed=4, longest=60)
    got = engine.generate(ps, Sampling(max_new_tokens=30))
    assert group.peak_used <= 80
    model = load_model(ckpt, "float32", "cpu")
    assert [g.output_ids for g in got] == one_by_one(model, ps, 30)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_kv_cache_stays_close(checkpoints, tmp_path, kv):
    ckpt, _ = checkpoints["exaone4"]
    engine = load_engine(build(ckpt, tmp_path / kv, BuildOptions(**SMALL, kv_cache_dtype=kv), **QUIET))
    assert engine.cache.k[0].dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[kv]
    model = load_model(ckpt, "float32", "cpu")
    seq = prompts(1, seed=5, longest=1)[0] + list(range(30, 70))
    engine.cache.admit(0, len(seq), chunk=8)
    for start in range(0, len(seq), 8):  # later chunks read earlier ones back from the quantized cache
        logits = engine.forward_logits([(0, seq[start : start + 8])])
    engine.cache.release(0)
    ref = model(torch.tensor([seq]))[0, -1]
    err = (logits[0] - ref).abs().max() / ref.abs().max()
    assert 0 < err < (0.02 if kv == "int8" else 0.1)


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers(tmp_path, num_beams):
    ref = exaone4_checkpoint(tmp_path / "ckpt")
    engine = load_engine(build(tmp_path / "ckpt", tmp_path / "eng", BuildOptions(**SMALL), **QUIET))
    for p in prompts(3, seed=6, longest=12):
        hf = ref.generate(
            torch.tensor([p]), max_new_tokens=8, num_beams=num_beams, do_sample=False, length_penalty=1.0,
            early_stopping=False, eos_token_id=None, pad_token_id=0,
        )[0, len(p) :].tolist()  # fmt: skip
        (ours,) = engine.generate([p], Sampling(max_new_tokens=8), num_beams=num_beams)
        assert ours.output_ids == hf
        assert len(ours.beams) == num_beams


def test_beam_search_with_eos_matches_transformers(tmp_path):
    ref = exaone4_checkpoint(tmp_path / "ckpt")
    engine = load_engine(build(tmp_path / "ckpt", tmp_path / "eng", BuildOptions(**SMALL), **QUIET))
    p = [5, 17, 99, 3, 42, 7]
    greedy = generate(load_model(tmp_path / "ckpt"), [p], Sampling(max_new_tokens=6))[0].output_ids
    eos = greedy[2]  # a token the search will meet early
    hf = ref.generate(
        torch.tensor([p]), max_new_tokens=10, num_beams=3, do_sample=False, eos_token_id=eos, pad_token_id=0
    )[0, len(p) :].tolist()
    hf = hf[: hf.index(eos)] if eos in hf else hf
    (ours,) = engine.generate([p], Sampling(max_new_tokens=10), stop_ids={eos}, num_beams=3)
    assert ours.output_ids == hf


def test_seeded_sampling_matches_reference_and_repeats(checkpoints):
    ckpt, engine_dir = checkpoints["exaone3"]
    engine = load_engine(engine_dir)
    params = Sampling(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=11)
    p = prompts(1, seed=7)[0]
    first = engine.generate([p], params)[0].output_ids
    assert first == engine.generate([p], params)[0].output_ids
    assert first == generate(load_model(ckpt, "float32", "cpu"), [p], params)[0].output_ids


def test_errors(checkpoints, tmp_path):
    ckpt, engine_dir = checkpoints["exaone3"]
    engine = load_engine(engine_dir)
    with pytest.raises(ExaoneError, match=r"max_input_len 96 .*--max_input_len"):
        engine.generate([[1] * 97], Sampling(max_new_tokens=2))
    with pytest.raises(ExaoneError, match=r"max_seq_len 160 .*--max_seq_len"):
        engine.generate([[1] * 90], Sampling(max_new_tokens=80))
    with pytest.raises(ExaoneError, match=r"--max_batch_size 0"):
        build(ckpt, tmp_path / "zero", BuildOptions(**{**SMALL, "max_batch_size": 0}))
    with pytest.raises(ExaoneError, match=r"--max_batch_size 0"):
        load_engine(engine_dir, options=RuntimeOptions(max_batch_size=0))
    with pytest.raises(ExaoneError, match=r"--max_batch_size 17: .*at most 16"):
        load_engine(engine_dir, options=RuntimeOptions(max_batch_size=17))
    with pytest.raises(ExaoneError, match=r"needs [\d.]+ [KMG]?i?B, [\d.]+ [KMG]?i?B available"):
        load_engine(engine_dir, options=RuntimeOptions(max_tokens_in_paged_kv_cache=100))
    with pytest.raises(ExaoneError, match=r"not supported"):
        build(ckpt, tmp_path / "tp", BuildOptions(**SMALL, tp_size=2))


def _edit_engine_json(engine_dir, tmp_path, change) -> str:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(engine_dir, copy)
    info = json.loads((copy / "engine.json").read_text())
    change(info)
    (copy / "engine.json").write_text(json.dumps(info))
    return copy


def test_refuses_engines_from_another_version_or_gpu(checkpoints, tmp_path):
    _, engine_dir = checkpoints["exaone3"]
    old = _edit_engine_json(engine_dir, tmp_path, lambda i: i["versions"].update(torch="1.0.0"))
    with pytest.raises(ExaoneError, match=r"built with torch 1\.0\.0.*rebuild"):
        load_engine(old)
    import shutil

    shutil.rmtree(old)
    gpu = _edit_engine_json(
        engine_dir,
        tmp_path,
        lambda i: (
            i.update(target={"device": "cuda", "gpu": "NVIDIA H100", "compute_capability": "9.0"})
            or i["build"].update(device="cuda")
        ),
    )
    if not torch.cuda.is_available():
        with pytest.raises(ExaoneError, match=r"built for NVIDIA H100 .*rebuild"):
            load_engine(gpu)
    with pytest.raises(ExaoneError, match=r"built for a CUDA GPU, asked to run on cpu.*rebuild"):
        load_engine(gpu, device="cpu")


def test_build_twice_is_a_noop_and_force_rebuilds(checkpoints, tmp_path):
    ckpt, _ = checkpoints["exaone3"]
    out, said = tmp_path / "eng", []
    build(ckpt, out, BuildOptions(**SMALL), say=said.append)
    stamp = (out / "rank0.safetensors").stat().st_mtime_ns
    build(ckpt, out, BuildOptions(**SMALL), say=said.append)
    assert "up to date" in said[-1] and (out / "rank0.safetensors").stat().st_mtime_ns == stamp
    build(ckpt, out, BuildOptions(**{**SMALL, "max_batch_size": 8}), say=said.append)  # new options: rebuilt
    assert json.loads((out / "engine.json").read_text())["build"]["max_batch_size"] == 8
    manifest = json.loads((out / "exaone-manifest.json").read_text())
    assert manifest["kind"] == "engine" and manifest["extra"]["engine"]["target"] == {"device": "cpu"}
    assert {f["path"] for f in manifest["files"]} >= {"engine.json", "rank0.safetensors", "config.json"}


@pytest.mark.slow
def test_default_model_through_the_engine(tmp_path, monkeypatch):
    import os

    from exaone.core.hub import default_model as dm
    from exaone.core.io.tokenizer import encode, load_tokenizer

    if not os.environ.get("EXAONE_CACHE"):  # test_default_model's session cache when the suite runs it first
        monkeypatch.setenv("EXAONE_CACHE", str(tmp_path / "cache"))
    directory = dm.ensure_default_model(lambda _: None)
    opts = BuildOptions(max_batch_size=2, max_input_len=64, max_seq_len=96, max_num_tokens=32)
    engine = load_engine(build(directory, tmp_path / "engine", opts, **QUIET))
    tok = load_tokenizer(directory)
    ps = [encode(tok, "The capital of France is"), encode(tok, "Water boils at a temperature of")]
    got = [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=8))]
    assert got == one_by_one(load_model(directory, "float32", "cpu"), ps, 8)
    assert "Paris" in tok.decode(got[0])


def quantized_dir(src, dst, fmt: str, group: int = 32):
    """A Model Optimizer style export of the float checkpoint src in `fmt`, made with formats.py."""
    from safetensors.torch import load_file, save_file

    from exaone.core import qmath as F

    dst.mkdir()
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, w in load_file(src / "model.safetensors").items():
        if not name.endswith("_proj.weight") and ".mlp.c_" not in name:
            out[name] = w
            continue
        m = name.removesuffix(".weight")
        if fmt in ("int8_sq", "int4_awq", "w4a8_awq"):
            pqs = torch.rand(w.shape[1], generator=gen) + 0.5
            out[m + ".pre_quant_scale"], w = pqs, w / pqs
        if fmt == "fp8":
            scale = (w.abs().amax() / 448.0).float()
            out[name], out[m + ".weight_scale"] = F.quantize_fp8(w, scale), scale
        elif fmt in ("int8_sq", "int8_wo"):
            scale = w.abs().amax(1).float() / 127
            out[name], out[m + ".weight_scale"] = F.quantize_int8(w, scale), scale
        elif fmt in ("int4_awq", "w4a8_awq"):
            scale = F.int4_block_scale(w, group)
            out[name], out[m + ".weight_scale"] = F.quantize_int4(w, scale, group), scale
            if fmt == "w4a8_awq":
                out[m + ".weight_scale_2"] = (scale.amax() / 448.0).float()
                out[m + ".weight_scale"] = scale / out[m + ".weight_scale_2"]
        else:
            s2 = F.nvfp4_scale_2(w.abs().amax().float())
            scale = F.nvfp4_block_scale(w, s2)
            out[name], out[m + ".weight_scale"], out[m + ".weight_scale_2"] = (
                F.quantize_nvfp4(w, scale, s2),
                scale,
                s2,
            )
        if fmt in ("fp8", "int8_sq", "w4a8_awq", "nvfp4"):
            out[m + ".input_scale"] = torch.tensor(0.05)
    save_file(out, dst / "model.safetensors")
    algo = {"fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int8_wo": "W8A16", "int4_awq": "W4A16_AWQ",
            "w4a8_awq": "W4A8_AWQ", "nvfp4": "NVFP4"}[fmt]  # fmt: skip
    quant = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    if fmt in ("int4_awq", "w4a8_awq"):
        quant["group_size"] = group
    write_modelopt_config(src, dst, quant)
    return dst


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """Widths the 4-bit kernels take (in_features a multiple of 128)."""
    directory = tmp_path_factory.mktemp("wide")
    exaone3_checkpoint(directory, hidden_size=128, intermediate_size=256)
    return directory


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq", "int8_wo", "int4_awq", "w4a8_awq", "nvfp4"])
def test_quantized_checkpoints_run_packed_kernels(wide_checkpoint, tmp_path, fmt):
    qdir = quantized_dir(wide_checkpoint, tmp_path / fmt, fmt)
    engine_dir = build(qdir, tmp_path / "engine", BuildOptions(**SMALL), **QUIET)
    info = json.loads((engine_dir / "engine.json").read_text())
    assert info["weights"] == "runtime" and set(info["packed"].values()) == {fmt}
    assert "PackedLinear" in info["linear_kinds"] and "QuantLinear" not in info["linear_kinds"]
    engine = load_engine(engine_dir)
    reference = load_model(qdir, "float32", "cpu")
    ids = torch.tensor([prompts(1, seed=8, longest=1)[0] + list(range(20, 50))])
    got, ref = engine.logits(ids), reference(ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-3, f"{fmt}: packed kernel logits differ from the QuantLinear reference by {err:.2e}"
    ps = prompts(3, seed=8)
    assert [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=6))] == one_by_one(
        reference, ps, 6
    )


def test_unpackable_quantized_checkpoint_keeps_the_reference_path(checkpoints, tmp_path):
    """int4 with in_features 64 (the kernel takes multiples of 128): Model Optimizer tensors kept as is."""
    ckpt, _ = checkpoints["exaone3"]
    qdir = quantized_dir(ckpt, tmp_path / "int4", "int4_awq")
    engine_dir = build(qdir, tmp_path / "engine", BuildOptions(**SMALL), **QUIET)
    info = json.loads((engine_dir / "engine.json").read_text())
    assert info["weights"] == "checkpoint" and "QuantLinear" in info["linear_kinds"]
    ps = prompts(3, seed=8)
    got = [g.output_ids for g in load_engine(engine_dir).generate(ps, Sampling(max_new_tokens=6))]
    assert got == one_by_one(load_model(qdir, "float32", "cpu"), ps, 6)


def test_cuda_graph_buffers_and_padding_on_the_cpu(checkpoints):
    """The static-buffer decode path CUDA graphs replay, run eagerly: batches padded to a captured size,
    split-KV attention, greedy and sampling graphs, one graph for every context length."""
    from exaone.core.engine.graphs import DecodeGraphs

    ckpt, engine_dir = checkpoints["exaone4"]
    engine = load_engine(engine_dir, options=RuntimeOptions(max_attention_window_size=[5, 5, 5, 1000]))
    engine.graphs = DecodeGraphs(engine, [1, 2, 4, 8])
    engine.graphs.long = 40  # short and long contexts in one small test
    assert engine.graphs.splits[1] > 1  # long contexts at small batch split the keys
    ps = prompts(11, seed=9, longest=60)
    got = [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=20))]
    assert got == one_by_one(load_model(ckpt, "float32", "cpu"), ps, 20)
    assert {(4, True, False), (8, True, False)} <= set(engine.graphs.graphs)
    assert any(key[2] for key in engine.graphs.graphs)  # contexts past graphs.LONG: split-KV graphs
    params = Sampling(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    sampled = engine.generate(ps[:3], params)
    assert any(not key[1] for key in engine.graphs.graphs)  # the sampling graph, made when first needed
    assert [g.output_ids for g in sampled] == [g.output_ids for g in engine.generate(ps[:3], params)]


def test_prefix_reuse_shares_prompt_blocks_and_changes_nothing(checkpoints):
    ckpt, engine_dir = checkpoints["exaone3"]
    engine = load_engine(engine_dir, options=RuntimeOptions(enable_kv_cache_reuse=True))
    system = prompts(1, seed=10, longest=1)[0] + list(range(100, 140))  # a shared 41-token prefix
    ps = [system + p for p in prompts(10, seed=11, longest=20)]
    first = [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=8))]
    reused = engine.kv_stats()["reused_prompt_tokens"]
    assert reused >= 40 * (len(ps) - engine.max_batch_size)  # later requests start after the prefix
    again = [g.output_ids for g in engine.generate(ps, Sampling(max_new_tokens=8))]
    assert engine.kv_stats()["reused_prompt_tokens"] >= reused + 40 * len(ps)  # cached across calls
    expected = one_by_one(load_model(ckpt, "float32", "cpu"), ps, 8)
    assert first == expected and again == expected
    small = load_engine(
        engine_dir, options=RuntimeOptions(enable_kv_cache_reuse=True, max_tokens_in_paged_kv_cache=2 * 160)
    )
    assert [g.output_ids for g in small.generate(ps * 2, Sampling(max_new_tokens=8))] == expected * 2
    with pytest.raises(ExaoneError, match="not supported with sliding-window layers"):
        load_engine(checkpoints["exaone4"][1], options=RuntimeOptions(enable_kv_cache_reuse=True))


def test_requests_with_logprobs_and_abort(checkpoints):
    """The request interface a server uses: log-probabilities of the chosen and top tokens equal the
    reference's log-softmax; an aborted request gives its blocks back at once."""
    ckpt, engine_dir = checkpoints["exaone3"]
    engine = load_engine(engine_dir)
    model = load_model(ckpt, "float32", "cpu")
    p = prompts(1, seed=12, longest=20)[0]
    r = engine.add_request(p, Sampling(max_new_tokens=4), logprobs=3)
    other = engine.add_request(p, Sampling(max_new_tokens=50))
    while not r.finished:
        engine.step()
    engine.abort(other)
    assert other.finish_reason == "abort" and not engine.cache.seqs
    assert all(g.used == 0 for g in engine.cache.groups)
    seq = p + r.output
    ref = torch.log_softmax(model(torch.tensor([seq]))[0].float(), -1)
    for i, (chosen, top) in enumerate(r.token_logprobs):
        row = ref[len(p) - 1 + i]
        assert abs(chosen - row[r.output[i]].item()) < 1e-4
        assert [t for t, _ in top] == row.topk(3).indices.tolist()

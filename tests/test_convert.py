"""`exaone convert` to the TensorRT-LLM checkpoint format: round trips for every family and mapping,
the tensor table of an EXAONE-3 conversion against TensorRT-LLM's converter, bad input, manifests."""

import json

import pytest
import torch
from conftest import exaone3_checkpoint, exaone4_checkpoint, exaone_moe_reference
from safetensors import safe_open
from test_exaone_moe import write_per_expert

from exaone.cli.app import main
from exaone.core import model as models
from exaone.core.io import manifest as mf
from exaone.core.loader import load_model
from exaone.core.trtllm import convert as trtllm
from exaone.core.trtllm import reader

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (checkpoint dir, transformers reference model)."""
    root = tmp_path_factory.mktemp("sources")
    ref3 = exaone3_checkpoint(root / "exaone3")  # 4 heads, 2 kv heads: tp 4 duplicates kv heads
    ref4 = exaone4_checkpoint(root / "exaone4")
    refm = exaone_moe_reference()
    write_per_expert(refm, root / "exaone_moe", mtp=True)
    return {"exaone3": (root / "exaone3", ref3), "exaone4": (root / "exaone4", ref4),
            "exaone_moe": (root / "exaone_moe", refm)}  # fmt: skip


@pytest.mark.parametrize("family", ["exaone3", "exaone4", "exaone_moe"])
def test_round_trip_reproduces_fp32_logits(sources, family, tmp_path):
    src, ref = sources[family]
    with torch.no_grad():
        want = ref(IDS).logits
    for tp in (1, 2, 4):
        for pp in (1, 2) if family != "exaone3" else (1, 3):  # EXAONE-3 fixture has 3 layers
            out = trtllm.convert(src, tmp_path / f"tp{tp}pp{pp}", trtllm.ConvertOptions("float32", tp, pp))
            assert {p.name for p in out.glob("rank*.safetensors")} == {
                f"rank{r}.safetensors" for r in range(tp * pp)
            }
            with torch.no_grad():
                got = load_model(out)(IDS)
            assert (got - want).abs().max().item() < 1e-5, (family, tp, pp)


def test_k_exaone_mtp_router_and_experts_read_back_exactly(sources, tmp_path):
    src, _ = sources["exaone_moe"]
    out = trtllm.convert(src, tmp_path / "moe", trtllm.ConvertOptions("float32", tp_size=2, pp_size=2))
    read = reader.read(out)
    state = models.checkpoint_names(read.state, read.cfg)
    original = models.checkpoint_names(trtllm.load_source(src).state, read.cfg)
    assert set(state) == set(original)
    for name, t in original.items():
        assert torch.equal(state[name], t.float()), name
    with safe_open(str(out / "rank3.safetensors"), "pt") as f:  # last stage: router fp32, experts stacked
        assert f.get_tensor("transformer.layers.0.mlp.router.weight").dtype == torch.float32
        assert f.get_slice("transformer.layers.1.mlp.fc.weight").get_shape() == [8, 2 * 32 // 2, 64]
        assert f.get_slice("mtp.fc.weight").get_shape() == [64, 128]


# --- the EXAONE-3 table ----------------------------------------------------------------------
# Written from TensorRT-LLM's tensorrt_llm/models/llama/convert.py (load_weights_from_hf_model with
# the EXAONE name map of get_prefix_and_param_name_map) and models/convert_utils.py (split = chunk):
# hidden 64, intermediate 96, 4 heads of 16, 2 kv heads, vocab 256, untied, tp 2, float16.
TABLE_TP2 = {
    "transformer.vocab_embedding.weight": [256, 64],  # not split: use_parallel_embedding False
    "lm_head.weight": [128, 64],  # rows split
    "transformer.ln_f.weight": [64],
    "transformer.layers.{i}.input_layernorm.weight": [64],
    "transformer.layers.{i}.post_layernorm.weight": [64],
    "transformer.layers.{i}.attention.qkv.weight": [32 + 16 + 16, 64],  # q, k, v rows split then cat
    "transformer.layers.{i}.attention.dense.weight": [64, 32],  # columns split
    "transformer.layers.{i}.mlp.fc.weight": [48, 64],  # c_fc_0 (gate)
    "transformer.layers.{i}.mlp.gate.weight": [48, 64],  # c_fc_1 (up)
    "transformer.layers.{i}.mlp.proj.weight": [64, 48],  # c_proj, columns split
}
# Weight-only (get_tllm_linear_weight + symmetric_quantize_last_axis_of_batched_matrix): the weight
# transposed and quantized, int8 [in, out] (int4: [in, out / 2]), per_channel_scale [out] in dtype.


def _table(layers=3):
    out = {}
    for name, shape in TABLE_TP2.items():
        for i in range(layers) if "{i}" in name else [None]:
            out[name.format(i=i)] = shape
    return out


def test_exaone3_tensor_table_and_config(tmp_path):
    ref = exaone3_checkpoint(tmp_path / "src")
    out = trtllm.convert(tmp_path / "src", tmp_path / "out", trtllm.ConvertOptions("float16", tp_size=2))
    sd = {n: t for n, t in ref.state_dict().items()}
    for rank in (0, 1):
        with safe_open(str(out / f"rank{rank}.safetensors"), "pt") as f:
            got = {n: f.get_tensor(n) for n in f.keys()}
        assert {n: list(t.shape) for n, t in got.items()} == _table()
        assert all(t.dtype == torch.float16 for t in got.values())
        half = lambda t, dim=0, rank=rank: t.chunk(2, dim)[rank].half()  # noqa: E731
        p = "model.layers.1."
        qkv = torch.cat([half(sd[p + f"self_attn.{x}_proj.weight"]) for x in "qkv"])
        assert torch.equal(got["transformer.layers.1.attention.qkv.weight"], qkv)
        assert torch.equal(got["transformer.layers.1.mlp.fc.weight"], half(sd[p + "mlp.gate_proj.weight"]))
        assert torch.equal(got["transformer.layers.1.mlp.gate.weight"], half(sd[p + "mlp.up_proj.weight"]))
        assert torch.equal(
            got["transformer.layers.1.mlp.proj.weight"], half(sd[p + "mlp.down_proj.weight"], 1)
        )
        assert torch.equal(got["lm_head.weight"], half(sd["lm_head.weight"]))
    config = json.loads((out / "config.json").read_text())
    expected = {
        "architecture": "ExaoneForCausalLM", "dtype": "float16", "vocab_size": 256, "hidden_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_size": 16,
        "intermediate_size": 96, "max_position_embeddings": 256, "hidden_act": "silu",
        "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0, "norm_epsilon": 1e-5,
        "rotary_scaling": json.loads((tmp_path / "src" / "config.json").read_text())["rope_scaling"],
        "use_parallel_embedding": False, "embedding_sharding_dim": 0, "tie_word_embeddings": False,
        "logits_dtype": "float32", "qk_layernorm": False, "mlp_bias": False, "attn_bias": False,
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert {k: config["mapping"][k] for k in ("world_size", "tp_size", "pp_size")} == {
        "world_size": 2, "tp_size": 2, "pp_size": 1,
    }  # fmt: skip
    assert config["quantization"] == {
        "quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128, "smoothquant_val": 0.5,
        "clamp_val": None, "use_meta_recipe": False, "has_zero_point": False, "pre_quant_scale": False,
        "exclude_modules": None,
    }  # fmt: skip


def test_tied_embeddings_pipeline_ranks_and_vocab_padding(tmp_path):
    ref = exaone3_checkpoint(tmp_path / "src", tie=True, vocab_size=250)  # 250 rows pad to 252 for tp 4
    out = trtllm.convert(tmp_path / "src", tmp_path / "out", trtllm.ConvertOptions("float32", 4, 3))
    for rank in range(12):
        with safe_open(str(out / f"rank{rank}.safetensors"), "pt") as f:
            names = set(f.keys())
            assert ("transformer.vocab_embedding.weight" in names) == (rank < 4)
            assert ("lm_head.weight" in names) == (rank >= 8)
            if rank == 11:
                assert f.get_slice("lm_head.weight").get_shape() == [63, 64]
                assert torch.equal(f.get_tensor("lm_head.weight")[-2:], torch.zeros(2, 64))
            assert {n.split(".")[2] for n in names if n.startswith("transformer.layers.")} == {"0"}
    with torch.no_grad():
        assert (load_model(out)(IDS.clamp(max=249)) - ref(IDS.clamp(max=249)).logits).abs().max() < 1e-5


# --- manifest, rerun, CLI --------------------------------------------------------------------


def test_manifest_and_rerun_is_a_no_op(tmp_path, capsys):
    exaone3_checkpoint(tmp_path / "src")
    args = ["convert", str(tmp_path / "src"), "--output_dir", str(tmp_path / "out"), "--tp_size", "2"]
    assert main([*args, "--pp_size", "3"]) == 0
    m = mf.read_manifest(tmp_path / "out")
    assert m.kind == "trtllm-checkpoint" and m.dtype == "float16"  # auto: float32 source -> float16
    assert (m.mapping.world_size, m.mapping.tp_size, m.mapping.pp_size) == (6, 2, 3)
    assert m.parent == mf.manifest_hash(mf.load_or_derive(tmp_path / "src"))
    assert {f.path for f in m.files} >= {"config.json", *(f"rank{r}.safetensors" for r in range(6))}
    err = capsys.readouterr().err
    assert all(f"rank {r}/6" in err for r in range(1, 7))
    stamp = (tmp_path / "out" / "rank0.safetensors").stat().st_mtime_ns
    assert main([*args, "--pp_size", "3"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (tmp_path / "out" / "rank0.safetensors").stat().st_mtime_ns == stamp
    assert main([*args, "--pp-size", "3", "--force"]) == 0  # kebab-case too
    assert main([*args, "--pp_size", "1"]) == 2  # other options, no --force: refuses to overwrite
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, overrides, message",
    [
        (["--tp_size", "3"], {}, "does not divide num_attention_heads 4"),
        (["--tp_size", "2"], dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96),
         "num_key_value_heads 3"),
        (["--pp_size", "2"], {}, "does not divide the 3 layers"),
        (["--use_weight_only", "--weight_only_precision", "int4"], {}, "int4 needs in_features % 64"),
        (["--use_weight_only", "--per_group"], {}, "only int4 has a group-wise format"),
        (["--use_weight_only", "--weight_only_precision", "int4", "--per_group"], {},
         "--group_size 128 does not divide hidden_size"),
        (["--per_group"], {}, "--per_group needs --use_weight_only"),
        (["--int8_kv_cache", "--calib_dataset", "/nonexistent"], {}, "no tokenizer files"),
        (["--use_weight_only", "--target_sm", "70"], dict(hidden_size=128, intermediate_size=128),
         "SM75-SM90"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, overrides, message):
    exaone3_checkpoint(tmp_path / "src", **overrides)
    assert main(["convert", str(tmp_path / "src"), "--output_dir", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_input_that_is_already_a_trtllm_checkpoint(tmp_path, capsys):
    exaone3_checkpoint(tmp_path / "src")
    trtllm.convert(tmp_path / "src", tmp_path / "ckpt", trtllm.ConvertOptions())
    assert main(["convert", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "again")]) == 2
    assert "already a TensorRT-LLM checkpoint" in capsys.readouterr().err


# The reference README's four convert commands (examples/models/core/exaone/README.md, "Convert
# checkpoint and build TensorRT engine(s)"), as the README of this project spells them.
README_COMMANDS = {
    "fp16/1-gpu": ["--dtype", "float16"],
    "int8_wq/1-gpu": ["--use_weight_only", "--weight_only_precision", "int8", "--dtype", "float16"],
    "int4_wq/1-gpu": ["--use_weight_only", "--weight_only_precision", "int4", "--dtype", "float16"],
    "fp16/2-gpu": ["--tp_size", "2", "--dtype", "float16"],
}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Sizes that TensorRT-LLM's int4 preprocessor accepts (multiples of 64 per rank)."""
    d = tmp_path_factory.mktemp("wide")
    ref = exaone3_checkpoint(d / "src", hidden_size=128, intermediate_size=256, num_attention_heads=4)
    return d / "src", ref


@pytest.mark.parametrize("name", README_COMMANDS)
def test_readme_convert_commands(wide_model, tmp_path, name):
    src, ref = wide_model
    out = tmp_path / "trt_models" / "exaone" / name
    assert main(["convert", "--model_dir", str(src), "--output_dir", str(out), *README_COMMANDS[name]]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert config["quantization"]["quant_algo"] == {"int8_wq": "W8A16", "int4_wq": "W4A16"}.get(
        name.split("/")[0]
    )
    assert config["mapping"]["tp_size"] == (2 if name.endswith("2-gpu") else 1)
    with torch.no_grad():
        want = ref(IDS).logits
        got = load_model(out, dtype="float32")(IDS)
    tol = {"int4_wq": 0.5, "int8_wq": 0.05}.get(name.split("/")[0], 0.01)  # quantization error bounds
    assert (got - want).abs().max().item() < tol


def test_run_accepts_a_converted_directory(tmp_path, capsys):
    from conftest import add_tokenizer

    exaone3_checkpoint(tmp_path / "src", vocab_size=102400, num_hidden_layers=2, tie=True)
    add_tokenizer(tmp_path / "src")
    trtllm.convert(tmp_path / "src", tmp_path / "ckpt", trtllm.ConvertOptions("float32", tp_size=2))
    runs = []
    for directory in ("src", "ckpt"):
        assert (
            main(["run", str(tmp_path / directory), "--input_text", "Hi", "--max_output_len", "4", "--json"])
            == 0
        )
        runs.append(json.loads(capsys.readouterr().out)["results"][0]["output_ids"])
    assert runs[0] == runs[1]


def test_int8_kv_cache_scales_are_calibrated_max_qkv_over_127(tmp_path, shared_data):
    """convert.py: kv_cache_scaling_factor = max |q, k, v projection outputs| / 127 per layer, on the
    calibration rows; checked against transformers' Llama run on the same rows with its own hooks."""
    from conftest import add_tokenizer

    from exaone.core.io import calibration as calib
    from exaone.core.io.tokenizer import load_tokenizer

    ref = exaone3_checkpoint(tmp_path / "src", vocab_size=102400, num_hidden_layers=2, tie=True)
    add_tokenizer(tmp_path / "src")
    args = [
        "--int8_kv_cache",
        "--calib_dataset",
        "shared",
        "--calib_size",
        "3",
        "--calib_max_seq_length",
        "16",
        "--dtype",
        "float32",
    ]
    assert (
        main(
            ["convert", str(tmp_path / "src"), "--output_dir", str(tmp_path / "out"), "--tp_size", "2", *args]
        )
        == 0
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"]["kv_cache_quant_algo"] == "INT8"
    m = mf.read_manifest(tmp_path / "out")
    assert m.quantization.kv_cache_dtype == "int8" and m.quantization.calibration.tokens == 48
    rows = calib.calibration_batches(
        load_tokenizer(tmp_path / "src"), calib.load_texts("shared", 12, 0), 3, 16, 0, "shared"
    )
    amax = {}
    hooks = [
        getattr(layer.self_attn, p).register_forward_hook(
            lambda mod, a, out, i=i: amax.__setitem__(i, max(amax.get(i, 0.0), out.abs().max().item()))
        )
        for i, layer in enumerate(ref.model.layers)
        for p in ("q_proj", "k_proj", "v_proj")
    ]
    with torch.no_grad():
        for row in rows:
            ref(row[None])
    for h in hooks:
        h.remove()
    for rank in (0, 1):
        with safe_open(str(tmp_path / "out" / f"rank{rank}.safetensors"), "pt") as f:
            for i in (0, 1):
                got = f.get_tensor(f"transformer.layers.{i}.attention.kv_cache_scaling_factor")
                assert got.shape == (1,) and got.item() == pytest.approx(amax[i] / 127, rel=1e-5)
    with torch.no_grad():  # the reader keeps the float weights; the scales need a quantized runtime
        assert (load_model(tmp_path / "out")(IDS) - ref(IDS).logits).abs().max() < 1e-5

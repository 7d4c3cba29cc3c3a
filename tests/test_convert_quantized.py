"""Converting Model Optimizer exports (what `exaone quantize` writes) to TensorRT-LLM's quantized
checkpoint names, and reading them back.

The quantized inputs are written here with exaone/quant/formats.py's math in Model Optimizer's HF
layout (so FP8 works without a GPU); a converted directory must load (through the quantized loader)
to the same logits as the input. Names follow Model Optimizer's TensorRT-LLM exporter
(modelopt/torch/export/model_config.py `LinearConfig`, `QKVConfig`; model_config_utils.py).
"""

import json

import pytest
import torch
from conftest import exaone3_checkpoint, exaone4_checkpoint, write_modelopt_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from exaone.cli.app import main
from exaone.core import model as models
from exaone.core import qmath as formats
from exaone.core.loader import load_model
from exaone.core.trtllm import convert as trtllm
from exaone.core.trtllm import reader

ALGO = {"fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ", "w4a8_awq": "W4A8_AWQ",
        "int8_wo": "W8A16", "int4_wo": "W4A16_AWQ"}  # fmt: skip
GROUP = 32
IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
# Linears sharing an input (so sharing AWQ / SmoothQuant pre_quant_scale), by suffix.
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "c_fc_0": "fc", "c_fc_1": "fc",
                "gate_proj": "fc", "up_proj": "fc"}  # fmt: skip


def quantize_dir(src, dst, fmt, kv_fp8=False, equal_qkv_scales=True):
    """A Model Optimizer style export of the float checkpoint src, in format fmt."""
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    pqs_cache = {}
    out = {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        leaf = module.rsplit(".", 1)[-1]
        if not name.endswith("_proj.weight") and ".mlp.c_" not in name:
            out[name] = w
            continue
        if fmt in ("int4_awq", "w4a8_awq", "int8_sq"):
            key = (module.rsplit(".", 1)[0], SHARED_INPUT.get(leaf, leaf))
            pqs = pqs_cache.setdefault(key, torch.rand(w.shape[1], generator=gen) + 0.5)
            out[module + ".pre_quant_scale"] = pqs.clone()
            w = w / pqs  # y = (x * pre_quant_scale) @ quantized(W / pre_quant_scale).T
        if fmt == "fp8":
            scale = (w.abs().amax() / 448.0).float()
            if equal_qkv_scales and leaf in ("q_proj", "k_proj", "v_proj"):
                scale = torch.tensor(0.002)
            out[name], out[module + ".weight_scale"] = formats.quantize_fp8(w, scale), scale
            out[module + ".input_scale"] = torch.tensor(0.05)
        elif fmt in ("int8_sq", "int8_wo"):
            scale = w.abs().amax(1).float() / 127
            out[name], out[module + ".weight_scale"] = formats.quantize_int8(w, scale), scale
            if fmt == "int8_sq":
                out[module + ".input_scale"] = torch.tensor(0.03)
        else:
            scale = formats.int4_block_scale(w, GROUP)
            out[name], out[module + ".weight_scale"] = formats.quantize_int4(w, scale, GROUP), scale
            if fmt == "w4a8_awq":
                out[module + ".weight_scale_2"] = torch.tensor(0.01 if leaf != "k_proj" else 0.02)
                out[module + ".input_scale"] = torch.tensor(0.04)
        if kv_fp8 and leaf in ("k_proj", "v_proj"):
            out[f"{module}.{leaf[0]}_scale"] = torch.tensor(0.1)
    save_file(out, dst / "model.safetensors")
    quant = {"quant_algo": ALGO[fmt], "kv_cache_quant_algo": "FP8" if kv_fp8 else None,
             "exclude_modules": ["lm_head"]}  # fmt: skip
    if fmt in ("int4_awq", "w4a8_awq", "int4_wo"):
        quant["group_size"] = GROUP
    write_modelopt_config(src, dst, quant)
    return dst


@pytest.fixture(scope="module")
def float_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("float")
    exaone3_checkpoint(d / "src", hidden_size=64, intermediate_size=128)
    return d / "src"


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq", "int4_awq", "w4a8_awq", "int8_wo", "int4_wo"])
def test_quantized_round_trip_same_logits(float_src, tmp_path, fmt):
    qdir = quantize_dir(float_src, tmp_path / "q", fmt, kv_fp8=fmt == "fp8")
    with torch.no_grad():
        want = load_model(qdir, "float32")(IDS)
    # tp 4 leaves 16 inputs per rank of o_proj: less than an int4 group, fewer than W8A16's 32
    for tp, pp in ((1, 1), (2, 3), *([(4, 1)] if fmt in ("fp8", "int8_sq") else [])):
        out = trtllm.convert(qdir, tmp_path / f"t{tp}{pp}", trtllm.ConvertOptions("float32", tp, pp))
        config = json.loads((out / "config.json").read_text())
        assert config["quantization"]["quant_algo"] == ALGO[fmt]
        assert config["quantization"]["exclude_modules"] == ["lm_head"]
        with torch.no_grad():
            got = load_model(out, "float32")(IDS)
        assert (got - want).abs().max().item() < 1e-5, (fmt, tp, pp)


def test_fp8_names_shapes_and_fused_qkv_scale(float_src, tmp_path):
    qdir = quantize_dir(float_src, tmp_path / "q", "fp8", kv_fp8=True, equal_qkv_scales=False)
    out = trtllm.convert(qdir, tmp_path / "t", trtllm.ConvertOptions("float16", tp_size=2))
    src = load_file(qdir / "model.safetensors")
    p = "transformer.h.0.attn.attention."
    with safe_open(str(out / "rank1.safetensors"), "pt") as f:
        t = {n: f.get_tensor(n) for n in f.keys() if n.startswith("transformer.layers.0.")}
    a = "transformer.layers.0.attention."
    assert t[a + "qkv.weight"].dtype == torch.float8_e4m3fn and t[a + "qkv.weight"].shape == (
        32 + 16 + 16,
        64,
    )
    # QKVConfig: the fused weight scale and activation scale are the maxima of q, k, v's.
    wmax = torch.stack([src[p + f"{x}_proj.weight_scale"] for x in "qkv"]).amax()
    assert (
        t[a + "qkv.weights_scaling_factor"].shape == (1,)
        and t[a + "qkv.weights_scaling_factor"].item() == wmax
    )
    assert t[a + "qkv.activation_scaling_factor"].item() == pytest.approx(0.05)
    assert t[a + "kv_cache_scaling_factor"].item() == pytest.approx(0.1)
    assert t[a + "dense.weight"].shape == (64, 32)
    assert t["transformer.layers.0.mlp.fc.weights_scaling_factor"].dtype == torch.float32
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["kv_cache_quant_algo"] == "FP8"
    # The re-quantized q/k/v dequantize to within one e4m3 step of the originals.
    read = reader.read(out)
    hf, state = read.hf_config, models.checkpoint_names(read.state, read.cfg)
    assert hf["quantization_config"]["quant_algo"] == "FP8"
    for x in "qkv":
        before = formats.dequantize_fp8(src[p + f"{x}_proj.weight"], src[p + f"{x}_proj.weight_scale"])
        after = formats.dequantize_fp8(state[p + f"{x}_proj.weight"], state[p + f"{x}_proj.weight_scale"])
        assert (after - before).abs().max() <= wmax * 32  # e4m3 spacing at the top of the range


def test_int4_awq_layout_and_row_split(float_src, tmp_path):
    qdir = quantize_dir(float_src, tmp_path / "q", "int4_awq")
    out = trtllm.convert(qdir, tmp_path / "t", trtllm.ConvertOptions("float16", tp_size=2))
    src = load_file(qdir / "model.safetensors")
    with safe_open(str(out / "rank1.safetensors"), "pt") as f:
        proj = {
            n.rsplit(".", 1)[1]: f.get_tensor(n)
            for n in f.keys()
            if n.startswith("transformer.layers.2.mlp.proj.")
        }
    p = "transformer.h.2.mlp.c_proj."
    assert torch.equal(proj["weight"], src[p + "weight"].view(torch.int8).chunk(2, dim=1)[1])  # int8 view
    assert torch.equal(
        proj["weights_scaling_factor"], src[p + "weight_scale"].chunk(2, dim=1)[1]
    )  # [out, in/G]
    assert torch.equal(proj["prequant_scaling_factor"], src[p + "pre_quant_scale"].half().chunk(2)[1])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["group_size"] == GROUP and config["quantization"]["pre_quant_scale"] is True


def test_per_group_int4_is_w4a16_awq_without_prequant(float_src, tmp_path):
    args = ["--use_weight_only", "--weight_only_precision", "int4", "--per_group", "--group_size", "32"]
    assert (
        main(["convert", str(float_src), "--output_dir", str(tmp_path / "t"), "--dtype", "float32", *args])
        == 0
    )
    config = json.loads((tmp_path / "t" / "config.json").read_text())["quantization"]
    assert (config["quant_algo"], config["group_size"], config["pre_quant_scale"]) == ("W4A16_AWQ", 32, False)
    w = load_file(float_src / "model.safetensors")["transformer.h.0.mlp.c_proj.weight"]
    with safe_open(str(tmp_path / "t" / "rank0.safetensors"), "pt") as f:
        got = f.get_tensor("transformer.layers.0.mlp.proj.weight").view(torch.uint8)
        scale = f.get_tensor("transformer.layers.0.mlp.proj.weights_scaling_factor")
    want_scale = formats.int4_block_scale(w, 32)
    assert torch.equal(scale, want_scale) and torch.equal(got, formats.quantize_int4(w, want_scale, 32))


def test_exaone4_fp8_with_qk_norms(tmp_path):
    exaone4_checkpoint(tmp_path / "src")
    from safetensors.torch import load_file as lf

    state = lf(tmp_path / "src" / "model.safetensors")
    (tmp_path / "float").mkdir()
    save_file(state, tmp_path / "float" / "model.safetensors")
    (tmp_path / "float" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    qdir = quantize_dir(tmp_path / "float", tmp_path / "q", "fp8")
    with torch.no_grad():
        want = load_model(qdir, "float32")(IDS)
        out = trtllm.convert(qdir, tmp_path / "t", trtllm.ConvertOptions("float32", 4, 2))
        got = load_model(out, "float32")(IDS)
    assert (got - want).abs().max().item() < 1e-5


def test_quantized_input_errors(float_src, tmp_path, capsys):
    qdir = quantize_dir(float_src, tmp_path / "q", "int4_awq")
    base = ["convert", str(qdir), "--output_dir", str(tmp_path / "t")]
    assert main([*base, "--use_weight_only"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main([*base, "--tp_size", "4"]) == 2  # o_proj: 64 / 4 = 16 inputs per rank, group 32
    assert (
        "o_proj.weight_scale: dimension 1 of [64, 2] is not divisible by --tp_size 4"
        in capsys.readouterr().err
    )
    hq = json.loads((qdir / "hf_quant_config.json").read_text())
    hq["quantization"]["quant_algo"] = "NVFP4"
    (qdir / "hf_quant_config.json").write_text(json.dumps(hq))
    assert main(base) == 2
    assert "not supported yet" in capsys.readouterr().err

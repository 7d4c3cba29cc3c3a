"""exaone.core.qmath against Model Optimizer's own export, and the AutoAWQ layout against a formula.

A tiny LlamaForCausalLM is quantized by modelopt (`mtq.quantize` + `export_hf_checkpoint`) in every
format; re-quantizing the original weights with our functions and the exported scales must give the
exported bytes exactly, and dequantizing them must land within the format's rounding of the weight.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from exaone.core import qmath as F

FORMATS = ["fp8", "int8_sq", "int8_wo", "int4_wo", "int4_awq", "w4a8_awq", "nvfp4"]
BLOCK = 128


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg, LlamaForCausalLM(cfg).eval().state_dict()


def modelopt_export(cfg, state, qformat: str, tmp_path):
    import modelopt.torch.opt  # noqa: F401
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from exaone.quant.quantize import QuantizeOptions, quant_config

    model = LlamaForCausalLM(cfg).eval()
    model.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(
            model, quant_config(QuantizeOptions(qformat=qformat, awq_block_size=BLOCK)), lambda m: m(ids)
        )
        export_hf_checkpoint(model, dtype=torch.float32, export_dir=str(tmp_path / qformat))
    return load_file(str(tmp_path / qformat / "model.safetensors"))


@pytest.mark.parametrize("qformat", FORMATS)
def test_layout_matches_modelopt_export(tiny_llama, qformat, tmp_path):
    cfg, state = tiny_llama
    out = modelopt_export(cfg, state, qformat, tmp_path)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        w = state[f"{name}.weight"].float()
        t = {k.removeprefix(name + "."): v for k, v in out.items() if k.startswith(name + ".")}
        norm = "model.layers.0.input_layernorm.weight"
        if "pre_quant_scale" in t:  # SmoothQuant / AWQ: the weight was divided by it
            w = w / t["pre_quant_scale"][None]
        elif "awq" in qformat and name.endswith("q_proj"):  # AWQ folded it into the norm before
            t["pre_quant_scale"] = out[norm].float() / state[norm].float()
            w = w / t["pre_quant_scale"][None]
        ws = t["weight_scale"]
        if qformat == "fp8":
            q, d, tol = F.quantize_fp8(w, ws), F.dequantize_fp8(t["weight"], ws), ws * 16
        elif qformat in ("int8_sq", "int8_wo"):
            q, d, tol = F.quantize_int8(w, ws), F.dequantize_int8(t["weight"], ws), ws.max() * 0.51
        elif qformat in ("int4_wo", "int4_awq", "w4a8_awq"):
            assert t["weight"].shape == (w.shape[0] // 2, w.shape[1]) and ws.shape == (
                w.shape[0],
                w.shape[1] // BLOCK,
            )
            q, d, tol = F.quantize_int4(w, ws, BLOCK), F.dequantize_int4(t["weight"], ws), ws.max() * 0.51
            if qformat == "w4a8_awq":
                d = F.dequantize_w4a8(t["weight"], ws, t["weight_scale_2"])
                tol = tol + w.abs().max() / 16
        else:
            s2 = t["weight_scale_2"]
            assert torch.equal(F.nvfp4_block_scale(w, s2).view(torch.uint8), ws.view(torch.uint8))
            q, d = F.quantize_nvfp4(w, ws, s2), F.dequantize_nvfp4(t["weight"], ws, s2)
            tol = (ws.float().max() * s2) * 1.01  # half the widest e2m1 step (2) times the block scale
        assert q.dtype == t["weight"].dtype and q.shape == t["weight"].shape
        if "pre_quant_scale" in t and qformat != "int8_sq":
            # AWQ re-smooths q/k/v to one shared pre_quant_scale at export (weight * old / new), so
            # re-deriving from the original weight may flip a rare rounding tie by one step.
            flips = (F.unpack_int4_rows(q) != F.unpack_int4_rows(t["weight"])).float().mean()
            assert flips < 0.005, f"{qformat} {name}: {flips:.2%} of the int4 values differ"
        else:
            assert torch.equal(q.view(torch.uint8), t["weight"].view(torch.uint8)), f"{qformat} {name} bytes"
        assert (d - w).abs().max() <= tol, f"{qformat} {name}: dequantized weight too far"


def test_int4_packing_order():
    q = torch.tensor([[1, -8], [-1, 7]], dtype=torch.int8)  # rows 0 and 1 share bytes
    packed = F.pack_int4_rows(q)
    assert packed.tolist() == [[0xF1, 0x78]]  # row 0 low nibble, row 1 high nibble, two's complement
    assert torch.equal(F.unpack_int4_rows(packed), q)


def test_e2m1_rounding_and_packing():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.1, -6.0])
    codes = F.e2m1_code(x)
    # ties to even: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4; 7 saturates to 6; -0.1 -> -0
    assert F.E2M1_VALUES[codes.long()].tolist() == [0, 1, 1, 2, 2, 4, 4, 6, 0, -6]
    assert codes[8].item() == 8  # the sign bit survives a round to zero, as in modelopt
    packed = F.pack_fp4_cols(codes)
    assert packed[0].item() == codes[0].item() | (codes[1].item() << 4)
    assert torch.equal(F.unpack_fp4_cols(packed), codes)


def awq_reference_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM packing written out: word c holds columns 8c + (0,2,4,6,1,3,5,7) at nibbles 0..7."""
    rows, cols = values.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for nibble, col in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            out[:, c] |= values[:, 8 * c + col].long() << (4 * nibble)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_awq_gemm_dequantize_matches_formula():
    g = torch.Generator().manual_seed(0)
    inn, out, group = 64, 16, 32
    q = torch.randint(0, 16, (inn, out), generator=g)
    z = torch.randint(0, 16, (inn // group, out), generator=g)
    s = (torch.rand(inn // group, out, generator=g) + 0.1).half()
    expected = ((q - z.repeat_interleave(group, 0)) * s.float().repeat_interleave(group, 0)).t()
    qweight, qzeros = awq_reference_pack(q), awq_reference_pack(z)
    assert torch.equal(F.pack_awq_int32(q), qweight)
    assert torch.allclose(F.dequantize_awq_gemm(qweight, qzeros, s), expected.float(), atol=1e-6)


def test_autoawq_checkpoint_loads(tmp_path):
    """An AutoAWQ GEMM checkpoint (LG's -AWQ releases) packed here from the formula: load_model must
    compute with exactly the dequantized weights."""
    import json

    from conftest import exaone3_checkpoint
    from safetensors.torch import load_file, save_file

    from exaone.core.formats.linear import QuantLinear
    from exaone.core.loader import load_model

    src = tmp_path / "awq"
    exaone3_checkpoint(src, hidden_size=64, intermediate_size=128)
    state = load_file(str(src / "model.safetensors"))
    g, group, dense = torch.Generator().manual_seed(0), 32, {}
    for name in [n for n in state if ".attn." in n or ".mlp." in n]:
        out, inn = state[name].shape
        q = torch.randint(0, 16, (inn, out), generator=g)
        z = torch.randint(0, 16, (inn // group, out), generator=g)
        s = (torch.rand(inn // group, out, generator=g) * 0.01).half()
        prefix = name.removesuffix(".weight")
        state.pop(name)
        state.update({f"{prefix}.qweight": awq_reference_pack(q), f"{prefix}.qzeros": awq_reference_pack(z),
                      f"{prefix}.scales": s})  # fmt: skip
        dense[name] = ((q - z.repeat_interleave(group, 0)) * s.float().repeat_interleave(group, 0)).t()
    save_file(state, str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                     "zero_point": True, "version": "gemm"}  # fmt: skip
    (src / "config.json").write_text(json.dumps(config))
    model = load_model(src, dtype="float32")
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    ref_dir = tmp_path / "dense"
    ref_dir.mkdir()
    plain = {k: v for k, v in state.items() if not k.endswith(("qweight", "qzeros", "scales"))}
    plain.update({k: v.contiguous() for k, v in dense.items()})
    save_file(plain, str(ref_dir / "model.safetensors"))
    del config["quantization_config"]
    (ref_dir / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 256, (1, 10), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids), load_model(ref_dir, dtype="float32")(ids), rtol=1e-4, atol=1e-4
        )

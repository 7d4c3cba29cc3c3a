"""`exaone quantize` on the CPU: every format on the real default-model weights (SmolLM2 in EXAONE-3
layout), reloaded through load_model / `exaone run`, logits against the unquantized model; EXAONE-4's
explicit pre_quant_scale; K-EXAONE's router, bias and expert counts; bad input; the no-op rerun.

Calibration is deliberately small (4 x 64 tokens of the shared XSum text) to keep the suite fast; the
per-format top-1 bounds below are set from what that gives, with margin (docs/quantize.md).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import SHARED_DATA, add_tokenizer, exaone3_checkpoint, exaone4_checkpoint
from safetensors import safe_open

from exaone.cli.app import main
from exaone.core.errors import ExaoneError
from exaone.core.formats.linear import QuantLinear
from exaone.core.loader import load_model
from exaone.quant.quantize import QuantizeOptions, quantize

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data"),
    pytest.mark.filterwarnings("ignore"),
]

# Top-1 agreement with the unquantized model on 256 WikiText-2 tokens (measured: fp8 .90, int8_wo .97,
# int8_sq .58, int4_wo .64, int4_awq .73, w4a8_awq .72, nvfp4 .61). A wrong layout gives ~0.
TOP1_BOUND = {
    "fp8": 0.85, "int8_wo": 0.93, "int8_sq": 0.45, "int4_wo": 0.5,
    "int4_awq": 0.6, "w4a8_awq": 0.6, "nvfp4": 0.5,
}  # fmt: skip
CALIB = dict(calib_dataset=str(SHARED_DATA / "xsum"), calib_size=4, calib_seq=64, device="cpu")


def opts(qformat: str, **kw) -> QuantizeOptions:
    return QuantizeOptions(qformat=qformat, **{**CALIB, "awq_block_size": 64, **kw})


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("quantized")


@pytest.fixture(scope="module")
def eval_ids(default_model_dir):
    from exaone.core.io.tokenizer import load_tokenizer

    text = (SHARED_DATA / "wikitext2" / "raw" / "wiki.test.raw").read_text(encoding="utf-8")[:4000]
    ids = load_tokenizer(default_model_dir)(text)["input_ids"][:256]
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def reference_logits(default_model_dir, eval_ids):
    with torch.no_grad():
        return load_model(default_model_dir, dtype="float32")(eval_ids)[0]


@pytest.mark.parametrize("qformat", list(TOP1_BOUND))
def test_every_format_quantizes_reloads_and_stays_close(
    qformat, default_model_dir, out_root, eval_ids, reference_logits
):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = quantize(default_model_dir, opts(qformat), out_root / qformat, say=lambda m: None)
    assert s.bytes_after < 0.75 * s.bytes_before and s.tokens == 256
    hf_quant = json.loads((s.output / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["exclude_modules"] == ["lm_head", "transformer.wte"]  # EXAONE names, not Llama's
    config = json.loads((s.output / "config.json").read_text())
    assert config["model_type"] == "exaone" and config["quantization_config"]["quant_method"] == "modelopt"
    with safe_open(str(s.output / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "transformer.h.0.attn.attention.q_proj.weight_scale" in names
    assert not any(n.startswith("model.") for n in names)
    model = load_model(s.output, dtype="float32")
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        logits = model(eval_ids)[0]
    agree = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    assert agree >= TOP1_BOUND[qformat], f"{qformat}: top-1 agreement {agree:.3f}"
    manifest = json.loads((s.output / "exaone-manifest.json").read_text())
    q = manifest["quantization"]
    assert manifest["kind"] == "quantized" and q["algorithm"] == qformat
    assert q["calibration"] == {
        "dataset": CALIB["calib_dataset"], "size": 4, "seq": 64, "seed": 1234, "tokens": 256,
        "expert_tokens": None,
    }  # fmt: skip
    assert q["group_size"] == {"int4_awq": 64, "w4a8_awq": 64, "int4_wo": 64, "nvfp4": 16}.get(qformat)


def test_run_generates_from_quantized_dir_and_rerun_is_a_no_op(default_model_dir, out_root, capsys):
    out = out_root / "fp8"
    if not out.is_dir():
        pytest.skip("needs the fp8 output of the test above")
    assert (
        main(["run", str(out), "--input_text", "The capital of France is", "--max_output_len", "6", "--json"])
        == 0
    )
    text = json.loads(capsys.readouterr().out)["results"][0]["text"]
    assert "Paris" in text
    before = (out / "exaone-manifest.json").read_text()
    args = ["quantize", str(default_model_dir), "--qformat", "fp8", "--calib_dataset", CALIB["calib_dataset"],
            "--calib-size", "4", "--calib_seq", "64", "--device", "cpu", "--awq_block_size", "64",
            "--output_dir", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (out / "exaone-manifest.json").read_text() == before


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny3") / "src"
    exaone3_checkpoint(d, vocab_size=102400, hidden_size=64, intermediate_size=96)
    add_tokenizer(d)
    return d


@pytest.mark.parametrize(
    "args, message",
    [
        (["--qformat", "int3"], "--qformat 'int3': unknown"),
        (["--qformat", "int4_awq", "--awq_block_size", "128"], "does not divide the in-features"),
        (["--calib_size", "0"], "--calib_size 0: must be at least 1"),
        (["--calib_dataset", "EMPTY"], "the calibration set is empty"),
        (["--calib_size", "100000"], "too short"),
        (["--kv_cache_dtype", "int8"], "not supported"),
        (["--qformat", "nvfp4", "--export_format", "trtllm"], "not supported yet for --qformat nvfp4"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tiny3, tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [a.replace("EMPTY", str(empty)) for a in args]
    out = tmp_path / "out"
    base = ["quantize", str(tiny3), "--calib_dataset", str(SHARED_DATA / "xsum"), "--calib_size", "2",
            "--calib_seq", "16", "--device", "cpu", "--output_dir", str(out)]  # fmt: skip
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_hub_dataset_fails_fast_offline(tiny3, tmp_path, capsys, monkeypatch):
    import exaone.core.io.calibration as calib

    monkeypatch.setattr(calib, "_hub_reachable", lambda timeout=5.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["quantize", str(tiny3), "--device", "cpu", "--output_dir", str(tmp_path / "o")]) == 2
    assert "hub is not reachable" in capsys.readouterr().err


def test_exaone4_keeps_explicit_pre_quant_scale_and_matches_fake_quant(tmp_path):
    """Post-norm: q/k/v and gate/up read the residual stream, so AWQ/SmoothQuant scales cannot be folded
    into a norm. The export must keep them, and the reloaded model must match Model Optimizer's own
    fake-quantized model (int8_sq) well within the quantization error itself."""
    from exaone.core import reference as hf_model
    from exaone.core.config import load_config
    from exaone.core.io import calibration as calib
    from exaone.core.io.tokenizer import load_tokenizer
    from exaone.quant.quantize import ExpertCounter, _calibrate, _export, _plain_progress, write_checkpoint

    src = tmp_path / "e4"
    exaone4_checkpoint(src, vocab_size=102400)
    add_tokenizer(src)
    cfg, tok = load_config(src), load_tokenizer(src)
    o = opts("int8_sq", calib_size=4, calib_seq=32)
    rows = calib.calibration_batches(tok, calib.load_texts(o.calib_dataset, 16, 0), 4, 32, 0, "xsum")
    hf = hf_model.build(src, cfg, torch.float32, torch.device("cpu"))
    _calibrate(hf.model, rows, o, "cpu", ExpertCounter(cfg), _plain_progress(lambda m: None))
    with torch.no_grad():
        fake = hf.model(input_ids=rows[:2], use_cache=False).logits
    out = tmp_path / "q"
    out.mkdir()
    _export(hf.model, out / "scratch", torch.float32)
    write_checkpoint(out / "scratch", out, src, hf, torch.float32)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert f"model.layers.1.{proj}.pre_quant_scale" in names
    ref = load_model(src, dtype="float32")
    model = load_model(out, dtype="float32")
    with torch.no_grad():
        ours, exact = model(rows[:2]), ref(rows[:2])
    quant_error = (fake - exact).abs().max()
    assert quant_error > 0
    assert (ours - fake).abs().max() < 0.5 * quant_error  # the export re-smooths q/k/v to one scale
    # and without the runtime pre_quant_scale the result is far off: the path is really exercised
    for m in model.modules():
        if isinstance(m, QuantLinear) and hasattr(m, "pre_quant_scale"):
            m.pre_quant_scale.fill_(1.0)
    with torch.no_grad():
        assert (model(rows[:2]) - fake).abs().max() > quant_error


def test_k_exaone_router_unquantized_and_expert_counts(tmp_path):
    from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

    torch.manual_seed(0)
    cfg = ExaoneMoeConfig(
        vocab_size=102400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, n_group=1,
        topk_group=1, tie_word_embeddings=False,
    )  # fmt: skip
    src = tmp_path / "moe"
    ExaoneMoeForCausalLM(cfg).eval().save_pretrained(src)
    add_tokenizer(src)
    said = []
    # 2 tokens x top-2 = at most 4 of 8 experts: some must go without calibration tokens
    s = quantize(src, opts("fp8", calib_size=1, calib_seq=2), tmp_path / "q", say=said.append)
    counts = json.loads((s.output / "exaone-manifest.json").read_text())["quantization"]["calibration"]
    counts = counts["expert_tokens"]["model.layers.1.mlp"]
    assert len(counts) == 8 and sum(counts) == 4
    empty = [e for e, n in enumerate(counts) if n == 0]
    assert s.empty_experts == {"model.layers.1.mlp": empty}
    warning = "\n".join(m for m in said if m.startswith("warning"))
    assert str(empty) in warning and "--calib_size 4" in warning and "--calib_seq 4" in warning
    with safe_open(str(s.output / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32  # router as it was
        assert f.get_tensor("model.layers.1.mlp.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.float8_e4m3fn
    model = load_model(s.output, dtype="float32")
    assert isinstance(model.model.layers[1].mlp.experts[7].down_proj, QuantLinear)
    assert not isinstance(model.model.layers[1].mlp.gate, QuantLinear)
    ids = torch.randint(0, 102400, (1, 12))
    with torch.no_grad():
        diff = (model(ids) - load_model(src, dtype="float32")(ids)).abs().max()
    assert 0 < diff < 0.5


def test_already_quantized_input_is_refused(out_root, default_model_dir):
    if not (out_root / "int8_wo").is_dir():
        pytest.skip("needs the int8_wo output")
    with pytest.raises(ExaoneError, match="already quantized"):
        quantize(out_root / "int8_wo", opts("fp8"), out_root / "again", say=lambda m: None)


def test_fp8_kv_cache_scales_are_written_and_loaded(tiny3, tmp_path):
    s = quantize(
        tiny3, opts("fp8", kv_cache_dtype="fp8", calib_size=2, calib_seq=16), tmp_path / "kv", say=print
    )
    hf_quant = json.loads((s.output / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["kv_cache_quant_algo"] == "FP8"
    with safe_open(str(s.output / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {
        "transformer.h.0.attn.attention.k_proj.k_scale",
        "transformer.h.0.attn.attention.v_proj.v_scale",
    } <= names
    model = load_model(s.output, dtype="float32")
    assert model.model.layers[0].self_attn.k_proj.k_scale > 0
    manifest = json.loads((s.output / "exaone-manifest.json").read_text())
    assert manifest["quantization"]["kv_cache_dtype"] == "fp8"


def test_trtllm_export_goes_through_convert(tiny3, tmp_path):
    o = opts("int8_wo", calib_size=2, calib_seq=16, export_format="trtllm")
    s = quantize(tiny3, o, tmp_path / "trt", say=lambda m: None)
    assert (s.output / "rank0.safetensors").is_file() and not (s.output / "hf_quant_config.json").exists()
    manifest = json.loads((s.output / "exaone-manifest.json").read_text())
    assert manifest["kind"] == "trtllm-checkpoint" and manifest["quantization"]["algorithm"] == "int8_wo"
    assert quantize(tiny3, o, tmp_path / "trt", say=lambda m: None).skipped
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        diff = (load_model(s.output, dtype="float32")(ids) - load_model(tiny3, dtype="float32")(ids)).abs()
    assert 0 < diff.max() < 0.1

"""On a GPU: `exaone quantize` through CUDA, and NVFP4 made on the CPU byte-identical to the GPU export.

Model Optimizer calibrates NVFP4 with max calibration (no quantized forward), and its exporter derives
the packed weights and the e4m3 block scales from the weights and the calibrated amax; so the CPU path
must give the very bytes the GPU path gives. Two kinds of tensor are device arithmetic, not format:
activation scales come from matmuls, which differ in the last bits between devices (compared with a
tolerance); and the exporter's global scale `amax.float() / (6 * 448)` (NVFP4QTensor.
get_weights_scaling_factor_2) is a division by a Python scalar, which CUDA computes as a
multiplication by the reciprocal and so may land one ulp away from the CPU's true division. For those
the test checks that each side holds exactly that expression of the same weight amax on its device.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import exaone3_checkpoint
from safetensors.torch import load_file

from exaone.core.loader import load_model
from exaone.quant.quantize import QuantizeOptions, quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WORDS = [f"w{i}" for i in range(250)]


def word_tokenizer(directory):
    """A word-level tokenizer over WORDS (ids < 256), so no tokenizer files need to travel."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        directory
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-quant")
    src = root / "src"
    exaone3_checkpoint(src, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    word_tokenizer(src)
    g = torch.Generator().manual_seed(0)
    text = "\n\n".join(
        " ".join(WORDS[i] for i in torch.randint(0, 250, (200,), generator=g)) for _ in range(20)
    )
    (root / "calib.txt").write_text(text)
    return root, src


def run(root, src, qformat, device, name):
    opts = QuantizeOptions(
        qformat=qformat, calib_dataset=str(root / "calib.txt"), calib_size=8, calib_seq=64,
        device=device, dtype="float32", awq_block_size=64,
    )  # fmt: skip
    return quantize(src, opts, output_dir=root / name, force=True, say=lambda m: None).output


def test_nvfp4_cpu_export_is_byte_identical_to_gpu(tiny):
    root, src = tiny
    cpu = load_file(str(run(root, src, "nvfp4", "cpu", "nvfp4-cpu") / "model.safetensors"))
    gpu = load_file(str(run(root, src, "nvfp4", "cuda", "nvfp4-gpu") / "model.safetensors"))
    assert cpu.keys() == gpu.keys()
    weights = load_file(str(src / "model.safetensors"))
    differ = []
    for name, a in cpu.items():
        b = gpu[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name.endswith("weight_scale_2") and not torch.equal(a, b):
            # (fused q/k/v and gate/up share one amax, and so one global scale, across their weights)
            amax = weights[name.removesuffix("_scale_2")].float().abs().amax()
            assert torch.equal(a, amax / (6 * 448)), name  # the CPU's division
            assert torch.equal(b, (amax.cuda() / (6 * 448)).cpu()), name  # the same division on CUDA
            assert (a.view(torch.int32) - b.view(torch.int32)).abs() <= 1, name
        elif name.endswith("input_scale"):  # from activations: matmuls differ in the last bits
            if not torch.allclose(a, b, rtol=1e-3, atol=0):
                differ.append(f"{name}: {a.item()} vs {b.item()}")
        elif not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            frac = (a.reshape(-1).view(torch.uint8) != b.reshape(-1).view(torch.uint8)).float().mean()
            differ.append(f"{name} ({a.dtype}): {frac:.3%} of bytes differ")
    assert not differ, f"{len(differ)} tensors differ: " + "; ".join(differ[:8])
    cfg_cpu = json.loads((root / "nvfp4-cpu" / "hf_quant_config.json").read_text())
    cfg_gpu = json.loads((root / "nvfp4-gpu" / "hf_quant_config.json").read_text())
    assert cfg_cpu == cfg_gpu


@pytest.mark.parametrize("qformat", ["fp8", "int4_awq", "int8_sq", "w4a8_awq"])
def test_gpu_quantize_loads_and_runs(tiny, qformat):
    root, src = tiny
    out = run(root, src, qformat, "cuda", f"{qformat}-gpu")
    ids = torch.randint(2, 252, (1, 32), device="cuda")
    ref = load_model(src, dtype="float32", device="cuda")
    q = load_model(out, dtype="float32", device="cuda")
    with torch.no_grad():
        r, y = ref(ids), q(ids)
    assert torch.isfinite(y).all()
    assert (y - r).abs().max() < 0.25 * r.abs().max()

"""Weight-only (W8A16 / W4A16) conversion: the bytes TensorRT-LLM's converter writes, and reading them
back with the same math.

The reference below follows cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp step
by step on bytes and 32-bit words (symmetric_quantize, permute_B_rows_for_mixed_gemm,
subbyte_transpose, interleave_column_major_tensor, add_bias_and_interleave_int{8,4}s_inplace), loop
for loop, so that it shares nothing with the vectorised permutation in exaone/core/trtllm_wo.py.
"""

import numpy as np
import pytest
import torch
from conftest import exaone3_checkpoint
from safetensors import safe_open

from exaone.core.loader import load_model
from exaone.core.trtllm import convert as trtllm
from exaone.core.trtllm import weight_only as wo

LDSM = {
    8: [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15],
    4: [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27, 4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15,
        22, 23, 30, 31],
}  # fmt: skip


def ref_quantize(w_in_out: np.ndarray, bits: int):
    """symmetric_quantize on the transposed weight [rows = in, cols = out]: float math, C round."""
    col_max = np.abs(w_in_out.astype(np.float32)).max(axis=0) * np.float32(1.0 / (1 << (bits - 1)))
    q = np.zeros(w_in_out.shape, dtype=np.int64)
    for j in range(w_in_out.shape[1]):
        if col_max[j] != 0:
            x = (w_in_out[:, j].astype(np.float32) / col_max[j]).astype(np.float64)
            q[:, j] = np.clip(
                np.sign(x) * np.floor(np.abs(x) + 0.5), -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            )
    return q, col_max


def pack(elements: list[int], bits: int) -> list[int]:
    if bits == 8:
        return [e & 0xFF for e in elements]
    return [(elements[i] & 0xF) | ((elements[i + 1] & 0xF) << 4) for i in range(0, len(elements), 2)]


def unpack(data: list[int], bits: int) -> list[int]:
    if bits == 8:
        return list(data)
    return [x for b in data for x in (b & 0xF, b >> 4)]


def words(data):  # little-endian uint32 registers
    return [int.from_bytes(bytes(data[i : i + 4]), "little") for i in range(0, len(data), 4)]


def unwords(ws):
    return [b for w in ws for b in w.to_bytes(4, "little")]


def ref_preprocess(q: np.ndarray, bits: int, sm: int) -> np.ndarray:
    rows, cols = q.shape  # [in, out], row major
    data = pack([int(x) for x in q.reshape(-1)], bits)
    per_word = 32 // bits
    if sm < 90:  # permute_B_rows_for_mixed_gemm on 32-bit words
        ws, vec_cols, block = words(data), cols // per_word, 16 // bits * 8
        out = [0] * len(ws)
        for base in range(0, rows, block):
            for t in range(block):
                for c in range(vec_cols):
                    out[(base + t) * vec_cols + c] = ws[(base + LDSM[bits][t]) * vec_cols + c]
        data = unwords(out)
    elems = unpack(data, bits)  # subbyte_transpose: [rows, cols] -> [cols, rows]
    data = pack([elems[r * cols + c] for c in range(cols) for r in range(rows)], bits)
    if sm < 90:  # interleave_column_major_tensor, ColumnMajorTileInterleave<64, 128 * 8 / bits / 64>
        ws, vec_rows = words(data), rows // per_word
        interleave, vec_per_tile = 128 * 8 // bits // 64, 64 // per_word
        out = [0] * len(ws)
        for read_col in range(cols):
            write_col = read_col // interleave
            for base in range(0, vec_rows, vec_per_tile):
                for vec_read_row in range(base, min(vec_rows, base + vec_per_tile)):
                    vec_write_row = (
                        interleave * base
                        + vec_per_tile * (read_col % interleave)
                        + vec_read_row % vec_per_tile
                    )
                    out[write_col * vec_rows * interleave + vec_write_row] = ws[
                        read_col * vec_rows + vec_read_row
                    ]
        data = unwords(out)
        if bits == 8:  # +128, then swap elements 1 and 2 of every register
            data = [(b + 128) & 0xFF for b in data]
            for i in range(0, len(data), 4):
                data[i + 1], data[i + 2] = data[i + 2], data[i + 1]
        else:  # +8 per nibble, then nibbles [e7 e5 e3 e1 e6 e4 e2 e0] per register
            data = [(((b & 0xF) ^ 8) | ((((b >> 4) ^ 8) & 0xF) << 4)) for b in data]
            ws = words(data)
            for i, reg in enumerate(ws):
                new = 0
                for dest in range(8):
                    src = 2 * dest if dest < 4 else 2 * (dest - 4) + 1
                    new |= ((reg >> (4 * src)) & 0xF) << (4 * dest)
                ws[i] = new
            data = unwords(ws)
    return np.array(data, dtype=np.uint8).view(np.int8).reshape(rows, cols * bits // 8)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("sm", [80, 90])
def test_layout_matches_the_cutlass_preprocessor_reference(bits, sm):
    torch.manual_seed(bits + sm)
    w = (torch.randn(64, 128) * torch.rand(64, 1)).half()  # [out, in]
    w[3] = 0  # an all-zero output channel: scale 0, q 0
    q, scale = wo.symmetric_quantize(w, bits)
    rq, rscale = ref_quantize(w.t().numpy(), bits)
    assert np.array_equal(q.t().numpy(), rq)
    assert torch.equal(scale, torch.from_numpy(rscale).half())
    processed = wo.preprocess(q, bits, wo.layout_for_sm(sm))
    assert processed.dtype == torch.int8 and processed.shape == (128, 64 * bits // 8)
    assert np.array_equal(processed.numpy(), ref_preprocess(rq, bits, sm))
    assert torch.equal(wo.unpreprocess(processed, bits, wo.layout_for_sm(sm)), q)


def test_rounding_is_half_away_from_zero():
    q, scale = wo.symmetric_quantize(torch.tensor([[128.0, 0.5, -0.5, 1.5, -2.5]]), 8)
    assert scale.item() == 1.0 and q.tolist() == [[127, 1, -1, 2, -3]]  # 128 clips to 127


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("wo")
    ref = exaone3_checkpoint(d / "src", hidden_size=128, intermediate_size=256)
    return d / "src", ref


@pytest.mark.parametrize(
    "precision, bits, tp, sm",
    [("int8", 8, 2, 80), ("int4", 4, 1, 80), ("int8", 8, 1, 90), ("int4", 4, 2, 90)],
)
def test_weight_only_round_trip_equals_reference_dequantization(model, tmp_path, precision, bits, tp, sm):
    src, ref = model
    opts = trtllm.ConvertOptions("float32", tp, 1, True, precision, workers=2, target_sm=sm)
    out = trtllm.convert(src, tmp_path / "out", opts)
    with safe_open(str(out / "rank0.safetensors"), "pt") as f:
        w = f.get_tensor("transformer.layers.0.mlp.proj.weight")
        assert w.dtype == torch.int8 and list(w.shape) == [256 // tp, 128 * bits // 8]
        assert f.get_tensor("transformer.layers.0.mlp.proj.per_channel_scale").shape == (128,)
        assert f.get_tensor("lm_head.weight").dtype == torch.float32  # not quantized
    # Reference: quantize each rank's slice independently, dequantize, merge, run transformers.
    state = ref.state_dict()
    deq = {}
    for name, t in state.items():
        if name.endswith("_proj.weight"):
            dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
            parts = []
            for part in t.chunk(tp, dim=dim):
                q, s = ref_quantize(part.t().numpy(), bits)
                parts.append(torch.from_numpy(q * s.astype(np.float64)).float().t())
            deq[name] = torch.cat(parts, dim=dim)
    ref_q = type(ref)(ref.config).eval()
    ref_q.load_state_dict({**state, **deq})
    with torch.no_grad():
        want = ref_q(torch.arange(40).view(2, 20)).logits
        got = load_model(out)(torch.arange(40).view(2, 20))
        plain = ref(torch.arange(40).view(2, 20)).logits
    assert (got - want).abs().max().item() < 1e-5
    assert 0 < (got - plain).abs().max().item() < (0.3 if bits == 4 else 0.03)  # it did quantize

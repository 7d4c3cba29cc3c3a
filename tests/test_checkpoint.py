"""Loading from safetensors: sharded and single files, and every bad checkpoint as a one-line error."""

import json
import struct

import pytest
import torch
from conftest import exaone3_checkpoint
from safetensors.torch import load_file, save_file

from exaone.core.errors import ExaoneError
from exaone.core.loader import load_model


def shard(directory, n=2):
    """Split model.safetensors into n shards with an index, as save_pretrained does."""
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i in range(n):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k] for k in names[i::n]}
        save_file(part, str(directory / file))
        weight_map.update({k: file for k in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return weight_map


@pytest.fixture
def ckpt(tmp_path):
    ref = exaone3_checkpoint(tmp_path)
    return tmp_path, ref


def test_sharded_checkpoint_loads_identically(ckpt):
    directory, ref = ckpt
    shard(directory, 3)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (load_model(directory, "float32")(ids) - ref(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_choice(ckpt, dtype):
    model = load_model(ckpt[0], dtype)
    assert str(model.model.embed_tokens.weight.dtype) == f"torch.{dtype}"


def test_missing_shard(ckpt):
    directory, _ = ckpt
    weight_map = shard(directory)
    (directory / sorted(set(weight_map.values()))[1]).unlink()
    with pytest.raises(ExaoneError, match=r"model-00002-of-00002.safetensors: missing"):
        load_model(directory)


def test_truncated_shard(ckpt):
    directory, _ = ckpt
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ExaoneError, match=r"model.safetensors: truncated"):
        load_model(directory)


def test_header_that_lies(ckpt):
    directory, _ = ckpt
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    with pytest.raises(ExaoneError, match=r"header lies about"):
        load_model(directory)


def test_not_safetensors(ckpt):
    directory, _ = ckpt
    (directory / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ExaoneError, match="truncated"):
        load_model(directory)


def test_wrong_shape_names_tensor_and_expectation(ckpt):
    directory, _ = ckpt
    state = load_file(str(directory / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc_0.weight"] = torch.zeros(95, 64)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(
        ExaoneError, match=r"transformer.h.1.mlp.c_fc_0.weight has shape \[95, 64\], expected \[96, 64\]"
    ):
        load_model(directory)


def test_missing_and_unexpected_tensors(ckpt):
    directory, _ = ckpt
    state = load_file(str(directory / "model.safetensors"))
    extra = dict(state, **{"transformer.h.0.mystery.weight": torch.zeros(2)})
    save_file(extra, str(directory / "model.safetensors"))
    with pytest.raises(ExaoneError, match="unexpected tensor .*mystery"):
        load_model(directory)
    del state["transformer.h.2.ln_2.weight"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(ExaoneError, match="lacks tensor for model.layers.2.post_attention_layernorm.weight"):
        load_model(directory)


def test_pickle_only_directory_is_refused(tmp_path):
    exaone3_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ExaoneError, match="pickle"):
        load_model(tmp_path)


def test_index_names_a_tensor_its_shard_lacks(ckpt):
    directory, _ = ckpt
    weight_map = shard(directory)
    files = sorted(set(weight_map.values()))
    weight_map["transformer.wte.weight"] = next(f for f in files if f != weight_map["transformer.wte.weight"])
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ExaoneError, match="'transformer.wte.weight' is not in"):
        load_model(directory)

"""EXAONE-3.x against transformers' LlamaForCausalLM holding the same weights under Llama names."""

import pytest
import torch
from conftest import exaone3_checkpoint

from exaone.core.generate import Sampling, generate
from exaone.core.loader import load_model
from exaone.core.model.kv_cache import KVCache

CASES = {
    "untied-llama3": dict(tie=False),
    "tied-llama3": dict(tie=True),
    "untied-norope-scaling": dict(tie=False, rope_scaling=None),
    "tied-mha-headdim80": dict(tie=True, rope_scaling=None, hidden_size=160, num_attention_heads=2,
                               num_key_value_heads=2),
}  # fmt: skip


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    ref = exaone3_checkpoint(directory, **CASES[request.param])
    return ref, load_model(directory, "float32")


def test_prefill_logits_match_llama(pair):
    ref, ours = pair
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert (expected - got).abs().max() < 1e-4


def test_token_by_token_through_cache_matches_llama(pair):
    ref, ours = pair
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    cache = KVCache(ours.cfg, 2, 48, torch.float32)
    with torch.no_grad():
        expected = ref(ids).logits
        steps = [ours(ids[:, :9], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(9, 40)]
    assert (expected - torch.cat(steps, 1)).abs().max() < 1e-4


def test_greedy_generation_matches_transformers_generate(pair):
    ref, ours = pair
    prompt = [5, 17, 99, 3, 42, 7]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
    assert generate(ours, [prompt], Sampling(max_new_tokens=24))[0].output_ids == expected


def test_tied_embeddings_share_storage(tmp_path):
    exaone3_checkpoint(tmp_path, tie=True)
    model = load_model(tmp_path, "float32")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_batched_left_padding_equals_one_by_one(pair):
    _, ours = pair
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [50]]
    params = Sampling(max_new_tokens=12)
    batched = generate(ours, prompts, params)
    for prompt, got in zip(prompts, batched, strict=True):
        assert got.output_ids == generate(ours, [prompt], params)[0].output_ids


def test_bfloat16_load_runs(tmp_path):
    exaone3_checkpoint(tmp_path)
    model = load_model(tmp_path, "bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    out = generate(model, [[1, 2, 3]], Sampling(max_new_tokens=4))[0]
    assert len(out.output_ids) == 4

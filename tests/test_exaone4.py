"""EXAONE-4.0 against transformers' native Exaone4ForCausalLM (post-norm, q/k norm, hybrid attention)."""

import pytest
import torch
from conftest import exaone4_checkpoint

from exaone.core.config import FULL, SLIDING
from exaone.core.generate import Sampling, generate
from exaone.core.loader import load_model
from exaone.core.model.kv_cache import KVCache

WINDOW = 5
CASES = {
    "hybrid-window": dict(sliding_window=WINDOW),  # 3 sliding : 1 full, NoPE on the full layer
    "no-window-tied": dict(sliding_window=None, tie_word_embeddings=True),  # the 1.2B layout: RoPE everywhere
    "mha-default-rope": dict(
        sliding_window=WINDOW, num_key_value_heads=4, rope_parameters={"rope_theta": 1e4}
    ),
}


@pytest.fixture(params=list(CASES), scope="module")
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    ref = exaone4_checkpoint(directory, **CASES[request.param])
    return ref, load_model(directory, "float32")


def test_layer_pattern_and_rope_rule(pair):
    _, ours = pair
    cfg = ours.cfg
    if cfg.sliding_window:
        assert cfg.layer_types == (SLIDING, SLIDING, SLIDING, FULL)
        assert [cfg.uses_rope(i) for i in range(4)] == [True, True, True, False]
    else:
        assert set(cfg.layer_types) == {FULL} and all(cfg.uses_rope(i) for i in range(4))


def test_prefill_logits_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(0, 256, (2, 3 * WINDOW + 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() < 1e-4


def test_token_by_token_through_cache_matches_transformers(pair):
    ref, ours = pair
    ids = torch.randint(0, 256, (2, 4 * WINDOW), generator=torch.Generator().manual_seed(2))
    cache = KVCache(ours.cfg, 2, 4 * WINDOW + 4, torch.float32)
    with torch.no_grad():
        expected = ref(ids).logits
        steps = [ours(ids[:, :7], cache=cache)] + [
            ours(ids[:, t : t + 1], cache=cache) for t in range(7, 4 * WINDOW)
        ]
    assert (expected - torch.cat(steps, 1)).abs().max() < 1e-4


def test_chunked_prefill_longer_than_window(pair):
    ref, ours = pair
    ids = torch.randint(0, 256, (1, 4 * WINDOW), generator=torch.Generator().manual_seed(3))
    cache = KVCache(ours.cfg, 1, 4 * WINDOW, torch.float32)
    with torch.no_grad():
        chunks = [ours(ids[:, a : a + 7], cache=cache) for a in range(0, 4 * WINDOW, 7)]
        assert (ref(ids).logits - torch.cat(chunks, 1)).abs().max() < 1e-4


def test_greedy_generation_matches_transformers_generate(pair):
    ref, ours = pair
    prompt = [5, 17, 99, 3, 42, 7, 8, 200]
    greedy = dict(max_new_tokens=3 * WINDOW, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = ref.generate(torch.tensor([prompt]), **greedy)[0, len(prompt) :].tolist()
    assert generate(ours, [prompt], Sampling(max_new_tokens=3 * WINDOW))[0].output_ids == expected


def test_sliding_layers_store_only_the_window(tmp_path):
    exaone4_checkpoint(tmp_path, sliding_window=WINDOW)
    model = load_model(tmp_path, "float32")
    cache = KVCache(model.cfg, 1, 200, torch.float32)
    assert [cache.slots(i) for i in range(4)] == [WINDOW, WINDOW, WINDOW, 200]
    assert cache.nbytes(0) * 200 == cache.nbytes(3) * WINDOW

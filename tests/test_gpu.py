"""The same parity checks on a CUDA device (run on the GPU machine; skipped where there is none)."""

import json

import pytest
import torch
from conftest import add_tokenizer, exaone3_checkpoint, exaone4_checkpoint, exaone_moe_reference

from exaone.cli.app import main
from exaone.core.generate import Sampling, generate
from exaone.core.loader import load_model
from exaone.core.model.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def exaone_moe_checkpoint(directory):
    model = exaone_moe_reference()
    model.save_pretrained(directory)
    return model


BUILDERS = {"exaone3": exaone3_checkpoint, "exaone4": exaone4_checkpoint, "exaone_moe": exaone_moe_checkpoint}


@pytest.fixture(params=list(BUILDERS), scope="module")
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    ref = BUILDERS[request.param](directory)
    return directory, ref.cuda()


def test_fp32_prefill_and_cached_decode_match_transformers_on_cuda(pair):
    directory, ref = pair
    ours = load_model(directory, "float32", "cuda")
    ids = torch.randint(0, 256, (2, 24), device="cuda")
    cache = KVCache(ours.cfg, 2, 32, torch.float32, "cuda")
    with torch.no_grad():
        expected = ref(ids).logits
        assert (expected - ours(ids)).abs().max() < 1e-3
        steps = [ours(ids[:, :5], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(5, 24)]
        assert (expected - torch.cat(steps, 1)).abs().max() < 1e-3


def test_fp32_greedy_generation_matches_transformers_on_cuda(pair):
    directory, ref = pair
    ours = load_model(directory, "float32", "cuda")
    prompt = [5, 17, 99, 3, 42, 7]
    greedy = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = ref.generate(torch.tensor([prompt], device="cuda"), **greedy)[0, len(prompt) :].tolist()
    assert generate(ours, [prompt], Sampling(max_new_tokens=16))[0].output_ids == expected


def test_bf16_logits_as_close_to_fp32_as_transformers_bf16(pair):
    """bf16 rounding (and, for K-EXAONE, the expert choices it flips) moves both implementations away
    from the fp32 logits; ours must stay as close to them as transformers' own bf16 run."""
    directory, ref = pair
    ours = load_model(directory, "bfloat16", "cuda")
    ids = torch.randint(0, 256, (2, 24), device="cuda")
    with torch.no_grad():
        exact = ref(ids).logits
        theirs = ref.to(torch.bfloat16)(ids).logits.float()
        got = ours(ids).float()
    ref.float()

    def relative(x):
        return ((x - exact).norm() / exact.norm()).item()

    assert relative(got) <= 1.5 * relative(theirs) + 1e-2
    agree = (exact.argmax(-1) == got.argmax(-1)).float().mean()
    assert agree >= (exact.argmax(-1) == theirs.argmax(-1)).float().mean() - 0.1


def test_cli_run_on_cuda(tmp_path, capsys):
    exaone3_checkpoint(tmp_path, vocab_size=102400)
    add_tokenizer(tmp_path)
    args = ["run", str(tmp_path), "--device", "cuda", "--input_text", "Hi", "--max_output_len", "4", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"].startswith("cuda") and report["dtype"] == "float32"
    assert report["results"][0]["output_tokens"] == 4

"""`exaone build` and `exaone run --engine_dir` end to end, with the real EXAONE-3.5 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import add_tokenizer, exaone3_checkpoint

from exaone.cli.app import main


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("engine-cli")
    ckpt = root / "ckpt"
    exaone3_checkpoint(ckpt, vocab_size=102400)
    add_tokenizer(ckpt)
    engine = root / "engine"
    args = ["build", str(ckpt), "--output_dir", str(engine), "--max_batch_size", "4", "--max-input-len", "32",
            "--max_seq_len", "64", "--max_num_tokens", "16", "--tokens_per_block", "8"]  # fmt: skip
    assert main(args) == 0
    yield ckpt, engine, args
    torch.set_num_threads(before)


def run_json(capsys, *args):
    assert main(["run", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_engine_run_equals_the_in_memory_run(dirs, capsys):
    ckpt, engine, _ = dirs
    prompts = ["Hello there", "a much longer prompt than the first one, to be chunked", "x"]
    args = [x for p in prompts for x in ("--input_text", p)]
    direct = run_json(capsys, ckpt, *args, "--max_output_len", 6)
    through = run_json(capsys, "--engine_dir", engine, *args, "--max_output_len", 6)
    assert [r["output_ids"] for r in through["results"]] == [r["output_ids"] for r in direct["results"]]
    assert through["engine"]["groups"][0]["blocks"] > 0 and through["engine"]["max_batch_size"] == 4


def test_build_again_says_up_to_date(dirs, capsys):
    _, _, args = dirs
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().err


def test_beams_and_runtime_flags(dirs, capsys):
    _, engine, _ = dirs
    flags = ["--num_beams", 2, "--max_attention_window_size", "16", "--max_batch_size", 2]
    out = run_json(capsys, "--engine_dir", engine, "--input_text", "Hi", "--max_output_len", 4, *flags)
    assert out["results"][0]["output_tokens"] == 4 and out["engine"]["num_beams"] == 2
    assert [layer["window"] for layer in out["engine"]["layers"]] == [16, 16, 16]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input_text", "word " * 40], "max_input_len 32"),
        (["--max_batch_size", "0"], "--max_batch_size 0"),
        (["--max_tokens_in_paged_kv_cache", "8"], "KiB available"),
        (["--dtype", "float16"], "fixed when it is built"),
    ],
)
def test_engine_errors_are_one_line(dirs, capsys, args, message):
    _, engine, _ = dirs
    assert main(["run", "--engine_dir", str(engine), "--max_output_len", "4", *args]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_engine_flags_need_an_engine(dirs, capsys):
    ckpt, _, _ = dirs
    assert main(["run", str(ckpt), "--num_beams", "2"]) == 2
    assert "--num_beams applies to engines" in capsys.readouterr().err


def test_build_rejects_bad_limits(dirs, tmp_path, capsys):
    ckpt, _, _ = dirs
    assert main(["build", str(ckpt), "--output_dir", str(tmp_path / "e"), "--max_batch_size", "0"]) == 2
    assert "--max_batch_size 0" in capsys.readouterr().err
    assert main(["build", str(ckpt), "--output_dir", str(tmp_path / "e"), "--max_seq_len", "999"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_kv_cache_reuse_flag(dirs, capsys):
    ckpt, engine, _ = dirs
    prefix = "The quick brown fox jumps over the lazy dog, twice over. "
    args = ["--input_text", prefix + "One", "--input_text", prefix + "Two", "--max_output_len", 3]
    direct = run_json(capsys, ckpt, *args)
    out = run_json(capsys, "--engine_dir", engine, *args, "--max_batch_size", 1, "--enable_kv_cache_reuse")
    assert [r["output_ids"] for r in out["results"]] == [r["output_ids"] for r in direct["results"]]
    assert out["engine"]["reused_prompt_tokens"] >= 8

"""`exaone run` end to end on a tiny EXAONE-3 checkpoint with the real EXAONE-3.5 tokenizer."""

import json

import pytest
import torch
from conftest import add_tokenizer, exaone3_checkpoint, exaone4_checkpoint

from exaone.cli.app import main

AUTO_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # what --device auto picks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("exaone3")
    exaone3_checkpoint(directory, vocab_size=102400)
    add_tokenizer(directory)
    return directory


def run_json(capsys, *args):
    assert main(["run", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_fields_and_greedy_determinism(model_dir, capsys):
    a = run_json(capsys, model_dir, "--input_text", "Hello there", "--max_output_len", 6)
    b = run_json(capsys, "--model_dir", model_dir, "--input-text", "Hello there", "--max-output-len", 6)
    result = a["results"][0]
    assert result["prompt"] == "Hello there" and result["output_tokens"] == 6
    assert result["finish_reason"] == "length" and result["prompt_tokens"] > 0
    assert {"time_to_first_token_s", "total_s", "tokens_per_s", "text"} <= set(result)
    assert a["family"] == "exaone3" and a["device"] == AUTO_DEVICE and a["dtype"] == "float32"
    assert result["text"] == b["results"][0]["text"]


def test_batched_prompts_equal_one_by_one(model_dir, capsys):
    prompts = ["a", "a much longer prompt than the first one", "third"]
    args = [x for p in prompts for x in ("--input_text", p)]
    together = run_json(capsys, model_dir, *args, "--max_output_len", 5)["results"]
    for p, r in zip(prompts, together, strict=True):
        alone = run_json(capsys, model_dir, "--input_text", p, "--max_output_len", 5)["results"][0]
        assert alone["text"] == r["text"]


def test_input_file_plain_and_jsonl(model_dir, capsys, tmp_path):
    plain = tmp_path / "prompts.txt"
    plain.write_text("first prompt\n\nsecond prompt\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "first prompt"}\n"second prompt"\n')
    a = run_json(capsys, model_dir, "--input_file", plain, "--max_output_len", 3)["results"]
    b = run_json(capsys, model_dir, "--input_file", jsonl, "--max_output_len", 3)["results"]
    assert [r["prompt"] for r in a] == ["first prompt", "second prompt"]
    assert [r["text"] for r in a] == [r["text"] for r in b]


def test_sampling_is_seeded(model_dir, capsys):
    args = (model_dir, "--input_text", "x", "--max_output_len", 8, "--temperature", 1.0, "--top_k", 50,
            "--top_p", 0.9)  # fmt: skip
    first = run_json(capsys, *args, "--seed", 3)["results"][0]["text"]
    assert first == run_json(capsys, *args, "--seed", 3)["results"][0]["text"]


def test_stream_prints_text_and_stats(model_dir, capsys):
    assert main(["run", str(model_dir), "--input_text", "Hi", "--max_output_len", 4]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and f"1 prompt(s), 4 tokens on {AUTO_DEVICE}" in err


def test_multiple_prompts_print_reference_style(model_dir, capsys):
    assert main(["run", str(model_dir), "--input_text", "A", "--input_text", "B", "--max_output_len", 2]) == 0
    out = capsys.readouterr().out
    assert 'Input [Text 0]: "A"' in out and 'Output [Text 1]: "' in out


def test_chat_template_uses_the_tokenizers_own(model_dir, capsys):
    plain = run_json(capsys, model_dir, "--input_text", "Hi", "--max_output_len", 2)["results"][0]
    chat = run_json(capsys, model_dir, "--input_text", "Hi", "--max_output_len", 2, "--apply_chat_template")
    assert chat["results"][0]["prompt_tokens"] > plain["prompt_tokens"] + 5  # [|system|]... wrapper


def test_stops_at_eos(tmp_path, capsys):
    exaone3_checkpoint(tmp_path, vocab_size=102400)
    add_tokenizer(tmp_path)
    free = run_json(capsys, tmp_path, "--input_text", "Hi", "--max_output_len", 3)["results"][0]
    third = free["output_ids"][2]  # make the third greedy token a stop token
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [361, third]}))
    stopped = run_json(capsys, tmp_path, "--input_text", "Hi", "--max_output_len", 3)["results"][0]
    cut = free["output_ids"].index(third)
    assert free["finish_reason"] == "length" and len(free["output_ids"]) == 3
    assert stopped["finish_reason"] == "stop" and stopped["output_ids"] == free["output_ids"][:cut]


def test_exaone4_with_tokenizer_dir(tmp_path, capsys):
    exaone4_checkpoint(tmp_path / "m", vocab_size=102400)
    tok = tmp_path / "tok"
    tok.mkdir()
    add_tokenizer(tok)
    report = run_json(
        capsys, tmp_path / "m", "--tokenizer_dir", tok, "--input_text", "Hi", "--max_output_len", 3
    )
    assert report["family"] == "exaone4" and report["results"][0]["output_tokens"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top_p", "2"], "'--top_p'"),
        (["--max_output_len", "0"], "'--max_output_len'"),
        (["--input_file", "/no/such/prompts.txt"], "--input_file /no/such/prompts.txt: no such file"),
        (["--device", "tpu"], "'--device'"),
        (["--max_output_len", "100000"], "max_position_embeddings"),
    ],
)
def test_bad_flags_are_one_line_exit_2(model_dir, capsys, args, message):
    assert main(["run", str(model_dir), *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_library_errors_name_arguments_and_the_cli_names_flags(model_dir, capsys):
    """A library OptionError names the library's argument (max_new_tokens); the CLI shows the flag."""
    from exaone.cli.errors import message
    from exaone.core import runner
    from exaone.core.errors import OptionError
    from exaone.core.generate import Sampling

    with pytest.raises(OptionError, match=r"^max_new_tokens 0: expected at least 1$") as e:
        Sampling(max_new_tokens=0).check()
    assert (e.value.option, e.value.value) == ("max_new_tokens", 0)
    assert message(e.value) == "--max_output_len 0: expected at least 1"

    with pytest.raises(OptionError, match=r"^prompt of \d+ tokens \+ max_new_tokens 100000 exceeds") as e:
        runner.run(model_dir, ["Hi"], Sampling(max_new_tokens=100000), device="cpu")
    assert "--" not in str(e.value)
    args = ["run", str(model_dir), "--input_text", "Hi", "--max_output_len", "100000", "--device", "cpu"]
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: {message(e.value)}" and "+ --max_output_len 100000 exceeds" in last


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "config.json: missing"),
        (
            lambda d: (d / "config.json").write_text('{"model_type": "bert"}'),
            "model_type 'bert' is not supported",
        ),
    ],
)
def test_bad_model_dirs(tmp_path, capsys, setup, message):
    setup(tmp_path)
    assert main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_debug_shows_traceback(tmp_path, capsys):
    assert main(["--debug", "run", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_missing_tokenizer(tmp_path, capsys):
    exaone3_checkpoint(tmp_path)
    assert main(["run", str(tmp_path)]) == 2
    assert "no tokenizer files" in capsys.readouterr().err

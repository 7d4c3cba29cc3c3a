"""`exaone summarize`: ROUGE and perplexity of exaone against transformers on the same tokens.

End-to-end runs use the embedded default model (SmolLM2 weights, EXAONE-3 layout; transformers'
LlamaForCausalLM is the reference) on the shared CNN/DailyMail stories and WikiText-2, kept tiny
(short prompts and outputs) so the whole module stays well under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import exaone3_checkpoint, exaone4_checkpoint, exaone_moe_reference, require_shared_data

from exaone.cli.app import main
from exaone.core.errors import ExaoneError
from exaone.eval import data
from exaone.eval.rouge import rouge

TINY = ["--max_input_length", 96, "--output_len", 12, "--no_warmup"]


def summarize(capsys, *args) -> tuple[int, dict | None, str]:
    code = main(["summarize", *map(str, args)])
    out = capsys.readouterr()
    report = json.loads(out.out) if "--json" in args and out.out.strip() else None
    return code, report, out.err


@pytest.fixture(scope="module")
def stories():
    return require_shared_data() / "cnn_dailymail_stories"


@pytest.fixture(scope="module")
def both_fp32(default_model_dir, stories, tmp_path_factory):
    """One float32 run of both sides, with per-sample outputs written."""
    out = tmp_path_factory.mktemp("summarize") / "outputs"
    args = ["--model_dir", default_model_dir, "--dataset", stories, "--test_hf", "--test_trt_llm",
            "--max_ite", 2, "--batch_size", 2, *TINY, "--dtype", "float32", "--output_dir", out]  # fmt: skip
    code = main(["summarize", *map(str, args)])
    return code, out


def test_both_sides_produce_rouge_and_agree_in_float32(both_fp32):
    code, out = both_fp32
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    ours, ref = report["sides"]["exaone"], report["sides"]["hf"]
    assert ref["kind"] == "LlamaForCausalLM" and ours["kind"] == "model"
    assert ours["samples"] == ref["samples"] == 4 and report["dataset"]["format"] == "stories"
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert 0 < ours[key] <= 100 or key == "rouge2"
        assert abs(ours[key] - ref[key]) <= 0.5
    assert ours["output_tokens"] > 0
    assert set(report["run"]["timings"]) == {"exaone", "hf"}
    assert all(t["tokens_per_s"] > 0 for t in report["run"]["timings"].values())
    # nondeterministic fields live only under "run"
    assert "latency_s" not in json.dumps({k: v for k, v in report.items() if k != "run"})


def test_output_dir_holds_per_sample_outputs(both_fp32):
    _, out = both_fp32
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all({"reference", "exaone", "hf", "input_tokens"} <= set(r) for r in rows)
    assert all(r["input_tokens"] <= 96 for r in rows)
    lines = (out / "exaone.out").read_text().splitlines()
    assert lines[0].startswith("Model path: ") and lines[1].startswith(f"[{rows[0]['index']}] [Beam 0] ")
    assert (out / "hf.out").is_file()


def test_rouge_recomputed_from_saved_outputs(both_fp32):
    _, out = both_fp32
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    again = rouge([r["exaone"] for r in rows], [r["reference"] for r in rows])
    assert round(again["rouge1"], 4) == report["sides"]["exaone"]["rouge1"]


def test_bfloat16_rouge_matches_reference(default_model_dir, stories, capsys):
    code, report, _ = summarize(
        capsys, "--model_dir", default_model_dir, "--dataset", stories, "--test_hf", "--test_trt_llm",
        "--max_ite", 1, "--batch_size", 2, "--max_input_length", 48, "--output_len", 6, "--no_warmup",
        "--dtype", "bf16", "--json",
    )  # fmt: skip
    assert code == 0
    ours, ref = report["sides"]["exaone"], report["sides"]["hf"]
    assert ours["dtype"] == ref["dtype"] == "bfloat16"
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert abs(ours[key] - ref[key]) <= 0.5


def test_check_accuracy_exit_codes(default_model_dir, stories, capsys):
    args = ["--model_dir", default_model_dir, "--dataset", stories, "--max_ite", 1, "--max_input_length", 64,
            "--output_len", 8, "--no_warmup", "--json", "--check_accuracy"]  # fmt: skip
    code, report, err = summarize(capsys, *args, "--rouge1_threshold", 100)  # ROUGE-1 never exceeds 100
    assert code == 1 and report["accuracy_check"]["passed"] is False
    assert "[FAILED] rouge1" in err
    rouge1 = report["sides"]["exaone"]["rouge1"]
    assert rouge1 > 0
    code, report, _ = summarize(capsys, *args, "--tensorrt_llm_rouge1_threshold", rouge1 - 1)
    assert code == 0 and report["accuracy_check"]["passed"] is True


def test_eval_context_ppl_ours_matches_transformers(default_model_dir, shared_data, capsys):
    wiki = shared_data / "wikitext2" / "raw" / "wiki.test.raw"
    code, report, _ = summarize(
        capsys, "--model_dir", default_model_dir, "--eval_task", "eval_context_ppl", "--dataset", wiki,
        "--test_hf", "--test_engine", "--max_ite", 2, "--max_input_length", 64, "--dtype", "float32",
        "--json",
    )  # fmt: skip
    assert code == 0
    ours, ref = report["sides"]["exaone"], report["sides"]["hf"]
    assert report["settings"]["output_len"] == 1 and ours["tokens_scored"] == 128
    assert 1 < ours["context_ppl"] < 1000  # a trained model on English text
    assert ours["per_token_ppl"] == pytest.approx(ref["per_token_ppl"], rel=1e-3)
    assert ours["context_ppl"] == pytest.approx(ref["context_ppl"], rel=1e-3)


# --- the Hugging Face reference for every family --------------------------------------------------


@pytest.mark.parametrize("family", ["exaone3", "exaone4", "exaone_moe"])
def test_hf_reference_is_transformers_class_with_same_logits(family, tmp_path):
    from exaone.core.loader import load_model
    from exaone.core.reference import load_reference

    if family == "exaone3":
        exaone3_checkpoint(tmp_path, tie=True)
    elif family == "exaone4":
        exaone4_checkpoint(tmp_path)
    else:
        exaone_moe_reference().save_pretrained(tmp_path)
    ref = load_reference(tmp_path, torch.float32, torch.device("cpu"))
    expected = {
        "exaone3": "LlamaForCausalLM",
        "exaone4": "Exaone4ForCausalLM",
        "exaone_moe": "ExaoneMoeForCausalLM",
    }
    assert type(ref).__name__ == expected[family]
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ref(ids).logits - load_model(tmp_path, "float32")(ids)).abs().max() < 1e-4


def test_hf_reference_refuses_quantized_checkpoint(tmp_path):
    from exaone.core.reference import load_reference

    exaone3_checkpoint(tmp_path)
    (tmp_path / "hf_quant_config.json").write_text("{}")
    with pytest.raises(ExaoneError, match="quantized checkpoint.*--hf_model_dir"):
        load_reference(tmp_path, torch.float32, torch.device("cpu"))


# --- ROUGE ----------------------------------------------------------------------------------------


def test_rouge_known_values_and_newline_sentences():
    scores = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(200 / 3)  # P 1, R 1/2
    assert scores["rouge2"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)  # P 2/2, R 2/5
    # rougeLsum splits the reference into "\n" sentences (CNN/DailyMail highlights); rougeL does not
    split = rouge(["c d a b"], ["a b\nc d"])
    assert split["rougeLsum"] == pytest.approx(100) and split["rougeL"] == pytest.approx(50)


def test_rouge_aggregate_is_evaluate_bootstrap_mid_and_leaves_numpy_alone():
    import numpy as np

    preds, refs = ["a b c", "a x", "q r s t"], ["a b c", "a b", "q"]
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    got = rouge(preds, refs)["rouge1"]
    assert np.random.random() == before  # evaluate restores the global seed state
    per_sample = [100.0, 50.0, 40.0]
    assert min(per_sample) < got < max(per_sample) and abs(got - np.mean(per_sample)) < 10


# --- data sets ------------------------------------------------------------------------------------


def test_story_files_parse_like_the_hf_loader(stories):
    sample = data.read_story(stories / "2bd8ada1de6a7b02f59430cc82045eb8d29cf033.story")
    assert sample.text.startswith("(CNN)For the first time in eight years")
    assert "@highlight" not in sample.text and "\n" not in sample.text
    assert sample.reference.split("\n") == [
        'Bob Barker returned to host "The Price Is Right" on Wednesday .',
        "Barker, 91, had retired as host in 2007 .",
    ]
    ds = data.load(str(stories), "summarize", seed=0)
    assert ds.format == "stories" and len(ds.samples) == 20
    unshuffled = data.load(str(stories), "summarize", seed=None)
    assert [s.id for s in ds.samples] == [unshuffled.samples[i].id for i in data.shuffled(list(range(20)), 0)]


def test_shuffle_matches_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    order = datasets.Dataset.from_dict({"i": list(range(50))}).shuffle(seed=0)["i"]
    assert data.shuffled(list(range(50)), 0) == list(order)


def test_local_formats(tmp_path):
    rows = [{"article": f"text {i}", "highlights": f"sum {i}", "id": f"x{i}"} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "cols.json").write_text(json.dumps({"document": ["d0", "d1"], "summary": ["s0", "s1"]}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.parquet"):
        ds = data.load(str(tmp_path / name), "summarize", seed=None)
        assert [(s.id, s.text, s.reference) for s in ds.samples] == [
            (f"x{i}", f"text {i}", f"sum {i}") for i in range(3)
        ]
    cols = data.load(str(tmp_path / "cols.json"), "summarize", seed=None).samples
    assert [(s.text, s.reference) for s in cols] == [("d0", "s0"), ("d1", "s1")]


def test_shared_xsum_strips_the_helm_prompt(shared_data):
    ds = data.load(str(shared_data / "xsum" / "xsum_0shot.jsonl"), "summarize", seed=None)
    assert len(ds.samples) == 1000
    first = ds.samples[0]
    assert first.text.startswith("Prison Link Cymru had 1,099 referrals")
    assert not first.text.endswith("Summarize the above article in 1 sentence.\n") and first.reference


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"article": "a", "highlights": "b"}\nnot json', "bad.jsonl:2: not valid JSON"),
        ("fields.json", '[{"title": "a", "body": "b"}]', "need article/highlights or document/summary"),
        ("notes.txt", "hello", "unsupported file type .txt"),
        ("broken.story", "no highlights here", "expected article text followed by '@highlight'"),
    ],
)
def test_bad_local_data_is_a_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ExaoneError, match=message):
        data.load(str(tmp_path / name), "summarize")


def test_hub_dataset_fails_fast_when_offline(monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ExaoneError, match="cannot reach the Hugging Face Hub.*local copy"):
        data.load("cnn_dailymail", "summarize")
    assert time.perf_counter() - start < 15


# --- bad input through the CLI --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "no/such/file.jsonl"], "no such file"),
        (["--max_ite", "0"], "max_ite"),
        (["--eval_task", "translate"], "eval_task"),
        (["--dtype", "int3"], "int3"),
        (["--num_beams", "2", "--max_ite", "1", "--output_len", "2"], "num_beams > 1: not supported"),
        (["--model_dir", "/nonexistent/model"], "not a directory"),
    ],
)
def test_bad_input_exits_2(default_model_dir, stories, capsys, args, message):
    base = ["--dataset", stories] if "--dataset" not in args else []
    if "--model_dir" not in args:
        base += ["--model_dir", default_model_dir]
    code, _, err = summarize(capsys, *base, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_engine_dir_with_beam_search_matches_transformers(default_model_dir, stories, tmp_path, capsys):
    """An engine from `exaone build` as our side; beam search on both sides (transformers' semantics)."""
    engine = tmp_path / "engine"
    build = ["build", str(default_model_dir), "--output_dir", str(engine), "--max_input_len", "64",
             "--max_seq_len", "128", "--max_batch_size", "4", "--dtype", "float32"]  # fmt: skip
    assert main(build) == 0
    capsys.readouterr()
    code, report, _ = summarize(
        capsys, "--engine_dir", engine, "--hf_model_dir", default_model_dir, "--test_trt_llm", "--test_hf",
        "--dataset", stories, "--max_ite", 2, "--max_input_length", 64, "--output_len", 8, "--num_beams", 2,
        "--no_warmup", "--dtype", "float32", "--json",
    )  # fmt: skip
    assert code == 0
    assert report["sides"]["exaone"]["kind"] == "engine" and report["settings"]["num_beams"] == 2
    assert abs(report["comparison"]["rouge1_delta"]) <= 0.5

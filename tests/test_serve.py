"""`exaone serve`: the OpenAI API through the official `openai` client and raw HTTP, on servers started
here on 127.0.0.1 (a free port, a background thread): the default model for text, a scripted tiny
EXAONE-4 checkpoint for reasoning and tool calls, the load generator against both."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import SHARED_DATA, exaone4_checkpoint, require_shared_data

from exaone.core.errors import ExaoneError, FileError, Unsupported
from exaone.serve import parsers
from exaone.serve.config import ServeOptions, read_option_file, resolve
from exaone.serve.server import BackgroundServer, prepare

openai = pytest.importorskip("openai")

KEY = "test-key-123"
FRANCE = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TIMEOUT = 120


# -- servers ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(default_model_dir, tmp_path_factory):
    """The default model, built into a cached engine by the server itself, behind an API key."""
    opts = ServeOptions(
        model=default_model_dir,
        cache_dir=tmp_path_factory.mktemp("serve-cache"),
        max_batch_size=64,
        max_seq_len=512,
        max_num_tokens=1024,
        max_tokens_in_paged_kv_cache=8192,
        api_key=KEY,
        max_request_bytes=1 << 20,
        log_level="warning",
    )
    state = prepare(opts, say=lambda _m: None)
    with BackgroundServer(state) as server:
        yield server


@pytest.fixture(scope="module")
def client(smol):
    return openai.OpenAI(base_url=smol.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def _model(smol) -> str:
    return smol.state.model_name


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _idle(server, timeout: float = 20.0) -> dict:
    """Wait until the engine has nothing in flight; its KV-cache stats then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = server.state.loop.snapshot
        if snap["running"] == 0 and snap["waiting"] == 0 and server.state.outstanding == 0:
            return snap
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {server.state.loop.snapshot}")


# -- completions and chat through the openai client ---------------------------------------------------
def test_models_health_version(smol, client):
    assert httpx.get(smol.url + "/health").json() == {"status": "ok"}  # no key needed
    models = client.models.list()
    assert [m.id for m in models.data] == [_model(smol)]
    assert client.models.retrieve(_model(smol)).id == _model(smol)
    v = httpx.get(smol.url + "/version", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert v["version"] and v["device"] == "cpu"


def test_completion(smol, client):
    r = client.completions.create(model=_model(smol), prompt=FRANCE, max_tokens=6, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(smol.state.tokenizer(FRANCE)["input_ids"])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt,
        6,
        n_prompt + 6,
    )
    ids = smol.state.tokenizer(FRANCE)["input_ids"]
    by_ids = client.completions.create(model=_model(smol), prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_chat_and_stream(smol, client):
    kw = dict(model=_model(smol), messages=QUESTION, max_tokens=12, temperature=0)
    r = client.chat.completions.create(**kw)
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [r.choices[0].finish_reason]
    # completions stream the same text as they answer whole
    whole = client.completions.create(model=_model(smol), prompt=FRANCE, max_tokens=10, temperature=0)
    parts = client.completions.create(
        model=_model(smol), prompt=FRANCE, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text


def test_stop_strings_and_token_ids(smol, client):
    kw = dict(model=_model(smol), prompt=FRANCE, max_tokens=12, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert "." in full
    r = client.completions.create(**kw, stop=["."])
    assert r.choices[0].text == full[: full.index(".")] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kw, stop=["."], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    word = full.split()[1] if len(full.split()) > 1 else full.split()[0]
    cut = client.completions.create(**kw, stop=[word, "zzzz"]).choices[0].text
    assert cut == full[: full.index(word)]
    dot = smol.state.tokenizer.convert_tokens_to_ids(".")
    by_id = client.completions.create(**kw, extra_body={"stop_token_ids": [dot]})
    assert by_id.choices[0].text == full[: full.index(".")] and by_id.choices[0].finish_reason == "stop"
    _idle(smol)  # the choices cut by a stop string were aborted: nothing left running


def test_seed_and_n(smol, client):
    kw = dict(
        model=_model(smol),
        prompt="Once upon a time",
        max_tokens=6,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw, seed=1234).choices[0].text
    assert client.completions.create(**kw, seed=1234).choices[0].text == a
    others = {client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2)}
    assert others - {a}, "different seeds should give different text"
    r = client.completions.create(**kw, seed=50, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 6 * 2
    for j, c in enumerate(r.choices):  # choice j is drawn with seed + j
        assert c.text == client.completions.create(**kw, seed=50 + j).choices[0].text
    chat = client.chat.completions.create(
        model=_model(smol), messages=QUESTION, max_tokens=6, temperature=0.9, seed=5, n=2
    )
    assert len(chat.choices) == 2


def test_logprobs(smol, client):
    r = client.completions.create(model=_model(smol), prompt=FRANCE, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy takes the top token
    c = client.chat.completions.create(
        model=_model(smol), messages=QUESTION, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == c.choices[0].message.content
    s = client.chat.completions.create(
        model=_model(smol),
        messages=QUESTION,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        stream=True,
    )
    entries = [e for ch in s if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in entries] == [t.token for t in content]


# -- raw HTTP: every bad request gets its status, then the server still answers -----------------------
def _post(smol, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(smol.url + path, content=content, headers=headers, **{"timeout": TIMEOUT, **kw})


def _valid(smol):
    r = _post(smol, "/v1/completions", {"prompt": FRANCE, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
    ({"prompt": FRANCE, "temperature": "hot"}, 400, "temperature"),
    ({"prompt": FRANCE, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": 12}, 400, "prompt"),
    ({"prompt": FRANCE, "stream": 1}, 400, "stream"),
    ({"prompt": FRANCE, "frobnicate": True}, 400, "unknown field 'frobnicate'"),
    ({"prompt": FRANCE, "stream_options": {"bogus": 1}}, 400, "stream_options.bogus"),
    ({}, 400, "missing required field 'prompt'"),
    ({"prompt": FRANCE, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": FRANCE, "echo": True}, 400, "echo"),
    ({"prompt": FRANCE, "n": 0}, 400, "n"),
    ({"prompt": FRANCE, "top_p": 0}, 400, "top_p"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": [999999]}, 400, "outside the vocabulary"),
    ({"prompt": "word " * 600}, 400, "max_input_len"),
    ({"prompt": FRANCE, "max_tokens": 600}, 400, "max_seq_len"),
    ({"prompt": FRANCE, "model": "gpt-5"}, 404, "not served here"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests(smol, body, status, words):
    r = _post(smol, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"]
    assert "Traceback" not in r.text
    _valid(smol)


def test_bad_chat_requests(smol):
    base = {"messages": QUESTION, "max_tokens": 2}
    for body, status, words in [
        ({**base, "messages": "hi"}, 400, "messages"),
        ({**base, "messages": []}, 400, "messages"),
        ({**base, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        (
            {**base, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "image_url",
        ),
        (
            {**base, "tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "tool_choice",
        ),
        ({**base, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "does not render tools"),
        ({**base, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({**base, "chat_template_kwargs": {"tools": []}}, 400, "chat_template_kwargs"),
        ({**base, "top_logprobs": 2}, 400, "logprobs"),
    ]:
        r = _post(smol, "/v1/chat/completions", body)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
    _valid(smol)


def test_auth_size_routes(smol):
    for key, words in [(None, "missing API key"), ("wrong", "invalid API key")]:
        for path in ("/v1/completions", "/v1/models", "/metrics"):
            r = (
                _post(smol, path, {"prompt": FRANCE}, key=key)
                if path == "/v1/completions"
                else httpx.get(smol.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
            )
            assert r.status_code == 401 and words in r.json()["error"]["message"]
            assert KEY not in r.text
    r = _post(smol, "/v1/completions", b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = _post(smol, "/v1/nowhere", {})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert (
        httpx.get(smol.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}).status_code == 405
    )
    assert KEY not in httpx.get(smol.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    _valid(smol)


def test_queue_full_and_timeout(smol, monkeypatch):
    monkeypatch.setattr(smol.state.options, "max_queue", 0)
    r = _post(smol, "/v1/completions", {"prompt": FRANCE, "max_tokens": 2, "n": 65})  # never fits: 64 a batch
    assert r.status_code == 400 and "max_batch_size + --max_queue" in r.json()["error"]["message"]
    monkeypatch.setattr(smol.state, "outstanding", 60)  # as if 60 sequences were in flight
    r = _post(smol, "/v1/completions", {"prompt": FRANCE, "max_tokens": 2, "n": 5})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "overloaded_error"
    monkeypatch.undo()
    monkeypatch.setattr(smol.state.options, "request_timeout", 0.3)
    r = _post(smol, "/v1/completions", {"prompt": FRANCE, "max_tokens": 200, "ignore_eos": True})
    assert r.status_code == 504 and "request_timeout" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert _idle(smol)["kv_used"] == 0
    _valid(smol)


# -- under load, and cancelled -------------------------------------------------------------------------
def test_64_concurrent_streams(smol):
    """64 streaming clients at once: each greedy result equals the same request served alone; none lost;
    /metrics adds up."""
    prompts = [
        f"{w} is a word that means"
        for w in ("Happy", "River", "Castle", "Quick", "Blue", "Seven", "Forest", "Music")
    ]
    model = _model(smol)

    async def one(c, prompt: str) -> tuple[str, int, int]:
        stream = await c.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        return text, usage.prompt_tokens, usage.completion_tokens

    async def main(batch: list[str]):
        async with openai.AsyncOpenAI(
            base_url=smol.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT
        ) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, p) for p in batch)), 240)

    alone = {p: asyncio.run(main([p]))[0] for p in prompts}
    _idle(smol)
    before = _metrics(smol)
    batch = [prompts[i % len(prompts)] for i in range(64)]
    results = asyncio.run(main(batch))
    snap = _idle(smol)
    after = _metrics(smol)
    assert len(results) == 64
    for p, got in zip(batch, results, strict=True):
        assert got == alone[p], p

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta('exaone_requests_total{endpoint="/v1/completions",status="200"}') == 64
    assert delta("exaone_generation_tokens_total") == sum(r[2] for r in results) == 64 * 8
    assert delta("exaone_prompt_tokens_total") == sum(r[1] for r in results)
    assert delta("exaone_time_to_first_token_seconds_count") == 64
    assert delta("exaone_inter_token_latency_seconds_count") == 64 * 7
    assert delta('exaone_request_finished_total{reason="length"}') == 64
    assert after["exaone_requests_running"] == after["exaone_requests_waiting"] == 0
    assert snap["kv_used"] == 0 and after["exaone_kv_cache_used_blocks"] == 0
    assert after["exaone_kv_cache_total_blocks"] > 0


def test_cancel_mid_stream_frees_blocks(smol, client):
    cancelled = _metrics(smol).get("exaone_requests_cancelled_total", 0)
    stream = client.completions.create(
        model=_model(smol),
        prompt=FRANCE,
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].text)
        if got == 3:
            break
    assert smol.state.loop.snapshot["kv_used"] > 0  # the request holds blocks while it streams
    stream.close()
    snap = _idle(smol)
    assert snap["kv_used"] == 0
    engine = smol.state.engine
    assert all(g.used == 0 for g in engine.cache.groups) and not engine.requests  # the engine's own view
    deadline = time.monotonic() + 10
    while _metrics(smol).get("exaone_requests_cancelled_total", 0) != cancelled + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # a client that gives up on a whole (non-streaming) answer is cancelled too
    body = {"prompt": FRANCE, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        _post(smol, "/v1/completions", body, timeout=httpx.Timeout(30, read=1.0))
    assert _idle(smol)["kv_used"] == 0
    deadline = time.monotonic() + 10
    while _metrics(smol).get("exaone_requests_cancelled_total", 0) != cancelled + 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _valid(smol)


# -- reasoning and tool calls: a scripted tiny EXAONE-4 ---------------------------------------------------
REASONING = "The user asks about the weather in Seoul."
CONTENT = "I will look it up."
CALL = '{"name": "get_weather", "arguments": {"city": "Seoul"}}'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def scripted_exaone4(directory: Path) -> Path:
    """A tiny EXAONE-4 checkpoint with EXAONE-4.0's own chat template whose greedy answer is fixed: every
    sublayer writes zero, so the last hidden state is the current token's embedding and the next token
    depends on the current one only. After the thinking-on prompt (`...<think>\\n`) it writes
    REASONING</think>\\n\\nCONTENT<tool_call>CALL</tool_call>[|endofturn|]; after the thinking-off
    prompt (`...</think>\\n\\n`) it starts at CONTENT. Each phrase is one token of its tokenizer."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template = (require_shared_data() / "exaone40_1.2b" / "chat_template.jinja").read_text()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["[PAD]", "[BOS]", "[|endofturn|]", "[|system|]", "[|user|]", "[|assistant|]", "[|tool|]"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    words = [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<tool_result>",
        "</tool_result>",
        "\n\n",
        REASONING,
        CONTENT,
        CALL,
    ]
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in words])
    ids = {s: tok.token_to_id(s) for s in special + words}
    exaone4_checkpoint(
        directory,
        sliding_window=None,
        vocab_size=320,
        num_hidden_layers=2,
        max_position_embeddings=2048,
        bos_token_id=ids["[BOS]"],
        eos_token_id=ids["[|endofturn|]"],
        pad_token_id=ids["[PAD]"],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="[|endofturn|]", pad_token="[PAD]", bos_token="[BOS]"
    )
    fast.chat_template = template
    fast.save_pretrained(directory)
    chain = [
        tok.encode("\n").ids[0],
        ids[REASONING],
        ids["</think>"],
        ids["\n\n"],
        ids[CONTENT],
        ids["<tool_call>"],
        ids[CALL],
        ids["</tool_call>"],
        ids["[|endofturn|]"],
    ]
    path = directory / "model.safetensors"
    state = load_file(str(path))
    emb = torch.zeros_like(state["model.embed_tokens.weight"])
    head = torch.zeros_like(state["lm_head.weight"])
    for k, (a, b) in enumerate(zip(chain, chain[1:], strict=False)):
        emb[a, k], head[b, k] = 1.0, 1.0
    state["model.embed_tokens.weight"], state["lm_head.weight"] = emb, head
    state["model.norm.weight"] = torch.ones_like(state["model.norm.weight"])
    for name in state:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = torch.zeros_like(state[name])
    save_file(state, str(path))
    return directory


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    ckpt = scripted_exaone4(tmp_path_factory.mktemp("exaone4-scripted"))
    opts = ServeOptions(
        model=ckpt,
        cache_dir=tmp_path_factory.mktemp("serve-cache-4"),
        max_batch_size=8,
        max_seq_len=2048,
        log_level="warning",
    )
    state = prepare(opts, say=lambda _m: None)
    assert state.reasoning_tags == parsers.THINK and state.tool_calls  # on by default for this template
    with BackgroundServer(state) as server:
        yield server


def _think(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def test_reasoning_and_tool_calls(thinker):
    c = _think(thinker)
    kw = dict(
        model=thinker.state.model_name,
        messages=[{"role": "user", "content": "Weather in Seoul?"}],
        max_tokens=20,
        temperature=0,
        tools=TOOLS,
    )
    r = c.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    m = r.choices[0].message
    assert m.reasoning_content == REASONING
    assert m.content == CONTENT
    assert len(m.tool_calls) == 1 and m.tool_calls[0].type == "function"
    assert m.tool_calls[0].function.name == "get_weather"
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Seoul"}
    assert m.tool_calls[0].id.startswith("call_")
    assert r.choices[0].finish_reason == "tool_calls"

    stream = c.chat.completions.create(
        **kw, stream=True, extra_body={"chat_template_kwargs": {"enable_thinking": True}}
    )
    reasoning, content, calls, finish = "", "", [], None
    for chunk in stream:
        d = chunk.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        calls += d.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, finish) == (REASONING, CONTENT, "tool_calls")
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        (0, "get_weather", {"city": "Seoul"})
    ]

    # thinking off (EXAONE-4.0's default): no reasoning, the answer and the call
    off = c.chat.completions.create(**kw).choices[0].message
    assert off.reasoning_content is None and off.content == CONTENT and len(off.tool_calls) == 1
    # no tools in the request: no tool-call parsing, the call stays text
    plain = c.chat.completions.create(**{**kw, "tools": None}).choices[0]
    assert plain.message.tool_calls is None and f"<tool_call>{CALL}</tool_call>" in plain.message.content
    assert plain.finish_reason == "stop"
    # a conversation that carries the call and its result renders through the template
    history = [
        {"role": "user", "content": "Weather in Seoul?"},
        {"role": "assistant", "content": None, "tool_calls": [m.tool_calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "sunny, 21 C"},
    ]
    again = c.chat.completions.create(**{**kw, "messages": history})
    assert again.choices[0].message.content == CONTENT


def test_parsers_switch_off(thinker, monkeypatch):
    c = _think(thinker)
    monkeypatch.setattr(thinker.state, "reasoning_tags", None)
    monkeypatch.setattr(thinker.state, "tool_calls", False)
    r = c.chat.completions.create(
        model=thinker.state.model_name,
        max_tokens=20,
        temperature=0,
        tools=TOOLS,
        messages=[{"role": "user", "content": "Weather?"}],
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    m = r.choices[0].message
    assert m.tool_calls is None and getattr(m, "reasoning_content", None) is None
    assert m.content == f"{REASONING}</think>\n\n{CONTENT}<tool_call>{CALL}</tool_call>"


# -- the parsers on their own -----------------------------------------------------------------------------
def _events(parser, text: str, step: int) -> list:
    out = []
    for i in range(0, len(text), step):
        out += parser.feed(text[i : i + step])
    out += parser.finish()
    merged = []  # adjacent text events of one kind joined: what a client concatenates
    for kind, value in out:
        if merged and kind == merged[-1][0] and isinstance(value, str):
            merged[-1] = (kind, merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return [(k, v.name if isinstance(v, parsers.ToolCall) else v) for k, v in merged]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_output_parser_any_split(step):
    text = (
        'Let me think.\n</think>\n\nAnswer: 4 < 5.<tool_call>{"name": "add", "arguments": {"a": 1}}'
        '</tool_call>\n<tool_call>{"name": "sub", "parameters": {}}</tool_call>'
    )
    p = parsers.OutputParser(
        parsers.ReasoningParser(parsers.THINK, in_reasoning=True), parsers.ToolCallParser()
    )
    assert _events(p, text, step) == [
        ("reasoning", "Let me think.\n"),
        ("content", "Answer: 4 < 5."),
        ("tool_call", "add"),
        ("tool_call", "sub"),
    ]


def test_parser_edges():
    # the output opens the tag itself; EXAONE-Deep's <thought>
    p = parsers.ReasoningParser(parsers.THOUGHT)
    assert _events(p, "  <thought>hmm</thought>ok", 1) == [("reasoning", "hmm"), ("content", "ok")]
    assert parsers.reasoning_tags("... <thought> ...") == parsers.THOUGHT
    assert parsers.reasoning_tags("... <think> ...") == parsers.THINK
    assert parsers.prompt_opens_reasoning("[|assistant|]\n<think>\n", parsers.THINK)
    assert not parsers.prompt_opens_reasoning("[|assistant|]\n<think>\n\n</think>\n\n", parsers.THINK)
    # no tags: all content; ended while thinking: all reasoning
    assert _events(parsers.ReasoningParser(), "<thin", 1) == [("content", "<thin")]
    assert _events(parsers.ReasoningParser(in_reasoning=True), "still going", 3) == [
        ("reasoning", "still going")
    ]
    # a block that is not a call stays text; a call cut by EOS (no closing tag) still counts
    t = parsers.ToolCallParser()
    assert _events(t, "a<tool_call>not json</tool_call>b", 2) == [
        ("content", "a<tool_call>not json</tool_call>b")
    ]
    t = parsers.ToolCallParser()
    assert _events(t, '<tool_call>{"name": "f", "arguments": {"x": [1, 2]}}', 4) == [("tool_call", "f")]
    call = parsers.parse_tool_call('{"name": "f", "arguments": {"x": "서울"}}')
    assert json.loads(call.arguments) == {"x": "서울"} and call.to_json(0)["index"] == 0


# -- the option file and flags ----------------------------------------------------------------------------
REFERENCE_YAML = """\
enable_attention_dp: true
trust_remote_code: true
cuda_graph_config:
  max_batch_size: 2048
  enable_padding: true
moe_config:
  backend: CUTLASS
kv_cache_config:
  enable_block_reuse: true
  max_attention_window: [128, 128, 128, 131072]
  free_gpu_memory_fraction: 0.9
  dtype: "auto"
attention_dp_config:
  enable_balance: true
  batching_wait_iters: 50
  timeout_iters: 1
num_postprocess_workers: 4
"""


def test_option_file(tmp_path):
    path = tmp_path / "configs.yaml"
    path.write_text(REFERENCE_YAML)
    notices = []
    values = read_option_file(path, notices)
    assert values == {
        "cuda_graph_max_batch_size": 2048,
        "cuda_graphs": True,
        "enable_kv_cache_reuse": True,
        "max_attention_window_size": [128, 128, 128, 131072],
        "kv_cache_free_gpu_memory_fraction": 0.9,
    }
    ignored = {n.split(":")[1].split()[0] for n in notices}
    assert ignored == {
        "enable_attention_dp",
        "trust_remote_code",
        "moe_config",
        "attention_dp_config",
        "num_postprocess_workers",
    }
    # flags win over the file
    opts = resolve(ServeOptions(config_file=path, enable_kv_cache_reuse=False))
    assert opts.enable_kv_cache_reuse is False and opts.cuda_graph_max_batch_size == 2048
    for text, words in [
        ("speculative_config: {}\n", "speculative_config"),
        ("kv_cache_config:\n  enable_partial_reuse: true\n", "kv_cache_config.enable_partial_reuse"),
        ("max_batch_size: lots\n", "max_batch_size"),
        ("cuda_graph_config:\n  enable_padding: false\n", "enable_padding"),
        ("- a list\n", "mapping"),
        ("key: [unclosed\n", "YAML"),
    ]:
        path.write_text(text)
        with pytest.raises(FileError, match=re.escape(words)):
            read_option_file(path, [])
    path.write_text("tensor_parallel_size: 8\n")
    with pytest.raises(Unsupported, match="not supported yet"):
        resolve(ServeOptions(config_file=path))


def test_cli_refusals(capsys):
    from exaone.cli.app import main

    assert main(["serve", "--tp_size", "2"]) == 2
    assert "--tp_size 2: tensor parallelism is not supported yet" in capsys.readouterr().err
    assert main(["serve", "--ep_size", "4"]) == 2
    assert "expert parallelism is not supported yet" in capsys.readouterr().err
    assert main(["serve", "--reasoning_parser", "hermes"]) == 2
    assert "--reasoning_parser 'hermes'" in capsys.readouterr().err
    with pytest.raises(ExaoneError, match="api_key"):
        ServeOptions(api_key=" ").check()
    assert KEY not in repr(ServeOptions(api_key=KEY))


def test_sigterm_drains_and_exits_zero(thinker, tmp_path):
    """`exaone serve ENGINE_DIR` as a process: a request in flight when SIGTERM arrives completes, then
    the process exits 0; the API key comes from EXAONE_API_KEY and never reaches the log."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EXAONE_API_KEY": "secret-from-env", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "exaone.cli.app",
        "serve",
        thinker.state.engine_dir,
        "--port",
        str(port),
        "--max_batch_size",
        "4",
        "--log_level",
        "info",
        "--access_log",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        headers = {"Authorization": "Bearer secret-from-env"}
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        body = {"prompt": "x", "max_tokens": 60, "ignore_eos": True, "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert "text_completion" in first
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(x[5:]) for x in [first, *rest[:-1]]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it ran to the end
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "secret-from-env" not in text and "Shutting down" in text


# -- the load generator -------------------------------------------------------------------------------------
def test_bench_serving(smol, capsys):
    from exaone.cli.app import main
    from exaone.eval.serving_bench import ServingOptions, benchmark

    opts = ServingOptions(
        url=smol.url,
        concurrency=[1, 4],
        num_prompts=4,
        input_len=8,
        output_len=4,
        vocab_size=40000,
        api_key=KEY,
        warmup=1,
    )
    report = benchmark(opts, say=lambda _m: None)
    assert report["model"] == _model(smol) and len(report["levels"]) == 2
    for level in report["levels"]:
        assert (level["completed"], level["failed"], level["output_tokens"]) == (4, 0, 16)
        assert level["input_tokens"] == 32
        assert level["ttft_ms"]["p50"] > 0 and level["itl_ms"]["p99"] >= level["itl_ms"]["p50"] > 0
        assert level["output_tokens_per_s"] > 0
    code = main(
        [
            "bench",
            "serving",
            "--url",
            smol.url + "/v1",
            "--endpoint",
            "chat",
            "--concurrency",
            "2",
            "--num_prompts",
            "2",
            "--input_len",
            "6",
            "--output_len",
            "3",
            "--api_key",
            KEY,
            "--json",
        ]
    )
    assert code == 0
    level = json.loads(capsys.readouterr().out)["levels"][0]
    assert (level["completed"], level["output_tokens"]) == (2, 6)
    wrong = dict(url=smol.url, num_prompts=1, output_len=2, api_key="wrong", warmup=0)
    with pytest.raises(ExaoneError, match="answered 401 \\(invalid API key\\)"):
        benchmark(ServingOptions(**wrong), say=lambda _m: None)
    bad = benchmark(ServingOptions(**wrong, model=_model(smol)), say=lambda _m: None)
    assert bad["levels"][0]["failed"] == 1 and "HTTP 401" in bad["levels"][0]["errors"][0]


def test_shared_data_template_is_exaone4():
    """The template the scripted checkpoint uses is EXAONE-4.0's (its tool section is the parser's source)."""
    template = SHARED_DATA / "exaone40_1.2b" / "chat_template.jinja"
    if not template.is_file():
        pytest.skip("shared data not found")
    text = template.read_text()
    assert parsers.tools_default(text) and parsers.reasoning_default(text)
    assert '<tool_call>{\\"name\\": function_1_name, \\"arguments\\"' in text


# -- the engine loop on a stub engine: failures reach the handlers, never hang them --------------------------
class _StubEngine:
    def __init__(self, fail_step: bool = False, fail_always: bool = False):
        from types import SimpleNamespace

        self.device = torch.device("cpu")
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.cache = SimpleNamespace(groups=[])
        self.fail_step, self.fail_always, self.queued = fail_step, fail_always, []

    @property
    def busy(self):
        if self.fail_always:
            raise RuntimeError("broken")
        return bool(self.queued)

    def add_request(self, prompt, params, stop_ids, on_token=None, seed=None, logprobs=None):
        from types import SimpleNamespace

        r = SimpleNamespace(id=len(self.queued), finished=False)
        self.queued.append(r)
        return r

    def step(self):
        if self.fail_step:
            self.queued.clear()
            raise RuntimeError("device error")
        return []

    def flush(self):
        return []

    def abort(self, r):
        pass


def test_engine_loop_failures():
    from exaone.serve.loop import Add, EngineLoop, Sink

    async def main():
        loop = EngineLoop(_StubEngine(fail_step=True))
        loop.start(asyncio.get_running_loop())
        sink = Sink()
        loop.submit(Add(sink, 0, [1, 2], None, frozenset(), 0, None))
        stamp, event = await asyncio.wait_for(sink.queue.get(), 10)
        assert event[:3] == (0, "error", 500) and "internal engine error" in event[3]
        assert loop.alive  # a failed step fails its requests; the loop keeps serving
        loop.stop()
        dead = EngineLoop(_StubEngine(fail_always=True))
        with pytest.raises(ExaoneError, match="engine loop did not start"):
            dead.start(asyncio.get_running_loop())
            await asyncio.sleep(0.2)
            raise AssertionError("start should have failed")

    asyncio.run(main())

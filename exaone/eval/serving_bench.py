"""`exaone bench serving --url URL`: load on any OpenAI-compatible endpoint, measured as a client sees it.

Requests go out at a fixed concurrency (N in flight, the next one sent as soon as one ends) or as a
Poisson process of `request_rate` requests/s (optionally capped at N in flight), with synthetic
prompts (random token ids sent as a token-id prompt, which gives exact input lengths on
/v1/completions; or random words) or prompts from a file. Each request asks for `output_len`
tokens, with `ignore_eos` (vLLM's extension, which `exaone serve` honours) so every request
generates exactly that many. Streaming requests give time to first token (TTFT), the gaps between
streamed chunks (inter-token latency, ITL: one chunk a token unless the server coalesces) and the
time per output token after the first (TPOT); every request gives its end-to-end latency. The
report has p50/p90/p99 of each and the throughputs over the measured window.

The HTTP client is asyncio's own streams (HTTP/1.1, one connection per request, chunked or
sized bodies, http and https), so the generator needs no package beyond the standard library and
adds little of its own time to the figures.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from exaone.core.errors import ExaoneError, OptionError

WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be or has had "
    "not but first one their its new after who they have her she two been other when there all during "
    "into school time may years more most only over city some world would where later up such used many "
    "can state about national out known university united then made team american while group season "
    "since film part people also number three well between each home found back long work government"
).split()


@dataclass
class ServingOptions:
    url: str
    endpoint: str = "completions"  # completions | chat
    model: str | None = None  # default: the first model /v1/models lists
    concurrency: list[int] = field(default_factory=lambda: [1])  # 0: no limit (with a request_rate)
    request_rate: float | None = None  # Poisson arrivals per second; None: send at the concurrency limit
    num_prompts: int | None = None  # per level; default max(8, 4 x concurrency), 200 at a rate unlimited
    input_len: int = 128
    output_len: int = 128
    dataset: str = "random"  # random (token ids) | words | file
    prompt_file: Path | None = None
    vocab_size: int = 32000  # random token ids are drawn from [100, vocab_size)
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    warmup: int | None = None  # requests sent (and not measured) before each level; default: concurrency
    api_key: str | None = field(default=None, repr=False)
    seed: int = 0
    timeout: float = 600.0

    def check(self):
        if self.endpoint not in ("completions", "chat"):
            raise OptionError("endpoint", self.endpoint, "expected completions or chat")
        if self.dataset not in ("random", "words", "file"):
            raise OptionError("dataset", self.dataset, "expected random, words or file")
        if self.prompt_file is not None:
            self.dataset = "file"
        if self.dataset == "file" and self.prompt_file is None:
            raise OptionError("dataset", "file", "needs --prompt_file")
        if self.dataset == "random" and self.endpoint == "chat":
            self.dataset = "words"  # chat messages are text
        if not self.concurrency or any(c < 0 for c in self.concurrency):
            raise OptionError("concurrency", self.concurrency, "expected counts >= 1")
        if 0 in self.concurrency and self.request_rate is None:
            raise OptionError("concurrency", 0, "no limit needs a --request_rate")
        if self.request_rate is not None and self.request_rate <= 0:
            raise OptionError("request_rate", self.request_rate, "expected requests/s > 0")
        for name in ("input_len", "output_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), "expected at least 1")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise OptionError("num_prompts", self.num_prompts, "expected at least 1")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OptionError("url", self.url, "expected http://HOST[:PORT][/v1]")


# -- a small HTTP/1.1 client ------------------------------------------------------------------------
class Endpoint:
    def __init__(self, url: str, api_key: str | None, timeout: float):
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.base = parts.path.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key, self.timeout = api_key, timeout

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, AsyncIterator]:
        """Send a request; the status and an iterator of (arrival time, body bytes)."""
        ctx = ssl.create_default_context() if self.https else None
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=ctx)
        data = json.dumps(body).encode() if body is not None else b""
        head = [
            f"{method} {self.base}{path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Connection: close",
            "Accept: */*",
            f"Content-Length: {len(data)}",
        ]
        if body is not None:
            head.append("Content-Type: application/json")
        if self.api_key:
            head.append(f"Authorization: Bearer {self.api_key}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
        status_line = await reader.readline()
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError):
            writer.close()
            raise ExaoneError(
                f"{self.host}:{self.port}: not an HTTP response ({status_line[:60]!r})"
            ) from None
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        return status, _body(reader, writer, headers)

    async def get_json(self, path: str) -> tuple[int, dict]:
        status, body = await self.request("GET", path)
        raw = b"".join([chunk async for _, chunk in body])
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, {"raw": raw.decode("utf-8", "replace")[:200]}


async def _body(reader, writer, headers: dict) -> AsyncIterator[tuple[float, bytes]]:
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readline()
                if not size_line:
                    return
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                chunk = await reader.readexactly(size + 2)
                yield time.perf_counter(), chunk[:-2]
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left > 0:
                chunk = await reader.read(min(left, 1 << 16))
                if not chunk:
                    return
                left -= len(chunk)
                yield time.perf_counter(), chunk
        else:
            while chunk := await reader.read(1 << 16):
                yield time.perf_counter(), chunk
    finally:
        writer.close()


# -- one request ------------------------------------------------------------------------------------
@dataclass
class Sample:
    ok: bool
    error: str | None = None
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None
    chunks: list[float] = field(default_factory=list)  # arrival times of chunks carrying text
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def e2e(self) -> float:
        return self.end - self.start


def _payload(opts: ServingOptions, model: str, prompt) -> dict:
    body: dict = {
        "model": model,
        "max_tokens": opts.output_len,
        "temperature": opts.temperature,
        "stream": opts.stream,
    }
    if opts.ignore_eos:
        body["ignore_eos"] = True
    if opts.stream:
        body["stream_options"] = {"include_usage": True}
    if opts.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def one_request(ep: Endpoint, opts: ServingOptions, model: str, prompt) -> Sample:
    path = "/chat/completions" if opts.endpoint == "chat" else "/completions"
    s = Sample(ok=False, start=time.perf_counter())
    try:
        status, body = await asyncio.wait_for(
            ep.request("POST", path, _payload(opts, model, prompt)), opts.timeout
        )
        if status != 200:
            raw = b"".join([c async for _, c in body])
            s.error = f"HTTP {status}: {raw.decode('utf-8', 'replace')[:200]}"
            return s
        if opts.stream:
            await _read_stream(body, s, opts.endpoint)
        else:
            raw = b"".join([c async for _, c in body])
            _usage(json.loads(raw), s)
        s.ok = s.error is None
    except (OSError, asyncio.TimeoutError, json.JSONDecodeError, ExaoneError, ValueError) as e:
        s.error = f"{type(e).__name__}: {e}"
    finally:
        s.end = time.perf_counter()
    if s.ok and s.chunks:
        s.ttft = s.chunks[0] - s.start
    if s.ok and not s.output_tokens:
        s.output_tokens = len(s.chunks)
    return s


async def _read_stream(body, s: Sample, endpoint: str):
    buf = b""
    async for stamp, chunk in body:
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    s.error = str(obj["error"].get("message", obj["error"]))[:200]
                    return
                _usage(obj, s)
                for choice in obj.get("choices") or []:
                    if endpoint == "chat":
                        delta = choice.get("delta") or {}
                        text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                        text += "".join(str(t) for t in delta.get("tool_calls") or [])
                    else:
                        text = choice.get("text") or ""
                    if text:
                        s.chunks.append(stamp)
                        break


def _usage(obj: dict, s: Sample):
    u = obj.get("usage")
    if isinstance(u, dict):
        s.prompt_tokens = u.get("prompt_tokens") or s.prompt_tokens
        s.output_tokens = u.get("completion_tokens") or s.output_tokens


# -- prompts and a level ------------------------------------------------------------------------------
def make_prompts(opts: ServingOptions, count: int, rng: random.Random) -> list:
    if opts.dataset == "random":
        return [[rng.randrange(100, opts.vocab_size) for _ in range(opts.input_len)] for _ in range(count)]
    if opts.dataset == "words":
        return [" ".join(rng.choice(WORDS) for _ in range(opts.input_len)) for _ in range(count)]
    from exaone.core.runner import read_prompts

    lines = read_prompts(opts.prompt_file)
    if not lines:
        raise OptionError("prompt_file", opts.prompt_file, "has no prompts")
    return [lines[i % len(lines)] for i in range(count)]


async def run_level(
    ep: Endpoint, opts: ServingOptions, model: str, concurrency: int, prompts: list, rng: random.Random
) -> tuple[list[Sample], float]:
    """Send every prompt (at most `concurrency` in flight, Poisson arrivals if a rate is set)."""
    gate = asyncio.Semaphore(concurrency or len(prompts))

    async def go(p):
        async with gate:
            return await one_request(ep, opts, model, p)

    start = time.perf_counter()
    tasks = []
    for p in prompts:
        if opts.request_rate is not None and tasks:
            await asyncio.sleep(rng.expovariate(opts.request_rate))
        tasks.append(asyncio.ensure_future(go(p)))
    samples = await asyncio.gather(*tasks)
    return list(samples), time.perf_counter() - start


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats(values: list[float], scale: float = 1.0) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {
        "mean": statistics.fmean(values) * scale,
        "p50": _pct(values, 50) * scale,
        "p90": _pct(values, 90) * scale,
        "p99": _pct(values, 99) * scale,
    }


def summarize(samples: list[Sample], duration: float, concurrency: int) -> dict:
    ok = [s for s in samples if s.ok]
    itl = [b - a for s in ok for a, b in zip(s.chunks, s.chunks[1:], strict=False)]
    tpot = [
        (s.e2e - s.ttft) / (s.output_tokens - 1) for s in ok if s.ttft is not None and s.output_tokens > 1
    ]
    out_tokens = sum(s.output_tokens for s in ok)
    in_tokens = sum(s.prompt_tokens for s in ok)
    errors = sorted({s.error for s in samples if not s.ok})
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "completed": len(ok),
        "failed": len(samples) - len(ok),
        "errors": errors[:5],
        "duration_s": duration,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else None,
        "output_tokens_per_s": out_tokens / duration if duration else None,
        "total_tokens_per_s": (in_tokens + out_tokens) / duration if duration else None,
        "ttft_ms": _stats([s.ttft for s in ok if s.ttft is not None], 1e3),
        "itl_ms": _stats(itl, 1e3),
        "tpot_ms": _stats(tpot, 1e3),
        "e2e_ms": _stats([s.e2e for s in ok], 1e3),
    }


async def _benchmark(opts: ServingOptions, say: Callable[[str], None]) -> dict:
    ep = Endpoint(opts.url, opts.api_key, opts.timeout)
    model = opts.model
    if model is None:
        try:
            status, listing = await asyncio.wait_for(ep.get_json("/models"), 30)
        except (OSError, asyncio.TimeoutError) as e:
            raise ExaoneError(f"--url {opts.url}: cannot connect ({type(e).__name__}: {e})") from None
        if status != 200 or not listing.get("data"):
            why = (
                (listing.get("error") or {}).get("message")
                if isinstance(listing.get("error"), dict)
                else None
            )
            raise ExaoneError(
                f"--url {opts.url}: GET /v1/models answered {status}"
                f"{f' ({why})' if why else ''}; give --model or check --api_key"
            )
        model = listing["data"][0]["id"]
    report = {
        "url": opts.url,
        "endpoint": f"/v1/{'chat/completions' if opts.endpoint == 'chat' else 'completions'}",
        "model": model,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("url", "api_key")},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "levels": [],
    }
    report["options"]["prompt_file"] = str(opts.prompt_file) if opts.prompt_file else None
    rng = random.Random(opts.seed)
    for c in opts.concurrency:
        n = opts.num_prompts or (max(8, 4 * c) if c else 200)
        warm = (c or 8) if opts.warmup is None else opts.warmup
        if warm:
            say(f"concurrency {c}: {warm} warm-up request(s) ...")
            await run_level(ep, opts, model, c, make_prompts(opts, warm, rng), rng)
        rate = f", Poisson {opts.request_rate:g} req/s" if opts.request_rate else ""
        shape = f"{opts.input_len}/{opts.output_len}"
        say(f"concurrency {c or 'unlimited'}{rate}: {n} requests of {shape} tokens ...")
        samples, duration = await run_level(ep, opts, model, c, make_prompts(opts, n, rng), rng)
        level = summarize(samples, duration, c)
        level["request_rate"] = opts.request_rate
        report["levels"].append(level)
        if level["failed"]:
            say(f"concurrency {c}: {level['failed']} request(s) failed: {level['errors'][0]}")
    return report


def benchmark(opts: ServingOptions, say: Callable[[str], None] = print) -> dict:
    """Run every concurrency level against opts.url; the report (JSON-able)."""
    opts.check()
    return asyncio.run(_benchmark(opts, say))

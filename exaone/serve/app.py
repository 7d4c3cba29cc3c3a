"""The HTTP API: FastAPI routes over the engine loop, OpenAI's request and response shapes.

POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with `stream`),
GET /v1/models, /v1/models/{id}, /health, /metrics (Prometheus text), /version. Every error is an
OpenAI-style JSON body with its status; nothing a client sends reaches it as a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from exaone import __version__
from exaone.core.generate import Sampling
from exaone.serve import parsers
from exaone.serve.loop import Add, EngineLoop, Sink
from exaone.serve.metrics import Metrics
from exaone.serve.output import Choice, Detokenizer, StopStrings
from exaone.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Message,
    bad_request,
    new_id,
    now,
    parse_request,
    sse,
    usage,
)

log = logging.getLogger("exaone.serve")
SEED_SPACE = 1 << 63
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerState:
    """Everything the routes need; made by exaone.serve.server.prepare."""

    engine: object  # exaone.core.engine.Engine
    tokenizer: object
    model_name: str
    stop_ids: frozenset[int]
    options: object  # ServeOptions
    aliases: set[str] = field(default_factory=set)
    label: str | None = None
    engine_dir: str = ""
    defaults: dict = field(default_factory=dict)  # sampling defaults from generation_config.json
    reasoning_tags: tuple[str, str] | None = None  # None: the reasoning parser is off
    tool_calls: bool = False  # the tool-call parser is on
    metrics: Metrics | None = None
    loop: EngineLoop | None = None
    outstanding: int = 0  # engine requests submitted and not yet over
    created: int = field(default_factory=now)
    draining: bool = False

    def __post_init__(self):
        self.metrics = self.metrics or Metrics(self.model_name)
        self.loop = self.loop or EngineLoop(self.engine)


# -- the ASGI guard: API key, body size, request counting -----------------------------------------------
class Guard:
    """Outermost layer: counts every response by status, checks the API key on every path but
    /health (constant-time compare), and refuses a declared body over the size limit before reading it."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        key = state.options.api_key
        self.key = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")

        async def counted(message):
            if message["type"] == "http.response.start":
                self.state.metrics.request(path, message["status"])
            await send(message)

        headers = dict(scope.get("headers") or [])
        if self.key is not None and path != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                what = "invalid API key" if given else "missing API key: send Authorization: Bearer <key>"
                err = ApiError(
                    401,
                    what,
                    "authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await error_response(err)(scope, receive, counted)
        length = headers.get(b"content-length")
        limit = self.state.options.max_request_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            return await error_response(too_large(int(length), limit))(scope, receive, counted)
        await self.app(scope, receive, counted)


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body of {size} bytes is over the limit of {limit} (--max_request_bytes)",
        code="request_too_large",
    )


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# -- the app ------------------------------------------------------------------------------------------
def create_app(state: ServerState):
    @asynccontextmanager
    async def lifespan(app):
        state.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.draining = True
            state.loop.stop()

    app = FastAPI(
        title="exaone serve",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.exaone = state

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            e.status_code, "invalid_request_error"
        )
        message = (
            f"no such endpoint: {request.method} {request.url.path}"
            if e.status_code == 404
            else f"{request.method} is not allowed on {request.url.path}"
            if e.status_code == 405
            else str(e.detail)
        )
        return error_response(ApiError(e.status_code, message, kind))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return error_response(ApiError(500, "internal server error (see the server log)", "internal_error"))

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            return error_response(ApiError(503, "the engine loop is not running", "unavailable"))
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        import torch

        return {
            "version": __version__,
            "torch": torch.__version__,
            "device": str(state.engine.device),
            "engine_dir": state.engine_dir,
        }

    @app.get("/metrics")
    async def metrics():
        state.metrics.engine = state.loop.snapshot
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(await read_body(request, state.options.max_request_bytes), CompletionRequest)
        return await Completion(state, request, req).respond()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_request(await read_body(request, state.options.max_request_bytes), ChatRequest)
        return await ChatCompletion(state, request, req).respond()

    return Guard(app, state)


def _model_card(state: ServerState) -> dict:
    card = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "exaone",
        "max_model_len": state.engine.max_seq_len,
    }
    if state.label:
        card["description"] = state.label
    return card


def _check_model(state: ServerState, model: str | None):
    if model is not None and model != state.model_name and model not in state.aliases:
        raise ApiError(
            404,
            f"model '{model}' is not served here (this server serves '{state.model_name}')",
            "not_found_error",
            "model",
            "model_not_found",
        )


async def read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(receive) -> None:
    """Returns when the client has gone (call only after the body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(Response):
    """Server-sent events from an async iterator; if the client goes away the iterator is closed at
    once (its `finally` aborts the engine requests, which frees their KV blocks)."""

    def __init__(self, body: AsyncIterator[bytes], on_disconnect, on_close):
        super().__init__(status_code=200)
        self.events, self.on_disconnect, self.on_close = body, on_disconnect, on_close
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def pump():
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not pumping.done():
                self.on_disconnect()
            if pumping.done() and pumping.exception() is not None:
                if isinstance(pumping.exception(), OSError):  # the client closed the connection
                    self.on_disconnect()
                else:
                    log.error("stream failed", exc_info=pumping.exception())
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await self.events.aclose()
            self.on_close()


# -- one generation request ---------------------------------------------------------------------------
class Generation:
    """What both endpoints share: prompts in, choices out, through the engine loop."""

    object_name = ""
    id_prefix = ""

    def __init__(self, state: ServerState, request: Request, req):
        self.state, self.request, self.req = state, request, req
        self.arrival = time.perf_counter()
        self.id = new_id(self.id_prefix)
        self.created = now()
        self.sink: Sink | None = None
        self.choices: list[Choice] = []
        self.prompts: list[list[int]] = []
        self.submitted = 0
        self.cancelled = False
        self.accounted = False

    # subclasses: prompts(), make_parser(prompt_index), default_max_tokens(prompt), shaping
    def prompt_ids(self) -> list[list[int]]:
        raise NotImplementedError

    def make_parser(self, prompt_index: int):
        return None

    def default_max_tokens(self, prompt: list[int]) -> int:
        return COMPLETIONS_DEFAULT_MAX_TOKENS

    def logprobs_n(self) -> int | None:
        return None

    async def respond(self):
        req, state = self.req, self.state
        _check_model(state, req.model)
        if state.draining or not state.loop.alive:
            raise ApiError(
                503,
                "the server is shutting down" if state.draining else "the engine is not running",
                "unavailable",
                headers={"Retry-After": "1"},
            )
        self.prompts = self.prompt_ids()
        stops, stop_ids = self._stops()
        params = [self._sampling(p, i) for i, p in enumerate(self.prompts)]
        total = len(self.prompts) * req.n
        engine = state.engine
        most = engine.max_batch_size + state.options.max_queue
        if total > most:
            raise bad_request(
                f"this request asks for {total} sequences (prompts x n), more than the server "
                f"holds at once ({most}: max_batch_size + --max_queue)",
                "n",
            )
        room = most - state.outstanding
        if total > room:
            raise ApiError(
                503,
                f"the server is at capacity ({state.outstanding} sequences in flight, "
                f"--max_queue {state.options.max_queue}); retry later",
                "overloaded_error",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        seed = req.seed % SEED_SPACE if req.seed is not None else secrets.randbits(62)
        self.sink = Sink()
        logprobs = self.logprobs_n()
        for i, prompt in enumerate(self.prompts):
            for j in range(req.n):
                index = i * req.n + j
                self.choices.append(
                    Choice(index, i, Detokenizer(state.tokenizer), StopStrings(stops), self.make_parser(i))
                )
                state.loop.submit(
                    Add(self.sink, index, prompt, params[i], stop_ids, (seed + index) % SEED_SPACE, logprobs)
                )
        self.submitted = total
        state.outstanding += total
        state.metrics.prompt_tokens += sum(len(p) for p in self.prompts)
        if req.stream:
            return SSEResponse(self._stream(), self._on_disconnect, self.close)
        return await self._whole()

    # -- prompt checks and sampling -------------------------------------------------------------------
    def check_prompt(self, ids: list[int], where: str) -> list[int]:
        engine = self.state.engine
        if not ids:
            raise bad_request(f"{where} is empty", where)
        vocab = engine.cfg.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"{where}: token id {bad} is outside the vocabulary (0..{vocab - 1})", where)
        if len(ids) > engine.max_input_len:
            raise bad_request(
                f"{where} has {len(ids)} tokens, more than the engine's max_input_len {engine.max_input_len}",
                where,
                "context_length_exceeded",
            )
        return ids

    def _max_tokens(self, prompt: list[int]) -> int:
        req = self.req
        n = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if n is None:
            n = self.state.defaults.get("max_tokens") or self.default_max_tokens(prompt)
            n = min(n, self.state.engine.max_seq_len - len(prompt))
        limit = self.state.engine.max_seq_len
        if len(prompt) + n > limit:
            raise bad_request(
                f"the prompt's {len(prompt)} tokens + max_tokens {n} exceed the engine's max_seq_len {limit}",
                "max_tokens",
                "context_length_exceeded",
            )
        if n < 1:
            raise bad_request(
                f"the prompt's {len(prompt)} tokens leave no room in the engine's max_seq_len {limit}",
                "messages",
                "context_length_exceeded",
            )
        return n

    def _sampling(self, prompt: list[int], i: int) -> Sampling:
        req, d = self.req, self.state.defaults
        temperature = req.temperature if req.temperature is not None else d.get("temperature", 1.0)
        top_p = req.top_p if req.top_p is not None else d.get("top_p", 1.0)
        top_k = req.top_k if req.top_k is not None else d.get("top_k", 0)
        top_k = min(max(0, int(top_k)), self.state.engine.cfg.vocab_size)  # -1 (vLLM's "off") is 0 here
        return Sampling(self._max_tokens(prompt), float(temperature), top_k, float(top_p))

    def _stops(self) -> tuple[list[str], frozenset[int]]:
        req = self.req
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        strings = [s for s in stop if isinstance(s, str)]
        ids = {s for s in stop if isinstance(s, int)} | set(req.stop_token_ids or [])
        if len(strings) > 16:
            raise bad_request("at most 16 stop strings", "stop")
        vocab = self.state.engine.cfg.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"stop token id {bad} is outside the vocabulary (0..{vocab - 1})", "stop")
        if not req.ignore_eos:
            ids |= self.state.stop_ids
        return strings, frozenset(ids)

    # -- events ---------------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[list]:
        """Batches of (stamp, (index, kind, ...)) until every choice is done; raises on timeout."""
        deadline = self.arrival + self.state.options.request_timeout
        queue = self.sink.queue
        while not all(c.done for c in self.choices):
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError
            try:
                first = await asyncio.wait_for(queue.get(), left)
            except asyncio.TimeoutError:
                raise TimeoutError from None
            batch = [first]
            while not queue.empty():
                batch.append(queue.get_nowait())
            yield batch

    def apply(self, stamp: float, event: tuple) -> tuple[Choice, str, bool] | None:
        """One engine event into its choice: (choice, newly released text, finished now)."""
        index, kind = event[0], event[1]
        c = self.choices[index]
        if c.done:
            return None
        m = self.state.metrics
        if kind == "token":
            if c.first_at is None:
                m.ttft.observe(stamp - self.arrival)
            else:
                m.itl.observe(stamp - c.last_at)
            c.first_at = c.first_at or stamp
            c.last_at = stamp
            m.generation_tokens += 1
            text, hit = c.on_token(event[2], event[3])
            if hit:
                self.state.loop.abort(self.sink, index)  # a stop string: free its blocks now
                self._choice_done(c, stamp)
            return c, text, hit
        if kind == "finish":
            text = c.on_finish(event[2])
            self._choice_done(c, stamp)
            return c, text, True
        # error
        self._choice_done(c, stamp, reason="error")
        status, message = event[2], event[3]
        kind = {400: "invalid_request_error", 503: "unavailable"}.get(status, "internal_error")
        raise ApiError(status, message, kind)

    def _choice_done(self, c: Choice, stamp: float, reason: str | None = None):
        if c.finish_reason is None:
            c.finish_reason = reason or "abort"
        self.state.metrics.e2e.observe(stamp - self.arrival)
        self.state.metrics.finished[reason or c.finish_reason] += 1

    def _on_disconnect(self):
        self.cancelled = True

    def close(self):
        """Abort whatever is still running (a client gone, a timeout, an error) and settle the counts."""
        if self.sink is not None and not self.sink.closed:
            if not all(c.done for c in self.choices):
                self.state.loop.abort(self.sink)
            self.sink.closed = True
        if not self.accounted:
            self.accounted = True
            self.state.outstanding -= self.submitted
            if self.cancelled:
                self.state.metrics.cancelled += 1

    async def _whole(self):
        watcher = asyncio.ensure_future(_disconnected(self.request.receive))
        try:
            async for batch in self._guarded(watcher):
                for stamp, event in batch:
                    self.apply(stamp, event)
            return JSONResponse(self.whole_body())
        except TimeoutError:
            raise ApiError(
                504,
                f"the request did not finish within --request_timeout "
                f"{self.state.options.request_timeout:g} s",
                "timeout",
                code="timeout",
            ) from None
        finally:
            watcher.cancel()
            self.close()

    async def _guarded(self, watcher) -> AsyncIterator[list]:
        """events(), stopped if the client disconnects (non-streaming requests)."""
        it = self.events().__aiter__()
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                self.cancelled = True
                raise ApiError(499, "client disconnected", "cancelled")
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return

    async def _stream(self) -> AsyncIterator[bytes]:
        try:
            for chunk in self.stream_start():
                yield sse(chunk)
            async for batch in self.events():
                for chunk in self.stream_batch(batch):
                    yield sse(chunk)
            for chunk in self.stream_end():
                yield sse(chunk)
        except TimeoutError:
            err = ApiError(
                504,
                f"the request did not finish within --request_timeout "
                f"{self.state.options.request_timeout:g} s",
                "timeout",
                code="timeout",
            )
            yield sse(err.body())
        except ApiError as e:
            yield sse(e.body())
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        except Exception as e:  # never a traceback to the client
            log.error("stream failed", exc_info=e)
            yield sse(ApiError(500, "internal server error (see the server log)", "internal_error").body())
        finally:
            self.close()
        yield sse("[DONE]")

    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    def usage(self) -> dict:
        return usage(sum(len(p) for p in self.prompts), sum(len(c.tokens) for c in self.choices))

    # shaping, per endpoint
    def whole_body(self) -> dict:
        raise NotImplementedError

    def stream_start(self) -> list[dict]:
        return []

    def stream_batch(self, batch: list) -> list[dict]:
        raise NotImplementedError

    def stream_end(self) -> list[dict]:
        if not self.include_usage():
            return []
        return [
            {
                "id": self.id,
                "object": self.object_name,
                "created": self.created,
                "model": self.state.model_name,
                "choices": [],
                "usage": self.usage(),
            }
        ]

    def chunk(self, choices: list[dict]) -> dict:
        out = {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }
        if self.include_usage():
            out["usage"] = None
        return out

    def token_text(self, token: int) -> str:
        return self.state.tokenizer.decode([token], skip_special_tokens=False)


class Completion(Generation):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def prompt_ids(self) -> list[list[int]]:
        p = self.req.prompt
        tok = self.state.tokenizer
        if isinstance(p, str):
            return [self.check_prompt(tok(p)["input_ids"], "prompt")]
        if not p:
            raise bad_request("prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [self.check_prompt(list(p), "prompt")]
        if len(p) > 256:
            raise bad_request("at most 256 prompts in one request", "prompt")
        out = []
        for i, x in enumerate(p):
            ids = tok(x)["input_ids"] if isinstance(x, str) else list(x)
            out.append(self.check_prompt(ids, f"prompt.{i}"))
        return out

    def logprobs_n(self) -> int | None:
        return self.req.logprobs

    def _logprobs(self, entries: list, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for token, lp, top in entries:
            text = self.token_text(token)
            tokens.append(text)
            lps.append(lp)
            tops.append({self.token_text(t): v for t, v in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def whole_body(self) -> dict:
        choices = []
        for c in self.choices:
            lp = self._logprobs(c.logprobs, 0) if self.req.logprobs is not None else None
            choices.append(
                {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}
            )
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": self.usage(),
        }

    def stream_batch(self, batch: list) -> list[dict]:
        per: dict[int, dict] = {}
        for stamp, event in batch:
            c = self.choices[event[0]]
            seen = len(c.logprobs)
            got = self.apply(stamp, event)
            if got is None:
                continue
            _, text, finished = got
            entry = per.setdefault(
                c.index, {"text": "", "lp": [], "finish": None, "offset": len(c.text) - len(text)}
            )
            entry["text"] += text
            entry["lp"] += c.logprobs[seen:]
            if finished:
                entry["finish"] = c.finish_reason
        out = []
        for index, e in per.items():
            if not e["text"] and not e["lp"] and e["finish"] is None:
                continue
            lp = self._logprobs(e["lp"], e["offset"]) if self.req.logprobs is not None else None
            out.append(
                self.chunk(
                    [{"index": index, "text": e["text"], "logprobs": lp, "finish_reason": e["finish"]}]
                )
            )
        return out


class ChatCompletion(Generation):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, state, request, req: ChatRequest):
        super().__init__(state, request, req)
        self.rendered = ""
        self.parse_tools = False
        if (
            req.max_tokens is not None
            and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens
        ):
            raise bad_request(
                "max_tokens and max_completion_tokens differ; give one", "max_completion_tokens"
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")

    def default_max_tokens(self, prompt: list[int]) -> int:
        return self.state.engine.max_seq_len - len(prompt)

    def logprobs_n(self) -> int | None:
        return (self.req.top_logprobs or 0) if self.req.logprobs else None

    def prompt_ids(self) -> list[list[int]]:
        req, tok = self.req, self.state.tokenizer
        template = tok.chat_template
        if not template:
            raise bad_request("this model has no chat template: use /v1/completions", "messages")
        choice = req.tool_choice
        if isinstance(choice, dict) or choice == "required":
            raise bad_request(
                f"tool_choice {json.dumps(choice)} is not supported (it needs guided decoding); "
                'use "auto" or "none"',
                "tool_choice",
            )
        tools = None
        if req.tools and choice != "none":
            if "tools" not in template:
                raise bad_request("this model's chat template does not render tools", "tools")
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            self.parse_tools = self.state.tool_calls
        kwargs = dict(req.chat_template_kwargs or {})
        reserved = {
            "messages",
            "conversation",
            "tools",
            "documents",
            "add_generation_prompt",
            "tokenize",
            "continue_final_message",
            "return_dict",
            "chat_template",
        } & set(kwargs)
        if reserved:
            raise bad_request(
                f"chat_template_kwargs may not set '{sorted(reserved)[0]}'", "chat_template_kwargs"
            )
        messages = [_template_message(m, i) for i, m in enumerate(req.messages)]
        try:
            text = tok.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as e:  # the template's raise_exception, or a message it cannot render
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise bad_request(
                f"the chat template cannot render these messages: {first}", "messages"
            ) from None
        if not isinstance(text, str):
            raise bad_request("the chat template did not render text", "messages")
        self.rendered = text
        return [self.check_prompt(tok(text, add_special_tokens=False)["input_ids"], "messages")]

    def make_parser(self, prompt_index: int):
        tags = self.state.reasoning_tags
        reasoning = None
        if tags is not None:
            reasoning = parsers.ReasoningParser(tags, parsers.prompt_opens_reasoning(self.rendered, tags))
        tools = parsers.ToolCallParser() if self.parse_tools else None
        if reasoning is None and tools is None:
            return None
        return parsers.OutputParser(reasoning, tools)

    def _calls(self, c: Choice) -> list:
        calls = c.tool_calls
        return calls[:1] if self.req.parallel_tool_calls is False else calls

    def _logprobs(self, entries: list) -> dict:
        def item(token: int, lp: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries
            ]
        }

    def whole_body(self) -> dict:
        choices = []
        for c in self.choices:
            c.parse(c.text, final=True)
            calls = self._calls(c)
            content = c.content.strip() if calls or self.state.reasoning_tags else c.content
            message = {"role": "assistant", "content": (content or None) if calls else content}
            if self.state.reasoning_tags is not None:
                message["reasoning_content"] = c.reasoning.strip() or None
            if calls:
                message["tool_calls"] = [call.to_json() for call in calls]
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": self._logprobs(c.logprobs) if self.req.logprobs else None,
                    "finish_reason": c.chat_finish_reason(),
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": self.usage(),
        }

    def stream_start(self) -> list[dict]:
        return [
            self.chunk(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for c in self.choices
        ]

    def stream_batch(self, batch: list) -> list[dict]:
        """One chunk per choice and kind of delta for all the tokens that arrived together."""
        per: dict[int, dict] = {}
        for stamp, event in batch:
            c = self.choices[event[0]]
            seen = len(c.logprobs)
            calls_before = len(self._calls(c))
            got = self.apply(stamp, event)
            if got is None:
                continue
            _, text, finished = got
            entry = per.setdefault(c.index, {"deltas": [], "lps": [], "finish": None})
            deltas = entry["deltas"]
            for kind, value in c.parse(text, final=finished):
                if kind == "tool_call":
                    calls = self._calls(c)
                    if len(calls) > calls_before:
                        deltas.append({"tool_calls": [calls[-1].to_json(len(calls) - 1)]})
                        calls_before = len(calls)
                    continue
                key = "reasoning_content" if kind == "reasoning" else "content"
                if deltas and list(deltas[-1]) == [key]:
                    deltas[-1][key] += value
                else:
                    deltas.append({key: value})
            entry["lps"] += c.logprobs[seen:]
            if finished:
                entry["finish"] = c.chat_finish_reason()
        out = []
        for index, e in per.items():
            deltas, lps = e["deltas"], e["lps"]
            if lps and not deltas:
                deltas.append({"content": ""})
            for k, delta in enumerate(deltas):
                lp = self._logprobs(lps) if self.req.logprobs and lps and k == 0 else None
                out.append(
                    self.chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}])
                )
            if e["finish"] is not None:
                done = {"index": index, "delta": {}, "logprobs": None, "finish_reason": e["finish"]}
                out.append(self.chunk([done]))
        return out


def _template_message(m: Message, i: int) -> dict:
    """A request message as chat templates read it (text content, tool-call arguments as objects)."""
    out: dict = {"role": "system" if m.role == "developer" else m.role}
    content = m.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"messages.{i}.content: content of type '{part.type}' is not supported (text only)",
                    f"messages.{i}.content",
                )
            texts.append(part.text)
        content = "".join(texts)
    if content is None and m.role != "assistant":
        raise bad_request(f"messages.{i}.content is missing", f"messages.{i}.content")
    out["content"] = content if content is not None else ""
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        out["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            args = call.function.arguments
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    pass  # the template gets the text as given
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": args},
                }
            )
        out["tool_calls"] = calls
    return out

"""`exaone serve` as a library call: find or build the engine, load it with its tokenizer, and run
the HTTP server (uvicorn) in front of the engine loop.

A model directory that is not an engine is built once into the user's cache
($EXAONE_CACHE/engines, else the platform's cache directory for exaone), in a directory named by
the source's manifest hash and the build options; a later start with the same model and options
finds it up to date.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from exaone.core.errors import ExaoneError, OptionError
from exaone.serve import parsers
from exaone.serve.app import ServerState, create_app
from exaone.serve.config import ServeOptions, resolve

log = logging.getLogger("exaone.serve")
DEFAULT_CUDA_GRAPH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def cache_root(opts: ServeOptions) -> Path:
    if opts.cache_dir is not None:
        return Path(opts.cache_dir)
    if os.environ.get("EXAONE_CACHE"):
        return Path(os.environ["EXAONE_CACHE"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("exaone"))


def is_engine_dir(path: Path) -> bool:
    from exaone.core.engine.store import ENGINE_JSON

    return (Path(path) / ENGINE_JSON).is_file()


def engine_for(opts: ServeOptions, say: Callable[[str], None] = print) -> tuple[Path, Path, str | None]:
    """The engine directory to serve (building a model directory into the cache), the directory
    given (or the default model's), and the model's label."""
    from exaone.core.io.manifest import load_or_derive, manifest_hash

    label = None
    if opts.model is None:
        from exaone.core.hub.default_model import DEFAULT_LABEL, ensure_default_model

        src, label = ensure_default_model(say), DEFAULT_LABEL
    else:
        src = Path(opts.model)
        if not src.is_dir():
            raise OptionError("model", str(src), "not a directory (expected a model or engine directory)")
    if is_engine_dir(src):
        _check_engine_options(src, opts)
        return src, src, label or _label(src)
    from exaone.build.builder import BuildOptions, build
    from exaone.core.config import load_config
    from exaone.core.loader import resolve_device

    cfg = load_config(src)
    seq = opts.max_seq_len or cfg.max_position_embeddings
    bopts = BuildOptions(
        max_batch_size=opts.max_batch_size or BuildOptions.max_batch_size,
        max_input_len=opts.max_input_len or seq - 1,
        max_seq_len=seq,
        max_num_tokens=opts.max_num_tokens or BuildOptions.max_num_tokens,
        kv_cache_dtype=opts.kv_cache_dtype or "auto",
        device=resolve_device(opts.device).type,
        dtype=opts.dtype,
    )
    source = manifest_hash(load_or_derive(src))
    key = hashlib.sha256(json.dumps({"source": source, "options": asdict(bopts)}, sort_keys=True).encode())
    out = cache_root(opts) / "engines" / f"{src.name}-{key.hexdigest()[:16]}"
    say(f"building an engine for {src} in {out} (once; later starts reuse it) ...")
    build(src, out, bopts, say=say)
    return out, src, label or _label(src)


def _label(directory: Path) -> str | None:
    from exaone.core.io.manifest import read_manifest

    try:
        m = read_manifest(directory)
    except ExaoneError:
        return None
    return m.model.label if m else None


def _check_engine_options(engine_dir: Path, opts: ServeOptions):
    """Build-time options given for a built engine must match it (they cannot change at load)."""
    from exaone.core.engine.store import read_engine_json

    built = read_engine_json(engine_dir).get("build", {})
    for name in ("max_seq_len", "max_input_len", "kv_cache_dtype"):
        value = getattr(opts, name)
        if value is not None and value != built.get(name):
            raise OptionError(
                name,
                value,
                f"the engine {engine_dir} was built with {built.get(name)}; "
                "rebuild it (exaone build) or serve its model directory",
            )
    if opts.dtype not in ("auto", built.get("dtype")):
        raise OptionError("dtype", opts.dtype, f"the engine {engine_dir} was built for {built.get('dtype')}")


def prepare(opts: ServeOptions, say: Callable[[str], None] = print) -> ServerState:
    """Resolve the options, find or build the engine, load it and its tokenizer: the server state."""
    from exaone.core.engine import RuntimeOptions, load_engine
    from exaone.core.io.tokenizer import load_tokenizer, stop_ids

    opts = resolve(opts)
    for notice in opts.notices:
        say(f"notice: {notice}")
    engine_dir, source, label = engine_for(opts, say)
    sizes = opts.cuda_graph_batch_sizes or DEFAULT_CUDA_GRAPH_SIZES
    if opts.cuda_graph_max_batch_size is not None:
        sizes = [s for s in sizes if s <= opts.cuda_graph_max_batch_size] or [1]
    runtime = RuntimeOptions(
        max_batch_size=opts.max_batch_size,
        max_num_tokens=opts.max_num_tokens,
        kv_cache_free_gpu_memory_fraction=opts.kv_cache_free_gpu_memory_fraction or 0.9,
        max_tokens_in_paged_kv_cache=opts.max_tokens_in_paged_kv_cache,
        max_attention_window_size=opts.max_attention_window_size,
        enable_kv_cache_reuse=bool(opts.enable_kv_cache_reuse),
        cuda_graphs=opts.cuda_graphs is not False,
        cuda_graph_batch_sizes=sorted(set(sizes)),
    )
    say(f"loading the engine {engine_dir} ...")
    start = time.perf_counter()
    engine = load_engine(engine_dir, opts.device, runtime)
    tokenizer = load_tokenizer(opts.tokenizer_dir or engine_dir)
    say(
        f"loaded in {time.perf_counter() - start:.1f} s on {engine.device}: max_batch_size "
        f"{engine.max_batch_size}, max_seq_len {engine.max_seq_len}, max_input_len {engine.max_input_len}"
    )
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    reasoning = _mode(opts.reasoning_parser, parsers.reasoning_default(template))
    tools = _mode(opts.tool_parser, parsers.tools_default(template))
    name = opts.served_model_name or source.name
    aliases = {str(opts.model) if opts.model is not None else "default", source.name}
    return ServerState(
        engine=engine,
        tokenizer=tokenizer,
        model_name=name,
        options=opts,
        stop_ids=frozenset(stop_ids(tokenizer, engine.cfg, engine_dir)),
        aliases=aliases,
        label=label,
        engine_dir=str(engine_dir),
        defaults=_generation_defaults(engine_dir),
        reasoning_tags=parsers.reasoning_tags(template) if reasoning else None,
        tool_calls=tools,
    )


def _mode(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "exaone"


def _generation_defaults(engine_dir: Path) -> dict:
    """Sampling defaults from generation_config.json (temperature, top_p, top_k, max_new_tokens), as
    vLLM reads them; OpenAI's defaults otherwise."""
    path = Path(engine_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    out = {}
    for key, name, kind in (
        ("temperature", "temperature", float),
        ("top_p", "top_p", float),
        ("top_k", "top_k", int),
        ("max_new_tokens", "max_tokens", int),
    ):
        v = raw.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = kind(v)
    if "top_p" in out and not 0 < out["top_p"] <= 1:
        out.pop("top_p")
    return out


def _uvicorn_config(state: ServerState, **extra):
    import uvicorn

    opts = state.options
    return uvicorn.Config(
        create_app(state),
        host=opts.host,
        port=opts.port,
        log_level=opts.log_level,
        access_log=opts.access_log,
        timeout_graceful_shutdown=opts.shutdown_timeout,
        lifespan="on",
        server_header=False,
        **extra,
    )


def serve(state: ServerState, say: Callable[[str], None] = print) -> int:
    """Run the server until SIGINT or SIGTERM; in-flight requests drain (at most --shutdown_timeout
    seconds) and the call returns 0."""
    import uvicorn

    opts = state.options
    server = uvicorn.Server(_uvicorn_config(state))
    key = "required (Authorization: Bearer)" if opts.api_key else "none"
    say(f"serving '{state.model_name}' on http://{opts.host}:{opts.port}/v1 (API key: {key})")
    if state.label:
        say(f"model: {state.label}")
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers that is a
    # no-op, so a drained SIGTERM exits 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        state.loop.stop()
    if not server.started:
        if state.loop.failure:
            raise ExaoneError(f"the engine loop failed to start: {state.loop.failure}")
        raise ExaoneError(f"could not start the server on {opts.host}:{opts.port} (is the port in use?)")
    return 0


class BackgroundServer:
    """The server in a thread on a free port of 127.0.0.1 (tests, notebooks): `with
    BackgroundServer(state) as s: s.url`."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1"):
        import uvicorn

        self.state = state
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        state.options = replace(state.options, host=host, port=self.port)
        self.server = uvicorn.Server(_uvicorn_config(state))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                why = f": {self.state.loop.failure}" if self.state.loop.failure else ""
                raise ExaoneError(f"the background server did not start{why}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0):
        self.server.should_exit = True
        self.thread.join(timeout)
        self.state.loop.stop()
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc):
        self.stop()

"""The engine loop: one thread owns the engine (it is not thread-safe) and runs its steps back to
back while anything is in flight; HTTP handlers talk to it through a command queue.

Handlers put `add` and `abort` commands; the thread applies them between steps, so a request joins
the running batch at the next step (continuous batching across HTTP requests) and an abort frees
its KV blocks at once. Tokens come back through the engine's `on_token` callback: the thread
collects a step's tokens and hands them to the event loop in one `call_soon_threadsafe`, stamped
with the step's time; detokenization and everything HTTP happen on the event loop, off the engine's
critical path. After every step the thread publishes a snapshot (running, waiting, KV blocks) for
/metrics.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from exaone.core.errors import ExaoneError

log = logging.getLogger("exaone.serve")


@dataclass
class Sink:
    """Where one HTTP request's events go: (choice index, kind, payload) tuples, on the event loop.
    kinds: "token" (token id, logprob entry or None), "finish" (reason), "error" (HTTP status, message)."""

    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False
    requests: dict = field(default_factory=dict)  # choice index -> engine Request (engine thread only)


@dataclass
class Add:
    sink: Sink
    index: int
    prompt: list[int]
    params: object  # Sampling
    stop_ids: frozenset[int]
    seed: int
    logprobs: int | None


@dataclass
class Abort:
    sink: Sink
    index: int | None = None  # None: every choice of the sink


class EngineLoop:
    def __init__(self, engine):
        self.engine = engine
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="exaone-engine", daemon=True)
        self.live: dict[int, tuple[Sink, int]] = {}  # engine request id -> (sink, choice index)
        self.events: list[tuple[Sink, tuple]] = []
        self.snapshot: dict = {}
        self.failure: str | None = None  # set if the engine loop itself died
        self.steps = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.cuda_index = None
        if engine.device.type == "cuda":
            import torch

            self.cuda_index = (
                engine.device.index if engine.device.index is not None else torch.cuda.current_device()
            )
        self._publish()

    # -- called from the event loop ----------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, timeout: float = 60.0):
        """Start the thread; raise if it does not come up (the server then refuses to start)."""
        self.loop = loop
        self.thread.start()
        self.ready.wait(timeout)
        if self.failure is not None or not self.ready.is_set():
            raise ExaoneError(f"the engine loop did not start ({self.failure or 'timed out'}; see the log)")

    def submit(self, add: Add):
        self.commands.put(add)

    def abort(self, sink: Sink, index: int | None = None):
        self.commands.put(Abort(sink, index))

    def stop(self, timeout: float = 10.0):
        if self.thread.is_alive():
            self.commands.put(None)
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.failure is None

    # -- the engine thread ---------------------------------------------------------------------------
    def _run(self):
        try:
            if self.cuda_index is not None:  # the current device is per thread
                import torch

                torch.cuda.set_device(self.cuda_index)
            while True:
                busy = self.engine.busy
                self.ready.set()  # the loop runs: start() may return
                commands = self._drain(block=not busy)
                if any(c is None for c in commands):
                    self._shutdown()
                    return
                for c in commands:
                    self._apply(c)
                if self.engine.busy:
                    try:
                        done = self.engine.step()
                    except Exception:  # a bug or a device error: fail what is in flight, keep serving
                        log.exception("engine step failed")
                        self._fail_all(500, "internal engine error (see the server log)")
                        done = []
                    self.steps += 1
                    self._finished(done)
                self._publish()
                self._dispatch()
        except Exception as e:  # never leave handlers waiting on a dead thread
            log.exception("engine loop died")
            self.failure = f"{type(e).__name__}: {e}"
            self.ready.set()
            self._fail_all(500, "the engine loop stopped (see the server log)")
            self._dispatch()

    def _drain(self, block: bool) -> list:
        out = []
        if block:
            self._publish()
            out.append(self.commands.get())
        while True:
            try:
                out.append(self.commands.get_nowait())
            except queue.Empty:
                return out

    def _apply(self, c):
        if isinstance(c, Add):
            if c.sink.closed:
                return
            try:
                r = self.engine.add_request(
                    c.prompt, c.params, c.stop_ids, on_token=self._on_token, seed=c.seed, logprobs=c.logprobs
                )
            except ExaoneError as e:
                self.events.append((c.sink, (c.index, "error", 400, str(e))))
                return
            c.sink.requests[c.index] = r
            self.live[r.id] = (c.sink, c.index)
        elif isinstance(c, Abort):
            indices = list(c.sink.requests) if c.index is None else [c.index]
            for i in indices:
                r = c.sink.requests.pop(i, None)
                if r is None or r.id not in self.live:
                    continue
                # abort() applies the step in flight first; take its finished requests ourselves
                self._finished(self.engine.flush())
                if r.id in self.live:
                    self.engine.abort(r)
                    self.live.pop(r.id, None)

    def _on_token(self, r, token: int):
        entry = self.live.get(r.id)
        if entry is not None:
            lp = r.token_logprobs[-1] if r.logprobs is not None and r.token_logprobs else None
            self.events.append((entry[0], (entry[1], "token", token, lp)))

    def _finished(self, done):
        for r in done:
            entry = self.live.pop(r.id, None)
            if entry is not None:
                entry[0].requests.pop(entry[1], None)
                self.events.append((entry[0], (entry[1], "finish", r.finish_reason)))

    def _fail_all(self, status: int, message: str):
        for rid, (sink, index) in list(self.live.items()):
            self.events.append((sink, (index, "error", status, message)))
            r = sink.requests.pop(index, None)
            try:
                if r is not None:
                    self.engine.abort(r)
            except Exception:
                log.exception("abort after a failed step")
            self.live.pop(rid, None)

    def _shutdown(self):
        self._fail_all(503, "the server is shutting down")
        self._dispatch()

    def _publish(self):
        s = self.engine.scheduler
        groups = self.engine.cache.groups
        self.snapshot = {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "steps": self.steps,
            "kv_used": sum(g.used for g in groups),
            "kv_total": sum(g.num_blocks - 1 for g in groups),
        }

    def _dispatch(self):
        if not self.events or self.loop is None:
            self.events.clear()
            return
        events, self.events = self.events, []
        try:
            self.loop.call_soon_threadsafe(_deliver, events, time.perf_counter())
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _deliver(events: list, stamp: float):
    for sink, event in events:
        if not sink.closed:
            sink.queue.put_nowait((stamp, event))

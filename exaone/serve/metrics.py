"""Prometheus text exposition of what the server does (GET /metrics).

Everything is updated on the event loop thread, so plain counters suffice; the engine's gauges
(running and waiting requests, KV-cache blocks) are a snapshot the engine thread publishes each step.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/version")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self, model: str):
        self.model = model
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (endpoint, status) -> count
        self.finished: dict[str, int] = defaultdict(int)  # finish reason -> choices
        self.cancelled = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.engine: dict = {}  # the engine thread's latest snapshot

    def request(self, path: str, status: int | str):
        self.requests[(path if path in ENDPOINTS else "other", str(status))] += 1

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, doc: str, samples: list[str]):
            lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *samples])

        metric(
            "exaone_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status.",
            [
                f'exaone_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())
            ],
        )
        metric(
            "exaone_request_finished_total",
            "counter",
            "Generated choices, by finish reason.",
            [f'exaone_request_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())],
        )
        metric(
            "exaone_requests_cancelled_total",
            "counter",
            "Requests whose client went away before the end.",
            [f"exaone_requests_cancelled_total {self.cancelled}"],
        )
        metric(
            "exaone_prompt_tokens_total",
            "counter",
            "Prompt tokens of requests admitted.",
            [f"exaone_prompt_tokens_total {self.prompt_tokens}"],
        )
        metric(
            "exaone_generation_tokens_total",
            "counter",
            "Tokens generated.",
            [f"exaone_generation_tokens_total {self.generation_tokens}"],
        )
        metric(
            "exaone_time_to_first_token_seconds",
            "histogram",
            "Request arrival to its first token.",
            self.ttft.lines("exaone_time_to_first_token_seconds"),
        )
        metric(
            "exaone_inter_token_latency_seconds",
            "histogram",
            "Time between a request's tokens.",
            self.itl.lines("exaone_inter_token_latency_seconds"),
        )
        metric(
            "exaone_e2e_request_latency_seconds",
            "histogram",
            "Request arrival to its last token.",
            self.e2e.lines("exaone_e2e_request_latency_seconds"),
        )
        e = self.engine
        metric(
            "exaone_requests_running",
            "gauge",
            "Sequences in the engine's running batch.",
            [f"exaone_requests_running {e.get('running', 0)}"],
        )
        metric(
            "exaone_requests_waiting",
            "gauge",
            "Sequences queued for the running batch.",
            [f"exaone_requests_waiting {e.get('waiting', 0)}"],
        )
        used, total = e.get("kv_used", 0), e.get("kv_total", 0)
        metric(
            "exaone_kv_cache_used_blocks",
            "gauge",
            "KV-cache blocks in use (all layer groups).",
            [f"exaone_kv_cache_used_blocks {used}"],
        )
        metric(
            "exaone_kv_cache_total_blocks",
            "gauge",
            "KV-cache blocks in the pool (all layer groups).",
            [f"exaone_kv_cache_total_blocks {total}"],
        )
        metric(
            "exaone_kv_cache_usage_ratio",
            "gauge",
            "Share of the KV-cache pool in use.",
            [f"exaone_kv_cache_usage_ratio {used / total if total else 0.0}"],
        )
        return "\n".join(lines) + "\n"

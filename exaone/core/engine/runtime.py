"""The engine runtime: the model's own modules over a paged KV cache, batched and scheduled.

The model code is the families' (exaone/core/model); the engine gives its attention layers a
`PagedStep` context (step.py) whose fused kernels store keys and values in the paged cache and
attend over it, so the engine computes what `generate` computes, only scheduled differently.

Scheduling (scheduler.py, on the CPU) is split from execution (here): `step()` makes the next plan
and launches it before it waits for the previous one's tokens, so the GPU never waits for Python;
decode steps replay CUDA graphs (graphs.py), sampling included, and one small device-to-host copy
of token ids per step brings the results back.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from exaone.core import qmath, sampling
from exaone.core.engine.paged import Group, PagedKVCache, bytes_per_block, make_groups
from exaone.core.engine.scheduler import Request, Scheduler
from exaone.core.engine.step import PagedStep, StepPlan, StepTensors
from exaone.core.errors import ExaoneError
from exaone.core.generate import Generation, Sampling
from exaone.core.kernels import ops
from exaone.core.model.layers import CausalLM

MiB = 1 << 20
CPU_DEFAULT_KV_BYTES = 2 << 30  # without --max_tokens_in_paged_kv_cache the CPU pool stops here


@dataclass(frozen=True)
class BuildConfig:
    """What an engine was built for (engine.json's "build")."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    kv_cache_dtype: str  # fp32 | fp16 | bf16 | fp8 | int8 (auto resolved at build time)
    tokens_per_block: int
    dtype: str  # float32 | float16 | bfloat16
    device: str  # cpu | cuda
    tp_size: int = 1


@dataclass
class RuntimeOptions:
    """`exaone run --engine_dir` knobs; None means the engine's built value."""

    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    kv_cache_free_gpu_memory_fraction: float = 0.9
    max_tokens_in_paged_kv_cache: int | None = None
    max_attention_window_size: list[int] | None = None
    enable_kv_cache_reuse: bool = False
    cuda_graphs: bool = True
    cuda_graph_batch_sizes: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    )


class Engine:
    def __init__(
        self,
        model: CausalLM,
        build: BuildConfig,
        options: RuntimeOptions | None = None,
        device: torch.device | str = "cpu",
    ):
        self.model, self.cfg, self.build = model, model.cfg, build
        self.options = options = options or RuntimeOptions()
        self.device = torch.device(device)
        self.dtype = model.model.embed_tokens.weight.dtype
        self.max_seq_len, self.max_input_len = build.max_seq_len, build.max_input_len
        self.max_batch_size = _at_most(options.max_batch_size, build.max_batch_size, "max_batch_size")
        self.max_num_tokens = _at_most(options.max_num_tokens, build.max_num_tokens, "max_num_tokens")
        if not 0 < options.kv_cache_free_gpu_memory_fraction <= 1:
            raise ExaoneError(
                f"--kv_cache_free_gpu_memory_fraction {options.kv_cache_free_gpu_memory_fraction}: "
                "expected a value in (0, 1]"
            )
        self.windows = self._apply_windows(options.max_attention_window_size)
        self.kv_dtype = qmath.KV_CACHE_DTYPES[build.kv_cache_dtype]
        self.cache = self._make_cache()
        self.cos_sin = ops.cos_sin_table(model.inv_freq, self.max_seq_len).to(self.device)
        self.scheduler = Scheduler(self.cache, self.max_batch_size, self.max_num_tokens)
        self.requests: dict[int, Request] = {}
        self._next_id = 0
        # The previous step's sampled tokens stay on the device: the next plan's decodes read them.
        self.last_tokens = torch.zeros(max(self.max_batch_size, self.max_num_tokens), dtype=torch.long,
                                       device=self.device)  # fmt: skip
        self._inflight = None
        self.graphs, self.graphs_off_reason = None, None
        if self.device.type == "cuda" and options.cuda_graphs:
            from exaone.core.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs.capture(self, options.cuda_graph_batch_sizes)

    # -- setup ----------------------------------------------------------------------------------
    def _apply_windows(self, user: list[int] | None) -> list[int | None]:
        """Per-layer attention window: the model's, narrowed by --max_attention_window_size (a list
        repeated over the layers, as TensorRT-LLM reads it); None where the layer sees everything."""
        if user is not None and (not user or any(w < 1 for w in user)):
            raise ExaoneError(f"--max_attention_window_size {user}: expected positive token counts")
        windows = []
        for i, block in enumerate(self.model.model.layers):
            attn = block.self_attn
            w = attn.window if attn.window is not None else math.inf
            if user:
                w = min(w, user[i % len(user)])
            if w < self.max_seq_len:
                attn.window = int(w)  # the model's own masking then applies the narrower window
                windows.append(int(w))
            else:
                windows.append(None)
        return windows

    def _make_cache(self) -> PagedKVCache:
        bs = self.build.tokens_per_block
        groups = make_groups(self.windows, bs)
        chunk = min(self.max_num_tokens, self.max_input_len)
        per_seq = [g.blocks_for(self.max_seq_len, chunk) for g in groups]
        per_block = [bytes_per_block(g, self.cfg, self.kv_dtype) for g in groups]
        one_seq = sum(n * b for n, b in zip(per_seq, per_block, strict=True))
        budget, source = self._kv_budget()
        if budget < one_seq:
            raise ExaoneError(
                f"KV cache: one sequence of max_seq_len {self.max_seq_len} needs {_size(one_seq)}, "
                f"{_size(max(budget, 0))} available ({source}); raise it, build with a smaller "
                "--max_seq_len, or use --kv_cache_dtype fp8"
            )
        units = min(budget / one_seq, self.max_batch_size)  # more than a full batch would never be used
        blocks = [max(n, int(units * n)) for n in per_seq]
        reuse = self.options.enable_kv_cache_reuse
        return PagedKVCache(
            self.cfg, groups, blocks, self.kv_dtype, self.dtype, self.device, self.max_seq_len, reuse
        )

    def _kv_budget(self) -> tuple[float, str]:
        opts = self.options
        per_token = bytes_per_block(Group(None, list(range(self.cfg.num_layers)), 1), self.cfg, self.kv_dtype)
        explicit = None
        if opts.max_tokens_in_paged_kv_cache is not None:
            if opts.max_tokens_in_paged_kv_cache < 1:
                raise ExaoneError("--max_tokens_in_paged_kv_cache: expected at least 1")
            explicit = opts.max_tokens_in_paged_kv_cache * per_token
        if self.device.type != "cuda":
            if explicit is not None:
                return explicit, f"--max_tokens_in_paged_kv_cache {opts.max_tokens_in_paged_kv_cache}"
            return CPU_DEFAULT_KV_BYTES, "the CPU default; set --max_tokens_in_paged_kv_cache"
        activations = self._profile_activations()
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = (free - activations) * opts.kv_cache_free_gpu_memory_fraction
        source = (
            f"{opts.kv_cache_free_gpu_memory_fraction} x ({free / MiB:.0f} MiB free - "
            f"{activations / MiB:.0f} MiB activations), --kv_cache_free_gpu_memory_fraction"
        )
        if explicit is not None and explicit < budget:
            return explicit, f"--max_tokens_in_paged_kv_cache {opts.max_tokens_in_paged_kv_cache}"
        return budget, source

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Peak bytes of the largest forward (a max_num_tokens prefill, or a full decode batch)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = min(self.max_num_tokens, self.max_seq_len)
        ids = torch.zeros((1, n), dtype=torch.long, device=self.device)
        self.model(ids, last_only=True)
        ids = torch.zeros((self.max_batch_size, 1), dtype=torch.long, device=self.device)
        self.model(ids)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        return peak

    # -- execution -----------------------------------------------------------------------------
    def tensors(self, plan: StepPlan) -> StepTensors:
        """A plan's index tensors on the device (for an eager forward)."""
        dev = self.device

        def up(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        tiles = None if plan.decode_only else up(plan.tiles(self.cfg.num_heads // self.cfg.num_kv_heads))
        return StepTensors(
            up(plan.positions), [up(s) for s in plan.slots], [up(t) for t in plan.block_tables],
            up(plan.seq_lens), up(plan.query_start), tiles, up(plan.rows),
        )  # fmt: skip

    def input_ids(self, plan: StepPlan) -> torch.Tensor:
        ids = torch.from_numpy(plan.input_ids).to(self.device, non_blocking=True)
        if (plan.src >= 0).any():
            src = torch.from_numpy(plan.src).to(self.device, non_blocking=True)
            ids = torch.where(src >= 0, self.last_tokens[src.clamp(min=0)], ids)
        return ids

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Logits [R, V] of a plan's sampled rows, run eagerly."""
        t = self.tensors(plan)
        ctx = PagedStep(self.cache, t, self.cos_sin)
        return self.model(self.input_ids(plan), t.positions, ctx, rows=t.rows)

    def sample(self, plan: StepPlan, logits: torch.Tensor) -> torch.Tensor:
        if plan.greedy:
            return ops.argmax(logits)
        dev = self.device
        return sampling.sample(
            logits, *(torch.from_numpy(a).to(dev) for a in (plan.temperature, plan.top_k, plan.top_p,
                                                            plan.seed, plan.step)),
        )  # fmt: skip

    @torch.inference_mode()
    def launch(self, plan: StepPlan):
        """Run a plan on the device without waiting for it; the result is fetched by `collect`."""
        tokens, logprobs = None, None
        want = plan.wants_logprobs
        if self.graphs is not None and plan.decode_only and want < 0:
            tokens = self.graphs.run(plan)
        if tokens is None:
            logits = self.forward(plan)
            tokens = self.sample(plan, logits)
            if want >= 0:  # the chosen tokens' log-probabilities and the top ones (steps that ask: eager)
                lp = torch.log_softmax(logits.float(), -1)
                top = lp.topk(max(want, 1), dim=-1)
                logprobs = (lp.gather(1, tokens[:, None])[:, 0], top.indices, top.values)
        n = tokens.shape[0]
        self.last_tokens[:n].copy_(tokens)
        pinned = self.device.type == "cuda"
        host = torch.empty(n, dtype=torch.long, pin_memory=pinned)
        host.copy_(tokens, non_blocking=True)
        if logprobs is not None:
            logprobs = tuple(t.to("cpu", non_blocking=True) for t in logprobs)
        event = torch.cuda.Event() if pinned else None
        if event is not None:
            event.record()
        return plan, host, logprobs, event

    def collect(self, inflight) -> list[Request]:
        plan, host, logprobs, event = inflight
        if event is not None:
            event.synchronize()
        if logprobs is not None:
            logprobs = tuple(t.tolist() for t in logprobs)
        return self.scheduler.update(plan, host.tolist(), self.requests, logprobs)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: list[int],
        params: Sampling | None = None,
        stop_ids: set[int] | frozenset[int] = frozenset(),
        on_token: Callable[[Request, int], None] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
    ) -> Request:
        """Queue one request (token ids); it joins the running batch at the next step with room.
        `logprobs` n: also record each chosen token's log-probability and the top n (steps that ask
        run eagerly, outside CUDA graphs)."""
        params = params or Sampling()
        params.check()
        self.check_prompts([prompt], params)
        if seed is None:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
        r = Request(self._next_id, list(prompt), params, frozenset(stop_ids), seed, on_token, logprobs)
        self._next_id += 1
        self.requests[r.id] = r
        self.scheduler.add(r)
        return r

    def abort(self, r: Request):
        """Cancel a request (queued or running); its KV blocks are free at once."""
        self.flush()
        self.scheduler.abort(r)
        self.requests.pop(r.id, None)

    def step(self) -> list[Request]:
        """Schedule and launch the next step, then apply the previous one's tokens; the requests that
        finished. Plans run one step ahead of their results, so the GPU never waits for Python."""
        plan = self.scheduler.schedule()
        inflight = self.launch(plan) if plan is not None else None
        done = self.collect(self._inflight) if self._inflight is not None else []
        self._inflight = inflight
        for r in done:
            self.requests.pop(r.id, None)
        return done

    def flush(self) -> list[Request]:
        """Apply the tokens of the step in flight (if any)."""
        done = self.collect(self._inflight) if self._inflight is not None else []
        self._inflight = None
        for r in done:
            self.requests.pop(r.id, None)
        return done

    @property
    def busy(self) -> bool:
        return self.scheduler.busy or self._inflight is not None

    # -- steps outside the scheduler (beam search, tests) ----------------------------------------
    @torch.inference_mode()
    def forward_logits(self, rows: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Feed tokens to admitted sequences (seq id, tokens), one step; the logits [len(rows), V]
        after each sequence's last token."""
        self.flush()
        seqs = [s for s, _ in rows]
        lens = [len(t) for _, t in rows]
        total = sum(lens)
        ids = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in rows])
        positions = np.concatenate([np.arange(self.cache.seqs[s].written, self.cache.seqs[s].written + n)
                                    for s, n in zip(seqs, lens, strict=True)])  # fmt: skip
        slots = [np.zeros(total, dtype=np.int64) for _ in self.cache.groups]
        at = 0
        for s, n in zip(seqs, lens, strict=True):
            for g, sl in enumerate(self.cache.allocate(s, n)):
                slots[g][at : at + n] = sl
            at += n
        query_start = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
        num_decode = len(seqs) if all(n == 1 for n in lens) else 0
        plan = StepPlan(
            seqs, num_decode, ids,
            np.full(total, -1, dtype=np.int64), positions, slots, self.cache.tables(seqs),
            np.array([self.cache.seqs[s].written for s in seqs], dtype=np.int32), query_start,
            (query_start[1:] - 1).astype(np.int64), seqs,
        )  # fmt: skip
        self.cache.end_step()
        return self.forward(plan)

    # -- public API -----------------------------------------------------------------------------
    def check_prompts(self, prompts: list[list[int]], params: Sampling):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ExaoneError("every prompt must have at least one token")
        for i, p in enumerate(prompts):
            if len(p) > self.max_input_len:
                raise ExaoneError(
                    f"prompt {i} has {len(p)} tokens, more than the engine's max_input_len "
                    f"{self.max_input_len} (rebuild with a larger --max_input_len)"
                )
            if len(p) + params.max_new_tokens > self.max_seq_len:
                raise ExaoneError(
                    f"prompt {i} of {len(p)} tokens + --max_output_len {params.max_new_tokens} exceeds the "
                    f"engine's max_seq_len {self.max_seq_len} (rebuild with a larger --max_seq_len)"
                )

    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling | None = None,
        stop_ids: set[int] | frozenset[int] = frozenset(),
        on_token: Callable[[int, int], None] | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
    ) -> list[Generation]:
        """Generate for every prompt (token ids), in order; `on_token(index, token)` streams. With
        `sampling.seed` S, prompt i draws from seed S + i: its output does not depend on its batch."""
        params = sampling or Sampling()
        params.check()
        self.check_prompts(prompts, params)
        if num_beams < 1:
            raise ExaoneError(f"--num_beams {num_beams}: expected at least 1")
        if num_beams > 1:
            from exaone.core.engine.beam import beam_search

            return [beam_search(self, p, params, stop_ids, num_beams, length_penalty) for p in prompts]
        base = params.seed if params.seed is not None else random.getrandbits(62)
        index: dict[int, int] = {}

        def stream(r: Request, token: int):
            on_token(index[r.id], token)

        reqs = []
        for i, p in enumerate(prompts):
            r = self.add_request(p, params, stop_ids, stream if on_token else None, seed=base + i)
            index[r.id] = i
            reqs.append(r)
        while self.busy:
            self.step()
        return [r.generation() for r in reqs]

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Logits [B, T, V] (float32) of whole sequences (token ids [T], [B, T] list or tensor)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[1] > self.max_seq_len:
            raise ExaoneError(f"{ids.shape[1]} tokens exceed the engine's max_seq_len {self.max_seq_len}")
        return self.model(ids.to(self.device)).float()

    def kv_stats(self) -> dict:
        """Per layer: pool bytes and window; per group: blocks and the most in use at once."""
        groups = [
            {
                "window": g.window,
                "layers": len(g.layers),
                "blocks": g.num_blocks - 1,
                "peak_used": g.peak_used,
            }
            for g in self.cache.groups
        ]
        layers = [{"window": w, "bytes": self.cache.layer_nbytes(i)} for i, w in enumerate(self.windows)]
        return {
            "reused_prompt_tokens": self.cache.prefix.reused_tokens if self.cache.prefix else None,
            "block_size": self.build.tokens_per_block,
            "kv_cache_dtype": self.build.kv_cache_dtype,
            "layers": layers,
            "groups": groups,
        }


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _at_most(value: int | None, built: int, name: str) -> int:
    if value is None:
        return built
    if value < 1:
        raise ExaoneError(f"--{name} {value}: expected at least 1")
    if value > built:
        raise ExaoneError(
            f"--{name} {value}: the engine was built for at most {built} (rebuild with a larger --{name})"
        )
    return value

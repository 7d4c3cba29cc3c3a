"""The engine runtime: the model's own modules over a paged KV cache, batched and scheduled.

Attention, RoPE and masking are the model code's (exaone/core/layers.py): the paged cache plugs
into Attention through the same `update(layer, k, v, positions)` interface as the reference
KVCache, so the engine computes what `generate` computes, only scheduled differently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from exaone.core import qmath
from exaone.core.engine.paged import Group, PagedKVCache, StepView, bytes_per_block, make_groups
from exaone.core.errors import ExaoneError
from exaone.core.generate import Generation, Sampling
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
    cuda_graph_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])


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
        per_seq = [g.blocks_for(self.max_seq_len) for g in groups]
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
        return PagedKVCache(self.cfg, groups, blocks, self.kv_dtype, self.dtype, self.device, reuse)

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

    # -- forward passes -------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, plans, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ids, pos = ids.to(self.device), pos.to(self.device)
        return self.model(ids, pos, StepView(self.cache, plans), last_only=True)[:, -1]

    def prefill(self, rows: list[tuple[int, int]], ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after feeding left-padded chunks ids/pos [B, T] of sequences (id, length)."""
        return self._forward(self.cache.plan(rows, ids.shape[1]), ids, pos)

    def decode(self, seq_ids: list[int], ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for one new token per sequence; through a CUDA graph where one is captured."""
        rows = [(i, 1) for i in seq_ids]
        key = None
        if self.graphs is not None:
            key = self.graphs.pick(len(rows), max(self.cache.seqs[i].written for i in seq_ids))
        if key is not None:
            plans = self.cache.plan(rows, 1, self.graphs.widths(key[1]))
            return self.graphs.run(plans, key, ids, pos)
        return self._forward(self.cache.plan(rows, 1), ids, pos)

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
        """Generate for every prompt (token ids), in order; `on_token(index, token)` streams."""
        params = sampling or Sampling()
        params.check()
        self.check_prompts(prompts, params)
        if num_beams < 1:
            raise ExaoneError(f"--num_beams {num_beams}: expected at least 1")
        if num_beams > 1:
            from exaone.core.engine.beam import beam_search

            return [beam_search(self, p, params, stop_ids, num_beams, length_penalty) for p in prompts]
        from exaone.core.engine.scheduler import run_batching

        return run_batching(self, prompts, params, stop_ids, on_token)

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

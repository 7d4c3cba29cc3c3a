"""Per-token perplexity as TensorRT-LLM's `tools/ppl.py` defines it: exp(mean NLL of the targets)."""

from __future__ import annotations

import math

import torch


def token_nll(logits: torch.Tensor, targets: list[int] | torch.Tensor) -> torch.Tensor:
    """-log p(target_t) under logits[t] ([T, V] -> [T]), in float32."""
    targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
    logp = logits.float().log_softmax(-1)
    return -logp.gather(-1, targets[:, None])[:, 0]


def perplexity(nll: torch.Tensor | list[float]) -> float:
    values = nll.tolist() if isinstance(nll, torch.Tensor) else list(nll)
    return math.exp(sum(values) / len(values)) if values else float("nan")


def sequence_nll(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """NLL of ids[1:] given their prefixes: summarize.py's eval_ppl over prompt + generated tokens."""
    return token_nll(logits[:-1], ids[1:])


def context_nll(logits: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, int]:
    """eval_context_ppl: the context's own next tokens plus the first generated (greedy) token.

    summarize.py runs this task with output_len 1 and scores output_ids[1 : ctx_len + 1] under the
    context logits, i.e. every context token after the first and then the token the engine picked
    (its default top_k=1: the argmax). Returns ([T] NLL, the appended token).
    """
    picked = int(logits[-1].argmax())
    return token_nll(logits, [*ids[1:], picked]), picked

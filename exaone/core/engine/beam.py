"""Beam search over the paged cache, with Hugging Face's semantics (transformers `_beam_search`).

Per step: the best 2 x num_beams (more with several EOS ids) continuations of all beams by summed
log-probability; those ending in an EOS id (or reaching max_output_len) among the first num_beams
become finished hypotheses scored sum / generated_length ** length_penalty; the best num_beams
others keep running. The search stops when every candidate is finished or no running beam can
beat the worst kept hypothesis (early_stopping=False's heuristic). Beams are cache sequences run
in lockstep; reordering copies the parents' blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from exaone.core.errors import ExaoneError
from exaone.core.generate import Generation, Sampling

NEG = -1.0e9


@dataclass
class BeamGeneration(Generation):
    beams: list[list[int]] = field(default_factory=list)  # every kept hypothesis, best first
    beam_scores: list[float] = field(default_factory=list)


@torch.inference_mode()
def beam_search(
    engine,
    prompt: list[int],
    params: Sampling,
    stop_ids: set[int] | frozenset[int],
    num_beams: int,
    length_penalty: float = 1.0,
) -> BeamGeneration:
    if not params.greedy:
        raise ExaoneError("--num_beams > 1 is beam search: it takes no --temperature/--top_k sampling")
    cache, nb = engine.cache, num_beams
    if nb > engine.max_batch_size:
        raise ExaoneError(f"--num_beams {nb}: more than the engine's max_batch_size {engine.max_batch_size}")
    length = len(prompt) + params.max_new_tokens
    chunk = min(len(prompt), max(1, engine.max_num_tokens // nb))
    seqs = [-1 - i for i in range(nb)]  # cache ids of their own: never those of the scheduler's requests
    for i, s in enumerate(seqs):
        if not cache.can_admit(length, chunk):
            for done in seqs[:i]:
                cache.release(done)
            raise ExaoneError(
                f"--num_beams {nb}: the KV cache holds only {i} sequences of {length} tokens "
                "(raise the KV cache size or lower --num_beams)"
            )
        cache.admit(s, length, chunk=chunk)
    try:
        return _search(engine, seqs, prompt, params, stop_ids, length_penalty)
    finally:
        for s in seqs:
            cache.release(s)


def _search(engine, seqs, prompt, params, stop_ids, length_penalty) -> BeamGeneration:
    nb, dev = len(seqs), engine.device
    start = time.perf_counter()
    fed, chunk = 0, max(1, engine.max_num_tokens // nb)
    while fed < len(prompt):  # every beam starts from the same prompt
        n = min(chunk, len(prompt) - fed)
        logits = engine.forward_logits([(s, prompt[fed : fed + n]) for s in seqs])
        fed += n
    ttft = time.perf_counter() - start
    eos = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
    keep = max(2, 1 + len(stop_ids)) * nb
    top_mask = torch.arange(keep, device=dev) < nb
    running_scores = torch.full((nb,), NEG, device=dev)
    running_scores[0] = 0.0
    running: list[list[int]] = [[] for _ in range(nb)]
    fin_scores = torch.full((nb,), NEG, device=dev)
    fin_seqs: list[list[int]] = [[] for _ in range(nb)]
    fin_done = torch.zeros(nb, dtype=torch.bool, device=dev)
    improvable = True
    for step in range(params.max_new_tokens):
        logp = torch.log_softmax(logits.float(), -1) + running_scores[:, None]
        vocab = logp.shape[-1]
        top_lp, top_idx = logp.reshape(-1).topk(keep)
        parents, tokens = top_idx // vocab, top_idx % vocab
        generated = step + 1
        hits = torch.isin(tokens, eos) | (generated == params.max_new_tokens)
        # beams that keep running
        run_lp = top_lp + hits.float() * NEG
        nxt = run_lp.topk(nb).indices
        # finished hypotheses: merge the new ones (first num_beams candidates only) with the kept ones
        cand = top_lp / generated**length_penalty
        if not improvable:
            cand = cand + NEG
        just_done = hits & top_mask
        cand = cand + (~just_done).float() * NEG
        p_list, t_list = parents.tolist(), tokens.tolist()
        merged_seqs = fin_seqs + [running[p] + [t] for p, t in zip(p_list, t_list, strict=True)]
        merged_scores = torch.cat((fin_scores, cand))
        merged_done = torch.cat((fin_done, just_done))
        sel = merged_scores.topk(nb).indices
        fin_scores, fin_done = merged_scores[sel], merged_done[sel]
        fin_seqs = [merged_seqs[i] for i in sel.tolist()]
        new_parents = [p_list[i] for i in nxt.tolist()]
        new_tokens = [t_list[i] for i in nxt.tolist()]
        running = [running[p] + [t] for p, t in zip(new_parents, new_tokens, strict=True)]
        running_scores = run_lp[nxt]
        best_possible = running_scores[0] / generated**length_penalty
        worst = torch.where(fin_done, fin_scores.min(), torch.tensor(NEG, device=dev))
        improvable = improvable and bool((best_possible > worst).any())
        if not improvable or bool(hits.all()):
            break
        engine.cache.reorder(seqs, new_parents)
        logits = engine.forward_logits([(s, [t]) for s, t in zip(seqs, new_tokens, strict=True)])
    total = time.perf_counter() - start
    beams = []
    for seq in fin_seqs:
        stopped = bool(seq) and seq[-1] in stop_ids
        beams.append((seq[:-1] if stopped else seq, stopped))
    best, stopped = beams[0]
    return BeamGeneration(
        list(prompt),
        best,
        "stop" if stopped else "length",
        ttft,
        total,
        beams=[b for b, _ in beams],
        beam_scores=fin_scores.tolist(),
    )

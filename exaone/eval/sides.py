"""The two things summarize compares, behind one small interface.

A side turns token-id prompts into generated token ids and gives teacher-forced logits for
perplexity. `ours` is exaone's runtime (a model directory through load_model + generate, or an
engine directory through the engine); `hf` is transformers' own class for the same checkpoint.
Both receive exactly the same token ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from exaone.core.errors import ExaoneError, OptionError
from exaone.core.generate import Sampling


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 1  # summarize.py's default: top_k 1 is greedy
    top_p: float = 0.0  # 0 = off, as in summarize.py
    seed: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: int = 1  # summarize.py: 1 early stopping, 0 none, other values "never"

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def greedy(self) -> bool:
        return self.sampling.greedy


@dataclass
class Side:
    name: str  # "exaone" | "hf"
    model_dir: str
    kind: str  # "model" | "engine" | transformers class name
    family: str
    device: str
    dtype: str
    stops: set[int]
    pad_id: int
    load_s: float

    def generate(self, prompts: list[list[int]], params: GenParams) -> list[list[int]]:
        raise NotImplementedError

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits [T, V] of one whole sequence."""
        raise NotImplementedError

    def close(self):
        pass


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    """Generated ids up to (not including) the first stop id."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


class OurModel(Side):
    """A model directory (HF, quantized or TRT-LLM checkpoint) through load_model + generate."""

    def __init__(self, model_dir, tokenizer_dir, device: str, dtype: str):
        from exaone.core import runner

        loaded = runner.load(model_dir, tokenizer_dir, device, dtype)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        cfg = self.model.cfg
        super().__init__(
            "exaone", str(model_dir), "model", cfg.family, str(loaded.device), loaded.dtype, loaded.stops,
            loaded.pad_id, loaded.load_s,
        )  # fmt: skip

    def generate(self, prompts, params):
        from exaone.core.generate import generate

        if params.num_beams > 1:
            raise OptionError(
                "num_beams",
                params.num_beams,
                "not supported for a model directory (exaone's reference runtime decodes greedily or by "
                "sampling); evaluate an engine (engine_dir), or the Hugging Face reference alone (test_hf)",
                "{option} > 1: {problem}",
            )
        gens = generate(self.model, prompts, params.sampling, self.stops, self.pad_id)
        return [g.output_ids for g in gens]

    @torch.inference_mode()
    def logits(self, ids):
        device = self.model.lm_head.weight.device
        return self.model(torch.tensor([ids], device=device))[0].float()

    def close(self):
        del self.model


class OurEngine(Side):
    """An engine directory (`exaone build`) through exaone.core.engine.load_engine."""

    def __init__(self, engine_dir, tokenizer, stops, pad_id, device: str):
        from exaone.core.engine import load_engine

        start = time.perf_counter()
        self.engine = load_engine(engine_dir, device=device)
        cfg = self.engine.cfg
        dtype = str(getattr(self.engine, "dtype", "")).removeprefix("torch.")
        super().__init__(
            "exaone", str(engine_dir), "engine", cfg.family, str(self.engine.device), dtype, stops, pad_id,
            time.perf_counter() - start,
        )  # fmt: skip
        self.tokenizer = tokenizer

    def generate(self, prompts, params):
        gens = self.engine.generate(
            prompts,
            params.sampling,
            self.stops,
            num_beams=params.num_beams,
            length_penalty=params.length_penalty,
        )
        return [_cut(list(g.output_ids), self.stops) for g in gens]

    def logits(self, ids):
        return self.engine.logits([ids])[0].float()

    def close(self):
        del self.engine


class HFReference(Side):
    """transformers' class for the checkpoint (Llama for EXAONE-3.x), same tokens in."""

    def __init__(self, model_dir, stops, pad_id, device: str, dtype: str):
        from exaone.core.config import load_config
        from exaone.core.loader import resolve_device, resolve_dtype
        from exaone.core.reference import load_reference

        start = time.perf_counter()
        dev = resolve_device(device)
        cfg = load_config(model_dir)
        torch_dtype = resolve_dtype(dtype, cfg, dev)
        self.model = load_reference(model_dir, torch_dtype, dev)
        self.device_ = dev
        super().__init__(
            "hf", str(model_dir), type(self.model).__name__, cfg.family, str(dev),
            str(torch_dtype).removeprefix("torch."), stops, pad_id, time.perf_counter() - start,
        )  # fmt: skip

    @torch.inference_mode()
    def generate(self, prompts, params):
        from transformers import GenerationConfig

        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding, as summarize.py does for HF
            ids[row, longest - len(p) :] = torch.tensor(p)
            mask[row, longest - len(p) :] = 1
        settings = dict(
            max_new_tokens=params.max_new_tokens,
            eos_token_id=sorted(self.stops) or None,
            pad_token_id=self.pad_id,
        )
        if params.num_beams > 1:
            early = bool(params.early_stopping) if params.early_stopping in (0, 1) else "never"
            settings.update(
                num_beams=params.num_beams, do_sample=False, early_stopping=early,
                length_penalty=params.length_penalty,
            )  # fmt: skip
        elif params.greedy:
            settings.update(do_sample=False)
        else:
            settings.update(
                do_sample=True, temperature=params.temperature, top_k=params.top_k or None,
                top_p=params.top_p if 0 < params.top_p < 1 else 1.0,
            )  # fmt: skip
            torch.manual_seed(params.seed)
        out = self.model.generate(
            ids.to(self.device_),
            attention_mask=mask.to(self.device_),
            generation_config=GenerationConfig(**settings),
        )
        return [_cut(row[longest:].tolist(), self.stops) for row in out]

    @torch.inference_mode()
    def logits(self, ids):
        return self.model(torch.tensor([ids], device=self.device_)).logits[0].float()

    def close(self):
        del self.model


def open_ours(
    model_dir: Path | None, engine_dir: Path | None, tokenizer_dir: Path | None, device: str, dtype: str
) -> tuple[Side, object]:
    """Our side and its tokenizer."""
    if engine_dir is not None:
        from exaone.core.io.tokenizer import load_tokenizer

        tok_dir = tokenizer_dir or model_dir or engine_dir
        tokenizer = load_tokenizer(tok_dir)
        stops, pad_id = stop_and_pad(tokenizer, model_dir or engine_dir)
        side = OurEngine(engine_dir, tokenizer, stops, pad_id, device)
        return side, tokenizer
    side = OurModel(model_dir, tokenizer_dir, device, dtype)
    return side, side.tokenizer


def stop_and_pad(tokenizer, directory: Path) -> tuple[set[int], int]:
    """Stop and pad ids from a directory's config.json when it has a readable one, else the tokenizer."""
    from exaone.core.config import load_config
    from exaone.core.io.tokenizer import stop_ids

    try:
        cfg = load_config(directory)
    except ExaoneError:
        cfg = None
    stops = stop_ids(tokenizer, cfg, directory) if cfg is not None else {tokenizer.eos_token_id} - {None}
    pad = cfg.pad_token_id if cfg is not None and cfg.pad_token_id is not None else tokenizer.pad_token_id
    return set(stops), pad if pad is not None else 0

"""The checkpoint's own tokenizer and chat template, through transformers, never from the network."""

from __future__ import annotations

import os
from pathlib import Path

from exaone.core.config import ModelConfig
from exaone.core.errors import ExaoneError, OptionError, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ExaoneError(f"{path}: no tokenizer files (expected tokenizer.json or tokenizer_config.json)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.utils import logging

    logging.set_verbosity_error()  # its advice about tokenizer options is noise for our users

    try:
        # An empty config: transformers cannot parse EXAONE-3's config.json (remote code only), and the
        # tokenizer class comes from tokenizer_config.json anyway.
        return AutoTokenizer.from_pretrained(
            str(path), config=PretrainedConfig(), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExaoneError(f"{path}: cannot load the tokenizer ({first})") from None


def encode(tokenizer, text: str, chat: bool = False, enable_thinking: bool | None = None) -> list[int]:
    """Token ids of a prompt, rendered with the tokenizer's own chat template when `chat`."""
    if not chat:
        return tokenizer(text)["input_ids"]
    if not tokenizer.chat_template:
        raise OptionError("chat", chat, "this tokenizer has no chat template", "{option}: {problem}")
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, **extra
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer, cfg: ModelConfig, model_dir: str | Path | None) -> set[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer: generation stops at any."""
    ids = set(cfg.eos_token_ids)
    gen = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen is not None and gen.is_file():
        eos = read_json(gen).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids

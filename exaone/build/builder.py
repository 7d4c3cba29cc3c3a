"""`exaone build`: a checkpoint directory -> an engine directory the runtime loads without re-layout.

Unquantized weights are stored fused (one q/k/v projection, one gate/up projection per layer) in
the compute dtype; quantized linears are packed once for exaone/core/kernels (PackedLinear). A
format or shape without a packed kernel keeps the quantized checkpoint as exported, run through the
reference QuantLinear math. The target (CPU, or GPU name and compute capability)
and library versions are recorded, so `run` can refuse an engine made for something else.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from exaone.build.packing import pack_model
from exaone.core import qmath
from exaone.core.engine.layout import fuse
from exaone.core.engine.runtime import BuildConfig
from exaone.core.engine.store import (
    CHECKPOINT_DIR,
    ENGINE_JSON,
    FORMAT,
    WEIGHTS,
    current_target,
    current_versions,
)
from exaone.core.errors import ExaoneError, OptionError
from exaone.core.formats.linear import linear_kinds
from exaone.core.io.checkpoint import SIDE_FILES
from exaone.core.io.manifest import (
    Manifest,
    ParallelMapping,
    atomic_output_dir,
    derive_manifest,
    is_up_to_date,
    list_files,
    make_producer,
    manifest_hash,
    now,
    read_manifest,
    write_manifest,
)
from exaone.core.loader import load_model, open_checkpoint, resolve_device, resolve_dtype
from exaone.core.trtllm.names import is_trtllm_checkpoint

# auto: the compute dtype (fp32 only that way: a float32 CPU engine).
KV_CACHE_DTYPES = ("auto", *(k for k in qmath.KV_CACHE_DTYPES if k != "fp32"))
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class BuildOptions:
    max_batch_size: int = 256
    max_input_len: int = 1024
    max_seq_len: int | None = None  # None: the model's max_position_embeddings
    max_num_tokens: int = 8192
    kv_cache_dtype: str = "auto"
    tokens_per_block: int = 32
    tp_size: int | None = None  # None: the checkpoint's
    device: str = "auto"
    dtype: str = "auto"


def _check(opts: BuildOptions):
    for name in ("max_batch_size", "max_input_len", "max_num_tokens", "tokens_per_block"):
        if getattr(opts, name) < 1:
            raise ExaoneError(f"--{name} {getattr(opts, name)}: expected at least 1")
    if opts.max_seq_len is not None and opts.max_seq_len < 2:
        raise OptionError("max_seq_len", opts.max_seq_len, "expected at least 2")
    if opts.kv_cache_dtype not in KV_CACHE_DTYPES:
        allowed = ", ".join(KV_CACHE_DTYPES)
        raise OptionError("kv_cache_dtype", opts.kv_cache_dtype, f"expected one of {allowed}")


def _source(src: Path) -> tuple[Manifest, str | None, int]:
    """The parent manifest, its hash, and the checkpoint's tp size."""
    if not src.is_dir():
        raise ExaoneError(f"{src}: not a directory (expected a checkpoint directory)")
    m = read_manifest(src)
    tp = 1
    if is_trtllm_checkpoint(src):
        tp = int(json.loads((src / "config.json").read_text()).get("mapping", {}).get("tp_size", 1))
        if m is None:
            raise ExaoneError(
                f"{src}: a TensorRT-LLM checkpoint without exaone-manifest.json: convert it again"
            )
        return m, manifest_hash(m), tp
    if m is None:
        m = derive_manifest(src)  # sizes, not hashes: a changed shard changes the fingerprint
    if m.mapping.tp_size:
        tp = m.mapping.tp_size
    return m, manifest_hash(m), tp


def build(
    checkpoint: str | Path,
    output_dir: str | Path,
    opts: BuildOptions | None = None,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Build (or find up to date) the engine for `checkpoint` in `output_dir`; return output_dir."""
    opts = opts or BuildOptions()
    _check(opts)
    src, out = Path(checkpoint), Path(output_dir)
    parent, parent_hash, ckpt_tp = _source(src)
    tp = opts.tp_size if opts.tp_size is not None else ckpt_tp
    if tp != 1 or ckpt_tp != 1:
        raise OptionError(
            "tp_size",
            tp,
            "engines are single-GPU for now",
            "{option} {value}: not supported: {problem} (convert with {option} 1)",
        )
    device = resolve_device(opts.device)
    started = now()
    arguments = {
        "checkpoint": str(src.resolve()),
        **asdict(opts),
        "target": current_target(device),
        "versions": current_versions(),
    }
    if not force and is_up_to_date(out, parent_hash, arguments):
        say(f"{out}: up to date (built from the same checkpoint with the same options); --force rebuilds")
        return out
    try:
        old = read_manifest(out) if out.is_dir() else None
    except ExaoneError:
        old = None
    if not force and old is not None and old.kind == "engine":
        force = True  # our own stale engine: replace it (anything else still needs --force)
    say(f"loading {src}")
    ck = open_checkpoint(src)
    cfg = ck.cfg
    dtype = resolve_dtype(opts.dtype, cfg, device)
    max_seq_len = opts.max_seq_len or cfg.max_position_embeddings
    if max_seq_len > cfg.max_position_embeddings:
        raise OptionError(
            "max_seq_len",
            max_seq_len,
            f"more than the model's max_position_embeddings ({cfg.max_position_embeddings})",
        )
    if opts.max_input_len >= max_seq_len:
        raise OptionError(
            "max_input_len",
            opts.max_input_len,
            f"must be below max_seq_len {max_seq_len} (room for at least one output token)",
        )
    kv = opts.kv_cache_dtype if opts.kv_cache_dtype != "auto" else SHORT[dtype]
    model = load_model(ck, dtype, "cpu")
    build_cfg = BuildConfig(
        max_batch_size=opts.max_batch_size,
        max_input_len=opts.max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=opts.max_num_tokens,
        kv_cache_dtype=kv,
        tokens_per_block=opts.tokens_per_block,
        dtype=str(dtype).removeprefix("torch."),
        device=device.type,
        tp_size=1,
    )
    kinds = linear_kinds(model)
    packed = None
    if kinds - {"Linear"}:
        packed = pack_model(model, dtype)  # None: a format without a packed kernel
        kinds = linear_kinds(model)
    quantized = packed is None and bool(kinds - {"Linear"})
    with atomic_output_dir(out, force) as tmp:
        if ck.is_trtllm:  # the Hugging Face config.json the reader rebuilt
            (tmp / "config.json").write_text(json.dumps(ck.hf_config, indent=2) + "\n")
        else:
            shutil.copy(src / "config.json", tmp / "config.json")
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
        if quantized:
            say("quantized linears: keeping the Model Optimizer tensors (reference math)")
            skip = shutil.ignore_patterns(".*", "exaone-manifest.json")
            shutil.copytree(src, tmp / CHECKPOINT_DIR, ignore=skip)
        else:
            what = f"packed {', '.join(sorted(set(packed.values())))} and " if packed else ""
            say(f"writing {what}fused {build_cfg.dtype} weights")
            fuse(model)
            state = model.state_dict()
            if cfg.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_file({n: t.contiguous() for n, t in state.items()}, str(tmp / WEIGHTS))
        info = {
            "format": FORMAT,
            "build": asdict(build_cfg),
            "weights": "checkpoint" if quantized else "runtime",
            "packed": packed or {},
            "linear_kinds": sorted(kinds),
            "target": current_target(device),
            "versions": current_versions(),
        }
        (tmp / ENGINE_JSON).write_text(json.dumps(info, indent=2) + "\n")
        manifest = Manifest(
            kind="engine",
            model=parent.model,
            dtype=build_cfg.dtype,
            quantization=parent.quantization,
            mapping=ParallelMapping(world_size=1, tp_size=1, pp_size=1),
            files=list_files(tmp),
            parent=parent_hash,
            producer=make_producer(arguments, started),
            extra={"engine": info},
        )
        write_manifest(tmp, manifest)
    say(f"engine written to {out}")
    return out

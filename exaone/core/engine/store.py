"""The engine directory on disk (what `exaone build` writes), the checks made before using one, and
`load_engine`, which reads one into an Engine.

ENGINE_DIR/
  exaone-manifest.json   kind "engine"; build config, target and versions also under extra.engine
  engine.json            build config, target (cpu, or GPU name + compute capability), versions
  config.json            the checkpoint's config (+ generation_config.json, tokenizer files)
  rank0.safetensors      weights in the runtime layout (fused qkv_proj / gate_up_proj, quantized
                         linears packed for exaone/core/kernels), or
  checkpoint/            a quantized checkpoint kept as exported (no packed kernel for it)
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from exaone import __version__
from exaone.core import model as models
from exaone.core.config import load_config
from exaone.core.engine.layout import fuse
from exaone.core.engine.runtime import BuildConfig, Engine, RuntimeOptions
from exaone.core.errors import ExaoneError, read_json
from exaone.core.formats.linear import PackedLinear
from exaone.core.loader import assign, load_model
from exaone.core.model.layers import CausalLM

ENGINE_JSON = "engine.json"
WEIGHTS = "rank0.safetensors"
CHECKPOINT_DIR = "checkpoint"
FORMAT = 1


def current_target(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu"}
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    return {"device": "cuda", "gpu": name, "compute_capability": f"{major}.{minor}"}


def current_versions() -> dict:
    return {"torch": torch.__version__, "exaone": __version__}


def read_engine_json(engine_dir: Path) -> dict:
    path = engine_dir / ENGINE_JSON
    if not engine_dir.is_dir():
        raise ExaoneError(f"--engine_dir {engine_dir}: not a directory")
    if not path.is_file():
        raise ExaoneError(f"{path}: missing (not an engine directory; make one with `exaone build`)")
    info = read_json(path)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise ExaoneError(f"{path}: engine format {found!r} is not {FORMAT}: rebuild it with `exaone build`")
    return info


def check_compatible(engine_dir: Path, info: dict, device: torch.device):
    """Refuse an engine built by another torch/exaone or for another device or GPU architecture."""
    built, here = info.get("versions", {}), current_versions()
    for lib in ("torch", "exaone"):
        if built.get(lib) != here[lib]:
            raise ExaoneError(
                f"{engine_dir}: engine built with {lib} {built.get(lib)}, this is {lib} {here[lib]}: "
                "rebuild it with `exaone build`"
            )
    target = info.get("target", {})
    if target.get("device") != device.type:
        want = "a CUDA GPU" if target.get("device") == "cuda" else "the CPU"
        raise ExaoneError(
            f"{engine_dir}: engine built for {want}, asked to run on {device.type}: "
            f"rebuild it with `exaone build --device {device.type}`"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ExaoneError(
                f"{engine_dir}: engine built for {target.get('gpu')} (compute capability "
                f"{target.get('compute_capability')}) but no CUDA device is available here: "
                "rebuild it with `exaone build --device cpu`"
            )
        now = current_target(device)
        if now["compute_capability"] != target.get("compute_capability"):
            raise ExaoneError(
                f"{engine_dir}: engine built for {target.get('gpu')} (compute capability "
                f"{target.get('compute_capability')}), this GPU is {now['gpu']} "
                f"({now['compute_capability']}): rebuild it on this GPU with `exaone build`"
            )


def load_engine(
    engine_dir: str | Path, device: str = "auto", options: RuntimeOptions | None = None
) -> Engine:
    """Load an engine directory on `device` (auto: where it was built for)."""
    engine_dir = Path(engine_dir)
    info = read_engine_json(engine_dir)
    built = info.get("build", {})
    build = BuildConfig(**{f.name: built[f.name] for f in fields(BuildConfig) if f.name in built})
    dev = torch.device(build.device if device == "auto" else device)
    check_compatible(engine_dir, info, dev)
    if info.get("weights") == "checkpoint":
        model = load_model(engine_dir / CHECKPOINT_DIR, build.dtype, dev)
    else:
        model = _load_runtime_weights(engine_dir, dev, info.get("packed") or {})
    return Engine(model, build, options, dev)


def _load_runtime_weights(engine_dir: Path, device: torch.device, packed: dict[str, str]) -> CausalLM:
    cfg = load_config(engine_dir)
    with torch.device("meta"):
        model = models.build(cfg)
    path = engine_dir / WEIGHTS
    if not path.is_file():
        raise ExaoneError(f"{path}: missing (the engine directory is incomplete: rebuild it)")
    state = load_file(str(path), device=str(device))
    fuse(model, keep=set(packed))  # the runtime layout; packed projections that stay apart stay apart
    for name, fmt in packed.items():
        tensors = {k.removeprefix(name + "."): t for k, t in state.items() if k.startswith(name + ".")}
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, PackedLinear(fmt, tensors))
    return assign(model, state, {}, str(path), device, hint="rebuild the engine")

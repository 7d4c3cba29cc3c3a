"""The engine directory on disk: engine.json, the weights, and the checks `run` makes before using it.

ENGINE_DIR/
  exaone-manifest.json   kind "engine"; build config, target and versions also under extra.engine
  engine.json            build config, target (cpu, or GPU name + compute capability), versions
  config.json            the checkpoint's config (+ generation_config.json, tokenizer files)
  rank0.safetensors      weights in the runtime layout (fused qkv_proj / gate_up_proj, quantized
                         linears packed for exaone/core/kernels), or
  checkpoint/            a quantized checkpoint kept as exported (no packed kernel for it)
"""

from __future__ import annotations

from pathlib import Path

import torch

from exaone import __version__
from exaone.core.errors import ExaoneError, read_json

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

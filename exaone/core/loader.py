"""The one loader: a checkpoint directory (Hugging Face, quantized, or TensorRT-LLM) -> a module tree.

`open_checkpoint` finds out what a directory holds without reading a weight: its config, its tensors
under our module names (as meta tensors, for shapes and dtypes) and how it was quantized. A
TensorRT-LLM checkpoint is read by exaone/core/trtllm/reader.py, which merges its ranks into module
names in memory. `read_state` reads the tensors; `load_model` builds the family's model on the meta
device, lets a hook replace the linears a checkpoint quantizes (formats/detect.py by default),
checks every name and shape, and assigns the tensors: no copy, no re-layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from exaone.core import model as models
from exaone.core.config import ModelConfig, load_config
from exaone.core.errors import OptionError
from exaone.core.formats.detect import quantization_method, swap_quantized_linears
from exaone.core.io import checkpoint
from exaone.core.model.layers import CausalLM, rope_inv_freq
from exaone.core.trtllm import reader as trtllm_reader
from exaone.core.trtllm.names import is_trtllm_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QuantizedLinears = Callable[[torch.nn.Module, dict[str, torch.Tensor], "str | None", str], list[str]]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(
            "device", "cuda", "no CUDA device is available", "{option} cuda: {problem} (use {option} cpu)"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise OptionError("device", device, "expected auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: float32 on the CPU (fast and exact there), the checkpoint's dtype on a GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    if dtype not in DTYPES:
        raise OptionError("dtype", dtype, f"expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, before any weight is read."""

    directory: Path
    cfg: ModelConfig
    meta: dict[str, torch.Tensor]  # module name -> meta tensor (dtype and shape as stored)
    origin: dict[str, str]  # module name -> "file:checkpoint name", for messages
    method: str | None  # quantization method: "modelopt", "awq" or None
    hf_config: dict  # the Hugging Face config.json (rebuilt for a TensorRT-LLM checkpoint)
    _infos: dict[str, checkpoint.TensorInfo] | None = None  # safetensors, when read lazily
    _state: dict[str, torch.Tensor] | None = None  # module-named tensors already in memory (TensorRT-LLM)

    @property
    def is_trtllm(self) -> bool:
        return self._state is not None


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    model_dir = Path(model_dir)
    if is_trtllm_checkpoint(model_dir):
        read = trtllm_reader.read(model_dir)
        meta = {n: t.to("meta") for n, t in read.state.items()}
        origin = {n: f"{model_dir.name}:{n}" for n in read.state}
        method = "modelopt" if read.quantization is not None else None
        return Checkpoint(model_dir, read.cfg, meta, origin, method, read.hf_config, _state=read.state)
    cfg = load_config(model_dir)
    infos = checkpoint.scan(model_dir)
    names = {n: f"{info.file.name}:{n}" for n, info in infos.items()}
    method = quantization_method(model_dir)
    # Quantized checkpoints are described as stored, only renamed (verify.py checks their modules).
    meta, origin = models.module_state({n: i.meta() for n, i in infos.items()}, cfg, names, method is None)
    return Checkpoint(model_dir, cfg, meta, origin, method, cfg.raw, _infos=infos)


def read_state(
    ck: Checkpoint | str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    fp32: list[str] = (),
    prepare: bool = True,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under module names; float tensors of 2+ bytes cast to dtype unless a
    regex of `fp32` names them (those become float32). dtype None: as stored. `prepare`: apply the
    family's re-layout (fused experts split per expert)."""
    ck = ck if isinstance(ck, Checkpoint) else open_checkpoint(ck)
    keep = [re.compile(p) for p in fp32]

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point() and t.element_size() >= 2:
            t = t.to(torch.float32 if any(p.search(name) for p in keep) else dtype)
        return t.to(device)

    if ck.is_trtllm:
        return {n: cast(n, t) for n, t in ck._state.items()}
    fam = models.family(ck.cfg)
    raw = {}
    for name, t in checkpoint.iter_tensors(ck._infos):
        raw[name] = cast(models.rename(name, fam.RENAME), t)
    state, _ = models.module_state(raw, ck.cfg, prepare=prepare)
    return state


def load_model(
    model_dir: str | Path | Checkpoint,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    quantized_linears: QuantizedLinears = swap_quantized_linears,
) -> CausalLM:
    """Load any supported EXAONE checkpoint directory into an inference model (eval mode).

    `quantized_linears(model, meta_state, method, where)` replaces the linears a quantized checkpoint
    holds in another form and returns the regexes of tensors to keep in float32."""
    ck = model_dir if isinstance(model_dir, Checkpoint) else open_checkpoint(model_dir)
    cfg = ck.cfg
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, cfg, device)
    with torch.device("meta"):
        model = models.build(cfg)
    fp32 = quantized_linears(model, ck.meta, ck.method, str(ck.directory)) + models.fp32_params(cfg)
    state = read_state(ck, dtype, device, fp32)
    return assign(model, state, ck.origin, str(ck.directory), device)


def assign(
    model: CausalLM,
    state: dict[str, torch.Tensor],
    origin: dict[str, str],
    where: str,
    device: torch.device,
    hint: str = "does config.json match?",
) -> CausalLM:
    """Check that state holds exactly the model's tensors with their shapes, then assign them."""
    cfg = model.cfg
    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    expected.pop("inv_freq")
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    shapes = {n: tuple(t.shape) for n, t in expected.items()}
    models.check_tensors(shapes, {n: tuple(t.shape) for n, t in state.items()}, origin, cfg, where, hint)
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.tie_weights()
    return model.eval()

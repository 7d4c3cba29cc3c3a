"""Reading safetensors checkpoints (single file or sharded), validated before anything is loaded.

Headers are parsed by hand first so that a missing or truncated shard, or a header whose offsets
do not add up, is reported as one line naming the file, instead of failing deep inside a loader.
Tensors are then read memory-mapped through `safetensors.safe_open`; nothing is unpickled.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from exaone.core.errors import ExaoneError

INDEX = "model.safetensors.index.json"
# Files a model directory carries beside config.json and the weights, which every stage copies along.
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json",
)  # fmt: skip
SINGLE = "model.safetensors"
MAX_HEADER = 256 * 1024 * 1024

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5,
}  # fmt: skip


TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    def meta(self) -> torch.Tensor:
        """A meta tensor of this dtype and shape (dtypes torch lacks read as uint8)."""
        return torch.empty(self.shape, dtype=TORCH_DTYPES.get(self.dtype, torch.uint8), device="meta")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header against the file's size."""
    if not path.is_file():
        raise ExaoneError(f"{path}: missing (named by the checkpoint but not on disk)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ExaoneError(f"{path}: truncated ({size} bytes; not a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):
            raise ExaoneError(
                f"{path}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ExaoneError(f"{path}: header is not valid JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise ExaoneError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ExaoneError(f"{path}: header entry for {name!r} lacks dtype/shape/data_offsets") from None
        if dtype not in ITEMSIZE:
            raise ExaoneError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            numel *= d
        if stop - begin != numel * ITEMSIZE[dtype] or begin < 0:
            raise ExaoneError(
                f"{path}: header lies about {name!r}: {dtype}{list(shape)} needs "
                f"{int(numel * ITEMSIZE[dtype])} bytes, offsets give {stop - begin}"
            )
        end = max(end, stop)
        tensors[name] = TensorInfo(name, path, dtype, shape)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "longer than its header says"
        raise ExaoneError(f"{path}: {what}: header describes {8 + n + end} bytes, file has {size}")
    return tensors


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ExaoneError(f"{index}: expected a JSON object with a 'weight_map'") from None
        return [model_dir / f for f in dict.fromkeys(weight_map.values())]
    if (model_dir / SINGLE).is_file():
        return [model_dir / SINGLE]
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if found:
        return [model_dir / f for f in found]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ExaoneError(
            f"{model_dir}: only pickle weights (*.bin/*.pt) found; exaone reads safetensors only"
        )
    raise ExaoneError(f"{model_dir}: no {SINGLE} or {INDEX} found")


def scan(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, headers validated; index entries checked against the shards."""
    model_dir = Path(model_dir)
    tensors: dict[str, TensorInfo] = {}
    for path in checkpoint_files(model_dir):
        tensors.update(read_header(path))
    index = model_dir / INDEX
    if index.is_file():
        for name, file in json.loads(index.read_text())["weight_map"].items():
            if name not in tensors or tensors[name].file.name != Path(file).name:
                raise ExaoneError(f"{index}: tensor {name!r} is not in {file}")
    return tensors


def iter_tensors(
    infos: dict[str, TensorInfo], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, file by file, cast to dtype when it is a float tensor."""
    by_file: dict[Path, list[str]] = {}
    for info in infos.values():
        by_file.setdefault(info.file, []).append(info.name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                t = f.get_tensor(name)
                if dtype is not None and t.is_floating_point() and t.element_size() >= 2:
                    t = t.to(dtype)
                yield name, t.to(device)

"""Is a Hugging Face checkpoint directory complete, and is it what its config.json says?

Checked without loading a single weight: config parses and names a supported family, every shard
the index names exists with a sound safetensors header, the tensor names and shapes are exactly
those of the family's model built from the config (on the meta device), and a tokenizer is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exaone.core import model as models
from exaone.core.config import ModelConfig, load_config
from exaone.core.errors import ExaoneError
from exaone.core.io import checkpoint

# Either file set is a complete byte-level BPE tokenizer.
TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


@dataclass(frozen=True)
class Report:
    cfg: ModelConfig
    tensors: int  # tensors in the checkpoint
    shards: int
    quantization: dict | None  # config.json's quantization_config, when pre-quantized


def checkpoint_tensors(
    infos: dict[str, checkpoint.TensorInfo], cfg: ModelConfig, prepare: bool = True
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The checkpoint's tensors under module names (renamed, and re-laid out by the family's
    prepare_state_dict on meta tensors, e.g. fused experts split), with where each came from."""
    names = {n: f"{info.file.name}:{n}" for n, info in infos.items()}
    state, origin = models.module_state({n: i.meta() for n, i in infos.items()}, cfg, names, prepare)
    return {n: tuple(t.shape) for n, t in state.items()}, origin


def check_tensors(model_dir: str | Path, cfg: ModelConfig | None = None) -> tuple[int, dict | None]:
    """Raise unless the checkpoint's tensors are exactly the model's; return (count, quantization).

    A pre-quantized checkpoint (config.json has quantization_config: AWQ, GPTQ, FP8 ...) stores
    other tensors per linear (qweight, scales, weight_scale ...): there only the modules are checked.
    """
    model_dir = Path(model_dir)
    cfg = cfg or load_config(model_dir)
    infos = checkpoint.scan(model_dir)
    quant = cfg.raw.get("quantization_config")
    expected = models.expected_tensors(cfg)
    found, origin = checkpoint_tensors(infos, cfg, prepare=quant is None)
    if quant is not None:
        _check_modules(model_dir, cfg, expected, found, origin)
        return len(infos), quant
    models.check_tensors(expected, found, origin, cfg, str(model_dir))
    return len(infos), None


def _check_modules(model_dir: Path, cfg: ModelConfig, expected: dict, found: dict, origin: dict):
    want = {n.rsplit(".", 1)[0] for n in expected}
    ancestors = {m.rsplit(".", k)[0] for m in want for k in range(m.count(".") + 1)}
    have = {n.rsplit(".", 1)[0] for n in found}

    def covered(module: str) -> bool:  # fused layouts store a parent module's tensor
        return any(module.rsplit(".", k)[0] in have for k in range(module.count(".") + 1))

    missing = sorted(m for m in want if not covered(m))
    if missing:
        raise ExaoneError(f"{model_dir}: checkpoint has no tensors for module {missing[0]}{_more(missing)}")
    stray = sorted(n for n in found if n.rsplit(".", 1)[0] not in ancestors)
    if stray:
        raise ExaoneError(
            f"{model_dir}: unexpected tensor {origin.get(stray[0], stray[0])}{_more(stray)} "
            f"for a {cfg.architecture} checkpoint"
        )


def check_tokenizer(model_dir: str | Path):
    model_dir = Path(model_dir)
    if not any(all((model_dir / f).is_file() for f in files) for files in TOKENIZER_SETS):
        wanted = " or ".join(" + ".join(files) for files in TOKENIZER_SETS)
        raise ExaoneError(f"{model_dir}: tokenizer files missing (expected {wanted})")


def lfs_pointers(model_dir: str | Path) -> list[str]:
    """Files that are still git-lfs pointers (a clone made without git-lfs, or before `git lfs pull`)."""
    root, found = Path(model_dir), []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not rel.parts[0].startswith(".") and path.stat().st_size < 1024:
            with open(path, "rb") as f:
                if f.read(len(LFS_POINTER)) == LFS_POINTER:
                    found.append(rel.as_posix())
    return found


def check_no_lfs_pointers(model_dir: str | Path):
    pointers = lfs_pointers(model_dir)
    if pointers:
        raise ExaoneError(
            f"{model_dir}: {len(pointers)} file(s) are unresolved git-lfs pointers, not content "
            f"({', '.join(pointers[:3])}{', ...' if len(pointers) > 3 else ''}): install git-lfs and run "
            "`git lfs pull` in the clone, or download from the hub with `exaone download ORG/NAME`"
        )


def verify_checkpoint(model_dir: str | Path) -> Report:
    """All the checks, in the order a user would fix them."""
    model_dir = Path(model_dir)
    check_no_lfs_pointers(model_dir)
    cfg = load_config(model_dir)
    shards = checkpoint.checkpoint_files(model_dir)
    count, quant = check_tensors(model_dir, cfg)
    check_tokenizer(model_dir)
    return Report(cfg=cfg, tensors=count, shards=len(shards), quantization=quant)


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""

"""`exaone-manifest.json`: what a directory holds, how it was made, and from what.

Every stage writes one next to its output. A stage verifies its input's manifest, skips work when
its output's manifest already records the same parent and arguments, and writes into a temporary
sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shlex
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from exaone import __version__
from exaone.core.errors import ExaoneError, read_json

MANIFEST_NAME = "exaone-manifest.json"
SCHEMA_VERSION = 1
LIBRARIES = ("torch", "transformers", "safetensors", "huggingface_hub", "nvidia-modelopt")
CHUNK = 1 << 20


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Model):
    path: str = Field(description="Path relative to the directory, '/'-separated.")
    size: int = Field(ge=0, description="Size in bytes.")
    sha256: str | None = Field(None, description="Hex sha256 of the content; null when not computed.")


class Calibration(_Model):
    dataset: str
    size: int = Field(description="Number of calibration samples.")
    seq: int = Field(description="Tokens per calibration sample.")
    seed: int
    tokens: int | None = Field(None, description="Total calibration tokens actually seen.")
    expert_tokens: dict[str, list[int]] | None = Field(
        None, description="MoE models: tokens each routed expert received, per MoE layer (by module name)."
    )


class Quantization(_Model):
    algorithm: str = Field(description="e.g. fp8, int8_sq, int4_awq, w4a8_awq, int8_wo, int4_wo, nvfp4.")
    kv_cache_dtype: str | None = None
    group_size: int | None = None
    calibration: Calibration | None = None
    extra: dict[str, Any] = {}


class ParallelMapping(_Model):
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1


class ModelInfo(_Model):
    family: str = Field(description="exaone3 | exaone4 | exaone_moe.")
    model_type: str = Field(description="config.json's model_type.")
    architecture: str = Field(description="Normalized architecture, e.g. Exaone4ForCausalLM.")
    source: str | None = Field(None, description="Where the weights came from (hub id or path).")
    label: str | None = Field(None, description="Human label, e.g. what the weights really are.")


class Producer(_Model):
    tool: str = "exaone"
    version: str
    command: str = Field(description="The exact command line.")
    arguments: dict[str, Any] = Field(description="The stage's resolved arguments; compared to skip work.")
    libraries: dict[str, str] = Field(description="Versions of python and the libraries that matter.")
    started_at: str = Field(description="ISO-8601 UTC.")
    finished_at: str = Field(description="ISO-8601 UTC.")


class Manifest(_Model):
    schema_version: int = Field(
        SCHEMA_VERSION, json_schema_extra={"const": SCHEMA_VERSION}, description="Other versions are refused."
    )
    kind: Literal["hf", "quantized", "trtllm-checkpoint", "engine"]
    model: ModelInfo
    dtype: str = Field(description="Dtype of the unquantized tensors, e.g. bfloat16.")
    quantization: Quantization | None = None
    mapping: ParallelMapping = Field(default_factory=ParallelMapping)
    files: list[FileEntry]
    parent: str | None = Field(None, description="sha256 of the input directory's manifest.")
    producer: Producer | None = Field(None, description="Null when derived on the fly, not written.")
    extra: dict[str, Any] = {}

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is not supported (this exaone reads {SCHEMA_VERSION})")
        return v


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(directory: str | Path, hashes: bool = True) -> list[FileEntry]:
    """Every regular file under directory, sorted; the manifest itself and hidden files are not content
    (hidden ones are our temp files, or download metadata such as .cache/huggingface)."""
    root = Path(directory)
    entries = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and not any(p.startswith(".") for p in rel.split("/")):
            sha = hash_file(path) if hashes else None
            entries.append(FileEntry(path=rel, size=path.stat().st_size, sha256=sha))
    return entries


def manifest_hash(m: Manifest) -> str:
    canonical = json.dumps(m.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_manifest(directory: str | Path) -> Manifest | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    raw = read_json(path)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        raise ExaoneError(f"{path}: field '{where}': {msg}") from None


def derive_manifest(directory: str | Path, hashes: bool = False) -> Manifest:
    """The manifest a plain Hugging Face directory would have: kind hf, nothing recorded about its making."""
    from exaone.core.config import load_config

    cfg = load_config(directory)
    model = ModelInfo(
        family=cfg.family,
        model_type=cfg.model_type,
        architecture=cfg.architecture,
        source=cfg.raw.get("_name_or_path") or None,
    )
    return Manifest(kind="hf", model=model, dtype=cfg.torch_dtype, files=list_files(directory, hashes))


def load_or_derive(directory: str | Path, hashes: bool = False) -> Manifest:
    d = Path(directory)
    if not d.is_dir():
        raise ExaoneError(f"{d}: not a directory (expected a model directory)")
    m = read_manifest(d)
    if m is not None:
        return m
    if not (d / "config.json").is_file():
        raise ExaoneError(f"{d}: neither {MANIFEST_NAME} nor config.json found (not a model directory)")
    return derive_manifest(d, hashes)


def verify(directory: str | Path, m: Manifest, deep: bool = False):
    """Raise on the first listed file that is missing, has another size or (deep) another sha256."""
    root = Path(directory)
    for entry in m.files:
        path = root / entry.path
        if not path.is_file():
            raise ExaoneError(f"{path}: missing (listed in {root / MANIFEST_NAME})")
        size = path.stat().st_size
        if size != entry.size:
            raise ExaoneError(
                f"{path}: {size} bytes, the manifest records {entry.size} (changed or truncated)"
            )
        if deep and entry.sha256 and hash_file(path) != entry.sha256:
            raise ExaoneError(f"{path}: sha256 differs from the manifest's (the file changed or is corrupt)")


def _jsonable(arguments: dict) -> dict:
    """Arguments as they read back from JSON (paths as str, tuples as lists), so comparisons hold."""
    return json.loads(json.dumps(arguments, sort_keys=True, default=str))


def _libraries() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name.removeprefix("nvidia-")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def make_producer(arguments: dict, started_at: str) -> Producer:
    return Producer(
        version=__version__,
        command=shlex.join(sys.argv),
        arguments=_jsonable(arguments),
        libraries=_libraries(),
        started_at=started_at,
        finished_at=now(),
    )


def write_manifest(directory: str | Path, m: Manifest):
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(m.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_up_to_date(out_dir: str | Path, parent: str | None, arguments: dict) -> bool:
    """True when out_dir was made from the same parent with the same arguments and is still intact."""
    try:
        m = read_manifest(out_dir)
        if m is None or m.producer is None:
            return False
        if m.parent != parent or m.producer.arguments != _jsonable(arguments):
            return False
        verify(out_dir, m)
    except ExaoneError:  # an unreadable or damaged output is simply not up to date
        return False
    return True


@contextmanager
def atomic_output_dir(final: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of final; rename it into place only when the block succeeds."""
    final = Path(final)
    _check_free(final, force)  # fail before the work, not after
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        _check_free(final, force)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
            os.rename(final, old)
            os.rename(tmp, final)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, final)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_free(final: Path, force: bool):
    if final.exists() and not force:
        raise ExaoneError(f"{final} exists (use --force to replace it)")


def json_schema() -> dict:
    schema = Manifest.model_json_schema()
    schema["title"] = f"exaone checkpoint manifest ({MANIFEST_NAME}), schema version {SCHEMA_VERSION}"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


if __name__ == "__main__":  # python -m exaone.core.io.manifest > docs/manifest.schema.json
    print(json.dumps(json_schema(), indent=2))

"""`exaone serve`'s options, and the reference's LLM API option file (`--config` /
`--extra_llm_api_options FILE.yaml`, the one TensorRT-LLM's README passes to `trtllm-serve`).

A flag given on the command line wins over the file. Every key of the file is either applied,
accepted and ignored with a notice (features of other backends that change nothing here, such as
`trust_remote_code`: we never run checkpoint code), or refused with a one-line error naming it;
nothing is dropped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from exaone.core.errors import FileError, OptionError, Unsupported
from exaone.serve.parsers import MODES

API_KEY_ENV = "EXAONE_API_KEY"
BACKENDS = ("pytorch", "trt", "tensorrt", "_autodeploy", "exaone")


@dataclass
class ServeOptions:
    """None means: the option file's value, else the engine's (or the default noted)."""

    model: Path | None = None  # a model or engine directory; None: the embedded default model
    tokenizer_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str | None = None
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    # engine limits: at build time for a model directory, at most the built values for an engine
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None
    max_input_len: int | None = None
    kv_cache_dtype: str | None = None
    kv_cache_free_gpu_memory_fraction: float | None = None
    max_tokens_in_paged_kv_cache: int | None = None
    max_attention_window_size: list[int] | None = None
    enable_kv_cache_reuse: bool | None = None
    cuda_graphs: bool | None = None
    cuda_graph_batch_sizes: list[int] | None = None
    cuda_graph_max_batch_size: int | None = None
    tp_size: int | None = None
    pp_size: int | None = None
    ep_size: int | None = None
    # serving
    reasoning_parser: str = "auto"
    tool_parser: str = "auto"
    api_key: str | None = field(default=None, repr=False)
    max_queue: int = 1024  # requests that may wait beyond a full batch before 503
    request_timeout: float = 600.0  # seconds a request may take in all
    max_request_bytes: int = 8 << 20
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may drain
    cache_dir: Path | None = None  # where built engines are kept; default $EXAONE_CACHE or the user cache
    config_file: Path | None = None
    log_level: str = "info"
    access_log: bool = False
    notices: list[str] = field(default_factory=list)

    def check(self):
        for name in ("tp_size", "pp_size", "ep_size"):
            v = getattr(self, name)
            if v is not None and v != 1:
                what = {"tp_size": "tensor", "pp_size": "pipeline", "ep_size": "expert"}[name]
                raise Unsupported(f"--{name} {v}: {what} parallelism is not supported yet (serve on one GPU)")
            if v is not None and v < 1:
                raise OptionError(name, v, "expected 1")
        for name in ("reasoning_parser", "tool_parser"):
            if getattr(self, name) not in MODES:
                raise OptionError(name, getattr(self, name), f"expected one of {', '.join(MODES)}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise OptionError("backend", self.backend, f"expected one of {', '.join(BACKENDS)}")
        if not 0 < self.port < 65536:
            raise OptionError("port", self.port, "expected 1-65535")
        for name in ("max_queue", "max_request_bytes"):
            if getattr(self, name) < (0 if name == "max_queue" else 1024):
                raise OptionError(name, getattr(self, name), "too small")
        for name in ("request_timeout", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise OptionError(name, getattr(self, name), "expected seconds > 0")
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError("api_key", "", "is empty", "{option}: {problem}")


def resolve(opts: ServeOptions) -> ServeOptions:
    """Apply the option file and the environment (EXAONE_API_KEY) under the flags; check the result."""
    if opts.config_file is not None:
        for key, value in read_option_file(opts.config_file, opts.notices).items():
            if getattr(opts, key) is None:
                setattr(opts, key, value)
    if opts.api_key is None and os.environ.get(API_KEY_ENV):
        opts.api_key = os.environ[API_KEY_ENV]
    if opts.backend is not None and opts.backend != "exaone":
        opts.notices.append(f"--backend {opts.backend}: accepted; this server runs exaone's own engine")
    opts.check()
    return opts


# -- the option file --------------------------------------------------------------------------------
IGNORED = {
    "enable_attention_dp": "attention data parallelism needs several GPUs",
    "attention_dp_config": "attention data parallelism needs several GPUs",
    "moe_config": "the MoE kernel is chosen by the engine",
    "num_postprocess_workers": "detokenization already runs off the engine thread",
    "trust_remote_code": "exaone never runs checkpoint code",
    "disable_overlap_scheduler": "the engine always plans one step ahead",
}
TOP = {  # key -> (ServeOptions field, type)
    "max_batch_size": ("max_batch_size", int),
    "max_num_tokens": ("max_num_tokens", int),
    "max_seq_len": ("max_seq_len", int),
    "max_input_len": ("max_input_len", int),
    "tensor_parallel_size": ("tp_size", int),
    "pipeline_parallel_size": ("pp_size", int),
    "moe_expert_parallel_size": ("ep_size", int),
    "backend": ("backend", str),
}
KV_CACHE = {
    "enable_block_reuse": ("enable_kv_cache_reuse", bool),
    "max_attention_window": ("max_attention_window_size", list),
    "free_gpu_memory_fraction": ("kv_cache_free_gpu_memory_fraction", float),
    "dtype": ("kv_cache_dtype", str),
    "max_tokens": ("max_tokens_in_paged_kv_cache", int),
}
CUDA_GRAPH = {
    "max_batch_size": ("cuda_graph_max_batch_size", int),
    "batch_sizes": ("cuda_graph_batch_sizes", list),
    "enable_padding": (None, bool),
}


def read_option_file(path: Path, notices: list[str]) -> dict:
    """The option file as ServeOptions values; notices for keys accepted and ignored."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise OptionError("config", path, "no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileError(path, f"not valid YAML ({first})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FileError(path, "expected a mapping of options at the top level")
    out: dict = {}
    for key, value in raw.items():
        if key in IGNORED:
            notices.append(f"{path.name}: {key} accepted and ignored ({IGNORED[key]})")
        elif key in TOP:
            name, kind = TOP[key]
            out[name] = _typed(path, key, value, kind)
        elif key == "kv_cache_config":
            out.update(_section(path, key, value, KV_CACHE))
        elif key == "cuda_graph_config":
            if value is None:  # TensorRT-LLM: no cuda_graph_config means no CUDA graphs
                out["cuda_graphs"] = False
                continue
            section = _section(path, key, value, CUDA_GRAPH)
            out.update(section)
            if value.get("enable_padding") is False:
                raise FileError(
                    path,
                    "not supported: this engine always pads a decode batch to the next "
                    "captured CUDA graph size (remove it or set true)",
                    "cuda_graph_config.enable_padding",
                )
            out["cuda_graphs"] = True
        elif key == "enable_chunked_prefill":
            if _typed(path, key, value, bool) is False:
                raise FileError(path, "not supported: the scheduler always chunks prompts", key)
            notices.append(f"{path.name}: enable_chunked_prefill accepted (prompts are always chunked)")
        else:
            raise FileError(path, f"not supported by exaone serve (supported: {', '.join(_known())})", key)
    windows = out.get("max_attention_window_size")
    if windows is not None:
        windows = windows if isinstance(windows, list) else [windows]
        if not windows or not all(isinstance(w, int) and not isinstance(w, bool) for w in windows):
            raise FileError(path, "expected a list of token counts", "kv_cache_config.max_attention_window")
        out["max_attention_window_size"] = windows
    sizes = out.get("cuda_graph_batch_sizes")
    if sizes is not None and not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise FileError(path, "expected a list of batch sizes", "cuda_graph_config.batch_sizes")
    dtype = out.get("kv_cache_dtype")
    if dtype == "auto":
        out.pop("kv_cache_dtype")
    return out


def _known() -> list[str]:
    return sorted({*IGNORED, *TOP, "kv_cache_config", "cuda_graph_config", "enable_chunked_prefill"})


def _section(path: Path, key: str, value, table: dict) -> dict:
    if not isinstance(value, dict):
        raise FileError(path, "expected a mapping", key)
    out = {}
    for sub, v in value.items():
        if sub not in table:
            raise FileError(path, f"not supported (supported: {', '.join(sorted(table))})", f"{key}.{sub}")
        name, kind = table[sub]
        v = _typed(path, f"{key}.{sub}", v, kind)
        if name is not None and v is not None:
            out[name] = v
    return out


def _typed(path: Path, key: str, value, kind: type):
    if value is None:
        return None
    if kind is list and isinstance(value, int) and not isinstance(value, bool):
        return [value]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise FileError(path, f"expected {kind.__name__}, got {value!r}", key)
    return value

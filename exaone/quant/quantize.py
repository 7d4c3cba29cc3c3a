"""`exaone quantize`: calibrate with NVIDIA Model Optimizer and write its HF export under EXAONE names.

Steps: check the request before any work; build the transformers model holding the checkpoint
(exaone/core/reference.py); pack calibration text into [calib_size, calib_seq] token rows
(exaone/core/io/calibration.py); run
`mtq.quantize` with the format's config and a forward loop over batches; `export_hf_checkpoint` into
a scratch directory; rewrite its tensors under the checkpoint's own names next to the source's
tokenizer files; write the manifest. Everything lands in a temporary sibling directory renamed into
place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from exaone.core import reference
from exaone.core.config import ModelConfig, load_config
from exaone.core.errors import ExaoneError, OptionError
from exaone.core.formats import registry
from exaone.core.formats.detect import quantization_method
from exaone.core.formats.registry import FP32_PATTERNS, QUANTIZE_FORMATS
from exaone.core.io import calibration as calib
from exaone.core.io import manifest as mf
from exaone.core.io.tokenizer import load_tokenizer
from exaone.core.loader import DTYPES, resolve_device
from exaone.core.qmath import NVFP4_BLOCK
from exaone.core.trtllm.convert import MODELOPT_ALGOS, ConvertOptions, convert

KV_DTYPES = ("auto", "fp8", "int8")  # what --kv_cache_dtype may ask Model Optimizer for
WEIGHT_FILES = (".safetensors",)
SKIP_FILES = {"config.json", "model.safetensors.index.json", mf.MANIFEST_NAME, "hf_quant_config.json"}
FP8_GPU = (8, 9)  # formats with FP8 math in calibration need Ada / Hopper / Blackwell on a GPU


@dataclass
class QuantizeOptions:
    qformat: str
    kv_cache_dtype: str = "auto"
    calib_dataset: str = "cnn_dailymail"
    calib_size: int = 512
    calib_seq: int = 512
    batch_size: int = 1
    awq_block_size: int = 128
    seed: int = 1234
    device: str = "auto"
    dtype: str = "auto"
    export_format: str = "hf"


@dataclass
class Summary:
    output: Path
    skipped: bool
    qformat: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    tokens: int = 0
    empty_experts: dict | None = None

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 0.0


def quant_config(opts: QuantizeOptions) -> dict:
    """Model Optimizer's config for a format, with our block size and KV-cache choice applied."""
    import modelopt.torch.quantization as mtq

    base = getattr(mtq, registry.get(opts.qformat).modelopt_config)
    cfg = copy.deepcopy(base)
    if registry.get(opts.qformat).block == "awq":
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                first = entry["cfg"][0] if isinstance(entry["cfg"], list) else entry["cfg"]
                first["block_sizes"] = {**first["block_sizes"], -1: opts.awq_block_size}
    if opts.kv_cache_dtype == "fp8":
        cfg["quant_cfg"] = [*cfg["quant_cfg"], *copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])]
    return cfg


def group_size(opts: QuantizeOptions) -> int | None:
    block = registry.get(opts.qformat).block
    return {"awq": opts.awq_block_size, "nvfp4": NVFP4_BLOCK}.get(block)


def in_features(cfg: ModelConfig) -> dict[str, int]:
    """In-features of every quantized linear kind, for block-size checks."""
    sizes = {"q/k/v_proj": cfg.hidden_size, "o_proj": cfg.num_heads * cfg.head_dim}
    if cfg.family != "exaone_moe" or "dense" in cfg.mlp_layer_types:
        sizes.update({"gate/up_proj": cfg.hidden_size, "down_proj": cfg.intermediate_size})
    if cfg.family == "exaone_moe" and "sparse" in cfg.mlp_layer_types:
        sizes["experts.down_proj"] = cfg.moe_intermediate_size
    return sizes


def validate(cfg: ModelConfig, opts: QuantizeOptions, device: torch.device):
    if opts.qformat not in QUANTIZE_FORMATS:
        raise OptionError("qformat", opts.qformat, f"unknown (expected one of {', '.join(QUANTIZE_FORMATS)})")
    if opts.kv_cache_dtype not in KV_DTYPES:
        raise OptionError("kv_cache_dtype", opts.kv_cache_dtype, f"expected one of {', '.join(KV_DTYPES)}")
    if opts.kv_cache_dtype == "int8":
        raise OptionError(
            "kv_cache_dtype",
            opts.kv_cache_dtype,
            "Model Optimizer's HF export has no INT8 KV cache "
            "(use fp8, or auto to keep the cache unquantized)",
            "{option} int8: not supported: {problem}",
        )
    if opts.export_format not in ("hf", "trtllm"):
        raise OptionError("export_format", opts.export_format, "expected hf or trtllm")
    for option, value in (("calib_size", opts.calib_size), ("calib_seq", opts.calib_seq)):
        if value < 1:
            raise OptionError(option, value, "must be at least 1")
    if opts.batch_size < 1:
        raise OptionError("batch_size", opts.batch_size, "must be at least 1")
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        raise OptionError("dtype", opts.dtype, f"expected auto, {', '.join(DTYPES)}")
    block = group_size(opts)
    if block is not None:
        if block < 1:
            raise OptionError("awq_block_size", block, "must be positive")
        for kind, n in in_features(cfg).items():
            if n % block:
                problem = f"does not divide the in-features of {kind} ({n}); pick a divisor of {n}"
                if opts.qformat == "nvfp4":  # a fixed block, not an option
                    raise ExaoneError(f"nvfp4's block {block} {problem}")
                raise OptionError("awq_block_size", block, problem, "{option} {value} {problem}")
    if device.type == "cuda" and registry.get(opts.qformat).fp8_hardware:
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_GPU:
            name = torch.cuda.get_device_name(device)
            raise OptionError(
                "qformat",
                opts.qformat,
                f"{name} (sm_{cap[0]}{cap[1]}) has no FP8 support; it needs sm_89 or newer (Ada, Hopper, "
                "Blackwell). On this GPU use int8_sq, int4_awq, int8_wo or int4_wo, or calibrate on the CPU "
                "(device cpu)",
                f"{{option}} {opts.qformat}: {{problem}}",
            )


def resolve_dtypes(
    opts: QuantizeOptions, cfg: ModelConfig, device: torch.device
) -> tuple[torch.dtype, torch.dtype]:
    """(calibration dtype, export dtype). auto calibrates in float32 on the CPU (bf16 matmuls are
    several times slower there) and in the checkpoint's dtype on a GPU, and always writes the
    unquantized tensors in the checkpoint's dtype, so they come out as they came in."""
    if opts.dtype != "auto":
        return DTYPES[opts.dtype], DTYPES[opts.dtype]
    native = DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    return (torch.float32 if device.type == "cpu" else native), native


def default_output(model_dir: Path, opts: QuantizeOptions) -> Path:
    return model_dir.with_name(f"{model_dir.name}-{opts.qformat}")


def quantize(
    model_dir: str | Path,
    opts: QuantizeOptions,
    output_dir: str | Path | None = None,
    force: bool = False,
    say: Callable[[str], object] | None = None,
    progress: Callable | None = None,
) -> Summary:
    """Quantize model_dir into output_dir (default: `<model_dir>-<qformat>` beside it)."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    started, t0 = mf.now(), time.monotonic()
    model_dir = Path(model_dir)
    parent_manifest = mf.load_or_derive(model_dir)
    if parent_manifest.kind == "quantized":
        raise ExaoneError(f"{model_dir}: already quantized; quantize the unquantized checkpoint")
    if parent_manifest.kind != "hf":
        raise ExaoneError(
            f"{model_dir}: a {parent_manifest.kind} directory; quantize needs an unquantized HF one"
        )
    if quantization_method(model_dir) is not None:
        raise ExaoneError(f"{model_dir}: already quantized; quantize the unquantized checkpoint")
    cfg = load_config(model_dir)
    device = resolve_device(opts.device)
    validate(cfg, opts, device)
    out = Path(output_dir) if output_dir else default_output(model_dir, opts)
    parent = mf.manifest_hash(parent_manifest)
    arguments = {"source": str(model_dir.resolve()), **asdict(opts)}
    if not force and mf.is_up_to_date(out, parent, arguments):
        say(f"{out}: already quantized from {model_dir} with these options; nothing to do (--force redoes)")
        return Summary(out, skipped=True, qformat=opts.qformat)
    if opts.export_format == "trtllm":
        _check_trtllm(opts)

    tokenizer = load_tokenizer(model_dir)
    texts = calib.load_texts(opts.calib_dataset, opts.calib_size * 4, opts.seed)
    rows = calib.calibration_batches(
        tokenizer, texts, opts.calib_size, opts.calib_seq, opts.seed, opts.calib_dataset
    )
    dtype, export_dtype = resolve_dtypes(opts, cfg, device)
    torch.manual_seed(opts.seed)
    with mf.atomic_output_dir(out, force=force) as tmp:
        say(f"loading {model_dir} ({cfg.architecture}) as {dtype} on {device} ...")
        hf = reference.build(model_dir, cfg, dtype, device)
        counter = ExpertCounter(cfg)
        _calibrate(hf.model, rows, opts, device, counter, progress or _plain_progress(say))
        scratch = tmp / ".modelopt-export"
        _export(hf.model, scratch, export_dtype)
        write_checkpoint(scratch, tmp, model_dir, hf, export_dtype)
        shutil.rmtree(scratch)
        empty = counter.empty()
        if empty:
            _warn_empty(empty, counter, opts, say)
        if opts.export_format == "trtllm":
            _write_manifest(
                tmp, parent_manifest, cfg, opts, rows, counter, parent, arguments, started, export_dtype
            )
            _to_trtllm(tmp, say)
        seconds = time.monotonic() - t0
        _write_manifest(
            tmp, parent_manifest, cfg, opts, rows, counter, parent, arguments, started, export_dtype
        )
    return Summary(
        out,
        skipped=False,
        qformat=opts.qformat,
        bytes_before=weight_bytes(model_dir),
        bytes_after=weight_bytes(out),
        seconds=seconds,
        tokens=rows.numel(),
        empty_experts=empty or None,
    )


def _check_trtllm(opts: QuantizeOptions):
    """`exaone convert` (exaone/core/trtllm) must map this format onto TensorRT-LLM tensors."""
    if not registry.get(opts.qformat).trtllm:
        raise OptionError(
            "qformat",
            opts.qformat,
            f"TensorRT-LLM export covers {', '.join(sorted(set(MODELOPT_ALGOS.values())))}",
            f"export_format trtllm: not supported yet for {{option}} {opts.qformat} ({{problem}}); "
            "use export_format hf",
        )


def _to_trtllm(tmp: Path, say) -> None:
    """Replace the HF export in tmp by its TensorRT-LLM checkpoint (through `exaone convert`)."""
    hf_dir = tmp / ".hf-export"
    for f in list(tmp.iterdir()):
        if f != hf_dir and not f.name.startswith("."):
            hf_dir.mkdir(exist_ok=True)
            f.rename(hf_dir / f.name)
    convert(hf_dir, tmp / ".trtllm", ConvertOptions(), force=True, say=say)
    for f in (tmp / ".trtllm").iterdir():
        f.rename(tmp / f.name)
    shutil.rmtree(hf_dir)
    shutil.rmtree(tmp / ".trtllm")


class ExpertCounter:
    """Tokens routed to each expert of each MoE layer during calibration (forward pre-hooks on the
    experts container: its second argument is the [tokens, top_k] expert index)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.counts: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def attach(self, model: torch.nn.Module):
        if self.cfg.family != "exaone_moe":
            return
        for name, module in model.named_modules():
            if name.endswith("mlp.experts"):
                self.counts[name] = torch.zeros(self.cfg.num_experts, dtype=torch.long)
                self.handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            if isinstance(index, torch.Tensor):
                flat = index.reshape(-1).cpu()
                flat = flat[flat < self.cfg.num_experts]
                self.counts[name] += torch.bincount(flat, minlength=self.cfg.num_experts)

        return hook

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def as_lists(self) -> dict[str, list[int]]:
        return {name.removesuffix(".experts"): c.tolist() for name, c in self.counts.items()}

    def empty(self) -> dict[str, list[int]]:
        """MoE layer -> experts that received no calibration token."""
        return {
            name: [e for e, n in enumerate(counts) if n == 0]
            for name, counts in self.as_lists().items()
            if 0 in counts
        }


def _warn_empty(empty: dict, counter: ExpertCounter, opts: QuantizeOptions, say):
    n = sum(len(v) for v in empty.values())
    for layer, experts in empty.items():
        say(f"warning: {layer}: experts {experts} received no calibration tokens")
    seen = opts.calib_size * opts.calib_seq
    say(
        f"warning: {n} routed expert(s) got no calibration tokens: their activation scales are not "
        f"calibrated (weights are). Try --calib_size {opts.calib_size * 4} or --calib_seq "
        f"{opts.calib_seq * 2} (this run: {seen} tokens)"
    )


def _plain_progress(say):
    def progress(total: int, description: str):
        state = {"done": 0}
        step = max(1, total // 10)

        def advance():
            state["done"] += 1
            if state["done"] % step == 0 or state["done"] == total:
                say(f"{description}: {state['done']}/{total} batches")

        return advance

    return progress


def _calibrate(model, rows: torch.Tensor, opts: QuantizeOptions, device, counter: ExpertCounter, progress):
    import modelopt.torch.opt  # noqa: F401  (import order: avoids modelopt's circular-import warnings)
    import modelopt.torch.quantization as mtq

    batches = rows.split(opts.batch_size)
    passes = {"n": 0}

    def forward_loop(m):
        passes["n"] += 1
        first = passes["n"] == 1
        if first:  # AWQ runs the loop more than once: count experts on the first pass only
            counter.attach(m)
        advance = progress(len(batches), f"calibrating {opts.qformat} (pass {passes['n']})")
        try:
            with torch.no_grad():
                for batch in batches:
                    m(input_ids=batch.to(device), use_cache=False)
                    advance()
        finally:
            counter.detach()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, quant_config(opts), forward_loop)


def _export(model, scratch: Path, dtype: torch.dtype):
    from modelopt.torch.export import export_hf_checkpoint

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, dtype=dtype, export_dir=str(scratch))


class _quiet:
    """Model Optimizer prints progress to stdout; keep stdout for our own output."""

    def __enter__(self):
        self.saved = sys.stdout
        sys.stdout = sys.stderr

    def __exit__(self, *exc):
        sys.stdout = self.saved


def write_checkpoint(scratch: Path, out: Path, source: Path, hf, dtype: torch.dtype) -> None:
    """Model Optimizer's export -> out, tensors renamed to the checkpoint's names and unquantized ones
    cast to dtype (scales stay float32), the source's side files (tokenizer, ...) kept."""
    from safetensors.torch import load_file, save_file

    keep = re.compile("|".join([*FP32_PATTERNS, r"e_score_correction_bias$"]))
    files = sorted(scratch.glob("*.safetensors"))
    weight_map: dict[str, str] = {}
    for i, f in enumerate(files):
        tensors = {}
        for k, v in load_file(str(f)).items():
            if v.is_floating_point() and v.element_size() >= 2 and not keep.search(k):
                v = v.to(dtype)
            tensors[hf.name_back(k)] = v
        if i == len(files) - 1 and hf.passthrough:
            tensors.update(hf.passthrough)  # e.g. K-EXAONE's MTP layer, which transformers does not hold
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, f.name))
    if len(files) > 1:
        index = {
            "metadata": {"total_size": weight_bytes(out)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    exported = json.loads((scratch / "config.json").read_text())
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = exported["quantization_config"]
    _rename_lists(config["quantization_config"], hf)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf_quant = json.loads((scratch / "hf_quant_config.json").read_text())
    _rename_lists(hf_quant, hf)
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4) + "\n")
    for f in source.iterdir():  # tokenizer, generation config, license, ...
        if (
            f.is_file()
            and f.name not in SKIP_FILES
            and f.suffix not in WEIGHT_FILES
            and not f.name.startswith(".")
        ):
            shutil.copy2(f, out / f.name)


def _rename_lists(node, hf):
    """Module names inside exclude/ignore lists, renamed like the tensors."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                node[key] = [hf.name_back(v) for v in value]
            else:
                _rename_lists(value, hf)


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def _write_manifest(tmp, parent_manifest, cfg, opts, rows, counter, parent, arguments, started, dtype):
    calibration = mf.Calibration(
        dataset=opts.calib_dataset,
        size=opts.calib_size,
        seq=opts.calib_seq,
        seed=opts.seed,
        tokens=rows.numel(),
        expert_tokens=counter.as_lists() or None,
    )
    quant = mf.Quantization(
        algorithm=opts.qformat,
        kv_cache_dtype=None if opts.kv_cache_dtype == "auto" else opts.kv_cache_dtype,
        group_size=group_size(opts),
        calibration=calibration,
        extra={"producer": "nvidia-modelopt", "export_format": opts.export_format},
    )
    converted = mf.read_manifest(tmp)  # `exaone convert`'s, when exporting to TensorRT-LLM
    if converted is not None and converted.kind == "trtllm-checkpoint":
        kind, model, mapping, dtype = converted.kind, converted.model, converted.mapping, converted.dtype
    else:
        kind, model, mapping = "quantized", parent_manifest.model, mf.ParallelMapping()
        dtype = str(dtype).removeprefix("torch.")
    m = mf.Manifest(
        kind=kind,
        model=model,
        dtype=dtype,
        quantization=quant,
        mapping=mapping,
        files=mf.list_files(tmp),
        parent=parent,
        producer=mf.make_producer(arguments, started),
    )
    mf.write_manifest(tmp, m)

"""One normalized model config for every EXAONE family, parsed from a checkpoint's config.json.

The three families spell the same things differently (EXAONE-3 says `num_layers` and
`layer_norm_epsilon`; transformers 5 moves `rope_theta` into `rope_parameters`). Everything
downstream reads `ModelConfig` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exaone.core.errors import ExaoneError, read_json

SLIDING = "sliding_attention"
FULL = "full_attention"

# model_type -> (family, normalized architecture)
FAMILIES = {
    "exaone": ("exaone3", "ExaoneForCausalLM"),
    "exaone4": ("exaone4", "Exaone4ForCausalLM"),
    "exaone_moe": ("exaone_moe", "ExaoneMoeForCausalLM"),
}
SUPPORTED_ROPE = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    family: str  # exaone3 | exaone4 | exaone_moe
    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None or {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    layer_types: tuple[str, ...]  # SLIDING | FULL per layer
    sliding_window: int | None
    # EXAONE-4 / K-EXAONE: when a sliding window is set, full-attention layers take no RoPE.
    rope_on_full_layers: bool = True
    # K-EXAONE only
    mlp_layer_types: tuple[str, ...] = ()  # "dense" | "sparse" per layer
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_mtp_layers: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    raw: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def window(self, layer: int) -> int | None:
        """Attention window of a layer, or None when it attends to the whole sequence."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def uses_rope(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING or self.rope_on_full_layers

    def transformers_kwargs(self) -> dict:
        """The fields every transformers config class of our families takes (Llama, Exaone4, ExaoneMoe)."""
        rope = {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=rope,
            bos_token_id=self.bos_token_id, eos_token_id=list(self.eos_token_ids) or None,
            pad_token_id=self.pad_token_id,
        )  # fmt: skip


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ExaoneError(f"{model_dir}: not a directory (expected a model directory with config.json)")
    if not path.is_file():
        raise ExaoneError(f"{path}: missing (expected a Hugging Face config.json in the model directory)")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ExaoneError(f"{path}: expected a JSON object")
    return parse_config(raw, source=str(path))


def parse_config(raw: dict, source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise ExaoneError(f"{source}: model_type {model_type!r} is not supported (expected one of: {known})")
    family, arch = FAMILIES[model_type]
    get = _Getter(raw, source)
    if family == "exaone3":
        num_layers = get.int("num_layers", "num_hidden_layers")
        eps = get.float("layer_norm_epsilon", "rms_norm_eps", default=1e-5)
        tie = raw.get("tie_word_embeddings", True)  # EXAONE-3 ties when the key is absent
    else:
        num_layers = get.int("num_hidden_layers", "num_layers")
        eps = get.float("rms_norm_eps", default=1e-5)
        tie = raw.get("tie_word_embeddings", False)
    hidden = get.int("hidden_size")
    heads = get.int("num_attention_heads")
    kv_heads = get.int("num_key_value_heads", default=heads)
    head_dim = raw.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise ExaoneError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    act = raw.get("hidden_act", raw.get("activation_function", "silu"))
    if act != "silu":
        raise ExaoneError(f"{source}: activation {act!r} is not supported (expected 'silu')")
    rope_theta, rope_scaling = _rope(raw, source)
    window = raw.get("sliding_window") if family != "exaone3" else None
    layer_types = _layer_types(raw, num_layers, window, source)
    fields = dict(
        family=family,
        model_type=model_type,
        architecture=arch,
        vocab_size=get.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=get.int("intermediate_size", default=4 * hidden),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=get.int("max_position_embeddings", default=2048),
        tie_word_embeddings=bool(tie),
        layer_types=layer_types,
        sliding_window=int(window) if window else None,
        rope_on_full_layers=family == "exaone3" or not window,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_ids(raw.get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        raw=raw,
    )
    if family == "exaone_moe":
        first_dense = get.int("first_k_dense_replace", "first_last_k_dense_replace", default=1)
        mlp_types = raw.get("mlp_layer_types") or [
            "dense" if i < first_dense else "sparse" for i in range(num_layers)
        ]
        if not raw.get("mlp_layer_types") and isinstance(raw.get("is_moe_layer"), list):  # older configs
            mlp_types = ["sparse" if moe else "dense" for moe in raw["is_moe_layer"]]
        if len(mlp_types) != num_layers or set(mlp_types) - {"dense", "sparse"}:
            raise ExaoneError(
                f"{source}: mlp_layer_types must list 'dense'/'sparse' for each of {num_layers} layers"
            )
        experts = get.int("num_experts", "n_routed_experts")
        n_group = get.int("n_group", default=1)
        if experts % n_group:
            raise ExaoneError(f"{source}: num_experts {experts} is not divisible by n_group {n_group}")
        fields.update(
            mlp_layer_types=tuple(mlp_types),
            num_experts=experts,
            num_experts_per_tok=get.int("num_experts_per_tok"),
            moe_intermediate_size=get.int("moe_intermediate_size"),
            num_shared_experts=get.int("num_shared_experts", "n_shared_experts", default=1),
            n_group=n_group,
            topk_group=get.int("topk_group", default=1),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            routed_scaling_factor=get.float("routed_scaling_factor", default=2.5),
            num_mtp_layers=get.int("num_nextn_predict_layers", "num_mtp_layers", default=0),
        )
    return ModelConfig(**fields)


def _layer_types(raw: dict, num_layers: int, window, source: str) -> tuple[str, ...]:
    """Derive the sliding/full pattern ourselves: transformers' config breaks when it is missing."""
    if not window:
        return (FULL,) * num_layers
    types = raw.get("layer_types")
    if types is not None:
        if len(types) != num_layers or set(types) - {SLIDING, FULL}:
            raise ExaoneError(
                f"{source}: layer_types must list {SLIDING!r}/{FULL!r} for each of {num_layers} layers"
            )
        return tuple(types)
    pattern = raw.get("sliding_window_pattern")
    if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:  # e.g. "LLLG"
        return tuple(SLIDING if pattern[i % len(pattern)] == "L" else FULL for i in range(num_layers))
    if isinstance(pattern, int) and pattern > 0:  # every pattern-th layer is global
        return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))
    if pattern is None:
        return (SLIDING,) * num_layers
    raise ExaoneError(
        f"{source}: sliding_window_pattern {pattern!r} not understood (expected e.g. 4 or 'LLLG')"
    )


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    theta = float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        raise ExaoneError(f"{source}: rope type {kind!r} is not supported (expected one of {SUPPORTED_ROPE})")
    if kind == "default":
        return theta, None
    return theta, {**scaling, "rope_type": kind}


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


class _Getter:
    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def _get(self, names, default, kind):
        for name in names:
            if self.raw.get(name) is not None:
                try:
                    return kind(self.raw[name])
                except (TypeError, ValueError):
                    raise ExaoneError(f"{self.source}: field {name!r} must be a {kind.__name__}") from None
        if default is None:
            raise ExaoneError(f"{self.source}: missing field {names[0]!r}")
        return default

    def int(self, *names, default=None) -> int:
        return self._get(names, default, int)

    def float(self, *names, default=None) -> float:
        return self._get(names, default, float)

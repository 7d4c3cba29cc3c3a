"""INT8 KV-cache scales for `exaone convert --int8_kv_cache`, calibrated as TensorRT-LLM's converter
does (tensorrt_llm/models/llama/convert.py: `capture_activation_range` records max |output| of every
linear; `attention.kv_cache_scaling_factor = max(q, k, v outputs) / 127` per layer).

The calibration text is the one `exaone quantize` uses (exaone/quant/calib.py: the checkpoint's
tokenizer, texts packed into [calib_size, calib_seq] rows), run through our own model.
"""

from __future__ import annotations

import torch

from exaone.core.loader import load_model, resolve_device


def calibrate(src, dataset: str, size: int, seq: int, seed: int, say) -> tuple[dict[int, torch.Tensor], int]:
    """{layer: scale [1] float32}, and the number of tokens seen."""
    from exaone.core.io import calibration as calib
    from exaone.core.io.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(src)
    rows = calib.calibration_batches(
        tokenizer, calib.load_texts(dataset, size * 4, seed), size, seq, seed, dataset
    )
    device = resolve_device("auto")
    model = load_model(src, "float32" if device.type == "cpu" else "auto", device)
    amax: dict[int, torch.Tensor] = {}

    def hook(layer):
        def record(module, args, output):
            m = output.detach().abs().amax().float()
            amax[layer] = torch.maximum(amax[layer], m) if layer in amax else m

        return record

    handles = []
    for i, block in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            handles.append(getattr(block.self_attn, name).register_forward_hook(hook(i)))
    try:
        with torch.no_grad():
            for n, row in enumerate(rows):
                model(row[None].to(device))
                if (n + 1) % max(1, len(rows) // 10) == 0 or n + 1 == len(rows):
                    say(f"calibrating int8 KV cache: {n + 1}/{len(rows)} samples")
    finally:
        for h in handles:
            h.remove()
    return {i: (a / 127.0).reshape(1).cpu() for i, a in amax.items()}, rows.numel()

"""What the load-time and token checks cost, and whether float experts run in bfloat16, on this machine.

1. Float experts kept float (quantize_experts=False) in bfloat16: a prefill and a few decode steps on
   the default device (MLX's CPU gather_mm takes float32 only; moe.gather_mm_float works around it
   there, a GPU takes bfloat16 as it is), against the same model in float32: relative error.
2. Transformer.check_tokens (one min/max reduction and sync per model call): its time beside one
   2,048-token prefill chunk of a random 2-layer model of the 20b's shapes (--small: a tiny one,
   for a CPU machine).
3. check_checkpoint on a 20b-shaped header set: the time every load spends checking.

    python3 benchmarks/probes/load_checks_probe.py            # GPU machine; prints one JSON object
    python3 benchmarks/probes/load_checks_probe.py --small    # CPU machine
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


def float_experts_bf16(root: Path) -> dict:
    """bf16 against f32 of the same model, float experts beside MXFP4 ones (the established path): a
    random model's bf16 error is its own, so the two should be alike."""
    from oss_mlx.loader import load_model
    from oss_mlx.synthetic import SyntheticSpec, write_checkpoint

    spec = SyntheticSpec.tiny(num_layers=2, vocab_size=512, hidden_size=128, intermediate_size=128)
    folder = write_checkpoint(root / "hf-float", spec, layout="hf-float", seed=0, dtype="bfloat16")
    tokens = mx.array(np.random.default_rng(0).integers(0, 512, size=(1, 96)))

    def logits(dtype, quantize: bool) -> np.ndarray:
        model, _ = load_model(folder, dtype=dtype, quantize_experts=quantize)
        cache = model.make_cache()
        steps = [model(tokens[:, :80], cache=cache)]  # sorted experts (prefill)
        steps += [model(tokens[:, t : t + 1], cache=cache) for t in range(80, 96)]  # decode
        return np.array(mx.concatenate(steps, axis=1).astype(mx.float32))

    out = {"device": str(mx.default_device())}
    for experts, quantize in (("float", False), ("mxfp4", True)):
        bf16, f32 = logits(None, quantize), logits(mx.float32, quantize)
        for part, cols in (("prefill", slice(0, 80)), ("decode", slice(80, 96))):
            a, b = bf16[:, cols], f32[:, cols]
            out[f"{experts}_experts_{part}_bf16_rel_err"] = float(np.abs(a - b).max() / np.abs(b).max())
        out[f"{experts}_experts_finite"] = bool(np.isfinite(bf16).all())
    return out


def token_check_cost(small: bool) -> dict:
    from oss_mlx.config import ModelConfig
    from oss_mlx.model import Transformer

    sizes = (
        dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
        if small
        else {}
    )
    model = Transformer(ModelConfig(num_layers=2, **sizes), quantized_experts=True)
    mx.eval(model.parameters())
    tokens = mx.array(np.random.default_rng(1).integers(0, 201088, size=(1, 2048)), dtype=mx.uint32)
    mx.eval(tokens)

    def best(fn, n=20) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    check = best(lambda: model.check_tokens(tokens))
    chunk = best(lambda: mx.eval(model(tokens, last_logits_only=True)), n=5)
    return {"check_tokens_ms": check * 1e3, "prefill_chunk_2048_ms_2_layers": chunk * 1e3}


def checkpoint_check_cost() -> dict:
    from mlx.utils import tree_flatten

    from oss_mlx.config import ModelConfig
    from oss_mlx.model import Transformer
    from oss_mlx.weights import check_checkpoint, hf_recipes

    config = ModelConfig()  # gpt-oss-20b
    model = Transformer(config)
    expected = {k: (v.shape, v.dtype) for k, v in tree_flatten(model.parameters())}
    recipes = hf_recipes(config, mxfp4=True)

    class Headers:  # the hub's tensors, described as their headers would (nothing on disk)
        file_of, shape_of, dtype_of = {}, {}, {}

        def __contains__(self, name):
            return name in self.file_of

        def names(self):
            return list(self.file_of)

    h = Headers()
    for name, (srcs, build) in recipes.items():
        for src, (shape, dtype) in zip(srcs, build.sources(tuple(expected[name][0]), expected[name][1])):
            h.file_of[src], h.shape_of[src] = Path("model.safetensors"), shape
            h.dtype_of[src] = "U8" if dtype == mx.uint8 else "BF16"
    t = time.perf_counter()
    check_checkpoint(h, recipes, expected, config=config)
    return {"check_checkpoint_20b_ms": (time.perf_counter() - t) * 1e3, "tensors": len(h.file_of)}


def main() -> None:
    small = "--small" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as root:
        result = {**float_experts_bf16(Path(root)), **token_check_cost(small), **checkpoint_check_cost()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

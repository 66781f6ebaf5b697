"""Does mx.compile cut the host cost of a decode step built from our kernels? (GPU machine)

A shape-static stand-in for one decode step of the 20b: per layer norm_qkv_rope -> sdpa_decode over a
fixed key buffer -> out_residual -> the MoE block (the cache write left out). Timed eagerly and through
mx.compile, each both synchronously (host build / evaluation) and pipelined (as generation runs).

    python3 benchmarks/probes/compile_probe.py --layers 24 --keys 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx  # noqa: E402

from oss_mlx import kernels  # noqa: E402
from oss_mlx.bench import preset_config, random_model  # noqa: E402
from oss_mlx.kernels import decode_attention  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--keys", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--json")
    args = p.parse_args()
    full = preset_config("20b")
    config = dataclasses.replace(full, num_layers=args.layers, layer_types=full.layer_types[: args.layers])
    model = random_model(config)
    attn0 = model.blocks[0].attn
    shape = (2, 1, attn0.num_kv_heads, args.keys, attn0.head_dim)
    kv = [(0.1 * mx.random.normal(shape)).astype(mx.bfloat16) for _ in range(args.layers)]
    mx.eval(kv)
    pos = mx.array([args.keys - 1], dtype=mx.int32)

    def step(x: mx.array, pos: mx.array) -> mx.array:
        for i, block in enumerate(model.blocks):
            a, w = block.attn, block.attn.decode_weights()
            q, _ = decode_attention.norm_qkv_rope(w, x, 0)
            o = decode_attention.sdpa_decode(q, kv[i], a.sinks, a.scale, None, pos)
            x = decode_attention.out_residual(o, w.out_weight, w.out_bias, x)
            x = block.mlp(x)  # on the GPU: norm_route, gate_up_swiglu, down_combine
        return x

    compiled = mx.compile(step)
    x0 = (0.1 * mx.random.normal((1, 1, config.hidden_size))).astype(mx.bfloat16)
    mx.eval(x0)
    out = {"layers": args.layers, "keys": args.keys, "backend": kernels.backend()}
    for name, fn in (("eager", step), ("compiled", compiled)):
        for _ in range(3):
            mx.eval(fn(x0, pos))
        build = run = 0.0
        for _ in range(args.steps):
            t0 = time.perf_counter()
            y = fn(x0, pos)
            t1 = time.perf_counter()
            mx.eval(y)
            build += t1 - t0
            run += time.perf_counter() - t1
        # Pipelined: each step's input is the previous step's output, queued before waiting.
        x = x0
        t = time.perf_counter()
        for _ in range(args.steps):
            nxt = fn(x, pos)
            mx.async_eval(nxt)
            x = nxt
        mx.eval(x)
        piped = time.perf_counter() - t
        row = {
            "build_ms": 1000 * build / args.steps,
            "eval_ms": 1000 * run / args.steps,
            "pipelined_ms": 1000 * piped / args.steps,
        }
        out[name] = row
        print(name, json.dumps(row), flush=True)
    diff = mx.max(mx.abs(step(x0, pos).astype(mx.float32) - compiled(x0, pos).astype(mx.float32))).item()
    out["max_abs_diff"] = diff
    print("max |eager - compiled|", diff)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

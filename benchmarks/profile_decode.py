"""Where a decode step's time goes (GPU machine): graph size, Python build time, per-part cost.

Not a benchmark of record (that is `oss-mlx bench`, side by side with mlx-lm); this splits one decode
step of gpt-oss shapes with random weights into parts, to decide what to fuse next:

    python3 benchmarks/profile_decode.py --layers 24 --depths 128,32768 --steps 64

Prints, per depth: pipelined ms/step (as generation.generate_tokens runs it), synchronous ms/step
split into graph building (Python) and evaluation, the number of primitives in one step's graph,
and the step without attention / without the MoE block / without both (the blocks patched to
identity), so each part's cost is the difference. Also the per-primitive cost of a chain of tiny ops.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from oss_mlx import kernels  # noqa: E402
from oss_mlx.attention import AttentionBlock  # noqa: E402
from oss_mlx.bench import _prompt, preset_config, random_model  # noqa: E402
from oss_mlx.decode import DecodeStep  # noqa: E402
from oss_mlx.generation import prefill  # noqa: E402
from oss_mlx.kernels import decode_attention, decode_moe  # noqa: E402
from oss_mlx.moe import MLPBlock, mxfp4_weights  # noqa: E402


@contextlib.contextmanager
def identity(cls):
    """Replace cls.__call__ by x -> x (first argument) for the duration."""
    before = cls.__call__
    cls.__call__ = lambda self, x, *a, **k: x
    try:
        yield
    finally:
        cls.__call__ = before


def count_primitives(*outputs: mx.array) -> dict[str, int]:
    """Primitives not yet evaluated in the graph of `outputs`, by name (the most common first)."""
    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs)
    labels = re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue())
    return {"total": len(labels), **dict(collections.Counter(labels).most_common())}


def pipelined(model, cache, token: mx.array, steps: int) -> float:
    """ms/step, each step queued before the previous token is read (as generation does)."""
    y = mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1)[:, None]
    mx.eval(y)
    t = time.perf_counter()
    for _ in range(steps):
        nxt = mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]
        mx.async_eval(nxt)
        y.item() if y.size == 1 else None
        y = nxt
    mx.eval(y)
    return 1000 * (time.perf_counter() - t) / steps


def synchronous(model, cache, token: mx.array, steps: int) -> tuple[float, float]:
    """(build ms, eval ms) per step, each step evaluated before the next is built."""
    build = run = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        y = mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1)
        t1 = time.perf_counter()
        mx.eval(y)
        t2 = time.perf_counter()
        build += t1 - t0
        run += t2 - t1
    return 1000 * build / steps, 1000 * run / steps


def op_cost(n: int = 400) -> dict:
    """µs per primitive for a chain of tiny elementwise ops, and for a chain of tiny matmuls."""
    x = mx.random.normal((1, 2880)).astype(mx.bfloat16)
    w = mx.random.normal((64, 2880)).astype(mx.bfloat16)
    mx.eval(x, w)
    out = {}
    for name, f in (("add", lambda y: y + 1), ("matvec", lambda y: (y @ w.T) @ w)):
        for _ in range(2):
            y = x
            t = time.perf_counter()
            for _ in range(n):
                y = f(y)
            mx.eval(y)
            dt = time.perf_counter() - t
        out[name] = 1e6 * dt / (n * (2 if name == "matvec" else 1))
    return out


def _time_us(fn, reps: int = 100) -> float:
    """µs per call of fn (independent calls, one evaluation: GPU time once it exceeds dispatch)."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        mx.eval([fn() for _ in range(reps)])
        best = min(best, 1e6 * (time.perf_counter() - t) / reps)
    return best


def kernel_sweep(model) -> dict:
    """Each decode kernel alone at gpt-oss shapes, µs and GB/s of weights (or K/V) read, for several
    work sizes; the module's chosen sizes are restored after."""
    block = model.blocks[1]
    attn, mlp = block.attn, block.mlp
    H = model.config.hidden_size
    x = mx.random.normal((1, 1, H)).astype(mx.bfloat16)
    o = mx.random.normal((1, 1, attn.num_heads * attn.head_dim)).astype(mx.bfloat16)
    mx.eval(x, o)
    nbytes = {
        "qkv": attn.qkv.weight.nbytes,
        "out": attn.out.weight.nbytes,
        "moe": 4 * (mlp.experts.gate_up_weight[0].nbytes + mlp.experts.gate_up_scales[0].nbytes)
        + 4 * (mlp.experts.down_weight[0].nbytes + mlp.experts.down_scales[0].nbytes),
    }
    out = {}

    def record(name: str, us: float, key: str | None = None) -> None:
        gbs = nbytes[key] / us / 1e3 if key else None
        out[name] = {"us": round(us, 1), "GB/s": round(gbs) if gbs else None}
        print(f"  {name:<40} {us:8.1f} µs" + (f"  {gbs:7.0f} GB/s" if gbs else ""), flush=True)

    if kernels.backend() == "cuda":
        empty = mx.fast.cuda_kernel(
            name="oss_profile_empty", input_names=["a"], output_names=["b"], source="b[0] = a[0];"
        )
        record(
            "custom kernel, 1 thread (launch floor)",
            _time_us(
                lambda: empty(
                    inputs=[x],
                    grid=(1, 1, 1),
                    threadgroup=(1, 1, 1),
                    output_shapes=[(1,)],
                    output_dtypes=[x.dtype],
                )[0]
            ),
        )
    record("mx add, 1 x H (builtin op floor)", _time_us(lambda: x + 1))
    wT = attn.qkv.weight.T
    record("cuBLAS addmm qkv (reference)", _time_us(lambda: mx.addmm(attn.qkv.bias, x, wT)), "qkv")
    oT = attn.out.weight.T
    record("cuBLAS addmm out (reference)", _time_us(lambda: mx.addmm(attn.out.bias, o, oT)), "out")
    with kernels.use_backend("reference"):
        record("moe block (reference)", _time_us(lambda: mlp(x)), "moe")
    tunables = {
        "QKV_PAIRS_PER_WARP": decode_attention,
        "OUT_ROWS_PER_WARP": decode_attention,
        "SDPA_KEYS_PER_SPLIT": decode_attention,
        "MOE_COLS_PER_WARP": decode_moe,
        "MOE_ROWS_PER_BLOCK": decode_moe,
    }
    chosen = {t: getattr(module, t) for t, module in tunables.items()}
    w = attn.decode_weights()
    for pw in (1, 2, 4, 8):
        decode_attention.QKV_PAIRS_PER_WARP = pw
        record(f"norm_qkv_rope PW={pw}", _time_us(lambda: decode_attention.norm_qkv_rope(w, x, 100)), "qkv")
    for rw in (2, 4, 8):
        decode_attention.OUT_ROWS_PER_WARP = rw
        out_residual = lambda: decode_attention.out_residual(o, w.out_weight, w.out_bias, x)  # noqa: E731
        record(f"out_residual RW={rw}", _time_us(out_residual), "out")
    for cols in (1, 2, 4):
        for rows in (2, 4, 8, 16):
            decode_moe.MOE_COLS_PER_WARP, decode_moe.MOE_ROWS_PER_BLOCK = cols, rows
            record(f"moe block COLS={cols} ROWS={rows}", _time_us(lambda: mlp(x)), "moe")
    for S in (128, 2048, 32768):
        k = mx.random.normal((2, 1, attn.num_kv_heads, S, attn.head_dim)).astype(mx.bfloat16)
        q = mx.random.normal((1, attn.num_heads, attn.head_dim)).astype(mx.bfloat16)
        mx.eval(k, q)
        nbytes[f"kv{S}"] = k.nbytes
        for kps in (128, 256, 512, 1024) if S > 128 else (256,):
            decode_attention.SDPA_KEYS_PER_SPLIT = kps
            record(
                f"sdpa_decode S={S} keys/split={kps}",
                _time_us(
                    lambda q=q, k=k, p=S - 1: decode_attention.sdpa_decode(
                        q, k, attn.sinks, attn.scale, None, p
                    )
                ),
                f"kv{S}",
            )
    for name, value in chosen.items():
        setattr(tunables[name], name, value)
    # The chosen sizes again, the experts' two kernels without the routing (fixed experts 0..3)
    ids, wts, x2 = mx.arange(4).astype(mx.uint32), mx.full((4,), 0.25), x.reshape(1, H)
    experts = mxfp4_weights(mlp.experts)
    gate_up_down = _time_us(lambda: decode_moe._experts(experts, x2, wts, ids, x2, 1, 4))
    record("moe experts only", gate_up_down, "moe")
    record("moe block (chosen sizes)", _time_us(lambda: mlp(x)), "moe")
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="20b")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--depths", default="128,32768")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--json")
    p.add_argument("--sweep", action="store_true", help="time each decode kernel alone, several work sizes")
    args = p.parse_args()

    full = preset_config(args.config)
    config = dataclasses.replace(full, num_layers=args.layers, layer_types=full.layer_types[: args.layers])
    t = time.perf_counter()
    model = random_model(config)
    env = {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "OSS_MLX"))}
    built = time.perf_counter() - t
    print(f"built {args.layers} layers in {built:.1f} s; kernels {kernels.backend()}; env {env}")
    result = {"layers": args.layers, "env": env, "kernels": kernels.backend(), "op_cost_us": op_cost()}
    print(f"per-primitive cost (µs): {result['op_cost_us']}", flush=True)
    if args.sweep:
        result["kernels"] = kernel_sweep(model)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    for depth in [int(d) for d in args.depths.split(",")]:
        cache = model.make_cache()
        prefill(model, _prompt(depth, config.vocab_size, 0), cache)
        token = mx.array([[17]])
        mx.eval(model(token, cache=cache))  # first decode step compiles
        row = {"depth": depth}
        logits = model(token, cache=cache)
        row["primitives_per_step"] = count_primitives(logits)
        mx.eval(logits)
        row["pipelined_ms"] = pipelined(model, cache, token, args.steps)
        # The decode step generation runs (decode.py): compiled, fixed-shape buffers. The first call
        # after a growth of the buffers traces; timed apart.
        step = DecodeStep(model)
        t = time.perf_counter()
        mx.eval(step(token, cache))
        row["compiled_first_step_ms"] = 1000 * (time.perf_counter() - t)
        eager = DecodeStep(model, compile=False)
        as_eager = lambda tk, cache, step=eager: step(tk, cache)  # noqa: E731
        row["static_eager_pipelined_ms"] = pipelined(as_eager, cache, token, args.steps)
        as_model = lambda tk, cache, step=step: step(tk, cache)  # noqa: E731  (called as model(tk, cache=))
        row["compiled_pipelined_ms"] = pipelined(as_model, cache, token, args.steps)
        row["compiled_build_ms"], row["compiled_eval_ms"] = synchronous(
            as_model, cache, token, args.steps // 2
        )
        row["build_ms"], row["eval_ms"] = synchronous(model, cache, token, args.steps // 2)
        with identity(AttentionBlock):
            row["no_attention_ms"] = pipelined(model, cache, token, args.steps // 2)
        with identity(MLPBlock):
            row["no_moe_ms"] = pipelined(model, cache, token, args.steps // 2)
            with identity(AttentionBlock):
                row["no_blocks_ms"] = pipelined(model, cache, token, args.steps // 2)
        result[f"depth_{depth}"] = row
        print(json.dumps(row), flush=True)
        del cache
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

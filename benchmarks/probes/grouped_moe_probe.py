"""What the decode MoE costs a layer at a decode batch's sizes, and which work split is fastest there.

One 20b layer's experts (E 32, k 4, H = I = 2,880, MXFP4), N rows of one token each (N streams
decoding together), uniform random routing: the per-slot kernels (gate_up_swiglu + down_combine), the
prefill's grouped GEMM on the matrix units (moe_group, moe_gemm twice, the weighted sum), the decode
batch's matrix-unit kernels (moe_group, gate_up_mma, down_mma, moe_combine) at each RT and the grouped
kernels (moe_group, gate_up_grouped, down_grouped, moe_combine) at every COLS (SwiGLU
columns a warp of gate_up_grouped computes: each warp reads its slot's input row once for all of
them) and RW (output rows a warp of down_grouped computes). Each figure: CHAIN calls in one
evaluation, each call's output the next one's residual (so the card runs them back to back and the
host's launch cost hides behind them), mean µs per call over REPS evaluations after one untimed one.
Also printed: the bytes a call must read (each distinct expert once) and the rate that gives.

    python benchmarks/probes/grouped_moe_probe.py            # GPU machine (CUDA) or a Mac
    python benchmarks/probes/grouped_moe_probe.py --rows 4,8,16 --rt 1,2 --cols 1,2,4,8 --rw 1,2,4
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import mlx.core as mx

from oss_mlx.bench import preset_config, random_model
from oss_mlx.kernels import decode_moe
from oss_mlx.memory import expert_bytes
from oss_mlx.moe import mxfp4_weights

CHAIN, REPS = 20, 5


def timed(fn, x0: mx.array) -> float:
    """µs per call of fn(residual) -> residual from x0, CHAIN calls chained in one evaluation."""

    def chain():
        y = x0
        for _ in range(CHAIN):
            y = fn(y)
        return y

    mx.eval(chain())
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(REPS):
        mx.eval(chain())
    mx.synchronize()
    return 1e6 * (time.perf_counter() - t) / (REPS * CHAIN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,8,16,32")
    ap.add_argument("--rt", default="1,2,4", help="gate_up_mma / down_mma: 16-row tiles per warp")
    ap.add_argument("--cols", default="1,2,4,8", help="grouped kernels' COLS ('' : not run)")
    ap.add_argument("--rw", default="1,2,4")
    a = ap.parse_args()
    full = preset_config("20b")
    config = dataclasses.replace(full, num_layers=1, layer_types=full.layer_types[:1])
    model = random_model(config)
    experts = mxfp4_weights(model.blocks[0].mlp.experts)
    E, k, H = config.num_experts, config.experts_per_token, config.hidden_size
    one_expert = expert_bytes(config)
    print(f"device {mx.default_device()}, one expert {one_expert / 1e6:.2f} MB, E {E}, k {k}, H {H}")
    for N in [int(v) for v in a.rows.split(",")]:
        x0 = mx.random.normal((N, H)).astype(mx.bfloat16)
        h = mx.random.normal((N, H)).astype(mx.bfloat16)
        indices = mx.argsort(mx.random.uniform(shape=(N, E)), axis=-1)[:, :k].astype(mx.uint32)
        weights = mx.softmax(mx.random.normal((N, k)), axis=-1)
        distinct = len(set(indices.reshape(-1).tolist()))
        need = distinct * one_expert
        mx.eval(x0, h, indices, weights)

        def call(y, h=h, weights=weights, indices=indices):
            return decode_moe.moe_decode(experts, h, weights, indices, y)

        rows = []
        names = ("MOE_GROUPED_FROM", "MOE_GROUPED_COLS", "MOE_GROUPED_ROWS", "MOE_GEMM_FROM", "MOE_MMA_FROM")
        names += ("MOE_MMA_TILES",)
        saved = {n: getattr(decode_moe, n) for n in names}
        try:
            decode_moe.MOE_GROUPED_FROM = decode_moe.MOE_GEMM_FROM = decode_moe.MOE_MMA_FROM = None
            rows.append(("per-slot", timed(call, x0)))
            decode_moe.MOE_GEMM_FROM = 1
            rows.append(("grouped GEMM (moe_gemm)", timed(call, x0)))
            decode_moe.MOE_GEMM_FROM = None
            decode_moe.MOE_MMA_FROM = 1
            for rt in [int(v) for v in a.rt.split(",")]:
                decode_moe.MOE_MMA_TILES = rt
                rows.append((f"matrix units (mma) RT {rt}", timed(call, x0)))
            decode_moe.MOE_MMA_FROM = None
            decode_moe.MOE_GROUPED_FROM = 1
            for cols in [int(v) for v in a.cols.split(",") if v]:
                for rw in [int(v) for v in a.rw.split(",")]:
                    decode_moe.MOE_GROUPED_COLS, decode_moe.MOE_GROUPED_ROWS = cols, rw
                    rows.append((f"grouped COLS {cols} RW {rw}", timed(call, x0)))
        finally:
            for n, v in saved.items():
                setattr(decode_moe, n, v)
        print(f"-- N {N} rows ({N * k} slots, {distinct} distinct experts, {need / 1e6:.1f} MB to read)")
        for name, us in rows:
            print(f"   {name:28s} {us:9.1f} µs  {need / us / 1e3:7.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()

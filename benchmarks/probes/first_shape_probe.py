"""Which op pays MLX's one-time setup when a prompt of a new length arrives (docs/UPSTREAM.md item 4).

For several token counts never seen before in the process, each piece of a 20b layer's prefill is
evaluated twice in a row at that shape; the first evaluation minus the second is the setup that shape
cost. Pieces: the qkv projection (GEMM), RoPE, full-attention (causal) and window-tiled attention with
sinks, the router, the experts (our grouped GEMM and MLX's gather_qmm path), a whole attention block,
a whole MoE block, and the unembedding GEMM.

    python benchmarks/probes/first_shape_probe.py [--lengths 1000,1333,1777] [--config 20b]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import mlx.core as mx

from oss_mlx.attention import sdpa_with_sinks, windowed_sdpa
from oss_mlx.bench import preset_config, random_model
from oss_mlx.kernels import prefill_moe


def first_and_second(fn) -> tuple[float, float]:
    """Milliseconds of the first and of the second evaluation of fn() (synchronized)."""
    times = []
    for _ in range(2):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1000,1333,1777", help="token counts new to the process")
    parser.add_argument("--config", default="20b", help="20b | 120b | tiny (tiny: a quick check on CPU)")
    args = parser.parse_args()
    full = preset_config(args.config)
    config = dataclasses.replace(full, num_layers=2, layer_types=full.layer_types[:2])
    model = random_model(config)
    window_block, full_block = model.blocks[0], model.blocks[1]
    attn, mlp = full_block.attn, full_block.mlp
    H = config.hidden_size
    # Warm every op at an unrelated shape first, so one-time (not per-shape) costs are out of the way.
    lengths = [int(t) for t in args.lengths.split(",")]
    for T in [700, *lengths]:
        x = mx.random.normal((1, T, H)).astype(mx.bfloat16)
        q, k, v = attn._project(x)
        q, k = attn.rope(q, 0), attn.rope(k, 0)
        h = mlp.norm(x).reshape(-1, H)
        _, indices = mlp.router(h)
        mx.eval(x, q, k, v, h, indices)

        def gather_qmm_path(h=h, indices=indices):
            prefill_moe.MOE_GEMM = False
            try:
                return mlp.experts(h, indices)
            finally:
                prefill_moe.MOE_GEMM = True

        pieces = {
            "qkv projection (GEMM)": lambda x=x: attn.qkv(x),
            "rope (q and k)": lambda q=q, k=k: (attn.rope(q, 0), attn.rope(k, 0)),
            "attention, causal, sinks": lambda q=q, k=k, v=v: sdpa_with_sinks(
                q, k, v, attn.sinks, attn.scale, "causal"
            ),
            "attention, window tiles, sinks": lambda q=q, k=k, v=v: windowed_sdpa(
                q, k, v, window_block.attn.sinks, attn.scale, 0, window_block.attn.window
            ),
            "router": lambda h=h: mlp.router(h),
            "argsort of the (token, expert) rows": lambda indices=indices: mx.argsort(indices.flatten()),
            "experts: moe_group + moe_gemm": lambda h=h, indices=indices: mlp.experts(h, indices),
            "experts: gather_qmm path": gather_qmm_path,
            "attention block (full)": lambda x=x: full_block.attn(x, "causal"),
            "attention block (window)": lambda x=x: window_block.attn(x, None),
            "MoE block": lambda x=x: mlp(x),
            "unembedding (last token)": lambda x=x: model.unembedding(model.norm(x[:, -1:])),
        }
        label = "warm-up" if T == 700 else f"T = {T}"
        print(f"== {label}: first / second evaluation, ms (difference)", flush=True)
        for name, fn in pieces.items():
            try:
                a, b = first_and_second(fn)
            except Exception as e:  # a piece this build lacks should not end the probe
                print(f"  {name:40s} failed: {e}", flush=True)
                continue
            print(f"  {name:40s} {a:9.2f} {b:9.2f}  ({a - b:+.2f})", flush=True)


if __name__ == "__main__":
    main()

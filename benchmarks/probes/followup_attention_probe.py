"""How fast MLX's fused attention runs a follow-up's full layer, and in which form (issue 22's follow-up).

A 2k follow-up after 32k cached spends its extra time over a fresh 2k prompt in the 12 full layers'
attention: 2,048 queries over 34,816 keys, causal bottom-right, with sinks. This times one such call
and variants of it on the card, each as TFLOP/s of the work it does (4 · Tq · Tk_visible · Hq · D):
the call as the model makes it, without sinks, without the mask (every key), the cached keys alone
(no mask), the GQA heads folded into the queries (8 KV heads, 8 × 2,048 queries each: the same
arithmetic, K/V read once per KV head), and the fresh prompt's causal 2,048 × 2,048.

    python benchmarks/probes/followup_attention_probe.py [--depth 32768] [--new 2048] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx


def timed(fn, repeat: int) -> float:
    """Median milliseconds of one evaluation of fn() (after two untimed ones)."""
    times = []
    for i in range(repeat + 2):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        if i >= 2:
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32768, help="cached tokens")
    parser.add_argument("--new", type=int, default=2048, help="new tokens (queries)")
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    Hq, Hkv, D, T, S = args.heads, args.kv_heads, args.head_dim, args.new, args.depth
    G, dt, scale = Hq // Hkv, mx.bfloat16, args.head_dim**-0.5
    mx.random.seed(0)
    q = mx.random.normal((1, Hq, T, D)).astype(dt)
    k = mx.random.normal((1, Hkv, S + T, D)).astype(dt)
    v = mx.random.normal((1, Hkv, S + T, D)).astype(dt)
    sinks = mx.random.normal((Hq,)).astype(dt)
    folded = q.reshape(1, Hkv, G * T, D)  # query head h = kv * G + g: the G heads of a KV head in a row
    cached_k, cached_v = k[:, :, :S], v[:, :, :S]
    fresh_k, fresh_v = k[:, :, S:], v[:, :, S:]
    mx.eval(q, k, v, sinks, folded, cached_k, cached_v, fresh_k, fresh_v)
    sdpa = mx.fast.scaled_dot_product_attention
    causal_keys = S + (T + 1) / 2  # keys a query sees on average, causal bottom-right
    cases = [
        (
            "follow-up as the model runs it (causal, sinks)",
            lambda: sdpa(q, k, v, scale=scale, mask="causal", sinks=sinks),
            T * causal_keys,
        ),
        ("follow-up, no sinks", lambda: sdpa(q, k, v, scale=scale, mask="causal"), T * causal_keys),
        (
            "follow-up, no mask (every key), sinks",
            lambda: sdpa(q, k, v, scale=scale, sinks=sinks),
            T * (S + T),
        ),
        (
            "cached keys only, no mask, sinks",
            lambda: sdpa(q, cached_k, cached_v, scale=scale, sinks=sinks),
            T * S,
        ),
        (
            "cached keys only, GQA folded, no mask",
            lambda: sdpa(folded, cached_k, cached_v, scale=scale),
            T * S,
        ),
        (
            "new keys only (the fresh prompt's call)",
            lambda: sdpa(q, fresh_k, fresh_v, scale=scale, mask="causal", sinks=sinks),
            T * (T + 1) / 2,
        ),
    ]
    print(
        f"{mx.default_device()}: Hq {Hq}, Hkv {Hkv}, D {D}, {T} queries over {S} cached + {T} new keys, bf16"
    )
    for name, fn, pairs in cases:
        ms = timed(fn, args.repeat)
        tflops = 4 * pairs * Hq * D / (ms / 1000) / 1e12
        print(f"{name:48s} {ms:8.3f} ms  {tflops:7.1f} TFLOP/s")


if __name__ == "__main__":
    main()

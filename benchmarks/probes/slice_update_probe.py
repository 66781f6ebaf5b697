"""Is a cache row written in place on this backend? (GPU machine; why the compiled decode step slows
down with the context: docs/UPSTREAM.md item 2.) Times a step of: write one row of a [1, 8, S, 64]
bf16 buffer with a static index (x[..., p:p+1, :] = row) or a dynamic one (mx.slice_update with an
int32 index array), then read one value from the result, for small and large S. A write in place costs
the same at every S; a copy grows with S.

    python3 benchmarks/probes/slice_update_probe.py
"""

from __future__ import annotations

import time

import mlx.core as mx


def step_static(buf, row, p):
    buf[..., p : p + 1, :] = row
    return buf


def step_dynamic(buf, row, p):
    return mx.slice_update(buf, row, mx.array([p], dtype=mx.int32), axes=(2,))


def step_put(buf, row, p):
    idx = mx.broadcast_to(mx.array([p], dtype=mx.int32).reshape(1, 1, 1, 1), row.shape)
    return mx.put_along_axis(buf, idx, row, axis=2)


def main() -> None:
    row = mx.ones((1, 8, 1, 64), dtype=mx.bfloat16)
    compiled = mx.compile(lambda b, r, p: mx.slice_update(b, r, p, axes=(2,)))
    for S in (1024, 33792):
        for name, fn in (
            ("static", step_static),
            ("dynamic", step_dynamic),
            ("put_along_axis", step_put),
            ("compiled", lambda b, r, p: compiled(b, r, mx.array([p], dtype=mx.int32))),
        ):
            buf = mx.zeros((1, 8, S, 64), dtype=mx.bfloat16)
            mx.eval(buf)
            for p in range(3):
                buf = fn(buf, row, p)
                mx.eval(buf[0, 0, 0, 0])
            t = time.perf_counter()
            for p in range(3, 203):
                buf = fn(buf, row, p)
                mx.eval(buf[0, 0, p, 0])
            us = 1e6 * (time.perf_counter() - t) / 200
            print(f"S={S:>6} {name:<14} {us:8.1f} µs/step  ({buf.nbytes / 1e6:.1f} MB buffer)", flush=True)


if __name__ == "__main__":
    main()

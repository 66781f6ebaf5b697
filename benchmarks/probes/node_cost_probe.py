"""What one graph node costs the host on MLX-CUDA: a compiled chain of N nodes evaluated again and
again, the host's time in mx.async_eval per node (MLX encodes there) and the wall time per node,
for a chain of MLX's own elementwise op (which mx.compile fuses into one kernel: a floor, not a node's
cost), a custom kernel with a short source and the same with a source as long as ours (~7 KB: MLX
hashes a custom kernel's whole source at every launch, docs/UPSTREAM.md item 14).
(GPU machine; docs/PERFORMANCE.md, "Decode toward the floor".)

    python benchmarks/probes/node_cost_probe.py [--nodes 200] [--reps 50]
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx


def chain(kind: str, n: int):
    body = "unsigned int i = threadIdx.x + blockIdx.x * blockDim.x; if (i < 256) y[i] = x[i] + 1.0f;"
    pad = (
        ""
        if kind != "custom-7KB"
        else "".join(
            f"__device__ inline float pad{i}(float v) {{ return v * {i}.0f; }}\n" for i in range(120)
        )
    )
    kernel = mx.fast.cuda_kernel(
        name=f"probe_{kind.replace('-', '_')}", input_names=["x"], output_names=["y"], source=body, header=pad
    )

    def step(x):
        for _ in range(n):
            if kind == "mlx-add":
                x = x + 1.0
            else:
                (x,) = kernel(
                    inputs=[x],
                    grid=(256, 1, 1),
                    threadgroup=(256, 1, 1),
                    output_shapes=[x.shape],
                    output_dtypes=[x.dtype],
                )
        return x

    return mx.compile(step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    for kind in ("mlx-add", "custom-short", "custom-7KB"):
        fn = chain(kind, args.nodes)
        x = mx.zeros((256,), dtype=mx.float32)
        mx.eval(fn(x))
        host = 0.0
        start = time.perf_counter()
        out = x
        for _ in range(args.reps):
            out = fn(out)
            t = time.perf_counter()
            mx.async_eval(out)
            host += time.perf_counter() - t
        mx.eval(out)
        wall = time.perf_counter() - start
        per = args.nodes * args.reps
        row = {
            "probe": "node_cost",
            "kind": kind,
            "nodes": args.nodes,
            "host_us_per_node": 1e6 * host / per,
            "wall_us_per_node": 1e6 * wall / per,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

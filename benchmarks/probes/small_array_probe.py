"""Does a kernel pay for reading a tiny array? (GPU machine; docs/UPSTREAM.md.) MLX-CUDA 0.32.4 serves
arrays of <= 8 bytes from a managed pool advised `AccessedBy` the GPU, which stays in host memory, so
each warp that reads one crosses the bus. This launches one custom kernel whose every warp reads
`scale[0]` and writes one float, with `scale` of 1, 2, 4 and 8 float32 (4 to 32 bytes), made on the
host and made by a GPU op, and reports µs per launch (run it under Nsight Compute for the card's own
time: `ncu --metrics gpu__time_duration.sum -k regex:probe python3 benchmarks/probes/small_array_probe.py`).

    python3 benchmarks/probes/small_array_probe.py
"""

from __future__ import annotations

import time

import mlx.core as mx

SOURCE = """
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const float s = scale[0];
  if ((threadIdx.x & 31) == 0) out[warp] = s * (float)warp;
"""


def main() -> None:
    kernel = mx.fast.cuda_kernel(
        name="probe_small", input_names=["scale"], output_names=["out"], source=SOURCE
    )
    warps = 2560  # as many warps as norm_qkv_rope launches at PW = 1
    for n in (1, 2, 4, 8):
        for made in ("host", "gpu"):
            scale = mx.full((n,), 0.5, dtype=mx.float32) if made == "gpu" else mx.array([0.5] * n)
            mx.eval(scale)

            def launch(scale=scale, n=n, made=made):
                return kernel(  # the template names the variant in Nsight Compute's kernel names
                    inputs=[scale],
                    template=[("N", n), ("GPU_MADE", int(made == "gpu"))],
                    grid=(32 * warps, 1, 1),
                    threadgroup=(128, 1, 1),
                    output_shapes=[(warps,)],
                    output_dtypes=[mx.float32],
                )[0]

            for _ in range(3):
                mx.eval(launch())
            t = time.perf_counter()
            for _ in range(50):
                mx.eval(launch())
            us = 1e6 * (time.perf_counter() - t) / 50
            size = f"{n} float32 ({4 * n:>2} bytes)"
            print(f"scale of {size}, made on the {made:<4}: {us:7.1f} µs a launch + sync")


if __name__ == "__main__":
    main()

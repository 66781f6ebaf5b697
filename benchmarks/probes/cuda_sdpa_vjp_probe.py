"""Which attention VJP fails on CUDA at training lengths: each case in a fresh subprocess
(an illegal memory access poisons the process)."""

import subprocess
import sys

HEAD = """
import mlx.core as mx, time
from oss_mlx.attention import windowed_sdpa, sdpa_with_sinks
mx.random.seed(0)
T = {T}
q = mx.random.normal((1, 64, T, 64)).astype(mx.bfloat16)
k = mx.random.normal((1, 8, T, 64)).astype(mx.bfloat16)
v = mx.random.normal((1, 8, T, 64)).astype(mx.bfloat16)
s = mx.random.normal((64,)).astype(mx.bfloat16)
t = time.time()
"""
CASES = {
    "causal": "f = lambda q, k, v: sdpa_with_sinks(q, k, v, s, 0.125, 'causal')",
    "windowed": "f = lambda q, k, v: windowed_sdpa(q, k, v, s, 0.125, 0, 128)",
    "causal_nosinks": "f = lambda q, k, v: mx.fast.scaled_dot_product_attention(\n"
    "    q, k, v, scale=0.125, mask='causal')",
    # one tile alone: 256 queries over 256 + window - 1 keys (odd) or one key more, a boolean mask
    "tile_383": "m = mx.ones((256, 383), dtype=mx.bool_)\n"
    "f = lambda q, k, v: sdpa_with_sinks(q[:, :, :256], k[:, :, :383], v[:, :, :383], s, 0.125, m)",
    "tile_384": "m = mx.ones((256, 384), dtype=mx.bool_)\n"
    "f = lambda q, k, v: sdpa_with_sinks(q[:, :, :256], k[:, :, :384], v[:, :, :384], s, 0.125, m)",
    "tile_383_contig": "m = mx.ones((256, 383), dtype=mx.bool_)\n"
    "c = lambda a, n: mx.contiguous(a[:, :, :n])\n"
    "f = lambda q, k, v: sdpa_with_sinks(c(q, 256), c(k, 383), c(v, 383), s, 0.125, m)",
    "causal_odd": "c = lambda a: a[:, :, : T - 1]\n"
    "f = lambda q, k, v: sdpa_with_sinks(c(q), c(k), c(v), s, 0.125, 'causal')",
}
TAIL = """
g = mx.grad(lambda q, k, v: f(q, k, v).astype(mx.float32).sum(), argnums=(0, 1, 2))(q, k, v)
mx.eval(g)
for _ in range(3):
    g = mx.grad(lambda q, k, v: f(q, k, v).astype(mx.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    mx.eval(g)
mx.synchronize()
print("ok", round(time.time() - t, 2), [bool(mx.isnan(x).any()) for x in g])
"""
for T in (2048,):
    for name, body in CASES.items():
        src = HEAD.format(T=T) + body + TAIL
        r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)
        lines = (r.stdout + r.stderr).strip().splitlines() or [""]
        print(f"T={T} {name}: rc={r.returncode} {lines[-1][:200]}", flush=True)

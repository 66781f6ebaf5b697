"""Each decode kernel's GPU time per work size, to run under Nsight Compute (GPU machine):

    ncu --cache-control all --clock-control none -k regex:oss_ --metrics gpu__time_duration.sum \
        --csv python3 benchmarks/ncu_sweep.py > sweep.csv
    python3 benchmarks/ncu_sweep.py --summarize sweep.csv

Why not wall-clock timing: one kernel launch costs ~5 µs of host work (Python, MLX's graph, the
launch), as long as most of these kernels take on the GPU, so timing launches from Python measures
the host. Nsight Compute times each kernel on the card; with `--cache-control all` every launch starts
with cold caches, as a layer's weights are in a 24-layer decode step (the step reads ~1 GB, the L2
holds 50 MB). Each configuration runs twice; the kernel names carry the template arguments (PW, RW,
NI) and the grid the key splits.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run() -> None:
    import mlx.core as mx

    from oss_mlx.bench import preset_config, random_model
    from oss_mlx.kernels import decode_attention, decode_moe

    full = preset_config("20b")
    config = dataclasses.replace(full, num_layers=2, layer_types=full.layer_types[:2])
    model = random_model(config)
    block = model.blocks[1]
    attn, mlp = block.attn, block.mlp
    H = config.hidden_size
    x = mx.random.normal((1, 1, H)).astype(mx.bfloat16)
    o = mx.random.normal((1, 1, attn.num_heads * attn.head_dim)).astype(mx.bfloat16)
    mx.eval(x, o)

    def twice(fn) -> None:
        for _ in range(2):
            mx.eval(fn())

    w = attn.decode_weights()
    for pw in (1, 2, 4, 8):
        decode_attention.QKV_PAIRS_PER_WARP = pw
        twice(lambda: decode_attention.norm_qkv_rope(w, x, 100))
    for rw in (2, 4, 8):
        decode_attention.OUT_ROWS_PER_WARP = rw
        twice(lambda: decode_attention.out_residual(o, w.out_weight, w.out_bias, x))
    for ni in (1, 2, 3, 6):  # one token: norm_route, gate_up_mma, down_mma, moe_combine (RT 1)
        decode_moe.MOE_MMA_ISSUE = ni
        twice(lambda: mlp(x))
    decode_moe.MOE_MMA_ISSUE = 1
    q = mx.random.normal((1, attn.num_heads, attn.head_dim)).astype(mx.bfloat16)
    for S in (128, 2048, 32768):
        k = mx.random.normal((2, 1, attn.num_kv_heads, S, attn.head_dim)).astype(mx.bfloat16)
        mx.eval(q, k)
        for mma in (True, False):
            decode_attention.SDPA_MMA = mma
            for kps in (64, 128, 256, 512):
                decode_attention.SDPA_KEYS_PER_SPLIT = kps
                twice(
                    lambda k=k, S=S: decode_attention.sdpa_decode(q, k, attn.sinks, attn.scale, None, S - 1)
                )
        decode_attention.SDPA_MMA, decode_attention.SDPA_KEYS_PER_SPLIT = True, 64
        for most in (64, 128):  # more splits than the default 32 at long contexts
            decode_attention.SDPA_MAX_SPLITS = most
            twice(lambda k=k, S=S: decode_attention.sdpa_decode(q, k, attn.sinks, attn.scale, None, S - 1))
        decode_attention.SDPA_MAX_SPLITS = 32


def detail() -> None:
    """One launch of each decode kernel at its 20b size (for `ncu --set full`: stalls, occupancy)."""
    import mlx.core as mx

    from oss_mlx.bench import preset_config, random_model
    from oss_mlx.kernels import decode_attention

    full = preset_config("20b")
    config = dataclasses.replace(full, num_layers=2, layer_types=full.layer_types[:2])
    model = random_model(config)
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    w = attn.decode_weights()
    x = mx.random.normal((1, 1, config.hidden_size)).astype(mx.bfloat16)
    o = mx.random.normal((1, 1, attn.num_heads * attn.head_dim)).astype(mx.bfloat16)
    q = mx.random.normal((1, attn.num_heads, attn.head_dim)).astype(mx.bfloat16)
    mx.eval(x, o, q)
    mx.eval(decode_attention.norm_qkv_rope(w, x, 100))
    mx.eval(decode_attention.out_residual(o, w.out_weight, w.out_bias, x))
    mx.eval(mlp(x))  # norm_route, gate_up_mma, down_mma, moe_combine
    for S in (128, 32768):
        k = mx.random.normal((2, 1, attn.num_kv_heads, S, attn.head_dim)).astype(mx.bfloat16)
        mx.eval(k)
        mx.eval(decode_attention.sdpa_decode(q, k, attn.sinks, attn.scale, None, S - 1))


def summarize(path: str) -> None:
    """Mean µs per (kernel name, grid), in the order first launched."""
    text = Path(path).read_text()
    rows = csv.DictReader(io.StringIO(text[text.index('"ID"') :]))
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for r in rows:
        if r["Metric Name"] == "gpu__time_duration.sum":
            name = r["Kernel Name"].split("(")[0].replace("custom_kernel_oss_", "")
            times[(name, r["Grid Size"])].append(float(r["Metric Value"].replace(",", "")) / 1000)
    for (name, grid), ts in times.items():
        print(f"{name:<56} {grid:<14} {sum(ts) / len(ts):7.1f} µs  (n={len(ts)})")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--summarize", metavar="CSV")
    p.add_argument("--detail", action="store_true", help="one launch per kernel (for ncu --set full)")
    a = p.parse_args()
    summarize(a.summarize) if a.summarize else detail() if a.detail else run()

"""The attention block's decode step in kernels (kernels_shared/decode_attention.gpu, and
kernels_{metal,cuda}/decode_attention.* for sdpa_decode_mma): norm_qkv_rope, then the model's cache
scatter, sdpa_decode (+ sdpa_combine where the keys were split), out_residual. The reference:
attention.AttentionBlock's own path and attention.sdpa_with_sinks."""

from __future__ import annotations

import math

import mlx.core as mx

from .dispatch import FLOATS, KERNEL_MAX_HIDDEN, as_position, backend, const, launch, on_gpu
from .weights import AttentionWeights

# sdpa_decode splits the keys over blocks (flash-decoding) in at least this many keys each, and into
# at most SDPA_MAX_SPLITS: 2k keys go in 8 blocks, 8k and more in 32. Each row's keys are cut by its
# own length (the kernel's KPS), so a row's sums do not depend on the batch's buffer length.
SDPA_KEYS_PER_SPLIT = 256
SDPA_MAX_SPLITS = 32
SDPA_MMA = True  # sdpa_decode_mma where its shapes apply
# Work per warp of the projection GEMVs (as decode_moe's): chosen by GPU time per kernel under Nsight
# Compute (benchmarks/ncu_sweep.py), not by launches timed from Python (docs/KERNELS.md).
QKV_PAIRS_PER_WARP = 4  # norm_qkv_rope: RoPE pairs (2 weight rows each)
OUT_ROWS_PER_WARP = 4  # out_residual (even)


def sdpa_decode_ok(q: mx.array, kv: mx.array) -> bool:
    """Whether sdpa_decode takes q [B, Hq, 1, D] over a cache's joint buffer kv [2, B, Hkv, S, D]
    (GPU, one float dtype, the head shapes the kernels were written for)."""
    B, Hq, T, D = q.shape
    return (
        T == 1
        and backend() != "reference"
        and on_gpu()
        and q.dtype in FLOATS
        and kv.dtype == q.dtype
        and kv.ndim == 5
        and kv.shape[4] == D
        and sdpa_heads_ok(D, Hq, kv.shape[2])
        and kv.shape[3] >= 1
    )


def sdpa_heads_ok(D: int, hq: int, hkv: int) -> bool:
    """The head shapes sdpa_decode was written for: D / 8 lanes per value row (16-byte loads; a power
    of two <= 32), G = hq / hkv query heads per block, G x 8 outputs per lane in registers
    (G * D <= 512)."""
    G = hq // hkv if hkv else 0
    return (
        D % 8 == 0
        and (D // 8) & (D // 8 - 1) == 0
        and D <= 256
        and G * hkv == hq
        and 1 <= G <= 16
        and G * D <= 512
    )


def sdpa_mma_ok(dtype: mx.Dtype, D: int, G: int) -> bool:
    """Shapes for sdpa_decode_mma (matrix units: 16-bit inputs, 64-dim heads, <= 8 query heads per
    KV head - gpt-oss has 64 / 8 / 8); others take the SIMT sdpa_decode. SDPA_MMA = False turns it
    off (benchmarks compare the two)."""
    return SDPA_MMA and dtype in (mx.bfloat16, mx.float16) and D == 64 and 1 <= G <= 8


def sdpa_decode(
    q: mx.array,
    kv: mx.array,
    sinks: mx.array,
    scale: float,
    window: int | None,
    pos: int | mx.array,
) -> mx.array:
    """q [B, Hq, D] row-contiguous over kv [2, B, Hkv, S, D] (keys, then values; any strides) ->
    out [B, 1, Hq * D] (the layout the output projection reads, so no transpose follows); callers
    have checked the shapes (sdpa_decode_ok).

    Row b's query sits at position pos[b] (an int for every row, or an int32 [B] array inside a
    compiled step): its keys [0, min(S, pos[b] + 1)) are attended (the last `window` of them), so kv
    may be the decode batch's buffer or ring (batch_cache.py) whose later slots are not filled yet,
    read in place."""
    B, Hq, D = q.shape
    Hkv, S = kv.shape[2], kv.shape[3]
    attended = min(S, window) if window else S
    nsplit = max(1, min(SDPA_MAX_SPLITS, -(-attended // SDPA_KEYS_PER_SPLIT)))
    part_shape = (B, Hq, nsplit, D + 2) if nsplit > 1 else (1,)
    out, part = launch(
        "sdpa_decode_mma" if sdpa_mma_ok(q.dtype, D, Hq // Hkv) else "sdpa_decode",
        [q, kv, sinks, const(scale * math.log2(math.e)), as_position(pos, B)],
        [
            ("T", q.dtype),
            ("D", D),
            ("G", Hq // Hkv),
            ("WINDOW", int(window or 0)),
            ("KPS", SDPA_KEYS_PER_SPLIT),
        ],
        (128 * nsplit, B * Hkv, 1),
        (128, 1, 1),
        [(B, 1, Hq * D) if nsplit == 1 else (1,), part_shape],
        [q.dtype, mx.float32],
    )
    if nsplit > 1:
        (out,) = launch(
            "sdpa_combine",
            [part, sinks],
            [("T", q.dtype), ("D", D)],
            (D * B * Hq, 1, 1),
            (D, 1, 1),
            [(B, 1, Hq * D)],
            [q.dtype],
        )
    return out


# A decode batch's rows go through norm_qkv_rope and out_residual ATTENTION_ROWS_PER_BLOCK to a block
# (fewer where their staged inputs would pass STAGED_BYTES of threadgroup memory: Apple GPUs give a
# threadgroup 32 KB), so a batch of R rows reads each projection ceil(R / that) times, the blocks
# sharing a slice side by side (L2). A row gets the bits it gets alone (kernels_shared/
# decode_attention.gpu), which MLX's matmul of R rows against one does not, so the kernels serve
# every batch the scheduler makes (up to ATTENTION_KERNEL_MAX_ROWS: 16 covers --max-concurrency 16);
# past it the step takes MLX's matmuls around the attention kernel.
ATTENTION_ROWS_PER_BLOCK = 4
STAGED_BYTES = 24 * 1024
ATTENTION_KERNEL_MAX_ROWS = 16
STAGE_ONE_ROW = False  # one row through the staged path too (benchmarks/probes/batch_step_probe.py)


def rows_per_block(rows: int, width: int, dtype: mx.Dtype) -> int:
    """The RB of norm_qkv_rope / out_residual for `rows` inputs of `width` elements: 1 for one row
    (its inputs stay in registers), else ATTENTION_ROWS_PER_BLOCK within STAGED_BYTES (one block
    size for every batch: one compile)."""
    if rows <= 1 and not STAGE_ONE_ROW:
        return 1
    staged_row = -(-width // 256) * 256 * dtype.size
    return max(1, min(ATTENTION_ROWS_PER_BLOCK, STAGED_BYTES // staged_row))


def attention_decode_ok(w: AttentionWeights | None, x: mx.array) -> bool:
    """Whether the decode kernels cover an attention block for x [B, 1, H] (GPU, the shapes the
    kernels were written for). w None: the block's projections are not plain float linears."""
    if w is None:
        return False
    D, hq, hkv = w.head_dim, w.num_heads, w.num_kv_heads
    H = x.shape[-1]
    return (
        x.ndim == 3
        and x.shape[1] == 1
        and x.shape[0] <= ATTENTION_KERNEL_MAX_ROWS
        and backend() != "reference"
        and on_gpu()
        and x.dtype in FLOATS
        and w.qkv_weight.dtype == x.dtype
        and w.out_weight.dtype == x.dtype
        and w.sinks.dtype in FLOATS
        and H % 8 == 0
        and H <= KERNEL_MAX_HIDDEN
        and hq * D <= 16384
        and sdpa_heads_ok(D, hq, hkv)
    )


def norm_qkv_rope(w: AttentionWeights, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
    """x [B, 1, H], row b at position offset[b] (an int for every row, or an int32 [B] array) ->
    q [B, Hq, D] and kv
    [2, B, Hkv, 1, D] (the new key and value, as the caches' joint buffer holds them): the attention's
    RMSNorm, qkv projection, YaRN concentration and RoPE in one kernel (attention_decode_ok first)."""
    B, _, H = x.shape
    D, hq, hkv = w.head_dim, w.num_heads, w.num_kv_heads
    pw = QKV_PAIRS_PER_WARP
    rb = rows_per_block(B, H, x.dtype)
    q, kv = launch(
        "norm_qkv_rope",
        [
            x,
            w.norm_weight,
            w.qkv_weight,
            w.qkv_bias,
            w.wavelengths,
            as_position(offset, B),
            const(w.eps, w.concentration),
        ],
        [
            ("T", x.dtype),
            ("H", H),
            ("D", D),
            ("HQ", hq),
            ("HKV", hkv),
            ("NC", -(-H // 256)),
            ("PW", pw),
            ("RB", rb),
        ],
        (128 * -(-B // rb), -(-((hq + 2 * hkv) * D // 2) // (4 * pw)), 1),
        (128, 1, 1),
        [(B, hq, D), (2, B, hkv, 1, D)],
        [x.dtype] * 2,
    )
    return q, kv


def out_residual(o: mx.array, weight: mx.array, bias: mx.array, residual: mx.array) -> mx.array:
    """residual + o @ weight.T + bias for o [B, 1, IN] in one kernel (attention_decode_ok first)."""
    IN = o.shape[-1]
    H = residual.shape[-1]
    N = residual.shape[0]  # [N, 1, H] or [N, H]: the kernel counts rows by the first dimension
    assert residual.size == N * H and o.size == N * IN, (o.shape, residual.shape)
    rw = OUT_ROWS_PER_WARP
    rb = rows_per_block(N, IN, residual.dtype)
    (y,) = launch(
        "out_residual",
        [o, weight, bias, residual],
        [("T", residual.dtype), ("H", H), ("IN", IN), ("NC", -(-IN // 256)), ("RW", rw), ("RB", rb)],
        (128 * -(-N // rb), -(-H // (4 * rw)), 1),
        (128, 1, 1),
        [residual.shape],
        [residual.dtype],
    )
    return y

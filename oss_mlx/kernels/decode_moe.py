"""The MoE block for decode-sized batches: norm_route (routing.py), then the experts. In bf16 from
MOE_MMA_FROM tokens (by default one) the matrix-unit kernels gate_up_mma and down_mma
(kernels_{cuda,metal}/decode_moe.*, slots grouped by moe_group, summed by moe_combine); otherwise the
per-slot gate_up_swiglu and down_combine (kernels_shared/decode_moe.gpu); from MOE_GEMM_FROM (off) the
prefill's grouped GEMM (prefill_moe), from MOE_GROUPED_FROM (off) gate_up_grouped, down_grouped and
moe_combine. The reference: moe.MLPBlock's own path."""

from __future__ import annotations

import mlx.core as mx

from . import prefill_moe
from .dispatch import FLOATS, KERNEL_MAX_HIDDEN, backend, const, launch, on_gpu
from .prefill_moe import MOE_MAX_SLOTS
from .routing import norm_route, route_ok
from .weights import ExpertWeights

# A decode batch (one token a row, x [R, 1, H]) keeps the decode kernels up to this many slots: at 64,
# 16 rows of the 20b went to the prefill path (MLX's unfused routing, the GEMM's 64-row tiles at ~2 rows
# an expert) and 16 streams decoded at 867 tok/s, fewer than 8 did (956); on the decode kernels 1,154
# (H200, docs/PERFORMANCE.md "Concurrency").
MOE_BATCH_MAX_SLOTS = 256


def max_slots(x: mx.array) -> int:
    """The (token, expert) slots the decode kernels take for x: more for a decode batch's rows."""
    return MOE_BATCH_MAX_SLOTS if x.ndim == 3 and x.shape[1] == 1 else MOE_MAX_SLOTS


# Work per warp of the GEMV kernels (each warp holds its input vector in registers and reads whole
# weight rows): more rows per warp reuse the vector more and keep more loads in flight; fewer make
# more blocks. Chosen by each kernel's GPU time under Nsight Compute (benchmarks/ncu_sweep.py), not by
# launches timed from Python, which time the host's cost of a launch (docs/KERNELS.md).
MOE_COLS_PER_WARP = 1  # gate_up_swiglu: SwiGLU columns (2 weight rows each)
MOE_ROWS_PER_BLOCK = 8  # down_combine (its 4 warps share the rows, one expert each)
# From this many tokens the grouped kernels (None: never). They read each chosen expert once a step,
# not once per (token, expert) slot, but on the H100 they were slower than the per-slot kernels at
# every batch of 1-32 rows (docs/PERFORMANCE.md "Concurrency"), so they are off; they stay tested to
# the per-slot kernels' bits for a device where they win (grouped_moe_probe.py measures both).
MOE_GROUPED_FROM: int | None = None
# From this many tokens of a decode batch the experts take the prefill's grouped GEMM on the matrix
# units (prefill_moe.moe_gemm; None: never). Its 64-row tiles hold ~2 rows of an expert at decode
# sizes: slower than gate_up_mma + down_mma at every batch measured (docs/PERFORMANCE.md
# "Concurrency"), so a decode batch never takes it.
MOE_GEMM_FROM: int | None = None
# From this many tokens of a decode batch the experts take gate_up_mma and down_mma (None: never):
# the slots grouped by expert (moe_group), each weight dequantized once a step for all the slots that
# chose its expert, the slots the matrix units' narrow side (kernels_cuda/decode_moe.cu says why).
# bf16 only (the CUDA mma's operands). From one row: a token's result does not depend on the other
# slots of its tile, so a sequence alone then gets the bits it gets in a batch (with the attention's
# projections in blocks of rows, bf16 greedy decoding in a batch of up to
# decode_attention.ATTENTION_KERNEL_MAX_ROWS equals each sequence alone). On the card one row is as
# fast as the per-slot kernels (their one launch fewer a layer is within the decode rate's spread) and
# 4-32 rows faster (docs/PERFORMANCE.md "Concurrency"); on Metal neither way has been timed.
MOE_MMA_FROM: int | None = 1
MOE_MMA_TILES = 2  # gate_up_mma / down_mma: 16-row weight tiles per warp (RT)
# gate_up_mma / down_mma: k blocks a warp loads together before it multiplies them (NI; CUDA: on
# Metal the template argument is taken and unused). Any value gives the same bits.
MOE_MMA_ISSUE = 1
# One token's down_mma and moe_combine as one kernel, down_mma_combine (the same bits): a launch and
# an MLX graph node fewer a layer.
ONE_TOKEN_COMBINED = True
# The kernels of the grouped and of the matrix-unit paths (moe_group is the prefill's too).
GROUPED_KERNELS = frozenset({"gate_up_grouped", "down_grouped", "moe_combine"})
MMA_KERNELS = frozenset({"gate_up_mma", "down_mma", "moe_combine", "down_mma_combine"})


def unused_kernels() -> frozenset[str]:
    """The decode-MoE kernels no path launches with the thresholds as set (the self-test skips them)."""
    used = (GROUPED_KERNELS if MOE_GROUPED_FROM is not None else frozenset()) | (
        MMA_KERNELS if MOE_MMA_FROM is not None else frozenset()
    )
    if MOE_MMA_FROM is None or MOE_MMA_FROM > 1 or not ONE_TOKEN_COMBINED:  # one token: per-slot or unfused
        used -= {"down_mma_combine"}
    return (GROUPED_KERNELS | MMA_KERNELS) - used


MOE_GROUPED_COLS = 2  # gate_up_grouped: SwiGLU columns per warp (its weight rows held in registers)
MOE_GROUPED_ROWS = 2  # down_grouped: output rows per warp
# The grouped kernels stage their slots' input rows in shared memory, this many bytes at most (Apple
# GPUs give a threadgroup 32 KB): 4 rows of the 20b in bf16, 2 in float32.
MOE_GROUPED_STAGE_BYTES = 24 * 1024


def staged_slots(width: int, dtype: mx.Dtype) -> int:
    """How many input rows of `width` elements the grouped kernels stage at a time (their layout:
    32-element groups at a stride of 34, decode_moe.gpu's GS)."""
    row = -(-width // 32) * 34 * dtype.size
    return max(1, min(8, MOE_GROUPED_STAGE_BYTES // row))


def experts_ok(experts: ExpertWeights | None, x: mx.array, N: int, k: int) -> bool:
    """Whether gate_up_swiglu and down_combine take N rows x [N, H] with k experts each (GPU, MXFP4
    experts, fewer than MOE_MAX_SLOTS (token, expert) pairs). experts None: none whole in memory."""
    if experts is None:
        return False
    H = x.shape[-1]
    I = experts.gate_up_weight.shape[1] // 2
    return (
        backend() != "reference"
        and on_gpu()
        and N * k < max_slots(x)
        and x.dtype in FLOATS
        and H % 32 == 0
        and I % 32 == 0
        and experts.down_weight.shape[1] >= H  # rows may be padded (loader.pad_down_rows)
    )


def moe_block_ok(x: mx.array, router_weight: mx.array, k: int, experts: ExpertWeights | None) -> bool:
    """Whether moe_block takes the MoE block of x [..., H] (its row staged in threadgroup memory)."""
    H = x.shape[-1]
    N = x.size // H
    return route_ok(x, router_weight, k) and H <= KERNEL_MAX_HIDDEN and experts_ok(experts, x, N, k)


def moe_block(
    x: mx.array,
    norm_weight: mx.array,
    eps: float,
    router_weight: mx.array,
    router_bias: mx.array,
    k: int,
    experts: ExpertWeights,
) -> mx.array:
    """The whole MoE block, x [..., H] -> x + MoE(RMSNorm(x)), in three kernels (moe_block_ok first).
    The kernels index x as [N, H] rows (MLX makes inputs row-contiguous); each one's outputs come
    shaped for the next, so no reshape or cast sits between them."""
    H = x.shape[-1]
    N = x.size // H
    h, wts, ids = norm_route(x, norm_weight, eps, router_weight, router_bias, k)
    return _experts(experts, h, wts, ids, x, N, k)


def moe_decode_ok(experts: ExpertWeights | None, x: mx.array, indices: mx.array) -> bool:
    N, k = indices.shape
    return experts_ok(experts, x, N, k)


def moe_decode(
    experts: ExpertWeights, x: mx.array, weights: mx.array, indices: mx.array, residual: mx.array
) -> mx.array:
    """residual + sum_j weights[:, j] * expert_{indices[:, j]}(x) for given routing: x [N, H] (normed),
    weights [N, k], indices [N, k], residual [N, H]; gate_up_swiglu then down_combine (moe_decode_ok
    first)."""
    N, k = indices.shape
    ids = indices.reshape(-1).astype(mx.uint32)
    wts = weights.reshape(-1).astype(mx.float32)
    return _experts(experts, x, wts, ids, residual.astype(x.dtype), N, k)


def mma_ok(experts: ExpertWeights, x: mx.array, N: int) -> bool:
    """Whether a batch of N rows x takes gate_up_mma and down_mma (experts_ok first)."""
    return (
        MOE_MMA_FROM is not None
        and N >= MOE_MMA_FROM
        and x.dtype == mx.bfloat16
        and experts.gate_up_weight.shape[0] <= 1024  # moe_group's limit
    )


def _experts(experts: ExpertWeights, x, wts, ids, residual, N: int, k: int) -> mx.array:
    """gate_up_swiglu then down_combine (or, from MOE_GEMM_FROM / MOE_GROUPED_FROM / MOE_MMA_FROM
    tokens where set, in that order, the grouped GEMM / the grouped kernels / the matrix-unit
    kernels); the result has the residual's shape."""
    if MOE_GEMM_FROM is not None and N >= MOE_GEMM_FROM and prefill_moe.gemm_ok(experts, x):
        y = prefill_moe.moe_prefill(experts, x, ids.reshape(N, k))  # [N, k, H], bias included
        y = (y * wts.reshape(N, k, 1).astype(y.dtype)).sum(axis=-2)  # as moe.MLPBlock sums them
        return residual + y.reshape(residual.shape)
    grouped = MOE_GROUPED_FROM is not None and N >= MOE_GROUPED_FROM
    if grouped and experts.gate_up_weight.shape[0] <= 1024:
        return _experts_grouped(experts, x, wts, ids, residual, N, k)
    if mma_ok(experts, x, N):
        return _experts_mma(experts, x, wts, ids, residual, N, k)
    H = x.shape[-1]
    I = experts.gate_up_weight.shape[1] // 2
    T = x.dtype
    cols = MOE_COLS_PER_WARP
    (h,) = launch(
        "gate_up_swiglu",
        [
            x,
            ids,
            experts.gate_up_weight,
            experts.gate_up_scales,
            experts.gate_up_bias,
            const(experts.alpha, experts.limit),
        ],
        [("T", T), ("H", H), ("I", I), ("K", k), ("NC", -(-H // 1024)), ("COLS", cols)],
        (128 * N * k, -(-I // (4 * cols)), 1),  # slots first: decode_moe.gpu says why
        (128, 1, 1),
        [(N * k, I)],
        [T],
    )
    rows = MOE_ROWS_PER_BLOCK
    (y,) = launch(
        "down_combine",
        [h, ids, wts, experts.down_weight, experts.down_scales, experts.down_bias, residual],
        [*_down_template(experts, T, H, I, k), ("NC", -(-I // 1024)), ("ROWS", rows)],
        (128 * N, -(-H // rows), 1),
        (128, 1, 1),
        [residual.shape],
        [T],
    )
    return y


def _down_template(experts: ExpertWeights, T: mx.Dtype, H: int, I: int, k: int) -> list[tuple]:
    """The template arguments every down kernel starts with (HP: the weights' padded row count)."""
    return [("T", T), ("H", H), ("HP", experts.down_weight.shape[1]), ("I", I), ("K", k)]


def _experts_grouped(experts: ExpertWeights, x, wts, ids, residual, N: int, k: int) -> mx.array:
    """moe_group (the slots sorted by expert), gate_up_grouped, down_grouped, moe_combine: the same
    result as the per-slot kernels, each expert's weights read once."""
    H = x.shape[-1]
    E, gate_up_rows, _ = experts.gate_up_weight.shape
    I, T, NK = gate_up_rows // 2, x.dtype, N * k
    perm, offsets = _group(ids, E)
    cols = MOE_GROUPED_COLS
    (h,) = launch(
        "gate_up_grouped",
        [
            x,
            perm,
            offsets,
            experts.gate_up_weight,
            experts.gate_up_scales,
            experts.gate_up_bias,
            const(experts.alpha, experts.limit),
        ],
        [
            ("T", T),
            ("H", H),
            ("I", I),
            ("K", k),
            ("NC", -(-H // 1024)),
            ("COLS", cols),
            ("S", staged_slots(H, T)),
        ],
        (256 * -(-I // (8 * cols)), E, 1),
        (256, 1, 1),
        [(NK, I)],
        [T],
    )
    rw = MOE_GROUPED_ROWS
    (d,) = launch(
        "down_grouped",
        [h, perm, offsets, wts, experts.down_weight, experts.down_scales, experts.down_bias],
        [*_down_template(experts, T, H, I, k), ("NC", -(-I // 1024)), ("RW", rw), ("S", staged_slots(I, T))],
        (256 * -(-H // (8 * rw)), E, 1),
        (256, 1, 1),
        [(NK, H)],
        [mx.float32],
    )
    return _combine(d, residual, N, k)


def _group(ids: mx.array, E: int) -> tuple[mx.array, mx.array]:
    """moe_group: the slots sorted by expert (perm) and each expert's run of them (offsets)."""
    perm, offsets, _ = launch(
        "moe_group",
        [ids],
        [("E", E), ("BM", 64)],
        (1024, 1, 1),
        (1024, 1, 1),
        [(ids.size,), (E + 1,), (E + 1,)],
        [mx.uint32] * 3,
    )
    return perm, offsets


def _combine(d: mx.array, residual: mx.array, N: int, k: int) -> mx.array:
    """moe_combine: the residual plus each token's k weighted expert outputs d [N * k, H], in order."""
    H = residual.shape[-1]
    (y,) = launch(
        "moe_combine",
        [d, residual],
        [("T", residual.dtype), ("H", H), ("K", k)],
        (256 * -(-H // 256), N, 1),
        (256, 1, 1),
        [residual.shape],
        [residual.dtype],
    )
    return y


def _experts_mma(experts: ExpertWeights, x, wts, ids, residual, N: int, k: int) -> mx.array:
    """moe_group, gate_up_mma, down_mma, moe_combine: each chosen expert's weights read and
    dequantized once a step, the slots on the matrix units (mma_ok first)."""
    H = x.shape[-1]
    E, gate_up_rows, _ = experts.gate_up_weight.shape
    I, T, NK = gate_up_rows // 2, x.dtype, N * k
    # One token's k slots have k distinct experts: no grouping (a block row per slot, the same bits),
    # and one tile a warp (more warps for its 4 slots: faster on the card). The tile count changes no
    # bits: each tile's arithmetic and k split are the same.
    sorted_, rt = int(N > 1), (MOE_MMA_TILES if N > 1 else 1)
    perm, offsets = _group(ids, E) if sorted_ else (ids, ids)
    rows = E if sorted_ else NK
    (h,) = launch(
        "gate_up_mma",
        [
            x,
            perm,
            offsets,
            experts.gate_up_weight,
            experts.gate_up_scales,
            experts.gate_up_bias,
            const(experts.alpha, experts.limit),
        ],
        [("T", T), ("H", H), ("I", I), ("K", k), ("RT", rt), ("SORTED", sorted_), ("NI", MOE_MMA_ISSUE)],
        (128 * -(-I // (8 * rt)), rows, 1),
        (128, 1, 1),
        [(NK, I)],
        [T],
    )
    if not sorted_ and ONE_TOKEN_COMBINED and k <= 8:
        (y,) = launch(
            "down_mma_combine",
            [h, ids, wts, experts.down_weight, experts.down_scales, experts.down_bias, residual],
            [*_down_template(experts, T, H, I, k), ("NI", MOE_MMA_ISSUE)],
            (128 * k * -(-H // 16), 1, 1),
            (128 * k, 1, 1),
            [residual.shape],
            [residual.dtype],
        )
        return y
    (d,) = launch(
        "down_mma",
        [h, perm, offsets, wts, experts.down_weight, experts.down_scales, experts.down_bias],
        [*_down_template(experts, T, H, I, k), ("RT", rt), ("SORTED", sorted_), ("NI", MOE_MMA_ISSUE)],
        (128 * -(-H // (16 * rt)), rows, 1),
        (128, 1, 1),
        [(NK, H)],
        [mx.float32],
    )
    return _combine(d, residual, N, k)

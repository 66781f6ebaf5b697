"""The experts of a prefill chunk as a grouped GEMM: moe_group (kernels_shared/prefill_moe.gpu) sorts
the (token, expert) rows by expert, moe_gemm (per dialect, on the matrix units:
kernels_{metal,cuda}/prefill_moe.*) runs gate_up + SwiGLU, then down. The reference: moe.Experts'
sorted gather_qmm path."""

from __future__ import annotations

import mlx.core as mx

from .dispatch import backend, const, launch, on_gpu
from .weights import ExpertWeights

# The fused MoE decode while N * k stays under this (decode_moe; a decode batch's rows go further:
# decode_moe.MOE_BATCH_MAX_SLOTS); from here on a prefill chunk's experts take the grouped GEMM.
MOE_MAX_SLOTS = 64

# Rows of one expert per tile; moe_gemm is written for 64.
MOE_GEMM_ROWS = 64
MOE_GEMM = True  # the grouped GEMM where its shapes apply (benchmarks compare it with gather_qmm)


def moe_prefill_ok(experts: ExpertWeights | None, x: mx.array, indices: mx.array) -> bool:
    """Whether moe_prefill takes x [N, H] with indices [N, k] (GPU, MXFP4 weights, 16-bit
    activations for the matrix units, the row count where decode's kernels stop)."""
    N, k = indices.shape
    return N * k >= MOE_MAX_SLOTS and gemm_ok(experts, x)


def gemm_ok(experts: ExpertWeights | None, x: mx.array) -> bool:
    """Whether moe_gemm takes the rows x [N, H] at all, whatever their number (a decode batch's rows
    too: decode_moe.MOE_GEMM_FROM)."""
    if not MOE_GEMM or experts is None:
        return False
    E, rows, _ = experts.gate_up_weight.shape
    return (
        backend() != "reference"
        and on_gpu()
        and x.dtype in (mx.bfloat16, mx.float16)
        and x.shape[-1] % 32 == 0
        and (rows // 2) % 32 == 0
        and E <= 1024
        and experts.down_weight.shape[1] >= x.shape[-1]  # rows may be padded (loader.pad_down_rows)
    )


def moe_prefill(experts: ExpertWeights, x: mx.array, indices: mx.array) -> mx.array:
    """Each selected expert's output for a prefill chunk: x [N, H] (normed), indices [N, k] ->
    [N, k, H] (bias included), as moe.Experts returns it. Three launches: moe_group, then moe_gemm
    for gate_up + SwiGLU and for down, the rows written back in (token, expert) order
    (moe_prefill_ok first)."""
    N, k = indices.shape
    E, gate_up_rows, _ = experts.gate_up_weight.shape
    H, I, NK, BM = x.shape[-1], gate_up_rows // 2, N * k, MOE_GEMM_ROWS
    perm, offsets, tiles = launch(
        "moe_group",
        [indices.reshape(-1).astype(mx.uint32)],
        [("E", E), ("BM", BM)],
        (1024, 1, 1),
        (1024, 1, 1),
        [(NK,), (E + 1,), (E + 1,)],
        [mx.uint32] * 3,
    )
    consts = const(experts.alpha, experts.limit)
    row_tiles = -(-NK // BM) + E  # at most one partial tile per expert
    out = x
    stages = (
        (0, experts.gate_up_weight, experts.gate_up_scales, experts.gate_up_bias, I),
        (1, experts.down_weight, experts.down_scales, experts.down_bias, H),
    )
    for mode, w, scales, bias, width in stages:
        (out,) = launch(
            "moe_gemm",
            [out, perm, offsets, tiles, w, scales, bias, consts],
            [
                ("T", x.dtype),
                ("KD", out.shape[-1]),
                ("N", w.shape[1]),
                ("NOUT", width),
                ("E", E),
                ("K", k),
                ("MODE", mode),
                ("BM", BM),
            ],
            (256 * -(-w.shape[1] // 128), row_tiles, 1),
            (256, 1, 1),
            [(NK, width)],
            [x.dtype],
        )
    return out.reshape(N, k, H)

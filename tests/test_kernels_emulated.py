"""The GPU tests of tests/test_kernels.py with the Metal dialect, on this CPU.

Every Metal kernel in SPECS runs through the Metal emulator (tests/metal_emulator: the Metal text as
mx.fast.metal_kernel assembles it, compiled by clang against a runnable shim, threadgroups as fibers
with real barriers, simdgroup exchanges and matrix layout) against the same pure-MLX references and
assertions as on a GPU: each case here calls the test function of tests/test_kernels.py itself. The
shapes are the CUDA tests' (docs/KERNELS.md), scaled where a 2-core CPU is too slow, keeping their
structure: several threadgroups, partial tiles and simdgroups, lanes past the end, several key
splits, k = 1..4, E up to 128, bf16 / f16 / f32, and 20b-shaped rows (2880) in float32, where the
CPU reference is sharp (in bf16 the CPU's quantized matmul is itself ~2% from float64 at 2880 x
2880, the kernel 0.4%).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import test_kernels as tk
from metal_emulator import EMULATOR, LAUNCHES, unavailable

from oss_mlx import kernel_selftest, kernels
from oss_mlx.kernels import decode_attention

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"Metal emulator: {unavailable()}")

F32, BF16, F16 = mx.float32, mx.bfloat16, mx.float16


@pytest.fixture(autouse=True)
def metal_on_this_cpu(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    mx.random.seed(20261127)  # the same inputs every run
    with kernels.emulated("metal", EMULATOR.metal_kernel), kernels.poison_outputs(float("nan")):
        yield


def ids(*cases):
    return [
        pytest.param(*c, id="-".join(str(getattr(v, "name", v)).split(".")[-1] for v in c)) for c in cases
    ]


# ---- routing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,E,k,N,H",
    ids(
        (F32, 4, 1, 17, 96),
        (F32, 32, 4, 3, 2880),
        (F32, 128, 3, 17, 96),
        (BF16, 32, 2, 3, 2880),
        (BF16, 128, 4, 17, 96),
    ),
)
def test_route(dtype, E, k, N, H):
    tk.test_route(dtype, E, k, N, H)


# ---- experts ---------------------------------------------------------------------------------------

MOE = [
    # dtype, E, k, H, I, N
    (F32, 4, 1, 64, 64, 1),
    (F32, 4, 4, 2880, 2880, 1),  # the 20b's rows: 11.25 groups a lane, the tail clamped
    (F32, 128, 4, 1088, 1120, 2),  # groups per lane not a multiple of 32
    (BF16, 4, 2, 64, 96, 3),
    (BF16, 8, 4, 96, 64, 2),
    (BF16, 8, 3, 96, 64, 5),
]


@pytest.mark.parametrize("dtype,E,k,H,I,N", ids(*MOE))
def test_moe_decode(dtype, E, k, H, I, N):
    tk.test_moe_decode_matches_reference(dtype, E, k, H, I, N)


@pytest.mark.parametrize(
    "dtype,E,k,H,I,N", ids((F32, 8, 4, 128, 96, 16), (BF16, 8, 4, 96, 64, 40), (BF16, 16, 4, 64, 96, 63))
)
def test_grouped_experts_of_large_batches(monkeypatch, dtype, E, k, H, I, N):
    """Decode batches of 16 to 63 rows (64 to 252 slots of k = 4): the grouped kernels (when on) give
    the per-slot ones' bits."""
    tk.test_grouped_experts_are_the_per_slot_kernels_bits(monkeypatch, dtype, E, k, H, I, N)


@pytest.mark.parametrize(
    "E,k,H,I,N,case",
    ids((8, 4, 96, 64, 5, "uniform"), (8, 4, 96, 64, 12, "skewed"), (8, 2, 64, 96, 6, "large scales")),
)
def test_experts_on_the_matrix_units(monkeypatch, E, k, H, I, N, case):
    tk.test_experts_on_the_matrix_units(monkeypatch, E, k, H, I, N, case)


def test_a_decode_batch_on_the_grouped_gemm(monkeypatch):
    tk.test_a_decode_batch_on_the_grouped_gemm(monkeypatch, 8, 4, 96, 64, 5)


@pytest.mark.parametrize("N", [16, 40])
def test_a_decode_batch_keeps_the_fused_moe_block(N):
    """A decode batch's rows (x [R, 1, H]) keep norm_route past the 64 slots where a prefill chunk
    ([1, T, H]) takes MLX's routing, and the matrix-unit decode kernels from MOE_MMA_FROM rows (the
    grouped GEMM from MOE_GEMM_FROM where set); the result is the reference block's."""
    from oss_mlx.kernels import decode_moe

    E, k, H, I = 8, 4, 96, 64
    block = tk.random_mlp(E, k, H, I, BF16)
    x = (3 * mx.random.normal((N, 1, H))).astype(BF16)
    router, experts = block.router, tk.mxfp4_weights(block.experts)
    assert decode_moe.moe_block_ok(x, router.weight, k, experts)
    assert not decode_moe.moe_block_ok(x.reshape(1, N, H), router.weight, k, experts)
    before = LAUNCHES.copy()
    fused = decode_moe.moe_block(x, block.norm.weight, block.norm.eps, router.weight, router.bias, k, experts)
    mx.eval(fused)
    launched = {n.removeprefix("oss_") for n in LAUNCHES - before}
    if decode_moe.MOE_GEMM_FROM is not None and N >= decode_moe.MOE_GEMM_FROM:
        experts = {"moe_group", "moe_gemm"}
    elif decode_moe.MOE_MMA_FROM is not None and N >= decode_moe.MOE_MMA_FROM:
        experts = {"moe_group", "gate_up_mma", "down_mma", "moe_combine"}
    else:
        experts = {"gate_up_swiglu", "down_combine"}
    assert {"norm_route"} | experts <= launched, launched
    with kernels.use_backend("reference"):
        ref = block(x)
    errs = [tk.rel_err(fused[n], ref[n]) for n in range(N)]
    assert len([e for e in errs if e >= tk.TOL[BF16]]) <= 1, errs  # near-tie routing in bf16: one token


@pytest.mark.parametrize("dtype,E,k,H,I,N", ids((F32, 8, 4, 96, 64, 2), (BF16, 4, 2, 64, 96, 3)))
def test_gate_up_swiglu_against_dequantized_math(dtype, E, k, H, I, N):
    tk.test_gate_up_swiglu_matches_dequantized_math(dtype, E, k, H, I, N)


@pytest.mark.parametrize(
    "dtype,E,k,H,I,N",
    ids((F32, 8, 4, 96, 64, 2), (F32, 4, 1, 64, 64, 1), (BF16, 8, 3, 96, 64, 5)),
)
def test_mlp_block_fused(dtype, E, k, H, I, N):
    tk.test_mlp_block_fused_matches_reference(dtype, E, k, H, I, N)


@pytest.mark.parametrize(
    "E,k,N,used", ids((4, 2, 40, 3), (32, 4, 700, 32), (128, 4, 517, 100), (8, 1, 65, 8), (16, 3, 101, 12))
)
def test_moe_group(E, k, N, used):
    tk.test_moe_group_groups_rows_by_expert(E, k, N, used)


@pytest.mark.parametrize(
    "dtype,E,k,H,I,N,used",
    ids(
        (BF16, 4, 2, 64, 96, 40, 3),  # an expert with no rows; partial row and column tiles
        (F16, 8, 1, 96, 64, 65, 8),
        (BF16, 16, 3, 256, 128, 50, 12),  # k = 3; 8 k-steps of the staged GEMM
        (F16, 128, 4, 64, 96, 300, 90),  # many experts with a row or two, some none
    ),
)
def test_moe_prefill(dtype, E, k, H, I, N, used):
    tk.test_moe_prefill_matches_reference(dtype, E, k, H, I, N, used)


@pytest.mark.parametrize("N", [3, 40])
def test_padded_down_rows(N):
    tk.test_padded_down_rows_change_nothing(N)


# ---- attention -------------------------------------------------------------------------------------

SDPA = [
    # mma, dtype, B, Hkv, G, D, S
    (True, BF16, 1, 8, 8, 64, 300),  # gpt-oss heads, 2 key splits + combine
    (True, F16, 2, 2, 4, 64, 33),
    (True, BF16, 1, 3, 5, 64, 1000),  # odd G, 4 splits, ragged tiles
    (True, BF16, 1, 1, 1, 64, 2049),  # 9 splits
    (False, F32, 1, 8, 8, 64, 1),
    (False, F32, 2, 1, 4, 128, 777),
    (False, F32, 1, 4, 16, 32, 260),  # G = 16: 512 outputs a lane
    (False, BF16, 1, 3, 5, 32, 1000),  # 8 key groups in P.V
    (False, F16, 2, 2, 2, 16, 33),
    (False, F32, 1, 4, 1, 32, 2049),
]


@pytest.mark.parametrize("mma,dtype,B,Hkv,G,D,S", ids(*SDPA))
def test_sdpa_decode(monkeypatch, mma, dtype, B, Hkv, G, D, S):
    tk.test_sdpa_decode(monkeypatch, mma, dtype, B, Hkv, G, D, S)


@pytest.mark.parametrize("S,window", ids((300, 128), (5, 128), (4000, 1000)))
def test_sdpa_decode_window(S, window):
    tk.test_sdpa_decode_window(S, window)


@pytest.mark.parametrize("S,window", ids((300, 128), (4000, 1000)))
def test_sdpa_decode_window_simt_float32(monkeypatch, S, window):
    """The window's bound on the SIMT kernel, in float32 (tolerance 2e-5: one key too many or too few
    shows; the window test above takes the bf16 matrix-unit kernel)."""
    monkeypatch.setattr(decode_attention, "SDPA_MMA", False)
    q = mx.random.normal((1, 8, 1, 64))
    k, v = mx.random.normal((1, 2, S, 64)), mx.random.normal((1, 2, S, 64))
    sinks = mx.random.normal((8,))
    out = tk.sdpa_kernel(q, k, v, sinks, 0.125, window=window)
    assert tk.rel_err(out, tk.sdpa_math(q, k, v, sinks, 0.125, window)) < tk.TOL[F32]


@pytest.mark.parametrize("dtype,prompt", ids((F32, 300), (BF16, 127)))
def test_sdpa_decode_reads_the_caches_in_place(dtype, prompt):
    tk.test_sdpa_decode_reads_the_caches_in_place(dtype, prompt)


PROJ = [(F32, 2880, 64, 64, 8, 1), (BF16, 224, 32, 4, 4, 2), (F32, 96, 16, 6, 2, 3), (BF16, 128, 64, 8, 2, 1)]


@pytest.mark.parametrize("dtype,H,D,hq,hkv,B", ids(*PROJ))
@pytest.mark.parametrize("offset", [37, 30000])
def test_norm_qkv_rope(dtype, H, D, hq, hkv, B, offset):
    tk.test_norm_qkv_rope_matches_reference(dtype, H, D, hq, hkv, B, offset)


@pytest.mark.parametrize("dtype,H,D,hq,hkv,B", ids(*PROJ))
def test_out_residual(dtype, H, D, hq, hkv, B):
    tk.test_out_residual_matches_reference(dtype, H, D, hq, hkv, B)


@pytest.mark.parametrize(
    "dtype,H,D,hq,hkv,rows",
    ids(
        (BF16, 256, 64, 8, 2, 6), (F32, 256, 64, 8, 2, 9), (BF16, 2880, 64, 64, 8, 5), (F16, 96, 16, 6, 2, 2)
    ),
)
def test_projection_rows_get_their_bits_alone(dtype, H, D, hq, hkv, rows):
    """A decode batch's rows in blocks through norm_qkv_rope and out_residual (threadgroup-staged
    inputs, part-filled last blocks) against each row alone on the register path: equal bits."""
    tk.test_projection_rows_get_their_bits_alone(dtype, H, D, hq, hkv, rows)


def test_out_residual_rounds_where_the_reference_rounds():
    """round(res + round(W o + b)) in bf16, as the reference's addmm then add: the kernel's outputs
    equal the reference's bit for bit except where float32 summation order flips a rounding (a
    tolerance test cannot see a rounding step dropped: that moves each output by under one ulp)."""
    block = tk.random_attention(256, 64, 8, 2, BF16)
    x = (0.5 * mx.random.normal((4, 1, 256))).astype(BF16)
    o = mx.random.normal((4, 1, 512)).astype(BF16)
    got = decode_attention.out_residual(o, block.out.weight, block.out.bias, x)
    want = x + block.out(o)
    same = np.mean(np.array(got.view(mx.uint16)) == np.array(want.view(mx.uint16)))
    assert same > 0.99, same


@pytest.mark.parametrize("dtype,window,prompt", ids((BF16, 16, 9), (F32, None, 40), (BF16, None, 1)))
def test_attention_block_decode(dtype, window, prompt):
    tk.test_attention_block_decode_matches_reference(dtype, window, prompt)


# ---- the whole model -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,prompt", ids((F32, 7), (F32, 15), (BF16, 100)))
def test_model_logits_with_kernels_equal_reference(dtype, prompt):
    """A tiny model's prefill (100 tokens: the prefill GEMM runs) then 6 decode steps, every kernel
    emulated, against the reference path (bf16: both against the float32 truth)."""
    tk.test_model_logits_with_kernels_equal_reference(dtype, prompt)


def test_a_batch_with_matmul_projections_equals_each_row_alone(monkeypatch):
    """A decode batch past ATTENTION_KERNEL_MAX_ROWS (MLX's matmuls for the attention's projections,
    the attention and MoE kernels still emulated) against each row decoded alone on the kernels."""
    monkeypatch.setenv("OSS_MLX_COMPILE", "0")  # the emulator runs eagerly, outside a trace
    tk.test_a_batched_decode_step_equals_each_row_alone(monkeypatch, 1)


@pytest.mark.parametrize("mma_from", [1, None])
def test_kernel_paths_are_taken(monkeypatch, mma_from):
    tk.test_kernel_paths_are_taken(monkeypatch, mma_from)


def test_self_test_passes_and_every_kernel_ran_on_this_cpu(monkeypatch):
    """The start-up self-test (each kernel against its reference; the grouped and the matrix-unit
    decode-MoE kernels turned on; one token then takes the per-slot kernels, not down_mma_combine)
    passes with every kernel emulated, and every kernel in SPECS has run through the emulator in this
    session (the count is printed at the end of the run)."""
    from oss_mlx.kernels import decode_moe

    monkeypatch.setattr(decode_moe, "MOE_GROUPED_FROM", 4)
    monkeypatch.setattr(decode_moe, "MOE_MMA_FROM", 2)
    before = LAUNCHES.copy()
    assert kernel_selftest.run() is None
    ran = {n.removeprefix("oss_") for n in LAUNCHES - before}
    assert (
        ran == set(kernels.SPECS) - decode_moe.unused_kernels() == set(kernels.SPECS) - {"down_mma_combine"}
    )
    assert {n.removeprefix("oss_") for n in LAUNCHES} >= set(kernels.SPECS)

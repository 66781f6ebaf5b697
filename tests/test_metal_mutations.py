"""Mutation check: plausible bugs planted in the Metal kernels, one at a time, each caught by an
emulated kernel test.

A mutation is a textual change to the Metal text of one kernel, as `kernel_sources("metal")` returns
it (so it follows the sources wherever they live): the pattern must occur there, and the emulator
builds the changed kernel in place of the real one (the factory handed to kernels.emulated applies
the change to that kernel's header and body). The check is a test of tests/test_kernels.py (or of
tests/test_kernels_emulated.py) that passes on the real kernel (checked here too) and must fail on
the changed one: an assertion, or an error of the emulator (invalid access, divergence, timeout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import pytest
import test_kernels as tk
import test_kernels_emulated as te
from metal_emulator import Emulator, MetalEmulatorError, unavailable

from oss_mlx import kernels
from oss_mlx.kernels import decode_moe

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"Metal emulator: {unavailable()}")

F32, BF16 = mx.float32, mx.bfloat16


@dataclass(frozen=True)
class Mutation:
    kind: str  # the kind of bug
    kernel: str  # the SPECS kernel whose text changes
    old: str  # its first occurrence (in the header or the body) is replaced
    new: str
    check: Callable[[pytest.MonkeyPatch], None]


def sdpa(mma, dtype, B, Hkv, G, D, S):
    return lambda mp: tk.test_sdpa_decode(mp, mma, dtype, B, Hkv, G, D, S)


SPLIT_MMA = sdpa(True, BF16, 1, 8, 8, 64, 300)  # gpt-oss heads, two key splits + combine


def MOE_DECODE(mp):  # the per-slot kernels (two bf16 rows would take the matrix-unit ones)
    mp.setattr(decode_moe, "MOE_MMA_FROM", None)
    tk.test_moe_decode_matches_reference(BF16, 8, 4, 96, 64, 2)


MOE_MMA = lambda mp: tk.test_experts_on_the_matrix_units(mp, 8, 4, 96, 64, 12, "skewed")  # noqa: E731
MOE_PREFILL = lambda mp: tk.test_moe_prefill_matches_reference(BF16, 4, 2, 64, 96, 40, 3)  # noqa: E731
STAGED_ROWS = lambda mp: tk.test_projection_rows_get_their_bits_alone(F32, 256, 64, 8, 2, 6)  # noqa: E731

MUTATIONS = [
    Mutation("wrong shuffle mask (the max over a tile's keys misses a lane bit)", "sdpa_decode_mma",
             "mt = max(mt, lane_xor(mt, 16));", "mt = max(mt, lane_xor(mt, 8));", SPLIT_MMA),
    Mutation("wrong shuffle lane (top-k takes a neighbour's index with its value)", "route",
             "int oi = lane_xor_i(bi, o);", "int oi = lane_xor_i(bi, o ^ 1);",
             lambda mp: tk.test_route(F32, 128, 3, 17, 96)),
    Mutation("missing threadgroup barrier (the simdgroups' partial sums read before written)", "down_combine",
             "OSS_BARRIER();", "", MOE_DECODE),
    Mutation("missing simdgroup barrier (P read from other lanes before they wrote it)", "sdpa_decode",
             "OSS_WARP_BARRIER();", "", sdpa(False, F32, 1, 4, 16, 32, 260)),
    Mutation("off-by-one in a threadgroup index (the split combine's sum tree)", "sdpa_combine",
             "if (d < s) red[d] += red[d + s];", "if (d < s) red[d] += red[d + s - 1];", SPLIT_MMA),
    Mutation("off-by-one in a threadgroup index (the GEMM's staged A rows)", "moe_gemm",
             "sa[ar * LDF + 8 * ac + i] = av[i];", "sa[ar * LDF + 8 * ac + i + 1] = av[i];", MOE_PREFILL),
    Mutation("swapped fragment coordinates (the GEMM's epilogue)", "moe_gemm",
             "const int fm = frag_row(lane), fn = frag_col(lane);",
             "const int fm = frag_col(lane), fn = frag_row(lane);", MOE_PREFILL),
    Mutation("matrix load not transposed (the weights as the B operand)", "moe_gemm",
             "LDF, ulong2(0, 0), true);", "LDF, ulong2(0, 0), false);", MOE_PREFILL),
    Mutation("wrong e8m0 bias (2^(s - 112) for 2^(s - 113))", "down_combine",
             "return as_type<float>((s + 14u) << 23);", "return as_type<float>((s + 15u) << 23);",
             MOE_DECODE),
    Mutation("wrong sink handling (the sink left out of the denominator)", "sdpa_decode",
             "const float den = L * c + fast_exp2(sk - M2);", "const float den = L * c;",
             sdpa(False, F32, 1, 8, 8, 64, 1)),
    Mutation("wrong sink handling (the sink in base e inside a base-2 softmax)", "sdpa_combine",
             "const float sk = to_f(sinks[bh % Hq]) * OSS_LOG2E;", "const float sk = to_f(sinks[bh % Hq]);",
             sdpa(False, F32, 1, 4, 1, 32, 2049)),  # 9 splits, float32: the sink's 0.3% shows
    Mutation("bf16 rounding dropped (round_to returns the float)", "out_residual",
             "return static_cast<float>(static_cast<T>(x));", "return x;",
             lambda mp: te.test_out_residual_rounds_where_the_reference_rounds()),
    Mutation("atomics replaced by a plain load and store (expert counts lose updates)", "moe_group",
             "atomic_fetch_add_explicit(&count[ids[s]], 1u, memory_order_relaxed)",
             "atomic_store_explicit(&count[ids[s]], "
             "atomic_load_explicit(&count[ids[s]], memory_order_relaxed) + 1u, memory_order_relaxed)",
             lambda mp: tk.test_moe_group_groups_rows_by_expert(32, 4, 700, 32)),
    Mutation("threadgroup memory read before it is written (the counts' reset dropped)", "moe_group",
             "for (int e = tid; e < E; e += 1024) "
             "atomic_store_explicit(&count[e], 0, memory_order_relaxed);", "",
             lambda mp: tk.test_moe_group_groups_rows_by_expert(4, 2, 40, 3)),
    Mutation("wrong window bound (one key too few)", "sdpa_decode",
             "const int lo = (WINDOW > 0 && S > WINDOW) ? S - WINDOW : 0;",
             "const int lo = (WINDOW > 0 && S > WINDOW) ? S - WINDOW + 1 : 0;",
             lambda mp: te.test_sdpa_decode_window_simt_float32(mp, 300, 128)),
    Mutation("softmax rescale dropped (the output kept at an old maximum)", "sdpa_decode",
             "for (int t = 0; t < 8; ++t) o[g][t] *= c;", "", sdpa(False, F32, 2, 1, 4, 128, 777)),
    Mutation("softmax rescale dropped (the running sum, matrix units)", "sdpa_decode_mma",
             "l[c] *= corr[c];", "", sdpa(True, BF16, 1, 3, 5, 64, 1000)),
    Mutation("wrong split combine (the splits' weights left out)", "sdpa_combine",
             "O = fma(pp[i * (D + 2) + d], cm[i], O);", "O += pp[i * (D + 2) + d];", SPLIT_MMA),
    Mutation("off-by-one in a fragment index (the B rows' k positions)", "gate_up_mma",
             "const int k = 32 * gi + 8 * (fm / 2) + fm % 2;", "const int k = 32 * gi + 8 * (fm / 2);",
             MOE_MMA),
    Mutation("missing threadgroup barrier (the split k's partial tiles read before written)", "down_mma",
             "threadgroup_barrier(mem_flags::mem_threadgroup);", "", MOE_MMA),
    Mutation("missing threadgroup barrier (a block's staged rows read before written)", "norm_qkv_rope",
             "OSS_BARRIER();", "", STAGED_ROWS),
    Mutation("off-by-one in a staged row (the block's rows one element apart)", "out_residual",
             "stage_chunks<NC>(xr, xs + r * ROW, lane);", "stage_chunks<NC>(xr, xs + r * ROW + 1, lane);",
             STAGED_ROWS),
    Mutation("wrong rotation sign (RoPE)", "norm_qkv_rope",
             "y0[j][r] = c0 * cs[j][r] - c1 * sn[j][r];", "y0[j][r] = c0 * cs[j][r] + c1 * sn[j][r];",
             lambda mp: tk.test_norm_qkv_rope_matches_reference(F32, 96, 16, 6, 2, 3, 37)),
]  # fmt: skip

EMULATOR = Emulator(cpu_seconds=30)  # a planted endless loop ends in seconds


class MutatedFactory:
    """mx.fast.metal_kernel through the emulator, with one kernel's text changed."""

    def __init__(self, mutation: Mutation | None):
        self.mutation, self.applied = mutation, 0

    def __call__(self, name, input_names, output_names, source, header="", **kw):
        m = self.mutation
        if m is not None and name == f"oss_{m.kernel}":
            if m.old in header:
                header = header.replace(m.old, m.new, 1)
            else:
                source = source.replace(m.old, m.new, 1)
            self.applied += 1
        return EMULATOR.metal_kernel(name, input_names, output_names, source, header, **kw)


def run_check(mutation: Mutation, factory: MutatedFactory) -> None:
    mx.random.seed(20261127)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(kernels.ENV, raising=False)
        with kernels.emulated("metal", factory), kernels.poison_outputs(float("nan")):
            mutation.check(mp)


def test_at_least_ten_kinds_on_every_family():
    kinds = {m.kind.split(" (")[0] for m in MUTATIONS}
    assert len(kinds) >= 10, kinds
    assert {kernels.SPECS[m.kernel].family for m in MUTATIONS} == {s.family for s in kernels.SPECS.values()}


_baselines: set[int] = set()


@pytest.mark.parametrize(
    "mutation", MUTATIONS, ids=[f"{m.kernel}:{m.kind.split(' (')[0]}" for m in MUTATIONS]
)
def test_the_emulated_tests_catch_the_planted_bug(mutation):
    header, body = kernels.kernel_sources("metal")[mutation.kernel]
    assert mutation.old in header + body, f"the pattern is not in {mutation.kernel}'s Metal text"
    assert mutation.new != mutation.old
    if id(mutation.check) not in _baselines:  # the check passes on the real kernels
        run_check(mutation, MutatedFactory(None))
        _baselines.add(id(mutation.check))
    factory = MutatedFactory(mutation)
    with pytest.raises((AssertionError, MetalEmulatorError)) as caught:
        run_check(mutation, factory)
    assert factory.applied, f"{mutation.kernel} was never built: the check does not launch it"
    print(f"{mutation.kernel}: {mutation.kind}: caught ({caught.typename}: {str(caught.value)[:160]})")

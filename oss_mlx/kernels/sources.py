"""The kernels' interfaces (SPECS) and source text: the text MLX compiles for each kernel in each
dialect (kernel_sources).

Where the source lives:
  kernels_shared/<family>.gpu   one source for both dialects (every SIMT kernel); dialect words are
                                written `$word` and replaced as text here (DIALECT_WORDS)
  kernels_metal/<family>.metal  Metal only: the matrix-unit kernels (sdpa_decode_mma, moe_gemm)
  kernels_cuda/<family>.cu      CUDA only: the same two, for mma.sync
  kernels_{metal,cuda}/common.* the dialect primitives (load8, warp_sum, MXFP4 bits, ...);
  kernels_shared/helpers.gpu    helpers of several families built on them;
  kernels_{metal,cuda}/matrix.* the matrix-unit helpers.
A family file holds a comment block, its helpers, then `// @@kernel NAME` bodies. A kernel is compiled
from its body plus the helpers it reaches, comments and layout removed (see _code_only and
_used_helpers for why), in this order: dialect primitives, shared helpers, matrix-unit helpers, the
family's shared helpers, the family's dialect helpers.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path

_PACKAGES = {
    "metal": "oss_mlx.kernels_metal",
    "cuda": "oss_mlx.kernels_cuda",
    "shared": "oss_mlx.kernels_shared",
}
_FOLDERS = {"metal": "kernels_metal", "cuda": "kernels_cuda", "shared": "kernels_shared"}
EXT = {"metal": ".metal", "cuda": ".cu", "shared": ".gpu"}
_PRIMITIVES = {"metal": "common.h", "cuda": "common.cuh"}
_MATRIX = {"metal": "matrix.h", "cuda": "matrix.cuh"}
_HELPERS = "helpers.gpu"
DIALECTS = ("metal", "cuda")


# ---- interfaces -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One instantiation of a kernel that both offline compile checks build (tests/test_metal_sources.py
    with clang, benchmarks/compile_cuda_kernels.py with nvcc): each input's and output's dtype (bf16,
    f16, f32, u32, u8, i32; a trailing "c": fewer than 8 elements, which MLX's Metal passes in
    `constant` memory) and the template arguments (a dtype name or an int)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    template: dict[str, str | int] = field(hash=False)


def _case(signature: str, **template: str | int) -> Case:
    ins, outs = signature.split("->")
    return Case(tuple(ins.split()), tuple(outs.split()), template)


def _name(doc: str) -> str:
    return re.match(r"\w+", doc).group(0)


@dataclass(frozen=True)
class KernelSpec:
    """A kernel's interface, written once: what the launchers pass, the compile checks build and MLX
    is told. The docs read "name [shape] (notes)", in the order MLX receives them; `inputs`,
    `outputs` and `template` are the names alone."""

    name: str
    family: str  # the source file: kernels_shared/<family>.gpu or kernels_<dialect>/<family>.*
    does: str
    input_docs: tuple[str, ...]
    output_docs: tuple[str, ...]
    template_docs: tuple[str, ...]
    grid: str  # the launch grid (threads), in the launcher's words
    threads: str  # the threadgroup
    cases: tuple[Case, ...]
    row_contiguous: bool = True  # MLX copies strided inputs first (False: the kernel reads strides)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(_name(d) for d in self.input_docs)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(_name(d) for d in self.output_docs)

    @property
    def template(self) -> tuple[str, ...]:
        return tuple(_name(d) for d in self.template_docs)


_B, _F = "bf16", "f32"
# The decode MoE's weights and gate/up template, as its per-slot and grouped kernels both take them.
_GATE_UP_WEIGHTS = (
    "w [E, 2I, H/8] uint32 (gate and up rows interleaved)",
    "scales [E, 2I, H/32] uint8",
    "bias [E, 2I]",
    "consts [2] float32 (alpha, limit)",
)
_DOWN_WEIGHTS = (
    "w [E, HP, I/8] uint32 (HP >= H: rows may be padded)",
    "scales [E, HP, I/32] uint8",
    "bias [E, H]",
)
# The matrix-unit decode kernels' slots: grouped by moe_group, or (one token) the router's ids as they are.
_MMA_SLOTS = (
    "perm [N * K] uint32 (SORTED: moe_group's sorted slot -> slot; else each slot's expert, the ids)",
    "offsets [E + 1] uint32 (SORTED: moe_group's, e's slots perm[offsets[e] .. offsets[e + 1]); else unread)",
)
_SORTED = "SORTED (1: slots grouped by expert, a block row per expert; 0: a block row per slot)"
_DOWN_20B = dict(T=_B, H=2880, HP=2944, I=2880, K=4)  # the 20b's down experts (rows padded for CUDA)
_NI = "NI (k blocks a warp loads before it multiplies them; CUDA: Metal's loads go one block at a time)"
_GATE_UP_TEMPLATES = ("T", "H", "I", "K", "NC (ceil(H / 1024))", "COLS (SwiGLU columns per warp, <= 32)")
_SDPA = dict(
    input_docs=(
        "q [B, Hq, D] (T, contiguous)",
        "kv [2, B, Hkv, S, D] (T; keys, then values; any strides: a cache's joint buffer, read in place)",
        "sinks [Hq] (any float)",
        "scale_log2 [1] float32 (scale * log2 e)",
        "pos [B] int32 (row b's position: its keys [0, min(S, pos[b] + 1)) are attended)",
    ),
    output_docs=(
        "out [B, Hq, D] (T; written when nsplit = 1)",
        "part [B, Hq, nsplit, D + 2] float32 (each split's o, m, l; written when nsplit > 1)",
    ),
    grid="(128 * nsplit, B * Hkv, 1)",
    threads="(128, 1, 1): 4 warps",
    row_contiguous=False,
)
SPECS = {
    s.name: s
    for s in (
        KernelSpec(
            "route",
            "routing",
            "router logits -> top-k -> softmax over the k",
            input_docs=("x [N, H]", "w [E, H]", "b [E]"),
            output_docs=("wts [N, K] float32 (descending logit order)", "ids [N, K] uint32"),
            template_docs=("LT (the logits' dtype)", "H", "E (<= 256)", "K (<= E, <= 8)"),
            grid="(256 * N, 1, 1)",
            threads="(256, 1, 1)",
            cases=(
                _case("bf16 bf16 bf16 -> f32 u32", LT=_B, H=2880, E=32, K=4),
                _case("f32 f32 f32c -> f32 u32", LT=_F, H=64, E=4, K=1),
                _case("f32 f32 f32 -> f32 u32", LT=_F, H=64, E=128, K=3),
            ),
        ),
        KernelSpec(
            "norm_route",
            "routing",
            "the MoE block's RMSNorm, then route",
            input_docs=("x [N, H]", "nw [H]", "w [E, H]", "b [E]", "eps [1] float32"),
            output_docs=("h [N, H] (T: the normed rows)", "wts [N * K] float32", "ids [N * K] uint32"),
            template_docs=(
                "T",
                "LT (the logits' dtype)",
                "H (<= 7680: the row is staged in 32 KB of threadgroup memory)",
                "E (<= 256)",
                "K (<= E, <= 8)",
            ),
            grid="(512 * N, 1, 1)",
            threads="(512, 1, 1)",
            cases=(
                _case("bf16 bf16 bf16 bf16 f32c -> bf16 f32 u32", T=_B, LT=_B, H=2880, E=32, K=4),
                _case("f16 f16 f32 f32 f32c -> f16 f32 u32", T="f16", LT=_F, H=96, E=128, K=3),
                _case("f32 f32 f32 f32 f32 -> f32 f32 u32", T=_F, LT=_F, H=64, E=128, K=3),
            ),
        ),
        KernelSpec(
            "gate_up_swiglu",
            "decode_moe",
            "MXFP4 gate/up GEMV + bias + clamped SwiGLU, for each (token, expert) slot",
            input_docs=(
                "x [N, H] (the normed rows)",
                "ids [N * K] uint32",
                *_GATE_UP_WEIGHTS,
            ),
            output_docs=("h [N * K, I] (T)",),
            template_docs=_GATE_UP_TEMPLATES,
            grid="(128 * N * K, ceil(I / (4 * COLS)), 1): slots first",
            threads="(128, 1, 1): 4 warps",
            cases=(
                _case("bf16 u32 u32 u8 bf16 f32c -> bf16", T=_B, H=2880, I=2880, K=4, NC=3, COLS=1),
                _case("f32 u32c u32 u8 f32 f32c -> f32", T=_F, H=64, I=96, K=2, NC=1, COLS=4),
            ),
        ),
        KernelSpec(
            "down_combine",
            "decode_moe",
            "MXFP4 down GEMV + bias, weighted sum over the k experts, + residual",
            input_docs=(
                "h [N * K, I]",
                "ids [N * K] uint32",
                "wts [N * K] float32",
                *_DOWN_WEIGHTS,
                "res [N, H]",
            ),
            output_docs=("y [N, H] (T)",),
            template_docs=("T", "H", "HP", "I", "K", "NC (ceil(I / 1024))", "ROWS (output rows per block)"),
            grid="(128 * N, ceil(H / ROWS), 1): tokens first",
            threads="(128, 1, 1): 4 warps, warp w takes experts w, w + 4, ...",
            cases=(
                _case(
                    "bf16 u32 f32 u32 u8 bf16 bf16 -> bf16", T=_B, H=2880, HP=2944, I=2880, K=4, NC=3, ROWS=8
                ),
            ),
        ),
        KernelSpec(
            "gate_up_grouped",
            "decode_moe",
            "gate_up_swiglu for slots grouped by expert: each expert's rows read once for all its slots",
            input_docs=(
                "x [N, H] (the normed rows)",
                "perm [N * K] uint32 (moe_group: sorted slot -> slot)",
                "offsets [E + 1] uint32 (moe_group: expert e's slots are perm[offsets[e] .. offsets[e + 1]))",
                *_GATE_UP_WEIGHTS,
            ),
            output_docs=("h [N * K, I] (T; in slot order, as gate_up_swiglu's)",),
            template_docs=(
                *_GATE_UP_TEMPLATES,
                "S (slots whose inputs are staged in shared memory at a time)",
            ),
            grid="(256 * ceil(I / (8 * COLS)), E, 1)",
            threads="(256, 1, 1): 8 warps",
            cases=(
                _case("bf16 u32 u32 u32 u8 bf16 f32c -> bf16", T=_B, H=2880, I=2880, K=4, NC=3, COLS=2, S=4),
                _case("f32 u32 u32c u32 u8 f32 f32c -> f32", T=_F, H=64, I=96, K=2, NC=1, COLS=2, S=8),
            ),
        ),
        KernelSpec(
            "down_grouped",
            "decode_moe",
            "down GEMV + bias, times the routing weight, for slots grouped by expert (float32 out)",
            input_docs=(
                "h [N * K, I] (gate_up_grouped's)",
                "perm [N * K] uint32",
                "offsets [E + 1] uint32",
                "wts [N * K] float32",
                *_DOWN_WEIGHTS,
            ),
            output_docs=("d [N * K, H] float32 (each slot's weighted expert output)",),
            template_docs=(
                "T",
                "H",
                "HP",
                "I",
                "K",
                "NC (ceil(I / 1024))",
                "RW (rows per warp, <= 32)",
                "S (slots whose inputs are staged in shared memory at a time)",
            ),
            grid="(256 * ceil(H / (8 * RW)), E, 1)",
            threads="(256, 1, 1): 8 warps",
            cases=(
                _case(
                    "bf16 u32 u32 f32 u32 u8 bf16 -> f32", T=_B, H=2880, HP=2944, I=2880, K=4, NC=3, RW=2, S=4
                ),
                _case("f32 u32 u32c f32 u32 u8 f32 -> f32", T=_F, H=64, HP=64, I=96, K=2, NC=1, RW=2, S=8),
            ),
        ),
        KernelSpec(
            "gate_up_mma",
            "decode_moe",
            "gate_up_swiglu on the matrix units, slots grouped by expert: each weight dequantized once for 8",
            input_docs=(
                "x [N, H] (the normed rows; bf16)",
                *_MMA_SLOTS,
                *_GATE_UP_WEIGHTS,
            ),
            output_docs=("h [N * K, I] (T; in slot order, as gate_up_swiglu's)",),
            template_docs=(
                "T (bf16)",
                "H (% 32 == 0)",
                "I (% 32 == 0)",
                "K",
                "RT (16-row tiles per warp)",
                _SORTED,
                _NI,
            ),
            grid="(128 * ceil(I / (8 * RT)), SORTED ? E : N * K, 1)",
            threads="(128, 1, 1): 4 warps splitting the k range",
            cases=(
                _case(
                    "bf16 u32 u32 u32 u8 bf16 f32c -> bf16", T=_B, H=2880, I=2880, K=4, RT=2, SORTED=1, NI=2
                ),
                _case(
                    "bf16 u32c u32c u32 u8 bf16 f32c -> bf16", T=_B, H=2880, I=2880, K=4, RT=2, SORTED=0, NI=2
                ),
                _case("bf16 u32 u32c u32 u8 f32 f32c -> bf16", T=_B, H=96, I=64, K=2, RT=1, SORTED=1, NI=1),
            ),
        ),
        KernelSpec(
            "down_mma",
            "decode_moe",
            "down + bias, times the routing weight, on the matrix units, slots grouped by expert (float32)",
            input_docs=(
                "h [N * K, I] (gate_up_mma's; bf16)",
                *_MMA_SLOTS,
                "wts [N * K] float32",
                *_DOWN_WEIGHTS,
            ),
            output_docs=("d [N * K, H] float32 (each slot's weighted expert output, for moe_combine)",),
            template_docs=("T (bf16)", "H", "HP", "I", "K", "RT (16-row tiles per warp)", _SORTED, _NI),
            grid="(128 * ceil(H / (16 * RT)), SORTED ? E : N * K, 1)",
            threads="(128, 1, 1): 4 warps splitting the k range",
            cases=(
                _case("bf16 u32 u32 f32 u32 u8 bf16 -> f32", **_DOWN_20B, RT=2, SORTED=1, NI=6),
                _case("bf16 u32c u32c f32c u32 u8 bf16 -> f32", **_DOWN_20B, RT=2, SORTED=0, NI=3),
                _case(
                    "bf16 u32 u32c f32 u32 u8 f32 -> f32", T=_B, H=64, HP=64, I=96, K=2, RT=1, SORTED=1, NI=2
                ),
            ),
        ),
        KernelSpec(
            "down_mma_combine",
            "decode_moe",
            "one token's down_mma and moe_combine in one kernel (the same bits): K x 4 warps per 16 rows",
            input_docs=(
                "h [K, I] (gate_up_mma's; bf16)",
                "ids [K] uint32 (the token's experts, the router's order)",
                "wts [K] float32",
                *_DOWN_WEIGHTS,
                "res [1, H]",
            ),
            output_docs=("y [1, H] (T)",),
            template_docs=("T (bf16)", "H", "HP", "I", "K (<= 8)", _NI),
            grid="(128 * K * ceil(H / 16), 1, 1)",
            threads="(128 * K, 1, 1): warps 4j .. 4j + 3 slot j's, splitting its k range",
            cases=(
                _case("bf16 u32c f32c u32 u8 bf16 bf16 -> bf16", **_DOWN_20B, NI=3),
                _case("bf16 u32c f32c u32 u8 f32 bf16 -> bf16", T=_B, H=64, HP=64, I=96, K=2, NI=1),
            ),
        ),
        KernelSpec(
            "moe_combine",
            "decode_moe",
            "the residual plus each token's K weighted expert outputs (down_grouped's), as down_combine sums",
            input_docs=("d [N * K, H] float32", "res [N, H]"),
            output_docs=("y [N, H] (T)",),
            template_docs=("T", "H", "K"),
            grid="(256 * ceil(H / 256), N, 1)",
            threads="(256, 1, 1)",
            cases=(_case("f32 bf16 -> bf16", T=_B, H=2880, K=4), _case("f32 f32 -> f32", T=_F, H=64, K=2)),
        ),
        KernelSpec(
            "moe_group",
            "prefill_moe",
            "a prefill chunk's (token, expert) rows grouped by expert, for moe_gemm",
            input_docs=("ids [NK] uint32 (the router's ids, flattened: row s = n * K + j)",),
            output_docs=(
                "perm [NK] uint32 (sorted row -> s)",
                "offsets [E + 1] uint32 (expert e's rows are perm[offsets[e] .. offsets[e + 1]))",
                "tiles [E + 1] uint32 (expert e's BM-row tiles are moe_gemm's tiles[e] .. tiles[e + 1])",
            ),
            template_docs=("E (<= 1024)", "BM"),
            grid="(1024, 1, 1)",
            threads="(1024, 1, 1): one block",
            cases=(_case("u32 -> u32 u32 u32", E=32, BM=64), _case("u32 -> u32 u32 u32", E=128, BM=64)),
        ),
        KernelSpec(
            "moe_gemm",
            "prefill_moe",
            "grouped MXFP4 GEMM on the matrix units: gate_up + bias + SwiGLU (MODE 0), down + bias (MODE 1)",
            input_docs=(
                "a [rows, KD] (T: MODE 0 the normed rows x, MODE 1 moe_gemm's MODE 0 output)",
                "perm [NK] uint32",
                "offsets [E + 1] uint32",
                "tiles [E + 1] uint32",
                "w [E, N, KD/8] uint32",
                "scales [E, N, KD/32] uint8",
                "bias [E, N] (MODE 0) or [E, NOUT] (MODE 1)",
                "consts [2] float32 (alpha, limit)",
            ),
            output_docs=("out [NK, NOUT] (T; MODE 0 in sorted-row order, MODE 1 in (token, expert) order)",),
            template_docs=(
                "T (bf16 or f16)",
                "KD (% 32 == 0)",
                "N (weight rows, padded ones included)",
                "NOUT",
                "E",
                "K",
                "MODE",
                "BM (= 64)",
            ),
            grid="(256 * ceil(N / 128), ceil(NK / BM) + E, 1)",
            threads="(256, 1, 1): 8 warps",
            cases=(
                _case(
                    "bf16 u32 u32 u32 u32 u8 bf16 f32c -> bf16",
                    T=_B,
                    KD=2880,
                    N=5760,
                    NOUT=2880,
                    E=32,
                    K=4,
                    MODE=0,
                    BM=64,
                ),
                _case(
                    "bf16 u32 u32 u32 u32 u8 bf16 f32c -> bf16",
                    T=_B,
                    KD=2880,
                    N=2944,
                    NOUT=2880,
                    E=32,
                    K=4,
                    MODE=1,
                    BM=64,
                ),
                _case(
                    "f16 u32 u32 u32 u32 u8 f16 f32c -> f16",
                    T="f16",
                    KD=2880,
                    N=2880,
                    NOUT=2880,
                    E=128,
                    K=4,
                    MODE=1,
                    BM=64,
                ),
                _case(
                    "f16 u32 u32 u32 u32 u8 f32 f32c -> f16",
                    T="f16",
                    KD=96,
                    N=128,
                    NOUT=64,
                    E=4,
                    K=2,
                    MODE=0,
                    BM=64,
                ),
            ),  # fmt: skip
        ),
        KernelSpec(
            "sdpa_decode",
            "decode_attention",
            "one-query attention with sinks over a cache's K/V buffer, the keys split over blocks",
            template_docs=(
                "T",
                "D (D / 8 a power of two <= 32)",
                "G (Hq / Hkv, <= 16, G * D <= 512)",
                "WINDOW",
                "KPS (a split takes at least this many of its row's keys)",
            ),
            cases=(
                _case("bf16 bf16 bf16 f32c i32c -> bf16 f32", T=_B, D=64, G=8, WINDOW=0, KPS=256),
                _case("f32 f32 f32 f32c i32 -> f32 f32", T=_F, D=16, G=2, WINDOW=128, KPS=256),
            ),
            **_SDPA,
        ),
        KernelSpec(
            "sdpa_decode_mma",
            "decode_attention",
            "sdpa_decode on the matrix units (16-bit, head_dim 64, G <= 8)",
            template_docs=("T (bf16 or f16)", "D (= 64)", "G (<= 8)", "WINDOW", "KPS (as sdpa_decode's)"),
            cases=(
                _case("bf16 bf16 bf16 f32c i32c -> bf16 f32", T=_B, D=64, G=8, WINDOW=0, KPS=256),
                _case("f16 f16 f32 f32c i32 -> f16 f32", T="f16", D=64, G=3, WINDOW=128, KPS=256),
            ),
            **_SDPA,
        ),
        KernelSpec(
            "sdpa_combine",
            "decode_attention",
            "merges sdpa_decode's key splits, sink included",
            input_docs=("part [B, Hq, nsplit <= 256, D + 2] float32", "sinks [Hq] (any float)"),
            output_docs=("out [B, Hq, D] (T)",),
            template_docs=("T", "D"),
            grid="(D * B * Hq, 1, 1)",
            threads="(D, 1, 1)",
            cases=(_case("f32 bf16 -> bf16", T=_B, D=64),),
        ),
        KernelSpec(
            "norm_qkv_rope",
            "decode_attention",
            "the attention's RMSNorm + qkv GEMV + bias + YaRN concentration + RoPE on q and k",
            input_docs=(
                "x [N, H]",
                "nw [H]",
                "w [(HQ + 2 HKV) D, H] (rows head-major: query heads, key heads, value heads)",
                "b [(HQ + 2 HKV) D]",
                "wl [D / 2] float32 (RoPE wavelengths, as mx.fast.rope takes them)",
                "pos [N] int32 (token n's position)",
                "consts [2] float32 (eps, concentration)",
            ),
            output_docs=(
                "q [N, HQ, D] (T)",
                "kv [2, N, HKV, 1, D] (T: the new key, then value, as the caches' joint buffer holds them)",
            ),
            template_docs=(
                "T",
                "H (<= 7680)",
                "D",
                "HQ",
                "HKV",
                "NC (ceil(H / 256))",
                "PW (pairs of rows per warp, <= 32)",
                "RB (token rows per block: 1, or RB rows staged in threadgroup memory, RB * NC * 256 T)",
            ),
            grid="(128 * ceil(N / RB), ceil((HQ + 2 HKV) D / 2 / (4 PW)), 1)",
            threads="(128, 1, 1): 4 warps",
            cases=(
                _case(
                    "bf16 bf16 bf16 bf16 f32 i32c f32c -> bf16 bf16",
                    T=_B,
                    H=2880,
                    D=64,
                    HQ=64,
                    HKV=8,
                    NC=12,
                    PW=4,
                    RB=1,
                ),
                _case(
                    "bf16 bf16 bf16 bf16 f32 i32 f32c -> bf16 bf16",
                    T=_B,
                    H=2880,
                    D=64,
                    HQ=64,
                    HKV=8,
                    NC=12,
                    PW=4,
                    RB=4,
                ),
            ),
        ),
        KernelSpec(
            "out_residual",
            "decode_attention",
            "the attention's output GEMV + bias + residual",
            input_docs=("o [N, IN]", "w [H, IN]", "b [H]", "res [N, H]"),
            output_docs=("y [N, H] (T)",),
            template_docs=(
                "T",
                "H",
                "IN",
                "NC (ceil(IN / 256))",
                "RW (rows per warp, even, <= 32)",
                "RB (token rows per block, as norm_qkv_rope's)",
            ),
            grid="(128 * ceil(N / RB), ceil(H / (4 RW)), 1)",
            threads="(128, 1, 1): 4 warps",
            cases=(
                _case("bf16 bf16 bf16 bf16 -> bf16", T=_B, H=2880, IN=4096, NC=16, RW=4, RB=1),
                _case("bf16 bf16 bf16 bf16 -> bf16", T=_B, H=2880, IN=4096, NC=16, RW=4, RB=3),
                _case("f32 f32 f32 f32 -> f32", T=_F, H=2880, IN=4096, NC=16, RW=4, RB=1),
            ),
        ),
    )
}


# ---- the dialect layer ------------------------------------------------------------------------------

# What the two dialects spell differently, written `$word` (or `$word(args)`) in kernels_shared/*.gpu:
# word -> (CUDA, Metal); {0}, {1}, ... are the arguments. Replaced as text, not by header macros,
# because MLX scans a kernel body for the Metal attributes it names (thread_index_in_simdgroup, ...)
# and for `<input>_shape` / `<input>_strides` to declare them in the signature. An empty spelling
# also takes the space after the word.
DIALECT_WORDS: dict[str, tuple[str, str]] = {
    # address spaces of pointers and references (CUDA's are implicit)
    "device": ("", "device"),
    "thread": ("", "thread"),
    "threadgroup": ("", "threadgroup"),
    # where a thread is
    "tid": ("threadIdx", "thread_position_in_threadgroup"),
    "group": ("blockIdx", "threadgroup_position_in_grid"),
    "groups": ("gridDim", "threadgroups_per_grid"),
    "lane": ("{0} & 31", "thread_index_in_simdgroup"),  # of thread {0}, the caller's own
    "warp": ("{0} >> 5", "simdgroup_index_in_threadgroup"),
    # threadgroup atomics, relaxed; {0} is the variable
    "atomic_uint": ("uint", "atomic_uint"),
    "atomic_add": ("atomicAdd(&{0}, {1})", "atomic_fetch_add_explicit(&{0}, {1}, memory_order_relaxed)"),
    "atomic_store": ("{0} = {1}", "atomic_store_explicit(&{0}, {1}, memory_order_relaxed)"),
    "atomic_load": ("{0}", "atomic_load_explicit(&{0}, memory_order_relaxed)"),
    # sin and cos of {0} into {1} and {2}
    "sincos": ("sincosf({0}, &{1}, &{2})", "{1} = metal::precise::sin({0}); {2} = metal::precise::cos({0})"),
    # a pointer parameter to an input: Metal passes inputs of fewer than 8 elements in `constant`
    # memory, others in `device`, so there the whole pointer type is the template parameter {0}
    "any_ptr": ("const {0}*", "{0}"),
    # MLX's `<input>_shape` / `_strides`: structs (CUDA, by reference), constant pointers (Metal)
    "cref": ("const {0}&", "{0}"),
}
# The shared sources otherwise use CUDA's spellings; these are Metal's for them (whole words).
METAL_SPELLINGS: dict[str, str] = {
    "long long": "long",
    "fmaf": "fma",
    "fmaxf": "max",
    "fminf": "min",
    "expf": "metal::precise::exp",
    "rsqrtf": "metal::precise::rsqrt",
}
# and Metal's expansion drops `#pragma unroll` lines (its compiler unrolls constant-trip loops itself).
_PRAGMA_UNROLL = re.compile(r"^[ \t]*#pragma unroll\b[^\n]*\n", re.M)
_WORD = re.compile(r"\$(\w+)")
_METAL_SPELLING = re.compile(r"\b(" + "|".join(re.escape(w) for w in METAL_SPELLINGS) + r")\b")


def _call_args(text: str, open_at: int) -> tuple[list[str], int]:
    """The comma-separated arguments of the call whose `(` is at open_at, and the index past its `)`."""
    depth, args, start = 0, [], open_at + 1
    for i in range(open_at, len(text)):
        c = text[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                args.append(text[start:i].strip())
                return args, i + 1
        elif c == "," and depth == 1:
            args.append(text[start:i].strip())
            start = i + 1
    raise ValueError(f"kernel source: unclosed `(` after {text[max(0, open_at - 20) : open_at]!r}")


def expand(text: str, dialect: str) -> str:
    """A shared source in one dialect: every `$word` replaced, then (Metal) CUDA's spellings renamed."""
    column = 0 if dialect == "cuda" else 1  # DIALECT_WORDS holds (CUDA, Metal)
    out, pos = [], 0
    for m in _WORD.finditer(text):
        if m.start() < pos:  # inside an argument list already expanded
            continue
        word = m.group(1)
        if word not in DIALECT_WORDS:
            raise ValueError(f"kernel source: unknown dialect word ${word} (known: {sorted(DIALECT_WORDS)})")
        spelling = DIALECT_WORDS[word][column]
        end = m.end()
        if "{0}" in DIALECT_WORDS[word][0] + DIALECT_WORDS[word][1]:
            if end >= len(text) or text[end] != "(":
                raise ValueError(f"kernel source: ${word} takes arguments: ${word}(...)")
            args, end = _call_args(text, end)
            spelling = spelling.format(*(expand(a, dialect) for a in args))
        elif spelling == "" and text[end : end + 1] == " ":
            end += 1
        out.append(text[pos : m.start()] + spelling)
        pos = end
    text = "".join(out) + text[pos:]
    if dialect == "metal":
        text = _METAL_SPELLING.sub(lambda m: METAL_SPELLINGS[m.group(1)], _PRAGMA_UNROLL.sub("", text))
    return text


# ---- assembly ---------------------------------------------------------------------------------------


def _source_text(folder: str, filename: str) -> str | None:
    """A kernel source file's text (None: no such file), from the package or from the checkout."""
    try:
        path = importlib.resources.files(_PACKAGES[folder]).joinpath(filename)
    except ModuleNotFoundError:  # a source checkout on sys.path without the package mapping
        path = Path(__file__).resolve().parents[2] / _FOLDERS[folder] / filename
    return path.read_text() if path.is_file() else None


_MARK = re.compile(r"^// @@kernel (\w+)\s*$", re.M)


def parse_source(text: str) -> tuple[str, dict[str, str]]:
    """Split a kernel file into its preamble (helpers, comments) and `// @@kernel NAME` bodies."""
    parts = _MARK.split(text)
    preamble, bodies = parts[0], {}
    for name, body in zip(parts[1::2], parts[2::2]):
        if name in bodies:  # a pasted section would silently replace the first one
            raise ValueError(f"kernel source: `// @@kernel {name}` appears twice")
        bodies[name] = body
    return preamble, bodies


_COMMENT = re.compile(r"[ \t]*//[^\n]*")


def _code_only(text: str) -> str:
    """The source without its `//` comments, indentation and blank lines. MLX copies header + body
    into a new string for every launch it records, and MLX-CUDA hashes that string again at every
    evaluation to find the compiled module (~140 launches a decode step), so the documentation and
    the layout stay in the files."""
    lines = (line.strip() for line in _COMMENT.sub("", text).splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def _top_level_items(code: str) -> list[str]:
    """Split comment-free C++ into its top-level items: preprocessor lines, declarations ending in
    `;`, and definitions ending in a closing brace (string literals skipped: asm text has braces)."""
    items, start, depth, i, n = [], 0, 0, 0, len(code)
    while i < n:
        c = code[i]
        if c == '"':
            i += 1
            while i < n and code[i] != '"':
                i += 2 if code[i] == "\\" else 1
        elif c == "#" and depth == 0 and not code[start:i].strip():
            end = code.find("\n", i)
            end = n if end < 0 else end
            items.append(code[start:end])
            start = i = end
            continue
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                end = i + 1
                while end < n and code[end] in " \t":
                    end += 1
                end += end < n and code[end] == ";"
                items.append(code[start:end])
                start = i = end
                continue
        elif c == ";" and depth == 0:
            items.append(code[start : i + 1])
            start = i + 1
        i += 1
    items.append(code[start:])
    return [item.strip() for item in items if item.strip()]


_IDENT = re.compile(r"\b[A-Za-z_]\w*\b")


def _defined_names(item: str) -> set[str] | None:
    """The names a helper item defines (None: always kept - macros, typedefs, using)."""
    if item.startswith(("#", "typedef", "using")):
        return None
    struct = re.match(r"(?:template\s*<[^{;]*?>\s*)?struct\s+(\w+)", item)
    if struct:
        return {struct.group(1)}
    head = item.split("(", 1)[0]
    while re.search(r"<[^<>]*>", head):  # template parameter lists and arguments
        head = re.sub(r"<[^<>]*>", " ", head)
    names = _IDENT.findall(head)
    return {names[-1]} if names else None


def _used_helpers(helpers: str, body: str) -> str:
    """The helper items a kernel body reaches (directly or through other helpers), in file order.

    Why: MLX-CUDA hashes each kernel's whole source at every launch to find its compiled module
    (custom_kernel.cpp, ~170 launches a decode step), so a header of every helper for every kernel
    cost host time per token; each kernel now carries only what it calls."""
    items = _top_level_items(helpers)
    defines = [_defined_names(item) for item in items]
    need = set(_IDENT.findall(body))
    keep = [False] * len(items)
    changed = True
    while changed:
        changed = False
        for k, item in enumerate(items):
            if not keep[k] and (defines[k] is None or defines[k] & need):
                keep[k] = changed = True
                need |= set(_IDENT.findall(item))
    return "\n".join(item for item, kept in zip(items, keep) if kept) + "\n"


def _family_code(dialect: str, family: str) -> list[tuple[str, str, dict[str, str]]]:
    """A family's files in a dialect, as (where, preamble, bodies), comments and layout removed: the
    shared file expanded to the dialect, then the dialect's own; either may be absent."""
    files = []
    for folder in ("shared", dialect):
        text = _source_text(folder, family + EXT[folder])
        if text is None:
            continue
        preamble, bodies = parse_source(text)
        code = {name: _dialect_code(folder, body, dialect) for name, body in bodies.items()}
        files.append(
            (f"{_FOLDERS[folder]}/{family}{EXT[folder]}", _dialect_code(folder, preamble, dialect), code)
        )
    return files


def _dialect_code(folder: str, text: str, dialect: str) -> str:
    code = _code_only(text)  # first, so comments may name $words
    return expand(code, dialect) if folder == "shared" else code


@functools.cache  # the files do not change in a process; ~10 ms a dialect, once per kernel otherwise
def kernel_sources(dialect: str) -> dict[str, tuple[str, str]]:
    """name -> (header, body) for every kernel of a dialect, as MLX will compile them: the body, and
    the helpers it uses (dialect primitives, shared helpers, matrix-unit helpers, its family's)."""
    if dialect not in DIALECTS:
        raise ValueError(f"kernel dialect {dialect!r}: one of {DIALECTS}")
    common = "".join(
        _dialect_code(folder, _source_text(folder, name), dialect)
        for folder, name in (
            (dialect, _PRIMITIVES[dialect]),
            ("shared", _HELPERS),
            (dialect, _MATRIX[dialect]),
        )
    )
    out: dict[str, tuple[str, str]] = {}
    for family in sorted({s.family for s in SPECS.values()}):
        helpers, bodies = common, {}
        for where, preamble, found in _family_code(dialect, family):
            helpers += preamble
            for name, code in found.items():
                if name in bodies or name in out:
                    raise ValueError(f"kernel source: {name} is defined twice ({where})")
                bodies[name] = code
        for name, code in bodies.items():
            out[name] = (_code_only(_used_helpers(helpers, code)), code)
    return out

"""The one dispatch point for custom kernels: metal | cuda | reference.

Every fused op here has a pure-MLX reference (the CPU / CI path, and what the kernels are tested
against). The kernels themselves live as source text in `kernels_metal/*.metal` and their CUDA twins
in `kernels_cuda/*.cu` (same algorithm, same inputs and outputs); oss_mlx/kernel_sources.py reads
them and their interfaces, and they are compiled by MLX (`mx.fast.metal_kernel` / `mx.fast.cuda_kernel`)
at first use.

Backend: Metal when `mx.metal.is_available()`, CUDA when `mx.cuda.is_available()`, else the
reference; `OSS_MLX_KERNELS=reference` forces the reference (also `metal` / `cuda` / `auto`). A
kernel runs only on the GPU stream and for the shapes it was written for (decode-sized batches);
everything else takes the reference path, so callers never need to check.

Kernels (see docs/KERNELS.md):
  route           router logits -> top-k -> softmax over the k          (routing.*)
  norm_route      the MoE block's RMSNorm, then route                   (routing.*)
  gate_up_swiglu  MXFP4 gate/up GEMV + bias + clamped SwiGLU            (experts.*)
  down_combine    MXFP4 down GEMV + bias + weighted sum of k + residual (experts.*)
  sdpa_decode     one-query attention with sinks, reading the KV cache  (attention.*)
  sdpa_decode_mma the same on the matrix units (16-bit, head_dim 64, G <= 8)  (attention.*)
  sdpa_combine    merges sdpa_decode's key splits, sink included        (attention.*)
  norm_qkv_rope   attention RMSNorm + qkv GEMV + bias + YaRN RoPE       (projections.*)
  out_residual    attention output GEMV + bias + residual               (projections.*)

At batch 1 the decode step is bound by the number of ops more than by their size (each MLX op costs
microseconds of dispatch), so a decode step on the kernels is ~10 ops per layer instead of ~47.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn

from .kernel_sources import SPECS, kernel_sources

ENV = "OSS_MLX_KERNELS"
BACKENDS = ("metal", "cuda", "reference")

# Fused MoE decode while N * k stays under this (the reference switches to sorted gather_qmm there).
MOE_MAX_SLOTS = 64
# Largest hidden size for the kernels that stage a whole row in threadgroup memory (norm_route,
# norm_qkv_rope): Apple GPUs give a threadgroup 32 KB, i.e. 4 H + the router's 4 E (E <= 256) + 64.
KERNEL_MAX_HIDDEN = 7680
# sdpa_decode splits the keys over blocks (flash-decoding) in at least this many keys each, and into
# at most SDPA_MAX_SPLITS: 2k keys go in 8 blocks, 8k and more in 32.
SDPA_KEYS_PER_SPLIT = 256
SDPA_MAX_SPLITS = 32
SDPA_MMA = True  # sdpa_decode_mma where its shapes apply
# Work per warp of the GEMV kernels (each warp holds its input vector in registers and reads whole
# weight rows): more rows per warp reuse the vector more and keep more loads in flight; fewer make
# more blocks. Chosen by GPU time per kernel (benchmarks/ncu_sweep.py under Nsight Compute, cold caches,
# H200): timing launches from Python measured the ~5 µs host cost of a launch instead, and had chosen
# out_residual RW = 8 (16.6 µs on the card; RW = 4: 9.0) and gate_up COLS = 2 (41.5; COLS = 1: 34.5).
MOE_COLS_PER_WARP = 1  # gate_up_swiglu: SwiGLU columns (2 weight rows each)
MOE_ROWS_PER_BLOCK = 8  # down_combine (its 4 warps share the rows, one expert each)
QKV_PAIRS_PER_WARP = 4  # norm_qkv_rope: RoPE pairs (2 weight rows each)
OUT_ROWS_PER_WARP = 4  # out_residual (even)


# ---- backend --------------------------------------------------------------------------------------


def available_backend() -> str:
    """The kernel dialect this machine's MLX can run: metal, cuda or reference."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "reference"


_AVAILABLE = available_backend()
_forced: str | None = None


def backend() -> str:
    """The backend in use now: `OSS_MLX_KERNELS` (or `use_backend`) over what is available."""
    want = (_forced or os.environ.get(ENV, "auto")).strip().lower()
    if want in ("reference", "ref", "off", "none", "0"):
        return "reference"
    if want in ("auto", "", "on", "1") or want == _AVAILABLE:
        if _AVAILABLE != "reference" and not _self_testing and self_test_failure() is not None:
            return "reference"
        return _AVAILABLE
    return "reference"  # asked for a dialect this machine cannot run


# The kernels are checked once per process on the machine that runs them, before the first use: the
# Metal sources could only be compiled by the macOS CI here, and a driver or MLX version may differ
# from the one they were tested with. A kernel that fails to compile or disagrees with the pure-MLX
# reference turns every kernel off, with a warning, instead of crashing or answering wrongly.
_self_testing = False
_self_test_done = False
_self_test_reason: str | None = None


def self_test_failure() -> str | None:
    """Why the kernels are off on this machine (None: they passed their self-test, or not run here)."""
    global _self_testing, _self_test_done, _self_test_reason
    if not _self_test_done:
        _self_testing = True
        try:
            _self_test_reason = _self_test()
        finally:
            _self_testing = False
            _self_test_done = True
        if _self_test_reason is not None:
            import warnings

            warnings.warn(
                f"oss-mlx: {_AVAILABLE} kernels disabled, using the pure-MLX path ({_self_test_reason}). "
                f"Please report it; {ENV}=reference silences this.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _self_test_reason


def _self_test() -> str | None:
    """Each kernel once on small random inputs against its reference; what went wrong, or None."""
    from .attention import AttentionBlock
    from .config import ModelConfig
    from .moe import MLPBlock

    keys = mx.random.split(mx.random.key(20261126), 10)
    try:
        cfg = ModelConfig(
            num_layers=1,
            num_experts=8,
            experts_per_token=2,
            vocab_size=64,
            hidden_size=64,
            intermediate_size=64,
            head_dim=64,
            num_attention_heads=8,
            num_key_value_heads=2,
        )
        block = MLPBlock(cfg)
        block.router.weight = 0.1 * mx.random.normal((8, 64), key=keys[0])
        for name, shape, key in (("gate_up", (8, 128, 64), keys[1]), ("down", (8, 64, 64), keys[2])):
            w, scales = mx.quantize(
                0.1 * mx.random.normal(shape, key=key), group_size=32, bits=4, mode="mxfp4"
            )
            setattr(block.experts, f"{name}_weight", w)
            setattr(block.experts, f"{name}_scales", scales)
        x = mx.random.normal((2, 64), key=keys[3])
        checks = {"route": None, "moe": None, "moe_prefill": None, "sdpa": None, "attention": None}
        wts, ids = route(x, block.router.weight, block.router.bias, 2)
        ref_w, ref_i = route_reference(x, block.router.weight, block.router.bias, 2)
        dense = mx.zeros((2, 8)).at[mx.arange(2)[:, None], ids].add(wts)
        ref_dense = mx.zeros((2, 8)).at[mx.arange(2)[:, None], ref_i].add(ref_w)
        checks["route"] = (dense, ref_dense)
        fused = moe_block(block, x)
        if fused is not None:
            checks["moe"] = (fused, _reference_moe(block, x))
        # The prefill experts (moe_group + moe_gemm): 16-bit rows, enough of them for the GEMM.
        xp = mx.random.normal((MOE_MAX_SLOTS // 2, 64), key=keys[3]).astype(mx.bfloat16)
        _, ids_p = route_reference(xp, block.router.weight, block.router.bias, 2)
        if moe_prefill_ok(block.experts, xp, ids_p):
            want = _dense_experts(block.experts, xp, ids_p)
            checks["moe_prefill"] = (moe_prefill(block.experts, xp, ids_p), want)
        # Both attention kernels (SIMT in float32, the matrix units' in bf16), keys split, so
        # sdpa_combine runs too.
        S = SDPA_KEYS_PER_SPLIT + 37
        q = mx.random.normal((1, 8, 1, 64), key=keys[4])
        k = mx.random.normal((1, 2, S, 64), key=keys[5])
        v = mx.random.normal((1, 2, S, 64), key=keys[6])
        sinks = mx.random.normal((8,), key=keys[7])
        for name, dtype in (("sdpa", mx.float32), ("sdpa_mma", mx.bfloat16)):
            qd, kd, vd, sd = (a.astype(dtype) for a in (q, k, v, sinks))
            kv = mx.stack([kd, vd])
            if sdpa_decode_ok(qd, kv):
                got = sdpa_decode(qd.reshape(1, 8, 64), kv, sd, 0.125, None, S - 1).reshape(1, 8, 1, 64)
                checks[name] = (got, sdpa_reference(qd, kd, vd, sd, 0.125, None))
        attn = AttentionBlock(cfg, layer=0)
        attn.qkv.weight = 0.1 * mx.random.normal(attn.qkv.weight.shape, key=keys[8])
        attn.out.weight = 0.1 * mx.random.normal(attn.out.weight.shape, key=keys[9])
        xa = x[:1, None, :]
        if attention_decode_ok(attn, xa):
            with use_backend("reference"):
                want = attn(xa, None)
            pos = position_array(0)  # a one-slot cache: the token attends itself, as `want` does
            got, _ = attn.step(xa, pos, pos, mx.zeros((2, 1, attn.num_kv_heads, 1, attn.head_dim), xa.dtype))
            checks["attention"] = (got, want)
        for name, pair in checks.items():
            if pair is None:
                continue
            got, want = pair
            err = mx.max(mx.abs(got.astype(mx.float32) - want.astype(mx.float32))).item()
            scale = max(mx.max(mx.abs(want.astype(mx.float32))).item(), 1e-6)
            # Gross errors only (a wrong index is off by the output's whole scale): TF32 and float32
            # rounding stay far below 2%; bf16 alone spreads up to 1.7% of the scale on these inputs
            # (the experts' float32 path against their bf16 reference path).
            tolerance = 2e-2 if want.dtype == mx.float32 else 1e-1
            if not err <= tolerance * scale:
                return f"{name} kernel disagrees with the reference (max error {err:.3g} of {scale:.3g})"
    except Exception as e:  # a compile error surfaces at evaluation
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _dense_experts(experts, x: mx.array, indices: mx.array) -> mx.array:
    """Each selected expert's output [N, k, H] from dequantized weights, rounded where the reference
    rounds (each matmul's and bias add's result to x's dtype): the self-test's reference for the
    prefill GEMM. Not the reference path's sorted gather_qmm: on CUDA its first use has MLX compile
    kernels of its own (over a minute at the 20b's shapes, docs/PERFORMANCE.md)."""
    from .moe import clamped_swiglu

    def linear(name: str, h: mx.array) -> mx.array:
        w, scales = getattr(experts, f"{name}_weight"), getattr(experts, f"{name}_scales")
        w = mx.dequantize(w, scales, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)[indices]
        bias = getattr(experts, f"{name}_bias")
        y = (w[..., : bias.shape[-1], :] @ h.astype(mx.float32)[..., None])[..., 0]  # rows may be padded
        return y.astype(x.dtype) + bias[indices].astype(x.dtype)

    h = clamped_swiglu(linear("gate_up", x[:, None, :]), experts.alpha, experts.limit)
    return linear("down", h)


def _reference_moe(block, x: mx.array) -> mx.array:
    with use_backend("reference"):
        return block(x[None])[0]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Temporarily force `reference` (or `auto`); None restores the environment's choice."""
    global _forced
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


def _on_gpu(*arrays: mx.array) -> bool:
    return mx.default_device() == mx.gpu


# Outputs are pre-filled with this value when set (tests: NaN shows any element left unwritten).
_poison: float | None = None


@contextlib.contextmanager
def poison_outputs(value: float = float("nan")) -> Iterator[None]:
    global _poison
    before, _poison = _poison, value
    try:
        yield
    finally:
        _poison = before


_compiled: dict[tuple[str, str], object] = {}


def _kernel(name: str):
    # The machine's dialect: a launch only follows a predicate that found backend() != "reference",
    # and backend() is then this one (reading the environment again per launch cost ~1 µs, x 144 a step).
    dialect = _AVAILABLE
    key = (dialect, name)
    if key not in _compiled:
        spec = SPECS[name]
        header, body = kernel_sources(dialect)[name]
        make = mx.fast.metal_kernel if dialect == "metal" else mx.fast.cuda_kernel
        _compiled[key] = make(
            name=f"oss_{name}",
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            source=body,
            header=header,
            ensure_row_contiguous=spec.row_contiguous,
        )
    return _compiled[key]


def _launch(name: str, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
    extra = {} if _poison is None else {"init_value": _poison}
    return _kernel(name)(
        inputs=inputs,
        template=template,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=output_shapes,
        output_dtypes=output_dtypes,
        **extra,
    )


_consts: dict[tuple, mx.array] = {}


# MLX-CUDA (0.32.4, allocator.cpp) serves every array of 8 bytes or less from a pool in host memory
# that the GPU reads over the bus, a round trip of microseconds for each warp that reads it: 44% of
# norm_qkv_rope's stall samples waited on its one eps load (Nsight Compute, H200). Larger
# arrays live on the card (made by a GPU op) or migrate there on first use (made on the host and
# never written again). So the kernels' small inputs are at least this many bytes.
_MIN_DEVICE_BYTES = 16


def _const(*values: float) -> mx.array:
    """A small float32 array of constants, made once (not a new upload per call), padded past the
    host-memory pool (_MIN_DEVICE_BYTES)."""
    if values not in _consts:
        padded = list(values) + [0.0] * max(0, _MIN_DEVICE_BYTES // 4 - len(values))
        _consts[values] = mx.array(padded, dtype=mx.float32)
    return _consts[values]


def ring_slot(pos: mx.array, window: int) -> mx.array:
    """pos % window for a position pos (int32 [1]) as int32 [1] on the card: computed 4-wide and
    viewed back (see _MIN_DEVICE_BYTES), since the cache-row scatter of every window layer reads it."""
    return (mx.broadcast_to(pos, (_MIN_DEVICE_BYTES // 4,)) % window)[:1]


_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def _result_dtype(a: mx.Dtype, b: mx.Dtype) -> mx.Dtype:
    if a == b:
        return a
    if mx.float32 in (a, b):
        return mx.float32
    return mx.float32  # bf16 with f16 promotes to f32 in MLX


# ---- routing --------------------------------------------------------------------------------------


def route_reference(x: mx.array, weight: mx.array, bias: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """x [N, H] -> (weights [N, k] float32, expert indices [N, k] uint32): top-k, softmax over k."""
    logits = mx.addmm(bias, x, weight.T)
    # The choice is not differentiable (gradients reach the router through the k weights only); MLX
    # would otherwise try a VJP through the gather's indices when fine-tuning.
    indices = mx.stop_gradient(mx.argpartition(logits, kth=-k, axis=-1)[..., -k:])
    top = mx.take_along_axis(logits, indices, axis=-1)
    return mx.softmax(top.astype(mx.float32), axis=-1), indices.astype(mx.uint32)


def route(x: mx.array, weight: mx.array, bias: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """Router: the fused kernel where it applies, else `route_reference`.

    The kernel returns the k experts in descending logit order; the reference in argpartition's
    order. The set and each expert's weight are the same (the MoE sum does not depend on order).
    """
    N, H = x.shape
    E = weight.shape[0]
    if not _route_ok(x, weight, k):
        return route_reference(x, weight, bias, k)
    lt = _result_dtype(x.dtype, weight.dtype)
    wts, ids = _launch(
        "route",
        [x, weight, bias],
        [("LT", lt), ("H", H), ("E", E), ("K", k)],
        (256 * N, 1, 1),
        (256, 1, 1),
        [(N, k), (N, k)],
        [mx.float32, mx.uint32],
    )
    return wts, ids


def _route_ok(x: mx.array, weight: mx.array, k: int) -> bool:
    H = x.shape[-1]
    N = x.size // H
    return (
        backend() != "reference"
        and _on_gpu()
        and x.dtype in _FLOATS
        and weight.dtype in _FLOATS
        and H % 8 == 0
        and weight.shape[0] <= 256
        and k <= min(weight.shape[0], 8)
        and N <= 65535
    )


# ---- experts --------------------------------------------------------------------------------------


def moe_block(block, x: mx.array) -> mx.array | None:
    """The whole MoE block, x [..., H] -> x + MoE(norm(x)), in three kernels (norm_route,
    gate_up_swiglu, down_combine), or None where the kernels do not apply (then: the reference)."""
    H = x.shape[-1]
    N = x.size // H
    router, k = block.router, block.router.top_k
    if not (_route_ok(x, router.weight, k) and H <= KERNEL_MAX_HIDDEN and N * k < MOE_MAX_SLOTS):
        return None
    if not _experts_ok(block.experts, x, N, k):
        return None
    # The kernels index x as [N, H] rows (MLX makes inputs row-contiguous); outputs come shaped for
    # the next kernel, so no reshape or cast sits between them.
    h, wts, ids = _launch(
        "norm_route",
        [x, block.norm.weight, router.weight, router.bias, _const(block.norm.eps)],
        [
            ("T", x.dtype),
            ("LT", _result_dtype(x.dtype, router.weight.dtype)),
            ("H", H),
            ("E", router.weight.shape[0]),
            ("K", k),
        ],
        (512 * N, 1, 1),
        (512, 1, 1),
        [(N, H), (N * k,), (N * k,)],
        [x.dtype, mx.float32, mx.uint32],
    )
    return _experts_decode(block.experts, h, wts, ids, x, N, k)


def _experts_ok(experts, x: mx.array, N: int, k: int) -> bool:
    # Streamed experts (streaming.StreamingExperts) hold no full weight tensors: ask first.
    if not getattr(experts, "quantized", False):
        return False
    H = x.shape[-1]
    I = experts.gate_up_weight.shape[1] // 2
    return (
        backend() != "reference"
        and _on_gpu()
        and N * k < MOE_MAX_SLOTS
        and x.dtype in _FLOATS
        and H % 32 == 0
        and I % 32 == 0
        and experts.down_weight.shape[1] >= H  # rows may be padded (prepare)
    )


def moe_decode(experts, x: mx.array, weights: mx.array, indices: mx.array, residual: mx.array):
    """residual + sum_j weights[:, j] * expert_{indices[:, j]}(x), fused, or None where no kernel applies.

    experts: moe.Experts with MXFP4 weights; x [N, H] (normed), weights [N, k], indices [N, k],
    residual [N, H]. Two launches: gate_up_swiglu then down_combine.
    """
    N, k = indices.shape
    if not _experts_ok(experts, x, N, k):
        return None
    ids = indices.reshape(-1).astype(mx.uint32)
    wts = weights.reshape(-1).astype(mx.float32)
    return _experts_decode(experts, x, wts, ids, residual.astype(x.dtype), N, k)


def _experts_decode(experts, x, wts, ids, residual, N: int, k: int) -> mx.array:
    """gate_up_swiglu then down_combine; the result has the residual's shape."""
    H = x.shape[-1]
    I = experts.gate_up_weight.shape[1] // 2
    T = x.dtype
    cols = MOE_COLS_PER_WARP
    (h,) = _launch(
        "gate_up_swiglu",
        [
            x,
            ids,
            experts.gate_up_weight,
            experts.gate_up_scales,
            experts.gate_up_bias,
            _const(experts.alpha, experts.limit),
        ],
        [("T", T), ("H", H), ("I", I), ("K", k), ("NC", -(-H // 1024)), ("COLS", cols)],
        (128 * -(-I // (4 * cols)), N * k, 1),
        (128, 1, 1),
        [(N * k, I)],
        [T],
    )
    rows = MOE_ROWS_PER_BLOCK
    (y,) = _launch(
        "down_combine",
        [h, ids, wts, experts.down_weight, experts.down_scales, experts.down_bias, residual],
        [
            ("T", T),
            ("H", H),
            ("HP", experts.down_weight.shape[1]),
            ("I", I),
            ("K", k),
            ("NC", -(-I // 1024)),
            ("ROWS", rows),
        ],
        (128 * -(-H // rows), N, 1),
        (128, 1, 1),
        [residual.shape],
        [T],
    )
    return y


# Prefill experts (moe_group + moe_gemm): rows of one expert per tile; moe_gemm is written for 64.
MOE_GEMM_ROWS = 64
MOE_GEMM = True  # the grouped GEMM where its shapes apply (benchmarks compare it with gather_qmm)


def moe_prefill_ok(experts, x: mx.array, indices: mx.array) -> bool:
    """Whether moe_prefill takes x [N, H] with indices [N, k] (GPU, MXFP4 weights, 16-bit
    activations for the matrix units, the row count where decode's kernels stop)."""
    if not MOE_GEMM or not getattr(experts, "quantized", False):
        return False
    N, k = indices.shape
    E, rows, _ = experts.gate_up_weight.shape
    return (
        backend() != "reference"
        and _on_gpu()
        and N * k >= MOE_MAX_SLOTS
        and x.dtype in (mx.bfloat16, mx.float16)
        and x.shape[-1] % 32 == 0
        and (rows // 2) % 32 == 0
        and E <= 1024
        and experts.down_weight.shape[1] >= x.shape[-1]  # rows may be padded (prepare)
    )


def moe_prefill(experts, x: mx.array, indices: mx.array) -> mx.array:
    """Each selected expert's output for a prefill chunk: x [N, H] (normed), indices [N, k] ->
    [N, k, H] (bias included), as moe.Experts returns it. Three launches: moe_group sorts the rows by
    expert, moe_gemm runs gate_up + SwiGLU, then down, writing the rows back in (token, expert) order.
    moe_prefill_ok first."""
    N, k = indices.shape
    E, gate_up_rows, _ = experts.gate_up_weight.shape
    H, I, NK, BM = x.shape[-1], gate_up_rows // 2, N * k, MOE_GEMM_ROWS
    perm, offsets, tiles = _launch(
        "moe_group",
        [indices.reshape(-1).astype(mx.uint32)],
        [("E", E), ("BM", BM)],
        (1024, 1, 1),
        (1024, 1, 1),
        [(NK,), (E + 1,), (E + 1,)],
        [mx.uint32] * 3,
    )
    consts = _const(experts.alpha, experts.limit)
    row_tiles = -(-NK // BM) + E  # at most one partial tile per expert
    out = x
    for mode, name, width in ((0, "gate_up", I), (1, "down", H)):
        w = getattr(experts, f"{name}_weight")
        (out,) = _launch(
            "moe_gemm",
            [
                out,
                perm,
                offsets,
                tiles,
                w,
                getattr(experts, f"{name}_scales"),
                getattr(experts, f"{name}_bias"),
                consts,
            ],
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


# MLX-CUDA's tensor-core gather_qmm needs the output size to be a multiple of this.
CUDA_GATHER_QMM_ROWS = 128


def prepare(model) -> None:
    """Shape a loaded model's weights for this backend's fast paths (called by the loader).

    CUDA: the experts' down projection is padded to a multiple of 128 output rows (moe.Experts.
    pad_down_rows), which moves its prefill gather_qmm from MLX's naive kernel to the tensor-core
    one. Metal's gather_qmm has no such condition, so nothing changes there (nor on CPU). The
    padding serves the pure-MLX prefill path, so it applies with the kernels off too.
    """
    if available_backend() != "cuda":
        return
    from .moe import Experts

    for block in getattr(model, "blocks", []):
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, Experts):
            experts.pad_down_rows(CUDA_GATHER_QMM_ROWS)


def gather_qmm_mxfp4(x, w, scales, indices, sorted_indices: bool) -> mx.array:
    """mx.gather_qmm on MXFP4 weights [E, N_out, K/8] (transposed), as the experts use it.

    (Splitting N_out = 2880 into 2816 + 64 to reach MLX-CUDA's tensor-core path was tried: MLX 0.32.4
    has no gather_qmm implementation for the sliced 64-row tail, so the call stays whole.)
    """
    return mx.gather_qmm(
        x,
        w,
        scales,
        None,
        rhs_indices=indices,
        transpose=True,
        group_size=32,
        bits=4,
        mode="mxfp4",
        sorted_indices=sorted_indices,
    )


# ---- attention ------------------------------------------------------------------------------------


def sdpa_reference(q, k, v, sinks, scale: float, mask) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks.astype(q.dtype))


def sdpa_decode_ok(q: mx.array, kv: mx.array) -> bool:
    """Whether sdpa_decode takes q [B, Hq, 1, D] over a cache's joint buffer kv [2, B, Hkv, S, D]
    (GPU, one float dtype, the head shapes the kernels were written for)."""
    B, Hq, T, D = q.shape
    return (
        T == 1
        and backend() != "reference"
        and _on_gpu()
        and q.dtype in _FLOATS
        and kv.dtype == q.dtype
        and kv.ndim == 5
        and kv.shape[4] == D
        and _sdpa_heads_ok(D, Hq, kv.shape[2])
        and kv.shape[3] >= 1
    )


def _sdpa_heads_ok(D: int, hq: int, hkv: int) -> bool:
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


def _sdpa_mma_ok(dtype: mx.Dtype, D: int, G: int) -> bool:
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
    """The decode kernel itself: q [B, Hq, D] row-contiguous over kv [2, B, Hkv, S, D] (keys, then
    values; any strides) -> out [B, 1, Hq * D] (the layout the output projection reads, so no
    transpose follows). Callers have checked the shapes (sdpa_decode_ok).

    The query sits at position `pos` (an int, or an int32 [1] array inside a compiled step): keys
    [0, min(S, pos + 1)) are attended (the last `window` of them), so kv may be a whole cache buffer
    or ring (cache.py) whose later slots are not filled yet, read in place."""
    B, Hq, D = q.shape
    Hkv, S = kv.shape[2], kv.shape[3]
    attended = min(S, window) if window else S
    nsplit = max(1, min(SDPA_MAX_SPLITS, -(-attended // SDPA_KEYS_PER_SPLIT)))
    part_shape = (B, Hq, nsplit, D + 2) if nsplit > 1 else (1,)
    out, part = _launch(
        "sdpa_decode_mma" if _sdpa_mma_ok(q.dtype, D, Hq // Hkv) else "sdpa_decode",
        [q, kv, sinks, _const(scale * math.log2(math.e)), _as_position(pos)],
        [("T", q.dtype), ("D", D), ("G", Hq // Hkv), ("WINDOW", int(window or 0))],
        (128 * nsplit, B * Hkv, 1),
        (128, 1, 1),
        [(B, 1, Hq * D) if nsplit == 1 else (1,), part_shape],
        [q.dtype, mx.float32],
    )
    if nsplit > 1:
        (out,) = _launch(
            "sdpa_combine",
            [part, sinks],
            [("T", q.dtype), ("D", D)],
            (D * B * Hq, 1, 1),
            (D, 1, 1),
            [(B, 1, Hq * D)],
            [q.dtype],
        )
    return out


# ---- attention projections (decode) --------------------------------------------------------------


def attention_decode_ok(block, x: mx.array) -> bool:
    """Whether the decode kernels cover this attention block for x [B, 1, H] (plain float linears,
    shapes the kernels were written for, GPU)."""
    qkv, out = block.qkv, block.out
    D, hq, hkv = block.head_dim, block.num_heads, block.num_kv_heads
    H = x.shape[-1]
    return (
        x.ndim == 3
        and x.shape[1] == 1
        and x.shape[0] <= 64
        and backend() != "reference"
        and _on_gpu()
        and x.dtype in _FLOATS
        and type(qkv) is nn.Linear
        and type(out) is nn.Linear
        and "bias" in qkv
        and "bias" in out
        and qkv.weight.dtype == x.dtype
        and out.weight.dtype == x.dtype
        and block.sinks.dtype in _FLOATS
        and H % 8 == 0
        and H <= KERNEL_MAX_HIDDEN
        and hq * D <= 16384
        and _sdpa_heads_ok(D, hq, hkv)
    )


_position: tuple[int, mx.array] | None = None


def _position_array(offset: int) -> mx.array:
    """The decode position as an int32 [1] array, one per step shared by every layer (a template
    argument would compile a kernel per position)."""
    global _position
    if _position is None or _position[0] != offset:
        _position = (offset, position_array(offset))
    return _position[1]


def position_array(offset: int) -> mx.array:
    """A decode position for the kernels: int32 [1] on the card (filled by a GPU op, see
    _MIN_DEVICE_BYTES), not in MLX's host-memory pool of small arrays."""
    return mx.full((_MIN_DEVICE_BYTES // 4,), offset, dtype=mx.int32)[:1]


def _as_position(pos: int | mx.array) -> mx.array:
    return pos if isinstance(pos, mx.array) else _position_array(pos)


def norm_qkv_rope(block, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
    """x [B, 1, H] at position `offset` (an int, or an int32 [1] array) -> q [B, Hq, D] and kv
    [2, B, Hkv, 1, D] (the new key and value, as the caches' joint buffer holds them): the attention's
    RMSNorm, qkv projection, YaRN concentration and RoPE in one kernel (attention_decode_ok first)."""
    B, _, H = x.shape
    D, hq, hkv = block.head_dim, block.num_heads, block.num_kv_heads
    pw = QKV_PAIRS_PER_WARP
    return _launch(
        "norm_qkv_rope",
        [
            x,
            block.norm.weight,
            block.qkv.weight,
            block.qkv.bias,
            block.rope.wavelengths,
            _as_position(offset),
            _const(block.norm.eps, block.rope.concentration),
        ],
        [("T", x.dtype), ("H", H), ("D", D), ("HQ", hq), ("HKV", hkv), ("NC", -(-H // 256)), ("PW", pw)],
        (128 * -(-((hq + 2 * hkv) * D // 2) // (4 * pw)), B, 1),
        (128, 1, 1),
        [(B, hq, D), (2, B, hkv, 1, D)],
        [x.dtype] * 2,
    )


def out_residual(o: mx.array, linear, residual: mx.array) -> mx.array:
    """residual + linear(o) for o [B, 1, IN] in one kernel (attention_decode_ok first)."""
    IN = o.shape[-1]
    H = residual.shape[-1]
    N = residual.size // H
    rw = OUT_ROWS_PER_WARP
    (y,) = _launch(
        "out_residual",
        [o, linear.weight, linear.bias, residual],
        [("T", residual.dtype), ("H", H), ("IN", IN), ("NC", -(-IN // 256)), ("RW", rw)],
        (128 * -(-H // (4 * rw)), N, 1),
        (128, 1, 1),
        [residual.shape],
        [residual.dtype],
    )
    return y

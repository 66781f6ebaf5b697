"""The kernels' start-up self-test: every kernel once on small random inputs against the model's
reference path, on the machine that runs them (the loader runs it: loader.prepare_for_backend).

Why: a driver or MLX version may differ from the ones the kernels were tested with (and the Metal
sources have only the macOS CI to compile them). A kernel that fails to compile or disagrees grossly
with the reference turns every kernel off for the process, with a warning, instead of crashing or
answering wrongly.
"""

from __future__ import annotations

import warnings

import mlx.core as mx

from . import kernels, mxfp4
from .attention import AttentionBlock, sdpa_with_sinks
from .config import ModelConfig
from .kernels import decode_attention, decode_moe, prefill_moe
from .moe import MLPBlock, dequantized_experts, mxfp4_weights, route_reference

# dialect -> what went wrong there (None: passed), for the dialects tested in this process
_verdicts: dict[str, str | None] = {}


def check() -> str | None:
    """Run the self-test once per process where kernels would run; a failure turns them all off
    (kernels.disable) with a RuntimeWarning. Returns why the kernels are off (None: they are not)."""
    if kernels.backend() == "reference":
        return kernels.disabled()
    dialect = kernels.available_backend()
    if dialect not in _verdicts:
        _verdicts[dialect] = reason = run()
        if reason is not None:
            kernels.disable(reason)
            warnings.warn(
                f"oss-mlx: {dialect} kernels disabled, using the pure-MLX path ({reason}). "
                f"Please report it; {kernels.ENV}=reference silences this.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _verdicts[dialect]


def run() -> str | None:
    """Each kernel once on small random inputs against its reference; what went wrong, or None.
    A kernel that does not apply here is skipped (on the CPU all of them; the router's reference is
    then compared with itself)."""
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
        router = block.router
        router.weight = 0.1 * mx.random.normal((8, 64), key=keys[0])
        for name, shape, key in (("gate_up", (8, 128, 64), keys[1]), ("down", (8, 64, 64), keys[2])):
            w, scales = mxfp4.quantize(0.1 * mx.random.normal(shape, key=key))
            setattr(block.experts, f"{name}_weight", w)
            setattr(block.experts, f"{name}_scales", scales)
        experts = mxfp4_weights(block.experts)
        x = mx.random.normal((2, 64), key=keys[3])
        checks = {
            "route": None,
            "moe": None,
            "moe_grouped": None,
            "moe_mma": None,
            "moe_mma_one": None,
            "moe_prefill": None,
            "sdpa": None,
            "attention": None,
        }
        wts, ids = router(x)  # the kernel where it applies
        ref_w, ref_i = route_reference(x, router.weight, router.bias, 2)
        dense = mx.zeros((2, 8)).at[mx.arange(2)[:, None], ids].add(wts)
        ref_dense = mx.zeros((2, 8)).at[mx.arange(2)[:, None], ref_i].add(ref_w)
        checks["route"] = (dense, ref_dense)
        if decode_moe.moe_block_ok(x, router.weight, 2, experts):
            fused = decode_moe.moe_block(
                x, block.norm.weight, block.norm.eps, router.weight, router.bias, 2, experts
            )
            with kernels.use_backend("reference"):
                checks["moe"] = (fused, block(x[None])[0])
        # The decode batch's experts grouped by expert (from MOE_GROUPED_FROM tokens on, when set).
        grouped_from = decode_moe.MOE_GROUPED_FROM
        xg = mx.random.normal(((grouped_from or 0) + 1, 64), key=keys[4])
        if grouped_from is not None and decode_moe.moe_block_ok(xg, router.weight, 2, experts):
            fused = decode_moe.moe_block(
                xg, block.norm.weight, block.norm.eps, router.weight, router.bias, 2, experts
            )
            with kernels.use_backend("reference"):
                checks["moe_grouped"] = (fused, block(xg[None])[0])
        # The decode batch's experts on the matrix units (from MOE_MMA_FROM bf16 tokens on, when set).
        mma_from = decode_moe.MOE_MMA_FROM
        xm = mx.random.normal((max(mma_from or 0, 3), 64), key=keys[5]).astype(mx.bfloat16)
        if mma_from is not None and decode_moe.moe_block_ok(xm, router.weight, 2, experts):
            fused = decode_moe.moe_block(
                xm, block.norm.weight, block.norm.eps, router.weight, router.bias, 2, experts
            )
            with kernels.use_backend("reference"):
                checks["moe_mma"] = (fused, block(xm[None])[0])
            one = xm[:1]  # one token: down_mma_combine where on (decode_moe.ONE_TOKEN_COMBINED)
            fused = decode_moe.moe_block(
                one, block.norm.weight, block.norm.eps, router.weight, router.bias, 2, experts
            )
            with kernels.use_backend("reference"):
                checks["moe_mma_one"] = (fused, block(one[None])[0])
        # The prefill experts (moe_group + moe_gemm): 16-bit rows, enough of them for the GEMM.
        xp = mx.random.normal((decode_moe.MOE_MAX_SLOTS // 2, 64), key=keys[3]).astype(mx.bfloat16)
        _, ids_p = route_reference(xp, router.weight, router.bias, 2)
        if prefill_moe.moe_prefill_ok(experts, xp, ids_p):
            want = dequantized_experts(experts, xp, ids_p)
            checks["moe_prefill"] = (prefill_moe.moe_prefill(experts, xp, ids_p), want)
        # Both attention kernels (SIMT in float32, the matrix units' in bf16), keys split, so
        # sdpa_combine runs too.
        S = decode_attention.SDPA_KEYS_PER_SPLIT + 37
        q = mx.random.normal((1, 8, 1, 64), key=keys[4])
        k = mx.random.normal((1, 2, S, 64), key=keys[5])
        v = mx.random.normal((1, 2, S, 64), key=keys[6])
        sinks = mx.random.normal((8,), key=keys[7])
        for name, dtype in (("sdpa", mx.float32), ("sdpa_mma", mx.bfloat16)):
            qd, kd, vd, sd = (a.astype(dtype) for a in (q, k, v, sinks))
            kv = mx.stack([kd, vd])
            if decode_attention.sdpa_decode_ok(qd, kv):
                got = decode_attention.sdpa_decode(qd.reshape(1, 8, 64), kv, sd, 0.125, None, S - 1)
                checks[name] = (got.reshape(1, 8, 1, 64), sdpa_with_sinks(qd, kd, vd, sd, 0.125, None))
        attn = AttentionBlock(cfg, layer=0)
        attn.qkv.weight = 0.1 * mx.random.normal(attn.qkv.weight.shape, key=keys[8])
        attn.out.weight = 0.1 * mx.random.normal(attn.out.weight.shape, key=keys[9])
        xa = x[:1, None, :]
        if decode_attention.attention_decode_ok(attn.decode_weights(), xa):
            with kernels.use_backend("reference"):
                want = attn(xa, None)
            pos = kernels.position_array(0)  # a one-slot cache: the token attends itself, as `want` does
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

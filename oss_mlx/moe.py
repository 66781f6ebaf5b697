"""The mixture-of-experts feed-forward: router (top-k, then softmax over the k) and experts.

Experts are clamped-SwiGLU MLPs whose weights stay in MXFP4 (4-bit e2m1 values, one e8m0 scale per
32) exactly as OpenAI ships them: MLX's `mxfp4` packing reads the hub's bytes unchanged. Gate and
up rows are interleaved (gate = even rows, up = odd rows), as shipped.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import mxfp4
from .config import ModelConfig
from .kernels import ExpertWeights, decode_moe, prefill_moe, routing
from .norm import RMSNorm

# Below this many (token, expert) pairs, gathering in token order is cheaper than sorting.
SORT_THRESHOLD = 64


def clamped_swiglu(gate_up: mx.array, alpha: float, limit: float) -> mx.array:
    """gpt-oss's SwiGLU: gate clamped above, up clamped both ways, and (up + 1)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return gate * mx.sigmoid(gate * alpha) * (up + 1)


def gather_mm_float(x: mx.array, w: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
    """x @ w[indices].T for float expert weights w [E, out, in] (kept float: quantize_experts=False).

    MLX's CPU gather_mm takes float32 only (0.32.4: "[GatherMM::eval] Currently only supports
    float32"), and bfloat16 is a fine-tune's dtype: there the product is taken in float32 and rounded
    back, as a bfloat16 matmul accumulates in float32 anyway. A few tokens (unsorted) convert only the
    experts they picked; a prefill converts each layer's experts once per chunk.
    """
    if w.dtype == mx.float32 or mx.default_device() != mx.cpu:
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
    if not sorted_indices:  # x [N, 1 or k, 1, in] against the picked experts [N, k, out, in]
        y = x.astype(mx.float32) @ w[indices].astype(mx.float32).swapaxes(-1, -2)
    else:
        y = mx.gather_mm(
            x.astype(mx.float32),
            w.astype(mx.float32).swapaxes(-1, -2),
            rhs_indices=indices,
            sorted_indices=True,
        )
    return y.astype(x.dtype)


def route_reference(x: mx.array, weight: mx.array, bias: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """x [N, H] -> (weights [N, k] float32, expert indices [N, k] uint32): top-k, softmax over k."""
    logits = mx.addmm(bias, x, weight.T)
    # The choice is not differentiable (gradients reach the router through the k weights only); MLX
    # would otherwise try a VJP through the gather's indices when fine-tuning.
    indices = mx.stop_gradient(mx.argpartition(logits, kth=-k, axis=-1)[..., -k:])
    top = mx.take_along_axis(logits, indices, axis=-1)
    return mx.softmax(top.astype(mx.float32), axis=-1), indices.astype(mx.uint32)


def gather_qmm_mxfp4(x, w, scales, indices, sorted_indices: bool) -> mx.array:
    """mx.gather_qmm on MXFP4 weights [E, N_out, K/8] (transposed), as the experts use it: one call
    (why not split to reach MLX-CUDA's tensor-core path: docs/KERNELS.md)."""
    return mx.gather_qmm(
        x,
        w,
        scales,
        None,
        rhs_indices=indices,
        transpose=True,
        sorted_indices=sorted_indices,
        **mxfp4.MLX_MODE,
    )


def mxfp4_weights(experts) -> ExpertWeights | None:
    """An experts module's MXFP4 tensors as the kernels take them; None where it holds none whole
    (float experts; streaming.StreamingExperts, which reads experts on demand, has no `quantized`)."""
    if not getattr(experts, "quantized", False):
        return None
    return ExpertWeights(
        experts.gate_up_weight,
        experts.gate_up_scales,
        experts.gate_up_bias,
        experts.down_weight,
        experts.down_scales,
        experts.down_bias,
        experts.alpha,
        experts.limit,
    )


def dequantized_experts(experts: ExpertWeights, x: mx.array, indices: mx.array) -> mx.array:
    """Each selected expert's output [N, k, H] from dequantized weights, rounded where the reference
    rounds (each matmul's and bias add's result to x's dtype): the kernels' self-test's reference for
    the prefill GEMM. Not the sorted gather_qmm path: on CUDA its first use has MLX compile kernels
    of its own (over a minute at the 20b's shapes, docs/PERFORMANCE.md)."""

    def linear(w: mx.array, scales: mx.array, bias: mx.array, h: mx.array) -> mx.array:
        w = mxfp4.dequantize(w, scales)[indices]
        y = (w[..., : bias.shape[-1], :] @ h.astype(mx.float32)[..., None])[..., 0]  # rows may be padded
        return y.astype(x.dtype) + bias[indices].astype(x.dtype)

    h = linear(experts.gate_up_weight, experts.gate_up_scales, experts.gate_up_bias, x[:, None, :])
    h = clamped_swiglu(h, experts.alpha, experts.limit)
    return linear(experts.down_weight, experts.down_scales, experts.down_bias, h)


class Router(nn.Module):
    """Linear scores over experts; the top k are kept and softmax-normalised among themselves.

    Not an nn.Linear on purpose: quantizing a model must never touch the router.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, hidden_size))
        self.bias = mx.zeros((num_experts,))
        self.top_k = top_k

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x [N, H] -> (weights [N, k] float32, expert indices [N, k] uint32): route_reference, or on
        a GPU one fused kernel doing all three steps."""
        if routing.route_ok(x, self.weight, self.top_k):
            return routing.route(x, self.weight, self.bias, self.top_k)
        return route_reference(x, self.weight, self.bias, self.top_k)


class Experts(nn.Module):
    """E expert MLPs: [x] -> down(swiglu(gate_up(x))), weights stored [E, out, in].

    `quantized=True`: MXFP4 (uint32-packed values + uint8 scales per 32 inputs).
    `quantized=False`: float weights (a fine-tune kept in float when asked).
    """

    def __init__(self, config: ModelConfig, quantized: bool = True):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.quantized = quantized
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        if quantized:
            words, group = mxfp4.VALUES_PER_WORD, mxfp4.GROUP_SIZE
            self.gate_up_weight = mx.zeros((E, 2 * I, H // words), dtype=mx.uint32)
            self.gate_up_scales = mx.zeros((E, 2 * I, H // group), dtype=mx.uint8)
            self.down_weight = mx.zeros((E, H, I // words), dtype=mx.uint32)
            self.down_scales = mx.zeros((E, H, I // group), dtype=mx.uint8)
        else:
            self.gate_up_weight = mx.zeros((E, 2 * I, H))
            self.down_weight = mx.zeros((E, H, I))
        self.gate_up_bias = mx.zeros((E, 2 * I))
        self.down_bias = mx.zeros((E, H))

    def _matmul(self, x: mx.array, name: str, indices: mx.array, sorted_indices: bool) -> mx.array:
        w = getattr(self, f"{name}_weight")
        if self.quantized:
            # mx.gather_qmm(x, w, scales, transpose, group 32, 4 bits, mxfp4), shaped for MLX's fast paths.
            y = gather_qmm_mxfp4(x, w, getattr(self, f"{name}_scales"), indices, sorted_indices)
        else:
            y = gather_mm_float(x, w, indices, sorted_indices)
        bias = getattr(self, f"{name}_bias")
        if y.shape[-1] != bias.shape[-1]:
            y = y[..., : bias.shape[-1]]  # rows padded for MLX-CUDA (loader.pad_down_rows)
        return y + bias[indices][..., None, :].astype(y.dtype)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, H], indices [N, k] -> each selected expert's output [N, k, H]."""
        N, k = indices.shape
        if N * k < SORT_THRESHOLD:
            h = x[:, None, None, :]  # [N, 1, 1, H] broadcasts against indices [N, k]
            h = self._matmul(h, "gate_up", indices, False)
            h = clamped_swiglu(h, self.alpha, self.limit)
            return self._matmul(h, "down", indices, False).squeeze(-2)
        experts = mxfp4_weights(self)
        if prefill_moe.moe_prefill_ok(experts, x, indices):  # GPU: grouping + grouped GEMM kernels
            return prefill_moe.moe_prefill(experts, x, indices)
        # Prefill: group rows by expert so each expert's weights are read once.
        flat = indices.flatten()
        order = mx.argsort(flat)
        h = x[order // k][:, None, :]  # [N*k, 1, H]
        sorted_experts = flat[order]
        h = self._matmul(h, "gate_up", sorted_experts, True)
        h = clamped_swiglu(h, self.alpha, self.limit)
        h = self._matmul(h, "down", sorted_experts, True).squeeze(-2)
        return h[mx.argsort(order)].reshape(N, k, -1)


class MLPBlock(nn.Module):
    """x + sum_k weight_k * expert_k(norm(x))."""

    # Expert parallel (distributed/tensor_parallel.py): `experts` holds a contiguous slice of them,
    # the router still scores all; `shard` keeps the chosen experts this rank holds and adds every
    # rank's part of the output, the residual counted once.
    shard = None

    def __init__(self, config: ModelConfig, quantized_experts: bool = True):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.router = Router(config.hidden_size, config.num_experts, config.experts_per_token)
        self.experts = Experts(config, quantized=quantized_experts)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        router, experts = self.router, mxfp4_weights(self.experts)
        if self.shard is None and decode_moe.moe_block_ok(x, router.weight, router.top_k, experts):
            # GPU, few tokens: norm + router, gate_up + SwiGLU, down + sum + residual
            return decode_moe.moe_block(
                x, self.norm.weight, self.norm.eps, router.weight, router.bias, router.top_k, experts
            )
        h = self.norm(x).reshape(-1, shape[-1])
        weights, indices = self.router(h)
        residual = x
        if self.shard is not None:
            weights, indices = self.shard.local(weights, indices)
            residual = self.shard.residual(x)
            if decode_moe.moe_decode_ok(experts, h, indices):  # GPU, few tokens: this rank's experts
                fused = decode_moe.moe_decode(experts, h, weights, indices, residual.reshape(h.shape))
                return self.shard.all_sum(fused.reshape(shape))
        y = self.experts(h, indices)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        out = residual + y.reshape(shape)
        return out if self.shard is None else self.shard.all_sum(out)

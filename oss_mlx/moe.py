"""The mixture-of-experts feed-forward: router (top-k, then softmax over the k) and experts.

Experts are clamped-SwiGLU MLPs whose weights stay in MXFP4 (4-bit e2m1 values, one e8m0 scale per
32) exactly as OpenAI ships them: MLX's `mxfp4` packing reads the hub's bytes unchanged. Gate and
up rows are interleaved (gate = even rows, up = odd rows), as shipped.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .config import ModelConfig
from .norm import RMSNorm

MXFP4_GROUP = 32
# Below this many (token, expert) pairs, gathering in token order is cheaper than sorting.
SORT_THRESHOLD = 64


def clamped_swiglu(gate_up: mx.array, alpha: float, limit: float) -> mx.array:
    """gpt-oss's SwiGLU: gate clamped above, up clamped both ways, and (up + 1)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return gate * mx.sigmoid(gate * alpha) * (up + 1)


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
        """x [N, H] -> (weights [N, k] float32, expert indices [N, k] uint32).

        The reference (addmm, argpartition, softmax) is kernels.route_reference; on a GPU one fused
        kernel does all three.
        """
        return kernels.route(x, self.weight, self.bias, self.top_k)


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
            self.gate_up_weight = mx.zeros((E, 2 * I, H // 8), dtype=mx.uint32)
            self.gate_up_scales = mx.zeros((E, 2 * I, H // MXFP4_GROUP), dtype=mx.uint8)
            self.down_weight = mx.zeros((E, H, I // 8), dtype=mx.uint32)
            self.down_scales = mx.zeros((E, H, I // MXFP4_GROUP), dtype=mx.uint8)
        else:
            self.gate_up_weight = mx.zeros((E, 2 * I, H))
            self.down_weight = mx.zeros((E, H, I))
        self.gate_up_bias = mx.zeros((E, 2 * I))
        self.down_bias = mx.zeros((E, H))

    def pad_down_rows(self, multiple: int) -> None:
        """Pad the MXFP4 down projection's output rows with zeros to a multiple of `multiple`.

        MLX-CUDA's tensor-core gather_qmm (prefill) needs the output size to be a multiple of 128;
        gpt-oss's 2,880 is not, so its down projection took a naive kernel. Zero codes with zero
        scales give exact zeros, cut off after the matmul: results are unchanged, for 64 more rows
        per expert (2% of the down weights). The decode kernel reads the padded rows' stride.
        """
        E, rows, cols = self.down_weight.shape
        pad = -rows % multiple
        if not self.quantized or pad == 0:
            return
        self.down_weight = mx.concatenate([self.down_weight, mx.zeros((E, pad, cols), mx.uint32)], axis=1)
        scales = self.down_scales
        self.down_scales = mx.concatenate([scales, mx.zeros((E, pad, scales.shape[2]), mx.uint8)], axis=1)
        mx.eval(self.down_weight, self.down_scales)

    def _matmul(self, x: mx.array, name: str, indices: mx.array, sorted_indices: bool) -> mx.array:
        w = getattr(self, f"{name}_weight")
        if self.quantized:
            # mx.gather_qmm(x, w, scales, transpose, group 32, 4 bits, mxfp4), shaped for MLX's fast paths.
            y = kernels.gather_qmm_mxfp4(x, w, getattr(self, f"{name}_scales"), indices, sorted_indices)
        else:
            y = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        bias = getattr(self, f"{name}_bias")
        if y.shape[-1] != bias.shape[-1]:
            y = y[..., : bias.shape[-1]]  # rows padded for MLX-CUDA (pad_down_rows)
        return y + bias[indices][..., None, :].astype(y.dtype)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, H], indices [N, k] -> each selected expert's output [N, k, H]."""
        N, k = indices.shape
        if N * k < SORT_THRESHOLD:
            h = x[:, None, None, :]  # [N, 1, 1, H] broadcasts against indices [N, k]
            h = self._matmul(h, "gate_up", indices, False)
            h = clamped_swiglu(h, self.alpha, self.limit)
            return self._matmul(h, "down", indices, False).squeeze(-2)
        if kernels.moe_prefill_ok(self, x, indices):  # GPU: grouping + grouped GEMM kernels
            return kernels.moe_prefill(self, x, indices)
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
        if self.shard is None:
            fused = kernels.moe_block(self, x)
            if fused is not None:  # GPU, few tokens: norm + router, gate_up + SwiGLU, down + sum + residual
                return fused
        h = self.norm(x).reshape(-1, shape[-1])
        weights, indices = self.router(h)
        residual = x
        if self.shard is not None:
            weights, indices = self.shard.local(weights, indices)
            residual = self.shard.residual(x)
            fused = kernels.moe_decode(self.experts, h, weights, indices, residual.reshape(h.shape))
            if fused is not None:  # GPU, few tokens: this rank's experts, summed, + its residual share
                return self.shard.all_sum(fused.reshape(shape))
        y = self.experts(h, indices)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        out = residual + y.reshape(shape)
        return out if self.shard is None else self.shard.all_sum(out)

"""The weights the kernels take, as small named tuples of arrays: launchers never see a model module
(the model builds these from its own, moe.py and attention.py)."""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx


class ExpertWeights(NamedTuple):
    """E experts' MXFP4 weights as OpenAI ships them: [E, rows, cols / 8] uint32 codes, [E, rows,
    cols / 32] uint8 e8m0 scales, [E, rows] biases; gate and up rows interleaved. down's rows may be
    padded past the hidden size (the loader does so on CUDA); its bias is not."""

    gate_up_weight: mx.array
    gate_up_scales: mx.array
    gate_up_bias: mx.array
    down_weight: mx.array
    down_scales: mx.array
    down_bias: mx.array
    alpha: float  # clamped SwiGLU: gate * sigmoid(alpha * gate) * (up + 1), both clamped at limit
    limit: float


class AttentionWeights(NamedTuple):
    """An attention block's decode weights: RMSNorm, the qkv and output projections (float, with
    biases), YaRN RoPE, the per-head sinks, and the head layout."""

    norm_weight: mx.array
    eps: float
    qkv_weight: mx.array  # [(Hq + 2 Hkv) D, H], rows head-major: query heads, key heads, value heads
    qkv_bias: mx.array
    wavelengths: mx.array  # [D / 2] float32, as mx.fast.rope takes them
    concentration: float  # YaRN's scale of q and k
    out_weight: mx.array  # [H, Hq D]
    out_bias: mx.array
    sinks: mx.array  # [Hq]
    num_heads: int
    num_kv_heads: int
    head_dim: int

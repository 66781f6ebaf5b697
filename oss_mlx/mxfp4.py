"""MXFP4, the experts' number format, in one place: its constants and its codec.

A group of GROUP_SIZE (32) consecutive values along the input axis shares one e8m0 scale (a uint8
exponent s: 2^(s - SCALE_BIAS), s = 255 is NaN); each value is a 4-bit e2m1 code (FP4_VALUES), two per
byte, the low nibble first. The hub stores the codes as `*_blocks` uint8 [..., out, in/32, 16]; MLX's
`mxfp4` mode packs the same bytes as uint32 [..., out, in/8] (eight codes per word), so a checkpoint's
bytes load unchanged. The numpy codec here writes and checks checkpoints without MLX's kernels; the
MLX calls (`quantize`, `dequantize`) are the model's.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

GROUP_SIZE = 32
BITS = 4
SCALE_BIAS = 127  # e8m0: scale = 2^(s - 127)
BYTES_PER_GROUP = GROUP_SIZE * BITS // 8  # 16
VALUES_PER_WORD = 32 // BITS  # codes in one uint32 of MLX's packing
MLX_MODE = {"group_size": GROUP_SIZE, "bits": BITS, "mode": "mxfp4"}

# FP4 e2m1 code -> value; bit 3 is the sign (code 8 is -0.0).
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
# byte -> (value of the low nibble, value of the high nibble): the low nibble is the earlier element.
_BYTE_PAIRS = np.stack([FP4_VALUES[np.arange(256) & 0xF], FP4_VALUES[np.arange(256) >> 4]], axis=-1)
# The rms of the 16 codes taken uniformly (2.926): random experts' scales are set from it.
FP4_RMS = float(np.sqrt(np.mean(FP4_VALUES.astype(np.float64) ** 2)))


# ---- MLX (the model's) --------------------------------------------------------------------------------


def quantize(w: mx.array) -> tuple[mx.array, mx.array]:
    """float [..., out, in] -> (uint32 codes [..., out, in/8], uint8 scales [..., out, in/32]), by MLX,
    computed in float32 as the loader and the converter quantize a float fine-tune's experts."""
    return tuple(mx.quantize(w.astype(mx.float32), **MLX_MODE)[:2])


def dequantize(w: mx.array, scales: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """MLX-packed MXFP4 (as `quantize` returns it) -> float [..., out, in]."""
    return mx.dequantize(w, scales, **MLX_MODE, dtype=dtype)


# ---- numpy, on the hub's blocks ------------------------------------------------------------------------


def dequantize_blocks(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 -> float32 [..., out, in], from hub-style blocks uint8 [..., out, in/32, 16] and scales uint8
    [..., out, in/32]. Exact."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.shape[-1] != BYTES_PER_GROUP or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"blocks {blocks.shape} must be scales {scales.shape} + ({BYTES_PER_GROUP},)")
    vals = _BYTE_PAIRS[blocks]  # [..., G, 16, 2]
    s = scales.astype(np.int32)
    factor = np.ldexp(np.float32(1.0), s - SCALE_BIAS).astype(np.float32)
    factor[s == 255] = np.nan
    vals = vals.reshape(*scales.shape, GROUP_SIZE) * factor[..., None]
    return vals.reshape(*scales.shape[:-1], scales.shape[-1] * GROUP_SIZE)


def quantize_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., out, in] -> (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32]).

    OCP MX rule: the group's scale is 2^(floor(log2(max|x|)) - 2) (FP4's largest exponent is 2), values are
    rounded to the nearest FP4 value (ties to the even code), saturating at +-6. An all-zero group gets
    scale 2^-127. `dequantize_blocks(*quantize_blocks(w)) == w` whenever w is exactly representable.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % GROUP_SIZE:
        raise ValueError(f"the last axis ({w.shape[-1]}) must be a multiple of {GROUP_SIZE}")
    g = w.reshape(*w.shape[:-1], w.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    amax = np.abs(g).max(axis=-1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -SCALE_BIAS)
    e = np.clip(e, -SCALE_BIAS, SCALE_BIAS).astype(np.int32)
    x = g / np.ldexp(np.float32(1.0), e)[..., None]
    mags = FP4_VALUES[:8]
    # nearest magnitude; ties go to the even code (the one with a zero mantissa bit)
    d = np.abs(np.abs(x)[..., None] - mags)
    best = d.min(axis=-1, keepdims=True)
    cand = d == best
    even_first = np.array([0, 2, 4, 6, 1, 3, 5, 7])
    code = even_first[np.argmax(cand[..., even_first], axis=-1)]
    code = code | np.where(np.signbit(x) & (code != 0), 8, 0)
    code = code.astype(np.uint8).reshape(*g.shape[:-1], BYTES_PER_GROUP, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return blocks.astype(np.uint8), (e + SCALE_BIAS).astype(np.uint8)

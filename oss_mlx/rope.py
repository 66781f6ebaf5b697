"""YaRN rotary embeddings, computed exactly as the reference does.

The correction range [low, high] is only rounded when the config says `truncate: true`. gpt-oss
ships `truncate: false` and OpenAI's reference never rounds; mlx-lm always rounds, which is why its
logits drift from the reference as the prompt grows.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .config import ModelConfig


def yarn_inv_freq(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies (float64) and the attention (concentration) factor."""
    dim, base, factor = config.head_dim, config.rope_theta, config.rope_scaling_factor
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    given = config.rope_attention_factor  # a config's explicit attention_factor (transformers' key)
    if factor <= 1.0:
        return 1.0 / pos_freqs, 1.0 if given is None else given

    def correction_dim(num_rotations: float) -> float:
        # The pair index whose wavelength fits `num_rotations` times in the original context.
        return (
            dim
            * math.log(config.rope_original_context / (num_rotations * 2 * math.pi))
            / (2 * math.log(base))
        )

    low, high = correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency (high-frequency pairs)
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolate
    concentration = 0.1 * math.log(factor) + 1.0 if given is None else given
    return inv_freq, concentration


class YarnRoPE:
    """Applies rotary embeddings (half-split pairs) at absolute positions `offset + t`."""

    def __init__(self, config: ModelConfig):
        inv_freq, self.concentration = yarn_inv_freq(config)
        self.dims = config.head_dim
        # mx.fast.rope takes wavelengths; float32 like the reference.
        self.wavelengths = mx.array((1.0 / inv_freq).astype(np.float32))
        self._scale: dict[mx.Dtype, mx.array] = {}  # the concentration per dtype, made once

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        """x: [B, heads, T, head_dim]."""
        # Scaling the input equals scaling cos and sin (rotation is linear).
        if x.dtype not in self._scale:
            self._scale[x.dtype] = mx.array(self.concentration, dtype=x.dtype)
        x = x * self._scale[x.dtype]
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self.wavelengths
        )

"""Attention with learned per-head sinks, on a sliding window or the full causal context.

Each head has a sink logit that joins the softmax but has no value: the head may attend to
"nothing". GQA: 8 key/value heads serve 64 query heads; K and V are never tiled.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import FullCache, WindowCache
from .config import ModelConfig
from .kernels import AttentionWeights, decode_attention
from .norm import RMSNorm
from .rope import YarnRoPE


def attention_mask(num_queries: int, offset: int, num_keys: int, window: int | None) -> mx.array | str | None:
    """Mask for queries at positions offset..offset+T-1 over the last S keys (up to offset+T-1).

    A window cache keeps only a suffix of the keys, so keys are counted back from the last query.
    None: every key is visible (single-token decode). "causal": plain causal, aligned to the last
    key, which the fused attention applies without building a T x S array (a 2k chunk over a 32k
    context would otherwise materialise scores of 2k x 32k per head). Otherwise a boolean [T, S]
    array, True = may attend.
    """
    if window is None or num_keys <= window:
        return None if num_queries == 1 else "causal"
    first_key = offset + num_queries - num_keys
    q = mx.arange(offset, offset + num_queries)[:, None]
    k = mx.arange(first_key, offset + num_queries)[None, :]
    return (k <= q) & (q - k < window)


def sdpa_with_sinks(
    q: mx.array, k: mx.array, v: mx.array, sinks: mx.array, scale: float, mask: mx.array | str | None
) -> mx.array:
    """softmax([q·k * scale, sink]) @ [v, 0] per head; q [B, Hq, T, D], k/v [B, Hkv, S, D]: MLX's
    fused attention with sinks. A decode step on a GPU takes the kernel instead (AttentionBlock.step).
    """
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks.astype(q.dtype))


# Prefill of a sliding-window layer goes in query tiles of this many tokens, each against only the
# keys its window can see: scores of TILE x (TILE + window - 1) per head instead of T x (T + window - 1),
# and never a T x S mask (a 2k chunk would otherwise build 2k x 2k scores per head per layer).
WINDOW_TILE = 256


def windowed_sdpa(
    q: mx.array, k: mx.array, v: mx.array, sinks: mx.array, scale: float, offset: int, window: int
) -> mx.array:
    """Sliding-window attention with sinks for T >= WINDOW_TILE queries at offset.., tile by tile.

    k/v hold the last S positions up to offset + T - 1 (what the window cache hands out).

    Every tile has the same shape, whatever T is: the last one ends at T and overlaps its neighbour
    (only its new rows are kept), and each tile is copied out contiguous. MLX-CUDA builds a cuDNN graph
    per distinct shape and strides (0.1-0.9 s for a new prompt length's tiles, docs/UPSTREAM.md item
    4); this way the window layers build them once per process (twice from an empty cache, plus one
    for a first prompt shorter than WINDOW_TILE + window - 1). The copies are ~3 MB a tile.
    """
    T, S = q.shape[2], k.shape[2]
    first_key = offset + T - S  # absolute position of k[:, :, 0]
    tiles = []
    for start in range(0, T, WINDOW_TILE):
        first_row = start  # rows of this tile not produced by the one before
        start = min(start, T - WINDOW_TILE)
        end = start + WINDOW_TILE
        lo = max(0, offset + start - (window - 1) - first_key)  # oldest key the first query sees
        hi = offset + end - first_key  # one past the last query's own key
        mask = attention_mask(WINDOW_TILE, offset + start, hi - lo, window)
        tile_q, tile_k, tile_v = (
            mx.contiguous(a) for a in (q[:, :, start:end], k[:, :, lo:hi], v[:, :, lo:hi])
        )
        out = sdpa_with_sinks(tile_q, tile_k, tile_v, sinks, scale, mask)
        tiles.append(out[:, :, first_row - start :])
    return mx.concatenate(tiles, axis=2)


def _write_row(buffer: mx.array, row: mx.array, slot: mx.array) -> mx.array:
    """buffer [2, B, H, S, D] (keys, values) with row [2, B, H, 1, D] at position slot (int32 [1]), in
    place where MLX can: one scatter for the key and the value.

    A scatter, not mx.slice_update with an index array: on MLX-CUDA 0.32.4 the latter copied the whole
    buffer every call (244 µs a row into 34.6 MB, against 62 µs for this; benchmarks/slice_update_probe.py).
    """
    index = mx.broadcast_to(slot.reshape(1, 1, 1, 1, 1), row.shape)
    return mx.put_along_axis(buffer, index, row, axis=3)


class AttentionBlock(nn.Module):
    """x + out(attention(rope(q), rope(k), v, sinks)) over the pre-normed x."""

    # Tensor parallel (distributed/tensor_parallel.py): the block holds a slice of the heads, and
    # `shard` adds every rank's part of the output, the residual counted once.
    shard = None

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, config.qkv_dim, bias=True)
        self.sinks = mx.zeros((config.num_attention_heads,))
        self.out = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size, bias=True)
        self.rope = YarnRoPE(config)

    def __call__(
        self, x: mx.array, mask: mx.array | str | None, cache: FullCache | WindowCache | None = None
    ) -> mx.array:
        """x [B, T, H] after what `cache` holds (one token per sequence goes through `step`, on the
        cache's buffer: Transformer.decode)."""
        T = x.shape[1]
        q, k, v = self._project(x)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if self.window is not None and T > WINDOW_TILE:
            o = windowed_sdpa(q, k, v, self.sinks, self.scale, offset, self.window)
        else:
            o = sdpa_with_sinks(q, k, v, self.sinks, self.scale, mask)
        return self._output(o, x)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x [B, T, H] -> q [B, Hq, T, D], k and v [B, Hkv, T, D] (normed, projected, not rotated)."""
        B, T, _ = x.shape
        D, hq, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv(self.norm(x))
        q = qkv[..., : hq * D].reshape(B, T, hq, D).transpose(0, 2, 1, 3)
        k = qkv[..., hq * D : (hq + hkv) * D].reshape(B, T, hkv, D).transpose(0, 2, 1, 3)
        v = qkv[..., (hq + hkv) * D :].reshape(B, T, hkv, D).transpose(0, 2, 1, 3)
        return q, k, v

    def _output(self, o: mx.array, x: mx.array) -> mx.array:
        """x + out(o) for the heads' outputs o [B, Hq, T, D]."""
        B, _, T, _ = o.shape
        y = self.out(o.transpose(0, 2, 1, 3).reshape(B, T, self.num_heads * self.head_dim))
        return x + y if self.shard is None else self.shard.all_sum(self.shard.residual(x) + y)

    def step(self, x: mx.array, pos: mx.array, slot: mx.array, kv: mx.array) -> tuple[mx.array, mx.array]:
        """One token per sequence, x [B, 1, H], at position `pos` (int32 [1]), with the cache as a
        fixed-shape buffer kv [2, B, Hkv, S, D] of keys and values (cache.py `decode_state`: a full
        layer's buffer, a window layer's ring of `window` slots, position p in slot p % window, the
        slot given): writes the new key and value in place and attends the slots written so far.
        Pure, for the compiled decode step (decode.py); returns (x + attention, kv).

        On a GPU: three kernels (norm + qkv + RoPE, attention, output + residual) around one scatter;
        with quantized projections (convert --quality small / balanced) the attention kernel still
        reads the buffer in place."""
        w = self.decode_weights()
        if decode_attention.attention_decode_ok(w, x):
            q, row = decode_attention.norm_qkv_rope(w, x, pos)
            kv = _write_row(kv, row, slot)
            o = decode_attention.sdpa_decode(q, kv, self.sinks, self.scale, self.window, pos)
            if self.shard is None:
                return decode_attention.out_residual(o, w.out_weight, w.out_bias, x), kv
            y = decode_attention.out_residual(o, w.out_weight, w.out_bias, self.shard.residual(x))
            return self.shard.all_sum(y), kv
        q, k, v = self._project(x)
        offset = pos.reshape(())
        q, k = self.rope(q, offset), self.rope(k, offset)
        kv = _write_row(kv, mx.stack([k, v]).astype(kv.dtype), slot)
        if decode_attention.sdpa_decode_ok(q, kv):
            B = x.shape[0]
            q = mx.contiguous(q.reshape(B, self.num_heads, self.head_dim))
            o = decode_attention.sdpa_decode(q, kv, self.sinks, self.scale, self.window, pos)
            y = self.out(o)
            return (x + y if self.shard is None else self.shard.all_sum(self.shard.residual(x) + y)), kv
        written = mx.arange(kv.shape[3]) <= pos  # a ring's slots are all written once pos >= window - 1
        o = sdpa_with_sinks(q, kv[0, ...], kv[1, ...], self.sinks, self.scale, written)
        return self._output(o, x), kv

    def decode_weights(self) -> AttentionWeights | None:
        """The block's weights as the decode kernels take them; None where its projections are not
        plain float linears with biases (convert --quality small / balanced quantizes them)."""
        qkv, out = self.qkv, self.out
        if not (type(qkv) is nn.Linear and type(out) is nn.Linear and "bias" in qkv and "bias" in out):
            return None
        return AttentionWeights(
            self.norm.weight,
            self.norm.eps,
            qkv.weight,
            qkv.bias,
            self.rope.wavelengths,
            self.rope.concentration,
            out.weight,
            out.bias,
            self.sinks,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )

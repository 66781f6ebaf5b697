"""Attention with learned per-head sinks, on a sliding window or the full causal context.

Each head has a sink logit that joins the softmax but has no value: the head may attend to
"nothing". GQA: 8 key/value heads serve 64 query heads; K and V are never tiled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .cache import FullCache, WindowCache
from .config import ModelConfig
from .kernels import AttentionWeights, decode_attention
from .norm import RMSNorm
from .rope import YarnRoPE
from .switches import env_switch


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
    if isinstance(mask, mx.array) and k.shape[2] % KEY_ALIGN and kernels.available_backend() == "cuda":
        pad = -k.shape[2] % KEY_ALIGN  # masked-out zero keys
        k, v = (mx.pad(a, [(0, 0), (0, 0), (0, pad), (0, 0)]) for a in (k, v))
        mask = mx.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)], constant_values=False)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks.astype(q.dtype))


# MLX-CUDA's fused attention backward (cuDNN) corrupts memory when a boolean mask's key length is not
# a multiple of 8 (0.32.4; its forward is right; docs/UPSTREAM.md item 11): fine-tuning differentiates
# it, so such keys are padded with masked-out zero rows on CUDA, and window tiles are sized to need none.
KEY_ALIGN = 8


# Prefill of a sliding-window layer goes in query tiles of this many tokens, each against only the
# keys its window can see: scores of TILE x (TILE + window - 1) per head instead of T x (T + window - 1),
# and never a T x S mask (a 2k chunk would otherwise build 2k x 2k scores per head per layer).
WINDOW_TILE = 256


# Without a cache (training: whole rows at once) a full layer attends in query tiles of this many
# tokens, each over the keys up to its end, where MLX differentiates the unfused attention (the CPU and
# Metal, docs/UPSTREAM.md item 12): a layer's backward then builds scores of TILE x keys at a time, not
# T x T. On CUDA the fused backward builds none, and a new key length per tile would be a new cuDNN graph
# (item 4): untiled there.
FULL_TRAIN_TILE = 256


def fused_attention_backward() -> bool:
    """Whether MLX differentiates the fused attention here (CUDA's cuDNN backward; docs/UPSTREAM.md
    item 12): then training attends whole rows, and the training plan counts no scores."""
    return kernels.available_backend() == "cuda"


def causal_tiles_sdpa(q: mx.array, k: mx.array, v: mx.array, sinks: mx.array, scale: float) -> mx.array:
    """Causal attention with sinks of q [B, Hq, T, D] over k/v [B, Hkv, T, D] from position 0, in query
    tiles of FULL_TRAIN_TILE, each over the keys up to its last query (MLX's "causal" aligns the mask
    to the last key): the same result as one call."""
    T = q.shape[2]
    tiles = []
    for start in range(0, T, FULL_TRAIN_TILE):
        end = min(start + FULL_TRAIN_TILE, T)
        tiles.append(
            sdpa_with_sinks(q[:, :, start:end], k[:, :, :end], v[:, :, :end], sinks, scale, "causal")
        )
    return mx.concatenate(tiles, axis=2)


def window_tile_keys(window: int) -> int:
    """Keys a window tile attends: the WINDOW_TILE + window - 1 its queries can see, rounded up to
    KEY_ALIGN (the extra keys come first and the window hides them)."""
    return -(-(WINDOW_TILE + window - 1) // KEY_ALIGN) * KEY_ALIGN


# ---- fixed prefill shapes ---------------------------------------------------------------------------
# MLX-CUDA builds a cuDNN graph for every new shape and stride set of its fused attention (~70 ms each,
# docs/UPSTREAM.md item 4), so on CUDA every prefill attention is given one of a small fixed set of
# shapes, which the load-time warm-up builds (warmup.py): a window layer's tiles all have one shape
# (windowed_sdpa), and a full layer attends a chunk as the aligned block of queries that holds it
# (QueryBlock), its other rows zeros and its keys cut at the block's end. Exact: the padded rows are
# dropped, and the keys past the chunk are hidden by the causal mask from every real query.
FIXED_SHAPES_ENV = "OSS_MLX_FIXED_SHAPES"
# Block sizes of a prompt's first block (a fresh cache): a short prompt is not padded to a whole step.
FIRST_BLOCKS = (256, 512, 1024)
# The window layers' mask marking "tiles, whatever T is" (Transformer._masks).
TILES = "tiles"


def fixed_shapes() -> bool:
    """Whether prefill attention takes the fixed shapes: on MLX-CUDA (the only backend that builds
    per-shape graphs), or as OSS_MLX_FIXED_SHAPES=1 / 0 says. Elsewhere the padding would be waste."""
    want = env_switch(FIXED_SHAPES_ENV)
    if want is not None:
        return want
    return kernels.available_backend() == "cuda"


@dataclass(frozen=True)
class QueryBlock:
    """A full layer's prefill chunk attended as the queries [first, first + size) over the keys
    [0, first + size): a shape that depends on the block, not on the chunk (query_block)."""

    first: int
    size: int

    @property
    def end(self) -> int:
        return self.first + self.size


def block_sizes(step: int) -> tuple[int, ...]:
    """The sizes a prompt's first block may have for prefill chunks of `step`: FIRST_BLOCKS below it,
    then the step (deeper blocks are always a whole step)."""
    return (*(s for s in FIRST_BLOCKS if s < step), step)


def query_block(start: int, end: int, step: int) -> QueryBlock | None:
    """The aligned block of queries that holds the chunk [start, end) for prefill chunks of `step`
    aligned to multiples of it (generation.prefill_cuts); None if the chunk crosses a block boundary."""
    first = (start // step) * step
    if end > first + step:
        return None
    size = step if first else next(s for s in block_sizes(step) if s >= end)
    return QueryBlock(first, size)


def block_sdpa(
    q: mx.array, k: mx.array, v: mx.array, sinks: mx.array, scale: float, offset: int, block: QueryBlock
) -> mx.array:
    """Causal attention with sinks of the T queries at offset.. (q [B, Hq, T, D]) as the whole block:
    q padded with zero rows to [block.first, block.end), k/v [B, Hkv, block.end, D] the keys from
    position 0 (rows past offset + T hold anything finite: only the padding rows see them)."""
    T = q.shape[2]
    before, after = offset - block.first, block.end - offset - T
    padded = mx.pad(q, [(0, 0), (0, 0), (before, after), (0, 0)]) if before or after else mx.contiguous(q)
    return sdpa_with_sinks(padded, k, v, sinks, scale, "causal")[:, :, before : before + T]


def window_tile_mask(first_query: int, first_key: int, window: int, valid_from: int) -> mx.array:
    """[WINDOW_TILE, window_tile_keys(window)] bool: query first_query + i may see key first_key + j
    (causal, within the window, and at or after valid_from: keys before it are padding)."""
    q = mx.arange(first_query, first_query + WINDOW_TILE)[:, None]
    k = mx.arange(first_key, first_key + window_tile_keys(window))[None, :]
    return (k <= q) & (q - k < window) & (k >= valid_from)


def windowed_sdpa(
    q: mx.array, k: mx.array, v: mx.array, sinks: mx.array, scale: float, offset: int, window: int
) -> mx.array:
    """Sliding-window attention with sinks for T > 1 queries at offset.., tile by tile.

    k/v hold the last S positions up to offset + T - 1 (what the window cache hands out).

    Every tile has the same shape, [WINDOW_TILE queries, window_tile_keys(window) keys], whatever T
    and the cache hold: the last tile ends at T and overlaps its neighbour (only its new rows are
    kept), fewer than WINDOW_TILE queries are padded in front with zero rows (dropped), and keys the
    cache does not hold (before position 0) are zero rows the mask hides. Each tile is copied out
    contiguous. MLX-CUDA builds a cuDNN graph per distinct shape and strides (0.1-0.9 s for a new prompt
    length's tiles, docs/UPSTREAM.md item 4); this way the window layers build one per process. The
    copies are ~3 MB a tile.
    """
    T, S = q.shape[2], k.shape[2]
    first_key = offset + T - S  # absolute position of k[:, :, 0]
    span = window_tile_keys(window)
    back = span - WINDOW_TILE  # keys before a tile's first query
    q_pad = max(0, WINDOW_TILE - T)
    if q_pad:
        q = mx.pad(q, [(0, 0), (0, 0), (q_pad, 0), (0, 0)])
    q0 = offset - q_pad  # absolute position of q[:, :, 0]
    k_pad = max(0, first_key - (q0 - back))
    if k_pad:
        k, v = (mx.pad(a, [(0, 0), (0, 0), (k_pad, 0), (0, 0)]) for a in (k, v))
    k0 = first_key - k_pad  # absolute position of k[:, :, 0] now
    rows = q.shape[2]
    tiles = []
    for start in range(0, rows, WINDOW_TILE):
        first_row = start  # rows of this tile not produced by the one before
        start = min(start, rows - WINDOW_TILE)
        lo = q0 + start - back  # absolute position of the tile's first key
        mask = window_tile_mask(q0 + start, lo, window, first_key)
        tile_q, tile_k, tile_v = (
            mx.contiguous(a)
            for a in (
                q[:, :, start : start + WINDOW_TILE],
                k[:, :, lo - k0 : lo - k0 + span],
                v[:, :, lo - k0 : lo - k0 + span],
            )
        )
        out = sdpa_with_sinks(tile_q, tile_k, tile_v, sinks, scale, mask)
        tiles.append(out[:, :, first_row - start :])
    return mx.concatenate(tiles, axis=2)[:, :, q_pad:]


def _write_row(buffer: mx.array, row: mx.array, slots: mx.array) -> mx.array:
    """buffer [2, R, H, S, D] (keys, values) with row [2, R, H, 1, D] at each row's slot (int32 [R]),
    in place where MLX can: one scatter for the keys and the values of every row.

    A scatter, not mx.slice_update with an index array: on MLX-CUDA 0.32.4 the latter copied the whole
    buffer every call (244 µs a row into 34.6 MB, against 62 µs for this; benchmarks/slice_update_probe.py).
    """
    index = mx.broadcast_to(slots.reshape(1, -1, 1, 1, 1), row.shape)
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
        self,
        x: mx.array,
        mask: mx.array | str | QueryBlock | None,
        cache: FullCache | WindowCache | None = None,
    ) -> mx.array:
        """x [B, T, H] after what `cache` holds (the decode batch's one token per row goes through
        `step` instead: Transformer.step). mask: as attention_mask makes it, TILES (a window layer in
        tiles whatever T is) or a QueryBlock (a full layer with a FullCache, at the block's shape)."""
        T = x.shape[1]
        q, k, v = self._project(x)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if isinstance(mask, QueryBlock) and isinstance(cache, FullCache):
            k, v = cache.update_and_fetch(k, v, keys_to=mask.end)
            return self._output(block_sdpa(q, k, v, self.sinks, self.scale, offset, mask), x)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if self.window is not None and (
            T > WINDOW_TILE or (isinstance(mask, str) and mask == TILES and T > 1)
        ):
            o = windowed_sdpa(q, k, v, self.sinks, self.scale, offset, self.window)
        elif (
            cache is None
            and isinstance(mask, str)
            and mask == "causal"
            and T > FULL_TRAIN_TILE
            and not fused_attention_backward()
        ):
            o = causal_tiles_sdpa(q, k, v, self.sinks, self.scale)
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

    def step(
        self, x: mx.array, positions: mx.array, slots: mx.array, kv: mx.array
    ) -> tuple[mx.array, mx.array]:
        """One token per row, x [R, 1, H], row r at position positions[r] (int32 [R]), with the cache
        as a fixed-shape buffer kv [2, R, Hkv, S, D] of keys and values (batch_cache.py: a full
        layer's buffer, a window layer's ring of `window` slots, position p in slot p % window; each
        row's slot given): writes every row's new key and value in place and attends, per row, the
        slots written so far. Pure, for the compiled decode step (decode.py); returns
        (x + attention, kv).

        On a GPU: three kernels (norm + qkv + RoPE, attention, output + residual, each row at its
        own position) around one scatter; with quantized projections (convert --quality small /
        balanced) the attention kernel still reads the buffer in place."""
        w = self.decode_weights()
        if decode_attention.attention_decode_ok(w, x):
            q, row = decode_attention.norm_qkv_rope(w, x, positions)
            kv = _write_row(kv, row, slots)
            o = decode_attention.sdpa_decode(q, kv, self.sinks, self.scale, self.window, positions)
            if self.shard is None:
                return decode_attention.out_residual(o, w.out_weight, w.out_bias, x), kv
            y = decode_attention.out_residual(o, w.out_weight, w.out_bias, self.shard.residual(x))
            return self.shard.all_sum(y), kv
        q, k, v = self._project(x)
        q, k = self.rope(q, positions), self.rope(k, positions)
        kv = _write_row(kv, mx.stack([k, v]).astype(kv.dtype), slots)
        if decode_attention.sdpa_decode_ok(q, kv):
            B = x.shape[0]
            q = mx.contiguous(q.reshape(B, self.num_heads, self.head_dim))
            o = decode_attention.sdpa_decode(q, kv, self.sinks, self.scale, self.window, positions)
            y = self.out(o)
            return (x + y if self.shard is None else self.shard.all_sum(self.shard.residual(x) + y)), kv
        # Per row: the slots written so far (a ring's are all written once the row reaches window - 1).
        written = mx.arange(kv.shape[3])[None, :] <= positions[:, None]
        o = sdpa_with_sinks(q, kv[0, ...], kv[1, ...], self.sinks, self.scale, written[:, None, None, :])
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

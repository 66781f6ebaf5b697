"""gpt-oss: token embedding, L x [attention block, MoE block], RMSNorm, unembedding.

Parameter names are the one canonical layout every checkpoint is mapped to (see weights.py):
    embedding.weight
    blocks.{i}.attn.{norm.weight, qkv.weight, qkv.bias, sinks, out.weight, out.bias}
    blocks.{i}.mlp.{norm.weight, router.weight, router.bias}
    blocks.{i}.mlp.experts.{gate_up,down}_{weight,scales,bias}
    norm.weight
    unembedding.weight
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .attention import (
    TILES,
    WINDOW_TILE,
    AttentionBlock,
    QueryBlock,
    attention_mask,
    fixed_shapes,
    query_block,
)
from .batch_cache import BatchCache
from .cache import FullCache, ModelCache, WindowCache
from .config import ModelConfig
from .moe import MLPBlock
from .norm import RMSNorm


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, quantized_experts: bool = True):
        super().__init__()
        self.attn = AttentionBlock(config, layer)
        self.mlp = MLPBlock(config, quantized_experts)

    def __call__(self, x: mx.array, mask: mx.array | str | None, cache=None) -> mx.array:
        return self.mlp(self.attn(x, mask, cache))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, quantized_experts: bool = True, layers: range | None = None):
        """layers: the contiguous range of layers this object holds and runs (default all); a pipeline
        stage (distributed/pipeline.py) holds a part, blocks[j] being layer layers[j]."""
        super().__init__()
        self.config = config
        self.layer_range = range(config.num_layers) if layers is None else layers
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = [TransformerBlock(config, i, quantized_experts) for i in self.layer_range]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.unembedding = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(
        self,
        tokens: mx.array,
        cache: ModelCache | None = None,
        last_logits_only: bool = False,
        block_step: int | None = None,
    ) -> mx.array:
        """tokens [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with last_logits_only), after what
        `cache` holds (which takes the new keys and values). The decode batch's steps go through
        `step_into` instead (decode.py).
        block_step: the prefill's chunk step, its chunks aligned to multiples of it (generation.prefill_cuts):
        with fixed attention shapes (attention.fixed_shapes) the attention then takes them.

        Raw ids are checked here (check_tokens); the decode step is not: the ids it feeds are
        sampled from the model's own logits."""
        self.check_tokens(tokens)
        x = self.run_blocks(self.embed(tokens), cache, last_logits_only, block_step)
        return self.head(x, last_logits_only)

    def run_blocks(
        self,
        x: mx.array,
        cache: ModelCache | None,
        last_logits_only: bool = False,
        block_step: int | None = None,
    ) -> mx.array:
        """The held layers over hidden states x [B, T, H]; cache[j] is blocks[j]'s."""
        masks = self._masks(x.shape[1], cache, block_step)
        last = self.config.num_layers - 1
        for i, (layer, block) in enumerate(zip(self.layer_range, self.blocks)):
            c = cache[i] if cache is not None else None
            if layer == last and last_logits_only:
                # Only the last position goes on: the last MoE block runs on one token, not T.
                x = block.mlp(block.attn(x, masks[block.attn.window], c)[:, -1:, :])
            else:
                x = block(x, masks[block.attn.window], c)
        return x

    # Where the hidden states come from and where they go. A pipeline stage receives them from the
    # previous stage and sends them on; a tensor-parallel rank holds a slice of the vocabulary
    # (distributed/pipeline.py, distributed/tensor_parallel.py).
    def embed(self, tokens: mx.array) -> mx.array:
        """tokens [B, T] -> hidden states [B, T, H]."""
        return self.embedding(tokens)

    def head(self, x: mx.array, last_logits_only: bool = False) -> mx.array:
        """Hidden states after the last layer -> logits (x holds only the last position when
        last_logits_only: the last layer cut it)."""
        return self.unembedding(self.norm(x))

    def check_tokens(self, tokens: mx.array) -> None:
        """Refuse ids outside the embedding table: MLX does not bounds-check the lookup (on the CPU an
        id past the end crashes the process; on a GPU it reads other memory). One small reduction and
        sync per call: a prefill chunk, not a decode step."""
        if not mx.issubdtype(tokens.dtype, mx.integer):
            raise ValueError(f"token ids must be integers, not {tokens.dtype}")
        if tokens.size == 0:
            return
        low, high = mx.stack([tokens.min(), tokens.max()]).tolist()
        vocab = self.config.vocab_size
        if low < 0 or high >= vocab:
            bad = high if high >= vocab else low
            raise ValueError(
                f"token id {bad} is outside this model's vocabulary (ids 0..{vocab - 1}, vocab_size in "
                "its config.json): the ids come from another tokenizer, or the checkpoint's vocabulary "
                "is too small"
            )

    def hidden_states(self, tokens: mx.array, run_block=None) -> mx.array:
        """tokens [B, T] from position 0, no cache -> the final norm's output [B, T, H] (training: the
        loss unembeds only the positions it scores). run_block(block, x, mask) replaces block(x, mask),
        e.g. to keep each block's input for a recomputation in the backward pass (finetune/loss.py)."""
        self.check_tokens(tokens)
        x = self.embedding(tokens)
        masks = self._masks(tokens.shape[1], None)
        for block in self.blocks:
            mask = masks[block.attn.window]
            x = block(x, mask) if run_block is None else run_block(block, x, mask)
        return self.norm(x)

    def step(
        self, tokens: mx.array, positions: mx.array, kv: list[mx.array], unembed: bool = True
    ) -> tuple[mx.array, list[mx.array]]:
        """One token per row, tokens [R, 1], row r at position positions[r] (int32 [R]) -> (logits
        [R, 1, vocab], each layer's buffer [2, R, Hkv, S, D] with every row's position written).
        Pure and shape-stable: decode.py compiles it once per buffer shape; `step_into` hands the
        decode batch's buffers in and back (batch_cache.py). unembed=False: the final norm's output
        [R, 1, H] instead of the logits (the CPU's host unembedding takes it on: host_head.py)."""
        x = self.embed(tokens)
        # A window layer writes slot position % window: one slot array per window size, not per layer.
        slots = {
            b.attn.window: kernels.ring_slots(positions, b.attn.window) for b in self.blocks if b.attn.window
        }
        written = []
        for block, buffer in zip(self.blocks, kv):
            x, buffer = block.attn.step(x, positions, slots.get(block.attn.window, positions), buffer)
            x = block.mlp(x)
            written.append(buffer)
        return (self.head(x) if unembed else self.norm(x)), written

    def step_into(self, batch: BatchCache, tokens: mx.array, step=None) -> mx.array:
        """tokens [R, 1] -> logits [R, 1, vocab], every row of the decode batch advanced one position:
        `step` (Transformer.step, or its compiled trace: decode.py) on the batch's buffers, which then
        take the written ones. (A distributed model announces it to the other ranks first.)"""
        state = batch.state()
        logits, written = (step or self.step)(tokens, batch.positions(), state)
        del state  # the old buffers are now referenced by the graph only: MLX writes them in place
        batch.commit(written)
        return logits

    def _masks(
        self, T: int, cache: ModelCache | None, block_step: int | None = None
    ) -> dict[int | None, mx.array | str | QueryBlock | None]:
        """One mask per attention kind, shared by all layers of that kind (a QueryBlock or TILES where
        the prefill takes fixed shapes: attention.fixed_shapes)."""
        masks: dict[int | None, mx.array | str | QueryBlock | None] = {}
        fixed = cache is not None and T > 1 and fixed_shapes()
        for i, block in enumerate(self.blocks):
            window = block.attn.window
            if window in masks:
                continue
            c = cache[i] if cache is not None else None
            offset = c.offset if c is not None else 0
            kept = (c.kept() if isinstance(c, WindowCache) else offset) if c is not None else 0
            qb = query_block(offset, offset + T, block_step) if fixed and block_step else None
            if window is not None and (T > WINDOW_TILE or fixed):
                masks[window] = TILES  # the window layers' prefill tiles build their own
            elif window is None and qb is not None and isinstance(c, FullCache):
                masks[window] = qb
            else:
                masks[window] = attention_mask(T, offset, kept + T, window)
        return masks

    def make_cache(self) -> ModelCache:
        return ModelCache(
            [WindowCache(b.attn.window) if b.attn.window is not None else FullCache() for b in self.blocks]
        )

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype: what the embedding produces (a quantized one: its scales' dtype)."""
        e = self.embedding
        if hasattr(e, "scales"):
            return e.scales.dtype
        return e.weight.dtype if hasattr(e, "weight") else e.dtype  # streamed: streaming.py

"""The training loss: next-token cross-entropy on the scored positions only, memory-lean.

Only scored positions are unembedded (the answer tokens, not the prompt): at 201,088 words of vocabulary
a 2,048-token row's full logits alone would be 1.6 GB in float32. They are unembedded in chunks of
`LOSS_CHUNK` rows, each under mx.checkpoint, so at most one chunk's logits exist at a time, backward
included. With `checkpoint=True` each transformer block is recomputed in the backward pass (mx.checkpoint:
only the blocks' inputs are kept), trading one more forward for most of the activation memory.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .data import Batch

LOSS_CHUNK = 512  # scored rows unembedded at once: 512 x 201,088 float32 logits = 0.41 GB


def _checkpointed_block(block: nn.Module, x: mx.array, mask) -> mx.array:
    # The trainable parameters go in as arguments so their gradients flow through the recomputation
    # (mlx-lm's grad_checkpoint does the same, but patches the class for every instance).
    def run(params, x):
        block.update(params)
        return block(x, mask)

    return mx.checkpoint(run)(block.trainable_parameters(), x)


def _chunk_loss(unembedding: nn.Module):
    def loss(h: mx.array, labels: mx.array) -> mx.array:
        logits = unembedding(h).astype(mx.float32)
        picked = mx.take_along_axis(logits, mx.stop_gradient(labels)[:, None], axis=-1)[:, 0]
        return (mx.logsumexp(logits, axis=-1) - picked).sum()

    return mx.checkpoint(loss)


def loss_sum(model: nn.Module, batch: Batch, checkpoint: bool = False) -> mx.array:
    """The summed cross-entropy (float32) over the batch's scored positions."""
    h = model.hidden_states(mx.array(batch.inputs), _checkpointed_block if checkpoint else None)
    h = h.reshape(-1, h.shape[-1])[mx.array(batch.positions)]
    labels = mx.array(batch.labels)
    chunk = _chunk_loss(model.unembedding)
    total = mx.array(0.0, dtype=mx.float32)
    for i in range(0, labels.size, LOSS_CHUNK):
        total = total + chunk(h[i : i + LOSS_CHUNK], labels[i : i + LOSS_CHUNK])
    return total

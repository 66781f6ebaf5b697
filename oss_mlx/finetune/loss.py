"""The training loss and its gradient: next-token cross-entropy on the scored positions only.

Only scored positions are unembedded (the answer tokens, not the prompt): at 201,088 words of vocabulary
a 2,048-token row's full logits alone would be 1.6 GB in float32. They are unembedded in chunks of
`LOSS_CHUNK` rows, each under mx.checkpoint; with gradient checkpointing each chunk's loss and gradient
are also evaluated before the next (head_value_and_grad), so at most one chunk's logits exist at a time.

Gradient checkpointing is done layer by layer with an evaluation between layers: the forward keeps each
block's input (evaluated), then the backward recomputes one block at a time from its input and the
gradient of its output, and evaluates before the next. mx.checkpoint around each block, inside one lazy
graph, left the peak to MLX's evaluation order: measured on CPU, 7 to 12 KB kept per token and layer
at hidden 256 with expert adapters, where the block inputs are 1 KB; this way the peak is the block
inputs plus one block's forward and backward (docs/FINETUNE.md, memory). Dropout draws the same masks
in the recomputation: each block's forward is seeded from (step seed, layer).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..memory import LOSS_CHUNK
from .data import Batch


def _chunk_loss(unembedding: nn.Module):
    def loss(h: mx.array, labels: mx.array) -> mx.array:
        logits = unembedding(h).astype(mx.float32)
        picked = mx.take_along_axis(logits, mx.stop_gradient(labels)[:, None], axis=-1)[:, 0]
        return (mx.logsumexp(logits, axis=-1) - picked).sum()

    return mx.checkpoint(loss)


def _scored(model: nn.Module, x: mx.array, batch: Batch) -> mx.array:
    """The final norm of x [B, T, H] at the batch's scored positions: [scored, H]."""
    h = model.norm(x)
    return h.reshape(-1, h.shape[-1])[mx.array(batch.positions)]


def head_loss(model: nn.Module, x: mx.array, batch: Batch) -> mx.array:
    """Summed cross-entropy of the last block's output x [B, T, H] at the batch's scored positions."""
    h = _scored(model, x, batch)
    labels = mx.array(batch.labels)
    chunk = _chunk_loss(model.unembedding)
    total = mx.array(0.0, dtype=mx.float32)
    for i in range(0, labels.size, LOSS_CHUNK):
        total = total + chunk(h[i : i + LOSS_CHUNK], labels[i : i + LOSS_CHUNK])
    return total


def head_value_and_grad(model: nn.Module, x: mx.array, batch: Batch) -> tuple[mx.array, mx.array]:
    """(head_loss, its gradient w.r.t. x), evaluated a loss chunk at a time. In one graph MLX held
    every chunk's logits at once despite mx.checkpoint: 5.2 GB for 2,048 rows at 201,088 words on
    CUDA, where one chunk's are ~1.3 GB (benchmarks/probes/train_phase_memory_probe.py)."""
    h = _scored(model, x, batch)
    mx.eval(h)
    labels = mx.array(batch.labels)
    chunk = mx.value_and_grad(_chunk_loss(model.unembedding))
    total, grads = mx.array(0.0, dtype=mx.float32), []
    for i in range(0, labels.size, LOSS_CHUNK):
        loss, g = chunk(h[i : i + LOSS_CHUNK], labels[i : i + LOSS_CHUNK])
        mx.eval(loss, g)
        total, grads = total + loss, [*grads, g]
    _, (dx,) = mx.vjp(lambda x: _scored(model, x, batch), [x], [mx.concatenate(grads)])
    mx.eval(total, dx)
    return total, dx


def loss_sum(model: nn.Module, batch: Batch) -> mx.array:
    """The summed cross-entropy (float32) over the batch's scored positions (one lazy graph)."""
    x = _blocks_forward(model, mx.array(batch.inputs), None)
    return head_loss(model, x, batch)


def _blocks_forward(model: nn.Module, tokens: mx.array, run_block) -> mx.array:
    """The blocks' output (before the final norm). Transformer.hidden_states normalizes; the loss wants
    the gradient before the norm, so the norm is undone here by running the blocks the same way."""
    out: list[mx.array] = []

    def keep_last(block, x, mask):
        y = block(x, mask) if run_block is None else run_block(block, x, mask)
        out[:] = [y]
        return y

    model.hidden_states(tokens, keep_last)
    return out[0]


def value_and_grad(
    model: nn.Module, batch: Batch, checkpoint: bool = False, seed: int = 0
) -> tuple[mx.array, dict]:
    """(summed loss, gradients of the summed loss w.r.t. the model's trainable parameters).

    The graph is built from the reference ops: the fused kernels (mx.fast.*_kernel) have no VJP, and
    the fused router's expert indices would sit in the graph, where MLX refuses a gather's VJP with
    respect to its indices."""
    with kernels.use_backend("reference"):
        return _value_and_grad(model, batch, checkpoint, seed)


def _value_and_grad(model: nn.Module, batch: Batch, checkpoint: bool, seed: int) -> tuple[mx.array, dict]:
    if not checkpoint:

        def loss_fn(b):
            layer = 0

            def seeded(block, x, mask):
                nonlocal layer
                mx.random.seed(_layer_seed(seed, layer))
                layer += 1
                return block(x, mask)

            return head_loss(model, _blocks_forward(model, mx.array(b.inputs), seeded), b)

        return nn.value_and_grad(model, loss_fn)(batch)

    # Forward, keeping each block's input, evaluated.
    saved: list[tuple[nn.Module, mx.array, object]] = []

    def forward(block, x, mask):
        mx.random.seed(_layer_seed(seed, len(saved)))
        saved.append((block, x, mask))
        y = block(x, mask)
        mx.eval(y)
        return y

    last = _blocks_forward(model, mx.array(batch.inputs), forward)
    loss, g = head_value_and_grad(model, last, batch)
    block_grads: list[dict] = [None] * len(saved)  # type: ignore[list-item]
    for i in range(len(saved) - 1, -1, -1):
        block, x, mask = saved[i]
        params = block.trainable_parameters()
        cotangent = g

        def project(params, x, block=block, mask=mask, cotangent=cotangent):
            block.update(params)
            return (block(x, mask) * cotangent).sum()  # its gradient is the block's VJP

        mx.random.seed(_layer_seed(seed, i))
        g_params, g = mx.grad(project, argnums=(0, 1))(params, x)
        mx.eval(g_params, g)
        block_grads[i] = g_params
        saved[i] = (block, None, None)  # the input is not needed any more
    return loss, {"blocks": block_grads}


def _layer_seed(seed: int, layer: int) -> int:
    return (seed * 257 + layer) % (1 << 31)

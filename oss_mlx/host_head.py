"""The decode step's unembedding on MLX's CPU backend, through numpy's BLAS.

Why not MLX's matmul there: the Linux `mlx-cpu` wheel links netlib's reference BLAS (docs/UPSTREAM.md
item 13), whose product of a few rows with the 201,088-row unembedding is compute-bound and linear in
the rows. That is most of a small model's decode step and what kept a decode batch from paying off on
the CPU; numpy's OpenBLAS reads the weight once for 8 rows (the times: docs/PERFORMANCE.md
"Concurrency"). The GPU keeps MLX's matmul.

The rows go through the BLAS in blocks of `COLUMNS`, zero-padded: a row's logits are then the same bits
whatever else is in the batch (OpenBLAS sums a lone column otherwise than a block's), so batched
decoding stays token-for-token equal to each sequence alone. The weight is copied once as float32
(`MAX_BYTES` bounds the copy) and again whenever the model's unembedding weight is replaced (an adapter
fused into it, a reload).
"""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .kernels.dispatch import on_gpu
from .model import Transformer
from .switches import env_switch

ENV = "OSS_MLX_HOST_HEAD"  # 0: MLX's matmul on the CPU too; 1: the host BLAS whatever the copy's size
COLUMNS = 8  # rows per BLAS call: one block reads the weight once
MAX_BYTES = 1 << 30  # the float32 copy's bound by default (a 20b's would be 2.3 GB: MLX's matmul there)


class HostUnembedding:
    """logits = h @ W^T for decode rows h [R, 1, H] on the host's BLAS, in h's dtype."""

    def __init__(self, weight: mx.array) -> None:
        self.source = weight  # kept: identity says whether the model's weight is still this one
        self.weight = np.array(weight.astype(mx.float32), copy=True)  # [V, H]
        # Buffers kept across steps (a fresh 6 MB array a step is a fresh mapping whose page faults
        # cost as much as the product), one set per thread: two threads may each run a decode step.
        self._buffers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, h: mx.array) -> mx.array:
        R, V, H = h.shape[0], self.weight.shape[0], self.weight.shape[1]
        x = np.array(h.reshape(R, H).astype(mx.float32))  # evaluates the step up to here
        blocks = -(-R // COLUMNS)
        key = (threading.get_ident(), blocks)
        if key not in self._buffers:
            self._buffers[key] = (
                np.zeros((H, COLUMNS), np.float32),
                np.empty((blocks, V, COLUMNS), np.float32),
            )
        block, out = self._buffers[key]
        for b in range(blocks):
            rows = x[b * COLUMNS : (b + 1) * COLUMNS]
            block[:] = 0
            block[:, : rows.shape[0]] = rows.T
            np.matmul(self.weight, block, out=out[b])
        # [blocks, V, COLUMNS] -> [R, V]: MLX transposes it in the cast to h's dtype
        logits = mx.array(out).transpose(0, 2, 1).reshape(blocks * COLUMNS, V)[:R]
        return logits.astype(h.dtype).reshape(R, 1, V)


def wanted(model) -> bool:
    """Whether the decode step of `model` takes the host's BLAS for its unembedding here and now."""
    if on_gpu() or model.__class__ is not Transformer or type(model.unembedding) is not nn.Linear:
        return False  # a GPU, a distributed model's own head, a quantized or adapted unembedding
    weight = model.unembedding.weight
    if not mx.issubdtype(weight.dtype, mx.floating):
        return False
    return _copied(weight.size)


def _copied(values: int) -> bool:
    """Whether a float unembedding of `values` elements is copied for the host's BLAS on the CPU."""
    setting = env_switch(ENV)
    return setting if setting is not None else values * 4 <= MAX_BYTES


def copy_bytes(vocab: int, hidden: int) -> int:
    """The float32 copy a float [vocab, hidden] unembedding takes on the CPU backend (0: none is made).
    The memory planner counts it where a CPU runs the model."""
    return vocab * hidden * 4 if _copied(vocab * hidden) else 0


def model_copy_bytes(model) -> int:
    """The copy `model`'s decode steps will make here and now (0 on a GPU, or for a quantized head)."""
    return model.unembedding.weight.size * 4 if wanted(model) else 0


class HostHeads:
    """The host unembedding of one model, made at first use and remade when its weight changes."""

    def __init__(self) -> None:
        self._head: HostUnembedding | None = None

    def for_model(self, model) -> HostUnembedding | None:
        if not wanted(model):
            return None
        weight = model.unembedding.weight
        if self._head is None or self._head.source is not weight:
            self._head = HostUnembedding(weight)
        return self._head

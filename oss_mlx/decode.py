"""The decode step: one token per row of the decode batch into its caches, compiled.

Why compiled: at batch 1 a decode step is ~200 small kernels, and building that graph from Python
took ~3.5 ms a step on the GPU machine (Python, MLX's bindings, each launch's arguments) - longer
than the card needed to run it. `mx.compile` traces `Transformer.step` once and replays the graph
from C++ afterwards (0.5 ms measured, benchmarks/compile_probe.py). Tracing needs fixed shapes, so
the step works on the decode batch's fixed-shape buffers (batch_cache.py) and reads each row's
position from an int32 array instead of Python; the buffers change shape when the batch changes
row bucket or the full layers grow (1,024 positions at a time), and only then is the step traced
again.

Not compiled where a step has host work in it (expert streaming reads experts from disk as the
router picks them) or `OSS_MLX_COMPILE=0`; the same pure function then runs eagerly.
"""

from __future__ import annotations

import threading

import mlx.core as mx

from . import kernels
from .batch_cache import BatchCache
from .host_head import HostHeads
from .model import Transformer
from .switches import env_switch

ENV = "OSS_MLX_COMPILE"


def compilable(model: Transformer) -> bool:
    """False when the forward pass does host work (streamed experts or embedding rows)."""
    from .streaming import StreamingEmbedding, StreamingExperts

    if isinstance(getattr(model, "embedding", None), StreamingEmbedding):  # a pipeline stage may hold none
        return False
    return not any(isinstance(b.mlp.experts, StreamingExperts) for b in model.blocks)


class DecodeStep:
    """`step(tokens [R, 1], batch) -> logits [R, 1, vocab]`, every row of the batch advanced one
    position. Holds the compiled traces: one compiled function per kernel backend and thread (a
    trace bakes in the backend it saw, and MLX streams belong to the thread that made them). On MLX's
    CPU backend the trace stops at the final norm and the unembedding runs on numpy's BLAS
    (host_head.py says why)."""

    def __init__(self, model: Transformer, compile: bool | None = None) -> None:
        self.model = model
        if compile is None:
            compile = env_switch(ENV) is not False
        self.compiled = compile and compilable(model)
        self._fns: dict[tuple[str, int, bool], object] = {}
        self._traced: set[tuple] = set()
        self.host_heads = HostHeads()

    def _fn(self, unembed: bool = True):
        key = (kernels.backend(), threading.get_ident(), unembed)
        if key not in self._fns:

            def step(tokens, positions, kv):  # not the bound method: `model` may be a weak proxy
                return self.model.step(tokens, positions, kv, unembed)

            self._fns[key] = mx.compile(step) if self.compiled else step
        return self._fns[key]

    def __call__(self, tokens: mx.array, batch: BatchCache) -> mx.array:
        if tokens.dtype != mx.uint32:  # one trace per input dtype: samplers return uint32
            tokens = tokens.astype(mx.uint32)
        fn, head = self._step()
        out = self.model.step_into(batch, tokens, fn)
        return out if head is None else head(out)

    def _step(self):
        """(the step's function, the host unembedding that finishes it or None: MLX's own)."""
        head = self.host_heads.for_model(self.model)
        return self._fn(unembed=head is None), head

    def trace_ahead(self, batch: BatchCache, rows: int, length: int) -> None:
        """Trace the compiled step for buffers of `rows` rows and full layers of `length` positions
        (BatchCache.shape_after_join) before they exist: the scheduler calls this while the GPU runs
        a joining prompt's last chunk, so its first decoded token waits on no trace (~5-15 ms of
        host work for the 20b; a bench decoding 32 tokens would otherwise count it in ~70 ms)."""
        if not self.compiled:
            return
        key = (kernels.backend(), threading.get_ident(), rows, length)
        if key in self._traced:
            return
        self._traced.add(key)
        fn, _ = self._step()
        fn(*_dummy_step(batch, rows, length))  # outputs dropped unevaluated: only the trace is kept

    def run_ahead(self, batch: BatchCache, rows: int, length: int) -> None:
        """Run the step once on zero buffers of that shape (the load-time warm-up: the kernels a
        batch of `rows` uses are compiled, and the step traced, before a request needs them)."""
        if self.compiled:
            self._traced.add((kernels.backend(), threading.get_ident(), rows, length))
        fn, _ = self._step()
        logits, written = fn(*_dummy_step(batch, rows, length))
        mx.eval(logits, written)


def _dummy_step(batch: BatchCache, rows: int, length: int) -> tuple[mx.array, mx.array, list[mx.array]]:
    """(tokens, positions, buffers) of a decode step of `rows` rows at position 0, the full layers
    `length` positions long."""
    H, D, dtype = batch.kv_heads, batch.head_dim, batch.dtype
    state = [mx.zeros((2, rows, H, w or length, D), dtype) for w in batch.windows]
    tokens = mx.zeros((rows, 1), dtype=mx.uint32)
    positions = kernels.device_ints([0] * rows)[:rows]
    return tokens, positions, state


def decode_one(step: DecodeStep, tokens: mx.array, cache) -> mx.array:
    """One decode step of a single sequence's cache (tests, checks): it joins a batch of its own,
    steps, and leaves (moved in and out, not copied). tokens [1, 1] -> logits [1, 1, vocab]."""
    batch = BatchCache.for_model(step.model)
    batch.join(0, cache)
    logits = step(tokens, batch)
    batch.leave(0)
    return logits

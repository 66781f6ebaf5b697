"""The decode step: one token per sequence into the cache, compiled.

Why compiled: at batch 1 a decode step is ~200 small kernels, and building that graph from Python
took ~3.5 ms a step on the GPU machine (Python, MLX's bindings, each launch's arguments) - longer
than the card needed to run it. `mx.compile` traces `Transformer.decode` once and replays the graph
from C++ afterwards (0.5 ms measured, benchmarks/compile_probe.py). Tracing needs fixed shapes, so
the step works on fixed-shape cache buffers (cache.py `decode_state`) and reads its position from
an int32 array instead of Python; the full layers' buffers grow 1,024 positions at a time, so the
step is traced again once per 1,024 tokens.

Not compiled where a step has host work in it (expert streaming reads experts from disk as the
router picks them) or `OSS_MLX_COMPILE=0`; the same pure function then runs eagerly.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import kernels
from .cache import ModelCache
from .model import Transformer

ENV = "OSS_MLX_COMPILE"


def compilable(model: Transformer) -> bool:
    """False when the forward pass does host work (streamed experts or embedding rows)."""
    from .streaming import StreamingEmbedding, StreamingExperts

    if isinstance(getattr(model, "embedding", None), StreamingEmbedding):  # a pipeline stage may hold none
        return False
    return not any(isinstance(b.mlp.experts, StreamingExperts) for b in model.blocks)


class DecodeStep:
    """`step(tokens [B, 1], cache) -> logits [B, 1, vocab]`, advancing the cache by one position."""

    def __init__(self, model: Transformer, compile: bool | None = None) -> None:
        self.model = model
        if compile is None:
            compile = os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")
        self.compiled = compile and compilable(model)
        # A trace bakes in the kernel backend it saw (OSS_MLX_KERNELS, kernels.use_backend): one each.
        self._fns: dict[str, object] = {}
        self._prepared: set[tuple] = set()

    def _fn(self):
        backend = kernels.backend()
        if backend not in self._fns:
            self._fns[backend] = mx.compile(self.model.decode) if self.compiled else self.model.decode
        return self._fns[backend]

    def __call__(self, tokens: mx.array, cache: ModelCache) -> mx.array:
        if tokens.dtype != mx.uint32:  # one trace per input dtype: samplers return uint32
            tokens = tokens.astype(mx.uint32)
        return self.model.decode_into(cache, tokens, self._fn())

    def prepare(self, cache: ModelCache, batch: int = 1) -> None:
        """Ready the step for the cache's next position: grow the buffers that are full (lazily:
        the caller's next evaluation of the cache does it) and trace the compiled step for their
        shapes. generate_tokens calls this while the GPU runs the prompt's last chunk, so the first
        decoded token waits on neither: a trace is ~5-15 ms of host work for the 20b, and a bench
        decoding 32 tokens would otherwise count it in a ~70 ms measurement."""
        state = cache.decode_state(self.model.kv_row(batch), self.model.dtype)
        if not self.compiled:
            return
        key = (kernels.backend(), tuple(kv.shape for kv in state))
        if key in self._prepared:
            return
        self._prepared.add(key)
        tokens = mx.zeros((batch, 1), dtype=mx.uint32)
        self._fn()(tokens, kernels.position_array(cache.offset), state)  # outputs dropped unevaluated

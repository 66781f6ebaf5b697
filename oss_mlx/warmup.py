"""The load-time warm-up: what a process's first prompts would pay once, paid before them.

On a GPU the first prompt of a process pays one-time costs the later ones do not (docs/PERFORMANCE.md,
"The first prompt"): our kernels compiled at the model's shapes (NVRTC on CUDA, the Metal compiler on
a Mac; the start-up self-test compiles them at its own small shapes only), MLX's own JIT kernels, the
decode step's trace, the batched step's kernels and trace at each row count (continuous batching;
only where batches will run: the server, `oss-mlx bench --concurrency`), the sampler's compile,
buffers allocated; and on MLX-CUDA a cuDNN graph for every new attention shape. The last is made a
small fixed set (attention.fixed_shapes: the window layers' tiles, the full layers' query blocks), so
it can be built here, once: `attention_shapes` lists it.

`warm_up(model, context)` runs it all; `steps(model, context)` is the same one piece at a time, for
a caller that can stop between them (the server's worker warms up while no request waits; MLX-CUDA's
attention graphs are kept per thread, so the warm-up must run on the thread that generates).
Nothing here changes the model or its results: the warm-up's cache is thrown away.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from . import kernels
from .attention import QueryBlock, block_sdpa, block_sizes, fixed_shapes
from .model import Transformer
from .switches import env_switch

ENV = "OSS_MLX_WARMUP"
# The warm-up's dummy prompt: long enough for the prefill experts' GEMM, the window layers' tiles and
# a first query block (attention.FIRST_BLOCKS), short enough to cost ~0.1 s of GPU work at 20b.
PROMPT_TOKENS = 300
# How deep the load-time warm-up builds the full layers' attention graphs (load_model; the bench's
# fresh processes): the prompts of up to 32k tokens the docs measure. ~1.3 s of load on the H200.
WARM_CONTEXT = 32768
# How deep a server's idle warm-up builds the full layers' attention graphs (one per 2,048 tokens,
# ~70 ms each on the H200; deeper blocks are built when first used).
SERVER_CONTEXT = 65536


@dataclass
class WarmupReport:
    """What the warm-up did and how long each piece took (seconds)."""

    pieces: list[tuple[str, float]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(t for _, t in self.pieces)

    def summary(self) -> str:
        return f"{self.seconds:.2f} s (" + ", ".join(f"{what} {t:.2f} s" for what, t in self.pieces) + ")"


def wanted() -> bool:
    """Whether loading warms up: where a GPU runs the model (a CPU has no per-shape setup worth a
    dummy prompt), unless OSS_MLX_WARMUP=0."""
    want = env_switch(ENV)
    if want is not None:
        return want
    return kernels.available_backend() in ("cuda", "metal") and mx.default_device() == mx.gpu


def attention_shapes(step: int, context: int) -> list[tuple[int, int]]:
    """(queries, keys) of every full-layer prefill attention for chunks of `step` up to `context`
    tokens (attention.query_block): a prompt's first block at each size, then whole-step blocks."""
    first = [(s, s) for s in block_sizes(step)]
    return first + [(step, end) for end in range(2 * step, context + step, step)]


def steps(model: Transformer, context: int, step: int | None = None, batched: bool = False) -> Iterator[str]:
    """The warm-up one piece at a time; each yields what it did once done.

    context: build the full layers' attention graphs for prompts up to this many tokens (deeper
    blocks are built when first used). step: the prefill chunk (default: the model runtime's).
    batched: also the batched decode step up to the runtime's max_batch (seconds on a GPU: the
    grouped expert kernels' compile), for a caller that will decode several sequences at once; a
    chat or `generate` decodes one, and a first batch_generate pays it at its first step."""
    from .batch_cache import BatchCache, row_bucket
    from .generation import SamplingOptions, TokenStream
    from .runtime import generate_tokens, runtime_of

    runtime = runtime_of(model)
    step = step or runtime.prefill_chunk
    vocab = model.config.vocab_size
    # A dummy prompt end to end (prefill chunk, last token, two compiled decode steps): every kernel at
    # the model's shapes, the step's trace for the buffers a short first prompt leaves, the buffers.
    prompt = [(i * 7919) % vocab for i in range(min(PROMPT_TOKENS, context))]
    options = SamplingOptions(temperature=0.0, max_tokens=3)
    cache = model.make_cache()
    run = generate_tokens(model, prompt, cache, options, set(), TokenStream(), prefill_chunk=step)
    for _ in run:
        pass
    yield f"a {len(prompt)}-token prompt"
    # The sampler chat and the server use by default (mlx-lm's, compiled at first use): temperature 1,
    # no top-p, as OpenAI advises for gpt-oss. Not top-p's: its sort and cumulative sum over the
    # vocabulary are compiled by the first reply that asks for them (with top-p 0.95 warmed this piece
    # took 28-30 s on the H200, docs/PERFORMANCE.md).
    logits = mx.zeros((1, vocab), dtype=model.dtype)
    mx.eval(SamplingOptions(temperature=1.0).sampler()(logits))
    yield "the sampler"
    # The compiled step's trace for each buffer size a first prompt can leave (host work, no GPU): a
    # prompt's full layers end at a query block's end (cache.FullCache with fixed shapes).
    decode, batch = runtime.decode, BatchCache.for_model(model)
    for size in block_sizes(step):
        decode.trace_ahead(batch, 1, size)
    yield "the decode step's traces"
    # The batched step once at each row count up to the runtime's max_batch: from two
    # rows the expert kernels are the grouped ones (kernels/decode_moe.py), compiled at first use, and
    # every row count has a trace of its own. (Not for a distributed model: one row, and a step run
    # here alone would wait in its collectives for ranks that were not told.)
    if batched and runtime.distributed is None and runtime.max_batch > 1:
        rows = 2
        while rows <= row_bucket(runtime.max_batch):
            decode.run_ahead(batch, rows, block_sizes(step)[0])
            rows *= 2
        yield "the batched decode step"
    if not fixed_shapes():
        return
    attn = next((b.attn for b in model.blocks if b.attn.window is None), None)
    if attn is None:
        return
    for queries, keys in attention_shapes(step, context):
        block = QueryBlock(keys - queries, queries)  # the call a prefill makes (AttentionBlock.__call__)
        q = mx.zeros((1, attn.num_heads, queries, attn.head_dim), model.dtype)
        kv = mx.zeros((1, attn.num_kv_heads, keys, attn.head_dim), model.dtype)
        mx.eval(block_sdpa(q, kv, kv, attn.sinks, attn.scale, block.first, block))
        yield f"attention {queries} x {keys}"
    # (MLX's buffer cache keeps what the warm-up freed: the first prompts reuse it, not allocate)


def warm_up(model: Transformer, context: int, step: int | None = None, batched: bool = False) -> WarmupReport:
    """Run every piece of `steps`; what each took."""
    report = WarmupReport()
    t = time.perf_counter()
    attention = 0.0
    for what in steps(model, context, step, batched):
        now = time.perf_counter()
        if what.startswith("attention "):  # one line for all the attention graphs
            attention += now - t
        else:
            report.pieces.append((what, now - t))
        t = now
    if attention:
        report.pieces.append(("the attention graphs", attention))
    return report


def warm_up_or_warn(model: Transformer, context: int, step: int | None = None) -> WarmupReport | None:
    """warm_up, where a failure is a warning and not a failed load: the warm-up only moves costs
    earlier, so a model it could not warm up still answers (its first prompt then pays them)."""
    try:
        return warm_up(model, context, step)
    except Exception as e:  # noqa: BLE001 (any failure of it: the load itself has succeeded)
        mx.clear_cache()  # what the failed piece allocated
        warnings.warn(
            f"oss-mlx: the load-time warm-up failed ({type(e).__name__}: {e}); the first prompt will be "
            f"slower. {ENV}=0 turns it off.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None

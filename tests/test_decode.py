"""The decode step (decode.py) on the decode batch's fixed-shape buffers (batch_cache.py), compiled,
equal to the plain forward: one sequence here; several at their own positions in test_batching.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_cache import CFG, TOKENS, model  # noqa: F401  (the fixture)

from oss_mlx import batch_cache, kernels
from oss_mlx.attention import FIXED_SHAPES_ENV
from oss_mlx.batch_cache import BatchCache
from oss_mlx.cache import FullCache
from oss_mlx.decode import DecodeStep, compilable, decode_one


def plain_logits(model, tokens, steps_after: int):  # noqa: F811
    """The logits of each of the last `steps_after` positions by a forward over the whole prefix,
    with no cache at all: the reference a cache (and the decode step on it) must reproduce."""
    return [
        np.array(model(mx.array(tokens[None, : i + 1]), last_logits_only=True))
        for i in range(len(tokens) - steps_after, len(tokens))
    ]


@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("prompt", [1, 5, 30])
def test_decode_step_equals_the_plain_forward(model, monkeypatch, compile, prompt):  # noqa: F811
    """Across a window layer's ring wrapping several times and the full layers' buffers growing
    (grown every 16 positions here, 1,024 in use): every step's logits equal a cache-free forward's.
    On the reference path everywhere (a GPU's kernels are held to the same step below, and to the
    reference in test_kernels.py): a fused router may break a near-tie otherwise than the reference."""
    monkeypatch.setattr(FullCache, "step", 8)  # prefill's own growth
    monkeypatch.setattr(batch_cache, "GROW", 16)
    steps = 40
    tokens = TOKENS[: prompt + steps]
    # MLX-CUDA's float32 matmuls may round through TF32; the CPU's are exact float32.
    rel = 2e-5 if mx.default_device() == mx.cpu else 2e-3
    with kernels.use_backend("reference"):
        want = plain_logits(model, tokens, steps)
        cache = model.make_cache()
        model(mx.array(tokens[None, :prompt]), cache=cache)
        step = DecodeStep(model, compile=compile)
        assert step.compiled is compile
        batch = BatchCache.for_model(model)
        batch.join("only", cache)
        held = batch.length
        for i in range(steps):
            got = np.array(step(mx.array(tokens[None, prompt + i : prompt + i + 1]), batch))
            atol = rel * np.abs(want[i]).max()
            np.testing.assert_allclose(got, want[i], rtol=0, atol=atol, err_msg=f"step {i}")
        assert held == 8 * -(-prompt // 8)
        assert batch.length == held + 16 * -(
            -(prompt + steps - held) // 16
        )  # grown 16 at a time, not per token
        batch.leave("only")
    assert cache.offset == prompt + steps


def test_compiled_step_equals_the_eager_step(model, monkeypatch):  # noqa: F811
    """The compiled trace computes what the same step computes op by op, on whatever backend this
    machine has (a GPU's kernels included), across buffer growth and ring wraps."""
    monkeypatch.setattr(batch_cache, "GROW", 16)
    steps = [DecodeStep(model, compile=c) for c in (True, False)]
    batches = [BatchCache.for_model(model) for _ in steps]
    for b in batches:
        c = model.make_cache()
        model(mx.array(TOKENS[None, :5]), cache=c)
        b.join(0, c)
    for i in range(5, 45):
        got, want = (np.array(s(mx.array(TOKENS[None, i : i + 1]), b)) for s, b in zip(steps, batches))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"position {i}")


def test_decoded_cache_rewinds_and_prefills_on(model):  # noqa: F811
    """Decode steps leave a cache the rest of the runtime can use: undo the last step, rewind to a
    mark past several window lengths, prefill and decode again - the same logits as when each decode
    step is the plain forward (the same kernels where there are any: a GPU's fused router may break
    a near-tie otherwise than the reference, which is not what this test is about)."""
    other = (TOKENS[12:20] + 7) % CFG.vocab_size

    def scenario(decode) -> list[np.ndarray]:
        cache = model.make_cache()
        model(mx.array(TOKENS[None, :12]), cache=cache)
        cache.mark()
        for i in range(12, 40):
            decode(mx.array(TOKENS[None, i : i + 1]), cache)
        cache.rewind_to(39)  # undo the last step (an interrupted reply)
        out = [np.array(model(mx.array(TOKENS[None, 39:45]), cache=cache))]
        cache.rewind_to(12)  # the mark: 33 positions back, 4 window lengths
        model(mx.array(other[None, :-1]), cache=cache)
        out.append(np.array(decode(mx.array(other[None, -1:]), cache)))
        return out

    step = DecodeStep(model)
    got = scenario(lambda tokens, cache: decode_one(step, tokens, cache))
    want = scenario(lambda tokens, cache: model(tokens, cache=cache))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * np.abs(w).max())
    if mx.default_device() == mx.cpu:  # and on the reference path, a fresh forward too
        ref = np.array(model(mx.array(np.concatenate([TOKENS[:12], other])[None])))[:, -1:]
        np.testing.assert_allclose(got[1], ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_streamed_models_are_not_compiled(model):  # noqa: F811
    from oss_mlx.streaming import StreamingExperts

    assert compilable(model)
    before = model.blocks[0].mlp.experts
    model.blocks[0].mlp.experts = StreamingExperts.__new__(StreamingExperts)
    try:
        assert not compilable(model) and not DecodeStep(model).compiled
    finally:
        model.blocks[0].mlp.experts = before


def test_the_step_is_traced_once_per_buffer_shape(model, monkeypatch):  # noqa: F811
    """The point of compiling: Python builds the step's graph only when the buffers change shape (the
    full layers' buffer grows by GROW positions), not every token."""
    monkeypatch.setattr(batch_cache, "GROW", 16)
    traced = []
    real = type(model).step
    monkeypatch.setattr(type(model), "step", lambda self, *a: traced.append(1) or real(self, *a))
    cache = model.make_cache()
    model(mx.array(TOKENS[None, :5]), cache=cache)  # a prefill buffer of 256 positions
    step = DecodeStep(model, compile=True)
    batch = BatchCache.for_model(model)
    batch.join(0, cache)
    shapes = set()
    for i in range(5, 300):
        mx.eval(step(mx.array(TOKENS[None, i % 70 : i % 70 + 1]), batch))
        shapes.add(batch.length)
    assert shapes == {256, 272, 288, 304}  # 256, then grown by 16 as positions 256, 272, 288 are reached
    assert len(traced) == len(shapes)


def test_greedy_generation_takes_the_argmax_of_each_steps_logits(model):  # noqa: F811
    """Greedy sampling reads the logits as they are (no log-softmax first: its argmax is the same);
    generation's tokens are each step's argmax of the plain forward, and a sampled run still draws
    from the log-probabilities."""
    from oss_mlx.generation import SamplingOptions
    from oss_mlx.runtime import generate_tokens

    prompt, n = [int(t) for t in TOKENS[:6]], 8
    got = list(generate_tokens(model, prompt, model.make_cache(), SamplingOptions(0.0, max_tokens=n), set()))
    cache, want = model.make_cache(), []
    logits = model(mx.array([prompt]), cache=cache)[:, -1, :]
    for _ in range(n):
        want.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[want[-1]]]), cache=cache)[:, -1, :]
    assert got == want
    options = SamplingOptions(temperature=1.0, top_p=0.9, max_tokens=n, seed=3)
    sampled = list(generate_tokens(model, prompt, model.make_cache(), options, set()))
    again = list(generate_tokens(model, prompt, model.make_cache(), options, set()))
    assert len(sampled) == n and sampled == again and all(0 <= t < CFG.vocab_size for t in sampled)


def test_the_step_reads_the_joint_buffers_as_views(model):  # noqa: F811
    """Each layer's cache is one [2, B, H, S, D] buffer of keys and values; the attention step and the
    caches must read its halves as views: a bare kv[i] is a Gather in MLX, a copy of the whole buffer
    every step. Also one scatter per step writes the key and the value together."""
    import collections
    import io
    import re

    from oss_mlx import kernels

    def ops(*arrays):
        buf = io.StringIO()
        mx.export_to_dot(buf, *arrays)
        return collections.Counter(re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue()))

    cache = model.make_cache()
    model(mx.array(TOKENS[None, :20]), cache=cache)
    for c in cache:
        mx.eval(c.kv)
        assert ops(c.keys + 0, c.values + 0)["Gather"] == 0
    attn = model.blocks[0].attn
    batch = BatchCache.for_model(model)
    batch.join(0, cache)
    kv = batch.state()[0]
    mx.eval(kv)
    x = mx.random.normal((1, 1, CFG.hidden_size)).astype(model.dtype)
    pos = batch.positions()
    slot = kernels.ring_slots(pos, attn.window) if attn.window else pos
    out, written = attn.step(x, pos, slot, kv)
    counted = ops(out, written)
    assert counted["Gather"] == 0 and counted["ScatterAxis"] == 1, counted


def test_generation_traces_the_step_while_the_prompt_runs(model, monkeypatch):  # noqa: F811
    """The first decoded token waits on no trace: the scheduler traces the compiled step for the batch
    the prompt joins while the prompt's last chunk runs (DecodeStep.trace_ahead), and every decoded
    token then replays that one trace."""
    from oss_mlx import generation
    from oss_mlx import runtime as runtime_module
    from oss_mlx.runtime import runtime_of

    monkeypatch.setattr(batch_cache, "GROW", 16)
    monkeypatch.setenv(FIXED_SHAPES_ENV, "0")  # buffers grown in steps of 8, not to a query block
    runtime = runtime_of(model)
    monkeypatch.setattr(runtime, "_decode", None)  # a fresh step: no traces yet
    events = []
    real_step, real_call = type(model).step, type(model).__call__
    monkeypatch.setattr(type(model), "step", lambda self, *a: events.append("step") or real_step(self, *a))

    def call(self, tokens, *a, **k):
        events.append(f"forward {tokens.shape[1]}")
        return real_call(self, tokens, *a, **k)

    monkeypatch.setattr(type(model), "__call__", call)
    cache = model.make_cache()
    prompt = [int(t) for t in TOKENS[:16]]
    options = generation.SamplingOptions(0.0, max_tokens=6)
    for _ in runtime_module.generate_tokens(model, prompt, cache, options, set()):
        events.append("token")
    # the prompt but its last token, the last token alone, the trace, then the first token and five
    # more decoded without another trace
    assert events == ["forward 15", "forward 1", "step"] + ["token"] * 6

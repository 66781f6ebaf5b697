"""The decode step (decode.py): fixed-shape cache buffers, compiled, equal to the plain forward."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_cache import CFG, TOKENS, model  # noqa: F401  (the fixture)

from oss_mlx import kernels
from oss_mlx.attention import FIXED_SHAPES_ENV
from oss_mlx.cache import FullCache
from oss_mlx.decode import DecodeStep, compilable


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
    monkeypatch.setattr(FullCache, "decode_step", 16)
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
        for i in range(steps):
            got = np.array(step(mx.array(tokens[None, prompt + i : prompt + i + 1]), cache))
            atol = rel * np.abs(want[i]).max()
            np.testing.assert_allclose(got, want[i], rtol=0, atol=atol, err_msg=f"step {i}")
    assert cache.offset == prompt + steps
    # A one-token prompt is itself a decode step; longer ones are prefilled in steps of 8.
    prefilled = 8 * -(-prompt // 8) if prompt > 1 else 0
    grown = prefilled + 16 * -(-(prompt + steps - prefilled) // 16)  # in steps of 16, not per token
    assert all(c.keys.shape[2] == grown for c in cache if isinstance(c, FullCache))


def test_compiled_step_equals_the_eager_step(model, monkeypatch):  # noqa: F811
    """The compiled trace computes what the same step computes op by op, on whatever backend this
    machine has (a GPU's kernels included), across buffer growth and ring wraps."""
    monkeypatch.setattr(FullCache, "decode_step", 16)
    caches = [model.make_cache(), model.make_cache()]
    steps = [DecodeStep(model, compile=c) for c in (True, False)]
    for c in caches:
        model(mx.array(TOKENS[None, :5]), cache=c)
    for i in range(5, 45):
        got, want = (np.array(s(mx.array(TOKENS[None, i : i + 1]), c)) for s, c in zip(steps, caches))
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

    got = scenario(DecodeStep(model))
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
    full layers' buffer grows by `decode_step` positions), not every token."""
    monkeypatch.setattr(FullCache, "step", 8)
    monkeypatch.setattr(FullCache, "decode_step", 16)
    traced = []
    real = type(model).decode
    monkeypatch.setattr(type(model), "decode", lambda self, *a: traced.append(1) or real(self, *a))
    cache = model.make_cache()
    model(mx.array(TOKENS[None, :5]), cache=cache)  # buffer of 8 positions
    step = DecodeStep(model, compile=True)
    shapes = set()
    for i in range(5, 45):
        mx.eval(step(mx.array(TOKENS[None, i : i + 1]), cache))
        shapes.add(next(c.keys.shape[2] for c in cache if isinstance(c, FullCache)))
    assert shapes == {8, 24, 40, 56}  # 8, then grown by 16 as positions 8, 24, 40 are reached
    assert len(traced) == len(shapes)


def test_greedy_generation_takes_the_argmax_of_each_steps_logits(model):  # noqa: F811
    """Greedy sampling reads the logits as they are (no log-softmax first: its argmax is the same);
    generation's tokens are each step's argmax of the plain forward, and a sampled run still draws
    from the log-probabilities."""
    from oss_mlx.generation import SamplingOptions, generate_tokens

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
    kv = cache[0].decode_state((1, attn.num_kv_heads, attn.head_dim), model.dtype)
    mx.eval(kv)
    x = mx.random.normal((1, 1, CFG.hidden_size)).astype(model.dtype)
    pos = kernels.position_array(20)
    slot = kernels.ring_slot(pos, attn.window) if attn.window else pos
    out, written = attn.step(x, pos, slot, kv)
    counted = ops(out, written)
    assert counted["Gather"] == 0 and counted["ScatterAxis"] == 1, counted


def test_generation_traces_the_step_while_the_prompt_runs(model, monkeypatch):  # noqa: F811
    """The first decoded token waits on no trace and no buffer growth: generate_tokens grows the full
    layers' buffers and traces the compiled step while the prompt's last chunk runs (DecodeStep.prepare),
    and every decoded token then replays that one trace."""
    from oss_mlx import generation

    monkeypatch.setattr(FullCache, "step", 8)
    monkeypatch.setattr(FullCache, "decode_step", 16)
    monkeypatch.setenv(FIXED_SHAPES_ENV, "0")  # buffers grown in steps of 8, not to a query block
    monkeypatch.setattr(model, "_decode_step", None, raising=False)  # a fresh step: no traces yet
    events = []
    real_decode, real_prefill = type(model).decode, generation.prefill
    counted = lambda self, *a: events.append("decode") or real_decode(self, *a)  # noqa: E731
    monkeypatch.setattr(type(model), "decode", counted)

    def prefill(*a, **k):
        logits = real_prefill(*a, **k)
        events.append("prefilled")
        return logits

    monkeypatch.setattr(generation, "prefill", prefill)
    cache = model.make_cache()
    prompt = [int(t) for t in TOKENS[:16]]  # exactly fills the prompt's buffer: decoding must grow it
    options = generation.SamplingOptions(0.0, max_tokens=6)
    for _ in generation.generate_tokens(model, prompt, cache, options, set()):
        if "token" not in events:
            assert {c.kv.shape[3] for c in cache if isinstance(c, FullCache)} == {32}  # grown in the prefill
        events.append("token")
    # the prompt's last token (an eager decode step), the trace, then six tokens without another one
    assert events == ["decode", "decode", "prefilled"] + ["token"] * 6

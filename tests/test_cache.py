"""Caches: chunked prefill == full forward, marks, rewinding past the window, undo of a step."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from oss_mlx.cache import CacheRewindError
from oss_mlx.config import ModelConfig
from oss_mlx.model import Transformer

CFG = ModelConfig(
    num_layers=4,
    num_experts=4,
    experts_per_token=2,
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=8,
)


@pytest.fixture(scope="module")
def model() -> Transformer:
    """A random tiny model with MXFP4 experts (the quantized path)."""
    mx.random.seed(0)
    m = Transformer(CFG, quantized_experts=True)
    params = []
    for name, p in tree_flatten(m.parameters()):
        if name.endswith("experts.gate_up_weight") or name.endswith("experts.down_weight"):
            continue
        if name.endswith("_scales"):
            continue
        scale = 1.0 if ("norm" in name or "sinks" in name or "embedding" in name) else 0.05
        base = 1.0 if "norm" in name else 0.0
        params.append((name, base + scale * mx.random.normal(p.shape)))
    for i in range(CFG.num_layers):
        for proj, shape in (("gate_up", (4, 128, 64)), ("down", (4, 64, 64))):
            w, s = mx.quantize(0.05 * mx.random.normal(shape), group_size=32, bits=4, mode="mxfp4")
            params += [
                (f"blocks.{i}.mlp.experts.{proj}_weight", w),
                (f"blocks.{i}.mlp.experts.{proj}_scales", s),
            ]
    m.update(tree_unflatten(params))
    mx.eval(m.parameters())
    return m


def run_chunks(model, tokens, chunks, cache=None):
    cache = cache if cache is not None else model.make_cache()
    outs, start = [], 0
    for n in chunks:
        outs.append(np.array(model(mx.array(tokens[None, start : start + n]), cache=cache)))
        start += n
    return np.concatenate(outs, axis=1), cache


TOKENS = np.random.default_rng(1).integers(0, 256, size=70)


@pytest.mark.parametrize("chunks", [[70], [1] * 70, [3, 20, 1, 1, 9, 36], [8, 8, 7, 9, 38]])
def test_chunked_prefill_equals_full_forward(model, chunks):
    full = np.array(model(mx.array(TOKENS[None])))
    out, cache = run_chunks(model, TOKENS, chunks)
    np.testing.assert_allclose(out, full, rtol=0, atol=2e-5 * np.abs(full).max())
    # Sliding layers hold only window - 1 keys between calls: bounded memory.
    assert all(c.kept() <= CFG.sliding_window - 1 for c in cache if hasattr(c, "kept"))


def test_rewind_past_the_window_to_a_mark(model):
    """Harmony drops the last analysis: the cache must return to the end of the previous prompt."""
    turn1, detour, turn2 = TOKENS[:20], TOKENS[20:60], TOKENS[60:]
    _, cache = run_chunks(model, turn1, [20])
    cache.mark()
    run_chunks(model, detour, [10] + [1] * 30, cache)  # 40 tokens, 5x the window
    assert cache.offset == 60
    assert cache.can_rewind_to(20) and not cache.can_rewind_to(21)
    cache.rewind_to(20)
    out, _ = run_chunks(model, turn2, [len(turn2)], cache)
    ref = np.array(model(mx.array(np.concatenate([turn1, turn2])[None])))[:, 20:]
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_unmarked_rewind_is_refused_with_a_clear_error(model):
    _, cache = run_chunks(model, TOKENS, [30, 10])
    with pytest.raises(CacheRewindError, match="mark"):
        cache.rewind_to(5)
    assert cache.offset == 40  # untouched


def test_undo_of_the_last_step_and_short_rewinds(model):
    """An interrupted decode step (Ctrl-C) can be undone; rewinds inside the kept keys work."""
    _, cache = run_chunks(model, TOKENS, [30, 1])
    cache.rewind_to(30)  # undo the single-token step
    out, _ = run_chunks(model, TOKENS[30:40], [10], cache)
    ref = np.array(model(mx.array(TOKENS[None, :40])))[:, 30:]
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    assert cache.rewind_point(35) == 30 or cache.can_rewind_to(cache.rewind_point(35))
    cache.rewind_to(0)
    out, _ = run_chunks(model, TOKENS[:12], [12], cache)
    np.testing.assert_allclose(out, np.array(model(mx.array(TOKENS[None, :12]))), rtol=0, atol=1e-4)


def test_last_logits_only_equals_the_last_row(model):
    full = np.array(model(mx.array(TOKENS[None])))[:, -1:]
    last = np.array(model(mx.array(TOKENS[None]), last_logits_only=True))
    np.testing.assert_allclose(last, full, rtol=0, atol=2e-5 * np.abs(full).max())


def test_marks_are_bounded_and_the_newest_kept(model):
    cache = model.make_cache()
    for i in range(40):
        model(mx.array(TOKENS[None, i : i + 1]), cache=cache)
        cache.mark()
    window_caches = [c for c in cache if hasattr(c, "kept")]
    assert all(len(c._marks) == c.max_marks for c in window_caches)
    assert cache.can_rewind_to(40 - 23) and not cache.can_rewind_to(3)


@pytest.mark.parametrize(
    "T,kept,window",
    [
        (257, 0, 8),
        (600, 7, 8),
        (700, 127, 128),
        (1000, 0, 128),
        (513, 40, 300),
        (2, 0, 8),
        (5, 3, 8),
        (100, 127, 128),
        (200, 30, 128),
        (256, 0, 128),
        (300, 0, 128),
    ],
)
def test_windowed_tiles_equal_one_masked_attention(T, kept, window):
    """Window-layer prefill in query tiles (no T x S mask) == one attention with the full mask, for
    chunks shorter than a tile (padded in front) and caches holding fewer keys than the window."""
    from oss_mlx.attention import attention_mask, sdpa_with_sinks, windowed_sdpa

    rng = np.random.default_rng(T)
    offset = kept if kept < window - 1 else 1000 + kept  # a cache holds fewer keys only near the start
    q = mx.array(rng.standard_normal((1, 4, T, 16)), dtype=mx.float32)
    k = mx.array(rng.standard_normal((1, 2, kept + T, 16)), dtype=mx.float32)
    v = mx.array(rng.standard_normal((1, 2, kept + T, 16)), dtype=mx.float32)
    sinks = mx.array(rng.standard_normal(4), dtype=mx.float32)
    want = sdpa_with_sinks(q, k, v, sinks, 0.25, attention_mask(T, offset, kept + T, window))
    got = windowed_sdpa(q, k, v, sinks, 0.25, offset, window)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [17, 64, 65, 200])
def test_full_layer_query_tiles_equal_one_causal_attention(monkeypatch, T):
    """Without a cache (training) a full layer attends in query tiles where MLX differentiates the
    unfused attention: values and gradients equal one causal call (tiles of 16 here, a last partial
    one included)."""
    from oss_mlx import attention

    monkeypatch.setattr(attention, "FULL_TRAIN_TILE", 16)
    rng = np.random.default_rng(T)
    q, k, v = (mx.array(rng.standard_normal((1, h, T, 16)), dtype=mx.float32) for h in (4, 2, 2))
    sinks = mx.array(rng.standard_normal(4), dtype=mx.float32)
    cot = mx.array(rng.standard_normal((1, 4, T, 16)), dtype=mx.float32)

    def one(q, k, v):
        return (attention.sdpa_with_sinks(q, k, v, sinks, 0.25, "causal") * cot).sum()

    def tiled(q, k, v):
        return (attention.causal_tiles_sdpa(q, k, v, sinks, 0.25) * cot).sum()

    want, got = (mx.value_and_grad(f, argnums=(0, 1, 2))(q, k, v) for f in (one, tiled))
    np.testing.assert_allclose(got[0].item(), want[0].item(), rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-5)


def test_training_takes_the_query_tiles_except_on_cuda(monkeypatch):
    """The model's no-cache forward (training) tiles a full layer's queries on the CPU and Metal, not
    on CUDA (fused backward there), and never with a cache (inference)."""
    from oss_mlx import attention, kernels

    model = Transformer(CFG, quantized_experts=False)
    full = sum(b.attn.window is None for b in model.blocks)
    monkeypatch.setattr(attention, "FULL_TRAIN_TILE", 8)
    calls = []
    real = attention.causal_tiles_sdpa
    monkeypatch.setattr(attention, "causal_tiles_sdpa", lambda *a: calls.append(1) or real(*a))
    tokens = mx.array([list(range(20))])
    mx.eval(model.hidden_states(tokens))
    assert len(calls) == full == 2  # each full layer
    mx.eval(model(tokens, cache=model.make_cache()))
    assert len(calls) == full
    monkeypatch.setattr(kernels, "available_backend", lambda: "cuda")
    monkeypatch.setattr(attention, "sdpa_with_sinks", lambda q, *a: mx.zeros_like(q))  # no CUDA here
    mx.eval(model.hidden_states(tokens))
    assert len(calls) == full


def test_windowed_tiles_have_one_shape_whatever_the_length(monkeypatch):
    """Every window tile has the same shape for any chunk length and any cache (MLX-CUDA builds an
    attention graph per shape): short chunks are padded to a tile, missing keys to the window."""
    from oss_mlx import attention

    seen = set()
    real = attention.sdpa_with_sinks

    def spy(q, k, v, sinks, scale, mask):
        seen.add((q.shape, k.shape, v.shape, mask.shape))
        return real(q, k, v, sinks, scale, mask)

    monkeypatch.setattr(attention, "sdpa_with_sinks", spy)
    window, W = 128, attention.WINDOW_TILE
    for kept, offset in ((window - 1, 5000), (0, 0), (40, 40)):
        for T in (2, 100, W, W + 1, 777, 2047):
            q = mx.zeros((1, 4, T, 16))
            kv = mx.zeros((1, 2, kept + T, 16))
            assert attention.windowed_sdpa(q, kv, kv, mx.zeros(4), 0.25, offset, window).shape == q.shape
    S = attention.window_tile_keys(window)
    assert S >= W + window - 1 and S % attention.KEY_ALIGN == 0
    assert seen == {((1, 4, W, 16), (1, 2, S, 16), (1, 2, S, 16), (W, S))}


def test_boolean_masks_are_padded_to_whole_key_groups_on_cuda(monkeypatch):
    """MLX-CUDA's attention backward breaks on a boolean mask of an odd key length (docs/UPSTREAM.md
    item 11): there the keys are padded with masked-out rows; the result is the unpadded one's."""
    from oss_mlx import attention, kernels

    rng = np.random.default_rng(7)
    T, S = 5, 13
    q = mx.array(rng.standard_normal((1, 4, T, 16)), dtype=mx.float32)
    k, v = (mx.array(rng.standard_normal((1, 2, S, 16)), dtype=mx.float32) for _ in range(2))
    sinks = mx.array(rng.standard_normal(4), dtype=mx.float32)
    mask = attention.attention_mask(T, S - T, S, 4)
    want = attention.sdpa_with_sinks(q, k, v, sinks, 0.25, mask)
    seen = []
    real = mx.fast.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((k.shape[2], kw["mask"].shape))
        return real(q, k, v, **kw)

    monkeypatch.setattr(kernels, "available_backend", lambda: "cuda")
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    got = attention.sdpa_with_sinks(q, k, v, sinks, 0.25, mask)
    assert seen == [(16, (T, 16))]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)

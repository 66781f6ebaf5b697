"""The first prompt is fast too: fixed prefill attention shapes (exact), aligned chunks, the load-time
warm-up (builds every shape a prompt then uses), the greedy argmax."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_cache import CFG, model  # noqa: F401  (the fixture)

from oss_mlx import attention, generation, warmup
from oss_mlx.attention import FIXED_SHAPES_ENV, QueryBlock, query_block
from oss_mlx.cache import FullCache
from oss_mlx.runtime import generate_tokens, runtime_of

RNG = np.random.default_rng(22)
TOKENS = [int(t) for t in RNG.integers(0, CFG.vocab_size, size=400)]


@pytest.fixture
def small_blocks(monkeypatch):
    """First blocks of 4 and 8 positions (256 / 512 / 1,024 at real sizes), for prefill steps of 16."""
    monkeypatch.setattr(attention, "FIRST_BLOCKS", (4, 8))


def prefill(model, tokens, cache, step, mark_at=()):  # noqa: F811
    """`tokens` into the cache in the chunks the scheduler cuts (generation.prefill_cuts), as it runs
    them; the last position's logits [1, vocab]."""
    start = 0
    for end in generation.prefill_cuts(len(tokens), step, mark_at, cache.offset):
        chunk = mx.array(tokens[start:end])[None]
        logits = model(chunk, cache=cache, last_logits_only=True, block_step=step)
        mx.eval(logits, *cache.arrays())
        if end in mark_at:
            cache.mark()
        start = end
    return logits[:, -1, :]


def prefill_all(model, parts, step, fixed, monkeypatch, marks=()):  # noqa: F811
    """Prefill `parts` (token lists) one after the other into one cache; each part's last logits and
    the full layers' cached keys."""
    monkeypatch.setenv(FIXED_SHAPES_ENV, "1" if fixed else "0")
    cache = model.make_cache()
    logits = []
    for part in parts:
        logits.append(np.array(prefill(model, part, cache, step=step, mark_at=marks)))
    keys = [np.array(c.kv[..., : c.offset, :]) for c in cache if isinstance(c, FullCache)]
    return logits, keys, cache


@pytest.mark.parametrize(
    "lengths",
    [[1], [2], [3], [15], [16], [17], [33], [100], [5, 7], [16, 16], [9, 30, 1, 40], [100, 3, 60], [300]],
)
def test_fixed_shapes_give_the_plain_logits(model, monkeypatch, small_blocks, lengths):  # noqa: F811
    """Padded query blocks, keys cut at the block's end, window tiles padded to one shape: the same
    logits and cached keys as plain causal attention, in float32, for fresh prompts and follow-ups at
    any offset (a chat's turns), chunks of 16."""
    parts, at = [], 0
    for n in lengths:
        parts.append(TOKENS[at : at + n])
        at += n
    want, want_keys, _ = prefill_all(model, parts, 16, False, monkeypatch)
    got, got_keys, _ = prefill_all(model, parts, 16, True, monkeypatch)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * np.abs(w).max())
    for g, w in zip(got_keys, want_keys):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_fixed_shapes_after_marks_and_a_rewind(model, monkeypatch, small_blocks):  # noqa: F811
    """Marks split chunks, a rewind leaves older keys past the offset: still the plain logits (the
    stale keys past a chunk are hidden from its queries)."""
    results = []
    for fixed in (False, True):
        logits, _, cache = prefill_all(model, [TOKENS[:50]], 16, fixed, monkeypatch, marks=(7, 20, 41))
        cache.rewind_to(20)
        logits.append(np.array(prefill(model, TOKENS[100:137], cache, step=16)))
        results.append(logits)
    for w, g in zip(*results):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * np.abs(w).max())


def test_query_blocks():
    assert query_block(0, 127, 2048) == QueryBlock(0, 256)
    assert query_block(0, 300, 2048) == QueryBlock(0, 512)
    assert query_block(0, 2047, 2048) == QueryBlock(0, 2048)
    assert query_block(100, 2048, 2048) == QueryBlock(0, 2048)  # a follow-up inside the first block
    assert query_block(2048, 4095, 2048) == QueryBlock(2048, 2048)
    assert query_block(8200, 10240, 2048) == QueryBlock(8192, 2048)
    assert query_block(2000, 2100, 2048) is None  # crosses a boundary: plain causal attention
    assert query_block(0, 300, 512) == QueryBlock(0, 512)
    assert query_block(0, 100, 100) == QueryBlock(0, 100)  # a step below every first block


def test_chunks_end_at_multiples_of_the_step(model, monkeypatch):  # noqa: F811
    """A follow-up's chunks end where a fresh prompt's would (positions 16, 32, ...), so both make the
    same shapes; the prompt's last token still goes alone (the scheduler's prefill, one token asked)."""
    seen = []
    real = type(model).__call__

    def spy(self, tokens, cache=None, **kw):
        seen.append((cache.offset, cache.offset + tokens.shape[1]))
        return real(self, tokens, cache, **kw)

    monkeypatch.setattr(type(model), "__call__", spy)
    cache = model.make_cache()
    options = generation.SamplingOptions(temperature=0.0, max_tokens=1)
    for prompt in (TOKENS[:20], TOKENS[20:60]):
        list(generate_tokens(model, prompt, cache, options, set(), prefill_chunk=16))
    assert seen == [(0, 16), (16, 19), (19, 20), (20, 32), (32, 48), (48, 59), (59, 60)]


def attention_calls(monkeypatch):
    """(queries, keys) of every fused attention call, with whether it had an array mask."""
    seen = set()
    real = attention.sdpa_with_sinks

    def spy(q, k, v, sinks, scale, mask):
        seen.add((q.shape[2], k.shape[2], isinstance(mask, mx.array)))
        return real(q, k, v, sinks, scale, mask)

    monkeypatch.setattr(attention, "sdpa_with_sinks", spy)
    return seen


def test_prefill_attention_takes_the_warm_ups_shapes(model, monkeypatch, small_blocks):  # noqa: F811
    """Fresh prompts of every length up to the context, and follow-ups at any depth: every full-layer
    attention has a shape warmup.attention_shapes lists, every window tile the one tile shape."""
    monkeypatch.setenv(FIXED_SHAPES_ENV, "1")
    seen = attention_calls(monkeypatch)
    step, context = 16, 96
    for n in range(2, context + 1, 3):
        prefill(model, TOKENS[:n], model.make_cache(), step=step)
    cache = model.make_cache()
    for n in (5, 11, 16, 1, 23, 9, 30):  # a conversation's turns
        prefill(model, TOKENS[cache.offset : cache.offset + n], cache, step=step)
    full = {(q, k) for q, k, masked in seen if not masked and q > 1}  # q = 1: the decode steps
    tiles = {(q, k) for q, k, masked in seen if masked and q > 1}
    assert full <= set(warmup.attention_shapes(step, context)), full
    assert tiles == {(attention.WINDOW_TILE, attention.window_tile_keys(CFG.sliding_window))}


def test_after_the_warm_up_a_first_prompt_makes_no_new_shape(model, monkeypatch, small_blocks):  # noqa: F811
    """What the warm-up built (its prompt, its attention calls) covers a first prompt, a follow-up,
    and the compiled decode step's trace: the real prompts add no attention shape and no trace."""
    monkeypatch.setenv(FIXED_SHAPES_ENV, "1")
    monkeypatch.setattr(runtime_of(model), "_decode", None)  # a fresh step: no traces yet
    seen = attention_calls(monkeypatch)
    report = warmup.warm_up(model, context=64, step=16)
    assert report.seconds > 0 and "attention graphs" in report.summary()
    built = set(seen)
    seen.clear()
    traced = set(runtime_of(model).decode._traced)
    options = generation.SamplingOptions(temperature=0.0, max_tokens=4)
    for n in (3, 7, 12):  # a short first prompt's buffers: traced already
        list(generate_tokens(model, TOKENS[:n], model.make_cache(), options, set(), prefill_chunk=16))
    assert set(runtime_of(model).decode._traced) == traced
    cache = model.make_cache()
    for prompt in (TOKENS[:3], TOKENS[3:40], TOKENS[40:45]):
        list(generate_tokens(model, prompt, cache, options, set(), prefill_chunk=16))
    new = {(q, k, m) for q, k, m in seen if q > 1} - built  # q = 1: the decode step (a kernel on a GPU)
    assert not new, new


def test_the_warm_up_changes_no_result(model, monkeypatch):  # noqa: F811
    """Tokens generated after a warm-up are those generated without one (its cache is thrown away)."""
    monkeypatch.setenv(FIXED_SHAPES_ENV, "1")
    options = generation.SamplingOptions(temperature=0.0, max_tokens=8)

    def tokens():
        return list(generate_tokens(model, TOKENS[:30], model.make_cache(), options, set()))

    before = tokens()
    warmup.warm_up(model, context=64, step=16)
    assert tokens() == before


def test_the_warm_up_is_for_gpus(monkeypatch):
    monkeypatch.delenv(warmup.ENV, raising=False)
    assert warmup.wanted() is (mx.default_device() == mx.gpu)  # a CPU has nothing per shape to build
    monkeypatch.setenv(warmup.ENV, "1")
    assert warmup.wanted()
    monkeypatch.setenv(warmup.ENV, "0")
    assert not warmup.wanted()


def test_loading_on_a_cpu_does_not_warm_up(tiny_checkpoint, monkeypatch):
    """A CPU user's load pays nothing for the warm-up: it does not run (a CPU has no per-shape setup),
    and prefill attention keeps the prompt's own shapes (no padding to the fixed ones)."""
    from oss_mlx.loader import load_model

    if mx.default_device() == mx.gpu:
        pytest.skip("a CPU-only check")
    monkeypatch.delenv(warmup.ENV, raising=False)
    monkeypatch.delenv(FIXED_SHAPES_ENV, raising=False)
    assert not attention.fixed_shapes()
    ran = []
    monkeypatch.setattr(warmup, "warm_up", lambda *a, **k: ran.append(a))
    loaded, _ = load_model(tiny_checkpoint)
    assert runtime_of(loaded).warmup_report is None and not ran


def test_a_failing_warm_up_warns_and_the_model_still_answers(tiny_checkpoint, monkeypatch):
    """The warm-up only moves costs earlier: if a piece of it fails (here: out of memory half way),
    the load succeeds with a warning that names the failure and how to turn it off, and the model
    generates what a load without the warm-up generates."""
    from oss_mlx.loader import load_model

    real = warmup.steps

    def failing(m, context, step=None, batched=False):
        pieces = real(m, context, step, batched)
        yield next(pieces)
        raise RuntimeError("[metal::malloc] out of memory")

    options = generation.SamplingOptions(temperature=0.0, max_tokens=6)
    plain, _ = load_model(tiny_checkpoint, warm_up=False)
    expected = list(generate_tokens(plain, TOKENS[:20], plain.make_cache(), options, set()))
    monkeypatch.setattr(warmup, "steps", failing)
    with pytest.warns(
        RuntimeWarning, match=r"warm-up failed \(RuntimeError: .*out of memory\).*OSS_MLX_WARMUP=0"
    ):
        loaded, _ = load_model(tiny_checkpoint, warm_up=True)
    assert runtime_of(loaded).warmup_report is None
    got = list(generate_tokens(loaded, TOKENS[:20], loaded.make_cache(), options, set()))
    assert got == expected


@pytest.mark.parametrize("width", [201088, 1024, 777, 256])
def test_greedy_tokens_are_the_first_maximum(width):
    """The two-stage argmax picks what mx.argmax picks, ties included (the first maximum)."""
    x = mx.array(RNG.integers(-3, 4, size=(3, width)).astype(np.float32)).astype(mx.bfloat16)
    got = generation.greedy_tokens(x)
    assert got.dtype == mx.uint32
    np.testing.assert_array_equal(np.array(got), np.array(mx.argmax(x, axis=-1)))
    assert generation.SamplingOptions(temperature=0.0).sampler() is generation.greedy_tokens


def test_an_adapter_after_a_traced_step_and_the_warm_up_with_one(tiny_checkpoint, tmp_path):
    """The compiled decode step's traces hold the arrays they saw: a model that decoded, then took an
    adapter, decodes with the adapter; `load(adapter=, warm_up=True)` warms up the adapted model.
    Both generate what a load with the adapter and no warm-up generates (which differs from the base)."""
    import oss_mlx
    from oss_mlx.adapters import load_adapter, save_adapter
    from oss_mlx.lora import LoRAConfig, attach, lora_modules

    trained, _ = oss_mlx.load(tiny_checkpoint, dtype=mx.float32, warm_up=False)
    targets = ("q", "v", "out", "gate_up", "down")
    attach(trained, LoRAConfig(rank=4, targets=targets).sites(trained.config.num_layers))
    for _, module in lora_modules(trained):
        for part in list(module.lora_b):
            module.lora_b[part] = 0.5 * mx.random.normal(module.lora_b[part].shape, key=mx.random.key(7))
    save_adapter(trained, tmp_path / "adapter")
    options = generation.SamplingOptions(temperature=0.0, max_tokens=12)

    def tokens(m) -> list[int]:
        return list(generate_tokens(m, TOKENS[:30], m.make_cache(), options, set()))

    want = tokens(
        oss_mlx.load(tiny_checkpoint, dtype=mx.float32, adapter=tmp_path / "adapter", warm_up=False)[0]
    )
    warmed, _ = oss_mlx.load(tiny_checkpoint, dtype=mx.float32, adapter=tmp_path / "adapter", warm_up=True)
    assert runtime_of(warmed).warmup_report is not None and tokens(warmed) == want
    late, _ = oss_mlx.load(tiny_checkpoint, dtype=mx.float32, warm_up=False)
    base = tokens(late)  # traces the step on the base model
    load_adapter(late, tmp_path / "adapter")
    assert tokens(late) == want and base != want


def test_the_sampler_comes_without_transformers_or_torch():
    """A sampled reply's sampler is mlx-lm's (the same draws as make_sampler's), and making it imports
    neither the mlx_lm package nor transformers or torch (their import was the warm-up's sampler
    piece: seconds of every GPU process's start)."""
    import subprocess
    import sys

    code = (
        "import sys, mlx.core as mx\n"
        "from oss_mlx.generation import SamplingOptions\n"
        "mx.random.seed(5)\n"
        "logits = mx.random.normal((1, 4096))\n"
        "mx.random.seed(9)\n"
        "ours = SamplingOptions(temperature=0.8, top_p=0.9, min_p=0.01, top_k=50).sampler()(logits)\n"
        "mx.eval(ours)\n"
        "print(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))\n"
        "from mlx_lm.sample_utils import make_sampler\n"
        "mx.random.seed(9)\n"
        "theirs = make_sampler(temp=0.8, top_p=0.9, min_p=0.01, top_k=50)(logits)\n"
        "print(ours.tolist() == theirs.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout


def test_the_batched_step_is_warmed_only_where_batches_run(tiny_checkpoint):
    """A chat or `generate` decodes one sequence: its load-time warm-up leaves the batched step (the
    grouped expert kernels' compile, seconds on a GPU) to where batches run (the server, bench
    --concurrency), which ask for it."""
    from oss_mlx.loader import load_model

    loaded, _ = load_model(tiny_checkpoint, warm_up=False)
    assert runtime_of(loaded).max_batch > 1
    alone = list(warmup.steps(loaded, context=64))
    batched = list(warmup.steps(loaded, context=64, batched=True))
    assert "the batched decode step" not in alone
    assert [p for p in batched if p != "the batched decode step"] == alone
    assert "the batched decode step" in batched

"""The decode step's unembedding on the CPU through numpy's BLAS (host_head.py): the logits MLX's
matmul gives, a row's bits independent of its batch, the copy following the model's weight, and the
cases that keep MLX's matmul."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_cache import TOKENS, model  # noqa: F401  (the fixture)

from oss_mlx import host_head
from oss_mlx.batch_cache import BatchCache
from oss_mlx.decode import DecodeStep
from oss_mlx.host_head import HostHeads, HostUnembedding, wanted
from oss_mlx.testing.random_model import preset_config, random_model

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the host head is the CPU's")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_logits_are_mlx_matmul_logits(dtype, rows):
    mx.random.seed(rows)
    weight = (mx.random.normal((5000, 96)) * 0.05).astype(dtype)
    h = mx.random.normal((rows, 1, 96)).astype(dtype)
    got = HostUnembedding(weight)(h)
    want = h @ weight.T
    assert got.shape == (rows, 1, 5000) and got.dtype == dtype
    g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    if dtype == mx.float32:
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    else:  # both sum in float32 and round once to bf16: at most one bf16 step apart, rarely that
        step = np.abs(w) * 2.0**-7 + 1e-30
        assert (np.abs(g - w) <= step).all()
        assert (g != w).mean() < 0.05


def test_a_rows_logits_are_the_same_bits_in_any_batch():
    mx.random.seed(1)
    weight = mx.random.normal((3000, 64)) * 0.1
    head = HostUnembedding(weight)
    h = mx.random.normal((17, 1, 64))
    alone = [np.array(head(h[i : i + 1])) for i in range(17)]
    for rows in (2, 4, 7, 8, 9, 16, 17):
        together = np.array(head(h[:rows]))
        for i in range(rows):
            assert np.array_equal(together[i], alone[i][0]), (rows, i)


def test_batched_greedy_decode_equals_each_sequence_alone():
    """A tiny random model (the real vocabulary), float32: four prompts decoded together in one
    batch give each prompt's tokens decoded alone, every step through the host head."""
    m = random_model(preset_config("tiny"), seed=3, dtype=mx.float32)
    assert wanted(m)
    step = DecodeStep(m)
    prompts = [TOKENS[:n].tolist() for n in (3, 9, 17, 30)]

    def decode(group: list[list[int]], n: int = 12) -> list[list[int]]:
        batch = BatchCache.for_model(m)
        last = []
        for i, p in enumerate(group):
            cache = m.make_cache()
            m(mx.array([p[:-1]]), cache=cache)
            batch.join(i, cache)
            last.append(p[-1])
        out = [[] for _ in group]
        tokens = mx.array(last)[:, None]
        for _ in range(n):
            logits = step(tokens, batch)
            tokens = mx.argmax(logits[:, -1, :], axis=-1).astype(mx.uint32)[:, None]
            for i, t in enumerate(tokens[:, 0].tolist()):
                out[i].append(t)
        return out

    together = decode(prompts)
    for p, got in zip(prompts, together):
        assert decode([p]) == [got]


def test_the_step_matches_mlxs_own_unembedding(model, monkeypatch):  # noqa: F811
    """The same model's decode logits with the host head and with MLX's matmul (OSS_MLX_HOST_HEAD=0)."""
    prompt = TOKENS[:12]

    def logits(setting: str) -> np.ndarray:
        monkeypatch.setenv(host_head.ENV, setting)
        cache = model.make_cache()
        model(mx.array(prompt[None, :-1]), cache=cache)
        batch = BatchCache.for_model(model)
        batch.join(0, cache)
        step = DecodeStep(model)
        out = [np.array(step(mx.array(prompt[None, -1:]), batch))]
        out.append(np.array(step(mx.array([[5]]), batch)))
        return np.concatenate(out)

    on, off = logits("1"), logits("0")
    np.testing.assert_allclose(on, off, rtol=2e-5, atol=2e-5 * np.abs(off).max())


def test_the_copy_follows_the_models_weight(model):  # noqa: F811
    heads = HostHeads()
    first = heads.for_model(model)
    assert first is not None and heads.for_model(model) is first
    before = model.unembedding.weight
    model.unembedding.weight = before * 2
    try:
        second = heads.for_model(model)
        assert second is not first
        np.testing.assert_allclose(second.weight, 2 * first.weight)
    finally:
        model.unembedding.weight = before


def test_mlxs_matmul_where_the_host_head_does_not_fit(model, monkeypatch):  # noqa: F811
    assert wanted(model)
    monkeypatch.setenv(host_head.ENV, "0")
    assert not wanted(model)
    monkeypatch.delenv(host_head.ENV)
    monkeypatch.setattr(host_head, "MAX_BYTES", model.unembedding.weight.size * 4 - 1)
    assert not wanted(model)  # the float32 copy would pass the bound
    monkeypatch.setenv(host_head.ENV, "1")
    assert wanted(model)  # asked for whatever the size
    quantized = nn.QuantizedLinear.from_linear(model.unembedding)
    saved = model.unembedding
    model.unembedding = quantized
    try:
        assert not wanted(model)
    finally:
        model.unembedding = saved


def test_a_steps_logits_survive_the_next_step():
    """The product's buffers are reused across steps: a step's logits, left unevaluated, must not
    change when the next step writes them."""
    mx.random.seed(2)
    head = HostUnembedding(mx.random.normal((2000, 32)))
    h1, h2 = mx.random.normal((3, 1, 32)), mx.random.normal((3, 1, 32))
    want = np.array(head(h1))
    first = head(h1)  # lazy
    head(h2)
    np.testing.assert_array_equal(np.array(first), want)


def test_two_threads_decode_at_once():
    """Each thread's product has its own buffers: two threads' steps at the same time each get their
    own rows' logits."""
    import threading

    mx.random.seed(4)
    head = HostUnembedding(mx.random.normal((4000, 48)))
    inputs = [mx.random.normal((2, 1, 48)) for _ in range(2)]
    want = [np.array(head(h)) for h in inputs]
    got, errors = [None, None], []

    def run(i: int) -> None:
        try:
            for _ in range(30):
                out = np.array(head(inputs[i]))
                if not np.array_equal(out, want[i]):
                    got[i] = out
                    return
            got[i] = want[i]
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        np.testing.assert_array_equal(got[i], want[i])

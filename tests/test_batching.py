"""Continuous batching (scheduler.py, batch_cache.py): sequences decoded together, each at its own
position, give exactly what each gives alone; joining, leaving, cancelling and admission."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_cache import CFG, model  # noqa: F401  (the fixture)

from oss_mlx import batch_cache, kernels
from oss_mlx.batch_cache import BatchCache
from oss_mlx.generation import SamplingOptions
from oss_mlx.runtime import generate_tokens, runtime_of
from oss_mlx.scheduler import End, Progress, Scheduler, Sequence, Token

# Mixed lengths: one token, under the window (8), several windows, and a multi-chunk prompt.
LENGTHS = (1, 3, 9, 17, 40)
MAX_TOKENS = (12, 20, 7, 25, 15)


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in LENGTHS]


def alone(model, prompt, options, chunk=4):  # noqa: F811
    return list(generate_tokens(model, prompt, model.make_cache(), options, set(), prefill_chunk=chunk))


def scheduler_for(model, max_batch=4, chunk=4, **kw) -> Scheduler:  # noqa: F811
    return Scheduler(model, runtime_of(model).decode, prefill_chunk=chunk, max_batch=max_batch, **kw)


def run(scheduler: Scheduler, arrivals: dict[int, list[Sequence]], limit: int = 500) -> int:
    """Step until every sequence ended, submitting each list of sequences at its step; the steps taken."""
    seqs = [s for group in arrivals.values() for s in group]
    for n in range(limit):
        for s in arrivals.get(n, []):
            scheduler.submit(s)
        if n > max(arrivals) and all(s.done for s in seqs):
            return n
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


def sequence(model, prompt, options, stop_ids=(), outputs=None):  # noqa: F811
    cache = model.make_cache()
    return Sequence(cache, prompt, options, stop_ids, emit=None if outputs is None else outputs.append)


def test_greedy_tokens_batched_equal_each_alone(model):  # noqa: F811
    """float32 on the CPU: five prompts of mixed lengths arriving at different steps (a fifth waiting
    for a row), prefilled 4 tokens a chunk between decode steps, give exactly the greedy tokens each
    gives alone, which are the argmax of a cache-free forward over each prefix."""
    with kernels.use_backend("reference"):
        want = [alone(model, p, SamplingOptions(0.0, max_tokens=m)) for p, m in zip(prompts(), MAX_TOKENS)]
        seqs = [sequence(model, p, SamplingOptions(0.0, max_tokens=m)) for p, m in zip(prompts(), MAX_TOKENS)]
        run(scheduler_for(model), {0: seqs[:2], 3: [seqs[2]], 4: [seqs[3]], 6: [seqs[4]]})
        got = [s.report.tokens for s in seqs]
        assert got == want
        # and alone is the model itself: greedy over a forward of the whole prefix, no cache at all
        p = prompts()[3]
        for t in want[3][:8]:
            logits = model(mx.array([p]), last_logits_only=True)
            assert int(mx.argmax(logits[0, -1]).item()) == t
            p = p + [t]
    assert all(s.report.stats.finish_reason == "length" for s in seqs)


def test_the_batch_really_holds_several_rows_at_their_own_positions(model, monkeypatch):  # noqa: F811
    """While they decode together the rows sit at different positions in one buffer per layer, and
    the buffers grow by rows (a bucket) and by positions (GROW) only when needed."""
    monkeypatch.setattr(batch_cache, "GROW", 16)
    seen = []
    real = BatchCache.commit

    def commit(self, written):
        seen.append(
            (self.rows, self.size, tuple(n for k, n in zip(self.keys, self.lengths) if k is not None))
        )
        real(self, written)

    monkeypatch.setattr(BatchCache, "commit", commit)
    seqs = [sequence(model, p, SamplingOptions(0.0, max_tokens=m)) for p, m in zip(prompts(), MAX_TOKENS)]
    run(scheduler_for(model), {0: seqs[:4], 2: [seqs[4]]})
    assert max(size for _, size, _ in seen) == 4
    assert any(len(set(lengths)) >= 3 for _, _, lengths in seen)  # rows at distinct positions
    assert {rows for rows, _, _ in seen} <= {1, 2, 4}


def test_caches_come_back_as_if_decoded_alone(model):  # noqa: F811
    """A sequence's cache leaves the batch holding what it would hold alone: one more forward on it
    gives the same logits as on the lone run's cache (prefix reuse for the next turn depends on it)."""
    with kernels.use_backend("reference"):
        options = SamplingOptions(0.0, max_tokens=10)
        lone = [model.make_cache() for _ in range(3)]
        for c, p in zip(lone, prompts()[1:4]):
            list(generate_tokens(model, p, c, options, set(), prefill_chunk=4))
        seqs = [sequence(model, p, options) for p in prompts()[1:4]]
        run(scheduler_for(model), {0: seqs[:2], 2: [seqs[2]]})
        for seq, c in zip(seqs, lone):
            assert seq.cache.offset == c.offset
            probe = mx.array([[7, 99]])
            a, b = model(probe, cache=seq.cache), model(probe, cache=c)
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-5 * float(mx.abs(b).max()))


def test_a_stop_token_or_cancel_frees_the_row_and_the_others_go_on(model):  # noqa: F811
    options = SamplingOptions(0.0, max_tokens=20)
    with kernels.use_backend("reference"):
        want = [alone(model, p, options) for p in prompts()[:3]]
        stop = want[0][4]
        outputs: list = []
        seqs = [sequence(model, prompts()[0], options, stop_ids={stop}, outputs=outputs)]
        seqs += [sequence(model, p, options) for p in prompts()[1:3]]
        scheduler = scheduler_for(model)
        for s in seqs:
            scheduler.submit(s)
        while not seqs[0].done:
            scheduler.step()
        assert seqs[0].report.tokens == want[0][: want[0].index(stop) + 1]
        assert seqs[0].report.stats.finish_reason == "stop"
        assert [type(o) for o in outputs if not isinstance(o, Progress)][-1] is End
        assert seqs[0] not in scheduler.batch
        for _ in range(3):
            scheduler.step()
        seqs[1].cancel()
        scheduler.step()  # within one step: out of the batch, ended, its cache back
        assert seqs[1].done and seqs[1] not in scheduler.batch and scheduler.batch.size == 1
        assert seqs[1].report.stats.finish_reason == "interrupted"
        assert seqs[1].cache.offset == len(prompts()[1]) + len(seqs[1].report.tokens)  # each fed, then read
        while not seqs[2].done:
            scheduler.step()
        assert seqs[2].report.tokens == want[2]


def test_a_prefill_is_cancelled_between_chunks(model):  # noqa: F811
    outputs: list = []
    long = list(range(3, 43))  # 40 tokens: 10 chunks of 4
    running = sequence(model, prompts()[2], SamplingOptions(0.0, max_tokens=30))
    joining = sequence(model, long, SamplingOptions(0.0, max_tokens=5), outputs=outputs)
    scheduler = scheduler_for(model)
    scheduler.submit(running)
    for _ in range(4):
        scheduler.step()
    scheduler.submit(joining)
    while not any(isinstance(o, Progress) and o.done == 12 for o in outputs):
        scheduler.step()
    joining.cancel()
    scheduler.step()
    assert joining.done and joining.cache.offset == 12 and not joining.report.tokens
    assert joining.report.stats.finish_reason == "interrupted" and not running.done


def test_seeded_sampling_is_the_same_beside_others(model):  # noqa: F811
    """A seeded sampled reply draws from its own random key: the same tokens alone and in a batch of
    other sampled and greedy replies."""
    seeded = SamplingOptions(temperature=1.0, top_p=0.95, seed=11, max_tokens=12)
    want = alone(model, prompts()[2], seeded)
    assert want == alone(model, prompts()[2], seeded)
    seqs = [
        sequence(model, prompts()[2], seeded),
        sequence(model, prompts()[1], SamplingOptions(temperature=1.0, max_tokens=15)),
        sequence(model, prompts()[3], SamplingOptions(0.0, max_tokens=9)),
    ]
    run(scheduler_for(model), {0: seqs[1:], 1: seqs[:1]})
    assert seqs[0].report.tokens == want


def test_outputs_come_in_order(model):  # noqa: F811
    outputs: list = []
    seq = sequence(model, prompts()[3], SamplingOptions(0.0, max_tokens=6), outputs=outputs)
    run(scheduler_for(model), {0: [seq]})
    kinds = [type(o).__name__ for o in outputs]
    assert kinds[0] == "Progress" and kinds[-1] == "End" and kinds.count("Token") == 6
    progress = [(o.done, o.total) for o in outputs if isinstance(o, Progress)]
    assert progress == [(0, 17), (4, 17), (8, 17), (12, 17), (16, 17), (17, 17)]
    assert [o.id for o in outputs if isinstance(o, Token)] == seq.report.tokens


def test_admission_waits_for_memory_and_room(model):  # noqa: F811
    """A sequence whose projected keys and values do not fit waits until the batch has room (a lone
    sequence always runs); max_batch bounds the rows."""
    from oss_mlx.memory import kv_bytes

    per = lambda n: kv_bytes(CFG, n, 4)  # noqa: E731
    options = SamplingOptions(0.0, max_tokens=8)
    limit = mx.get_active_memory() + per(2048)  # room for one sequence's batch row, not two
    scheduler = scheduler_for(model, memory_limit=limit, kv_bytes=per)
    seqs = [sequence(model, p, options) for p in prompts()[1:3]]
    for s in seqs:
        scheduler.submit(s)
    peak = 0
    while not all(s.done for s in seqs):
        scheduler.step()
        peak = max(peak, scheduler.running)
    assert peak == 1
    scheduler = scheduler_for(model, max_batch=2)
    seqs = [sequence(model, p, options) for p in prompts()]
    for s in seqs:
        scheduler.submit(s)
    peak = 0
    while not all(s.done for s in seqs):
        scheduler.step()
        peak = max(peak, scheduler.batch.size)
    assert peak == 2


def test_errors_end_the_sequence_not_the_scheduler(model):  # noqa: F811
    outputs: list = []
    bad = sequence(model, [CFG.vocab_size + 5], SamplingOptions(0.0, max_tokens=3), outputs=outputs)
    good = sequence(model, prompts()[1], SamplingOptions(0.0, max_tokens=3))
    run(scheduler_for(model), {0: [bad, good]})
    assert isinstance(outputs[-1], End) and "outside this model's vocabulary" in str(outputs[-1].error)
    assert good.report.tokens == alone(model, prompts()[1], SamplingOptions(0.0, max_tokens=3))


@pytest.mark.parametrize("compile", [True, False])
def test_rows_shrink_and_grow_without_changing_tokens(model, monkeypatch, compile):  # noqa: F811
    """Sequences of very different lengths leaving one by one pack the batch into fewer rows (and
    fewer positions), while the others' tokens stay what they are alone."""
    monkeypatch.setattr(batch_cache, "GROW", 8)
    monkeypatch.setenv("OSS_MLX_COMPILE", "1" if compile else "0")
    options = [SamplingOptions(0.0, max_tokens=m) for m in (30, 26, 45, 20, 12)]
    with kernels.use_backend("reference"):
        want = [alone(model, p, o) for p, o in zip(prompts(), options)]
        seqs = [sequence(model, p, o) for p, o in zip(prompts(), options)]
        rows = []
        scheduler = scheduler_for(model, max_batch=8)
        for s in seqs:
            scheduler.submit(s)
        while not all(s.done for s in seqs):
            scheduler.step()
            rows.append(scheduler.batch.rows)
        assert [s.report.tokens for s in seqs] == want
        top = max(rows)
        later = rows[rows.index(top) :]
        assert top == 8 and 4 in later and 2 in later and later[-2] == 1, rows


def test_fail_all_ends_the_sequences_not_yet_taken_in(model):  # noqa: F811
    """The stepping thread's last act (a lost distributed rank, a stopping server): every sequence
    ends with the error, those submitted since its last step too (no step would come for them)."""
    scheduler = scheduler_for(model, max_batch=1)
    running = sequence(model, prompts()[0], SamplingOptions(0.0, max_tokens=50))
    scheduler.submit(running)
    scheduler.step()
    late = [sequence(model, p, SamplingOptions(0.0, max_tokens=4)) for p in prompts()[1:3]]
    for s in late:
        scheduler.submit(s)
    error = RuntimeError("a rank is gone")
    scheduler.fail_all(error)
    assert all(s.done and s.error is error for s in [running, *late])
    assert scheduler.idle and scheduler.counts() == (0, 0, 0)

"""Concurrent decoding measured (`oss-mlx bench --concurrency 1,4,8,16`): oss-mlx's scheduler and
mlx-lm's BatchGenerator on the same weights, same prompts, same run.

For C streams: C prompts of the same length start together; once every stream has its first token
the clock runs until the first one is done, and the tokens all of them produced in that window,
over its length, are the aggregate decode rate (per stream: divided by C). Time to first token
under load: C - 1 streams decode, then one more request arrives; from its arrival to its first
token (and the same request alone, for comparison). Greedy everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from .generation import SamplingOptions
from .runtime import runtime_of
from .scheduler import Scheduler, Sequence, Token


@dataclass
class Concurrent:
    """One engine at one concurrency."""

    streams: int
    aggregate_tokens_per_s: float
    per_stream_tokens_per_s: float
    ttft_ms: float | None  # a request arriving while streams - 1 others decode (None for 1 stream)
    ttft_alone_ms: float
    peak_gb: float


def window_rate(arrivals: list[list[float]]) -> float:
    """Tokens per second over the window in which every stream was decoding: from the last first
    token to the first stream's last token (each list: the times one stream's tokens arrived)."""
    start = max(times[0] for times in arrivals)
    end = min(times[-1] for times in arrivals)
    if end <= start:
        raise ValueError("the streams never decoded together: decode more tokens")
    tokens = sum(sum(start < t <= end for t in times) for times in arrivals)
    return tokens / (end - start)


# ---- oss-mlx ------------------------------------------------------------------------------------------


def _scheduler(model, streams: int) -> Scheduler:
    runtime = runtime_of(model)
    return Scheduler(model, runtime.decode, prefill_chunk=runtime.prefill_chunk, max_batch=streams)


def _sequence(model, prompt: list[int], tokens: int, arrivals: list[float]) -> Sequence:
    def emit(out) -> None:
        if isinstance(out, Token):
            arrivals.append(time.perf_counter())

    return Sequence(model.make_cache(), prompt, SamplingOptions(0.0, max_tokens=tokens), (), emit=emit)


def _until(scheduler: Scheduler, done) -> None:
    while not done():
        scheduler.step()


def oss_mlx_decode(model, prompts: list[list[int]], decode: int, rate: bool = True) -> float | None:
    """Aggregate tok/s of len(prompts) streams decoding `decode` tokens each together (rate=False:
    only run them: a warm-up)."""
    scheduler = _scheduler(model, len(prompts))
    arrivals = [[] for _ in prompts]
    seqs = [_sequence(model, p, decode + 1, a) for p, a in zip(prompts, arrivals)]
    for s in seqs:
        scheduler.submit(s)
    _until(scheduler, lambda: all(s.done for s in seqs))
    return window_rate(arrivals) if rate else None


def oss_mlx_ttft(model, running: list[list[int]], probe: list[int]) -> float:
    """ms from the arrival of `probe` to its first token, with `running` streams decoding."""
    scheduler = _scheduler(model, len(running) + 1)
    arrivals = [[] for _ in running]
    seqs = [_sequence(model, p, 10**6, a) for p, a in zip(running, arrivals)]
    for s in seqs:
        scheduler.submit(s)
    _until(scheduler, lambda: all(len(a) >= 3 for a in arrivals))  # all decoding, traces made
    first: list[float] = []
    probe_seq = _sequence(model, probe, 2, first)
    start = time.perf_counter()
    scheduler.submit(probe_seq)
    _until(scheduler, lambda: bool(first))
    ttft = 1000 * (first[0] - start)
    for s in [*seqs, probe_seq]:
        s.cancel()
    _until(scheduler, lambda: all(s.done for s in [*seqs, probe_seq]))
    return ttft


def _concurrent(
    decode_rate, ttft, model, streams: int, prompts: list[list[int]], probe: list[int], decode: int
) -> Concurrent:
    """One engine at `streams` streams: its decode_rate(model, prompts, tokens, rate) and
    ttft(model, running, probe) (the engine's pair of functions below)."""
    decode_rate(model, prompts[:streams], 4, rate=False)  # traces for these batch shapes, kernels
    mx.reset_peak_memory()
    rate = decode_rate(model, prompts[:streams], decode)
    peak = mx.get_peak_memory() / 1e9
    alone = ttft(model, [], probe)
    under_load = ttft(model, prompts[: streams - 1], probe) if streams > 1 else None
    return Concurrent(streams, rate, rate / streams, under_load, alone, peak)


def oss_mlx_concurrent(
    model, streams: int, prompts: list[list[int]], probe: list[int], decode: int
) -> Concurrent:
    return _concurrent(oss_mlx_decode, oss_mlx_ttft, model, streams, prompts, probe, decode)


# ---- mlx-lm -----------------------------------------------------------------------------------------


def _generator(lm, streams: int, tokens: int):
    from mlx_lm.generate import BatchGenerator

    return BatchGenerator(
        lm, max_tokens=tokens, completion_batch_size=max(streams, 1), prefill_batch_size=max(streams, 1)
    )


def mlx_lm_decode(lm, prompts: list[list[int]], decode: int, rate: bool = True) -> float | None:
    gen = _generator(lm, len(prompts), decode + 1)
    try:
        uids = gen.insert(prompts, [decode + 1] * len(prompts))
        arrivals = {u: [] for u in uids}
        while responses := gen.next_generated():
            now = time.perf_counter()
            for r in responses:
                arrivals[r.uid].append(now)
    finally:
        gen.close()
    return window_rate(list(arrivals.values())) if rate else None


def mlx_lm_ttft(lm, running: list[list[int]], probe: list[int]) -> float:
    gen = _generator(lm, len(running) + 1, 10**6)
    try:
        counts: dict[int, int] = {}
        if running:
            for u in gen.insert(running, [10**6] * len(running)):
                counts[u] = 0
            while min(counts.values()) < 3:
                for r in gen.next_generated():
                    counts[r.uid] += 1
        start = time.perf_counter()
        (probe_uid,) = gen.insert([probe], [2])
        while True:
            if any(r.uid == probe_uid for r in gen.next_generated()):
                return 1000 * (time.perf_counter() - start)
    finally:
        gen.close()


def mlx_lm_concurrent(
    lm, streams: int, prompts: list[list[int]], probe: list[int], decode: int
) -> Concurrent:
    return _concurrent(mlx_lm_decode, mlx_lm_ttft, lm, streams, prompts, probe, decode)


def print_concurrency(results: dict[str, list[Concurrent]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("streams", justify="right")
    engines = list(results)
    for e in engines:
        for col in ("aggregate tok/s", "x 1 stream", "per stream", "TTFT ms (alone)"):
            table.add_column(f"{e} {col}", justify="right")
    if "mlx-lm" in results:
        for e in engines:
            if e != "mlx-lm":
                table.add_column(f"{e} / mlx-lm", justify="right")
    rows = sorted({c.streams for rs in results.values() for c in rs})
    for n in rows:
        cells = [str(n)]
        by = {e: next((c for c in results[e] if c.streams == n), None) for e in engines}
        for e in engines:
            c, one = by[e], next((c for c in results[e] if c.streams == 1), None)
            if c is None:
                cells += ["-"] * 4
                continue
            ttft = f"{c.ttft_ms:.0f}" if c.ttft_ms is not None else "-"
            cells += [
                f"{c.aggregate_tokens_per_s:,.1f}",
                f"{c.aggregate_tokens_per_s / one.aggregate_tokens_per_s:.2f}x" if one else "-",
                f"{c.per_stream_tokens_per_s:,.1f}",
                f"{ttft} ({c.ttft_alone_ms:.0f})",
            ]
        if "mlx-lm" in results:
            base = by["mlx-lm"]
            for e in engines:
                if e != "mlx-lm":
                    c = by[e]
                    ok = c and base and base.aggregate_tokens_per_s
                    cells.append(
                        f"{c.aggregate_tokens_per_s / base.aggregate_tokens_per_s:.2f}x" if ok else "-"
                    )
        table.add_row(*cells)
    Console().print(table)

"""The token loop: chunked prefill, pipelined decode, sampling, stop tokens, timing."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import mlx.core as mx

from .cache import ModelCache
from .decode import DecodeStep
from .model import Transformer

# Prefill in chunks: bounded activation memory for long prompts, same logits (tested).
PREFILL_STEP = 2048


@dataclass
class SamplingOptions:
    """temperature 0 is greedy. top_k 0 and top_p 1 and min_p 0 switch those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 4096
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's logit_bias)

    def sampler(self) -> Callable[[mx.array], mx.array]:
        if self.temperature == 0:  # greedy: our argmax (faster over 201k, and no mlx_lm import)
            return greedy_tokens
        # mlx-lm's samplers are well tested and compiled; no reason to write our own. Imported here:
        # mlx_lm pulls in transformers, which would slow every start-up by seconds.
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(temp=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def bias_vector(self, width: int) -> mx.array:
        """``logit_bias`` as a vector added to the logits before sampling."""
        ids = mx.array(list(self.logit_bias or {}), dtype=mx.int32)
        values = mx.array(list((self.logit_bias or {}).values()), dtype=mx.float32)
        return mx.zeros((width,), dtype=mx.float32).at[ids].add(values)


def _argmax_rows(width: int) -> int:
    """Rows to split a `width`-wide argmax into: the largest divisor of width up to 512 that leaves
    rows of at least 256 (1: none)."""
    return next((r for r in range(min(512, width // 256), 1, -1) if width % r == 0), 1)


@functools.lru_cache(maxsize=8)
def _greedy_fn(width: int) -> Callable[[mx.array], mx.array]:
    rows = _argmax_rows(width)
    cols = width // rows

    def argmax(logits: mx.array) -> mx.array:
        x = logits.reshape(*logits.shape[:-1], rows, cols)
        col = mx.argmax(x, axis=-1)  # each row's first maximum
        best = mx.take_along_axis(x, col[..., None], axis=-1)[..., 0]
        row = mx.argmax(best, axis=-1)[..., None]  # the first row holding the maximum
        return (row * cols + mx.take_along_axis(col, row, axis=-1))[..., 0]

    return mx.compile(argmax) if rows > 1 else functools.partial(mx.argmax, axis=-1)


def greedy_tokens(logits: mx.array) -> mx.array:
    """argmax over the last axis (the first maximum, as mx.argmax), uint32. In two stages: MLX-CUDA
    reduces one row of 201,088 logits in one thread block (32.6 µs of a 20b decode step on the H200,
    docs/KERNELS.md), 128 rows of 1,571 in parallel."""
    return _greedy_fn(logits.shape[-1])(logits).astype(mx.uint32)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # the whole prompt
    prefilled_tokens: int = 0  # the part not already in the cache, processed (so far, while it runs)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    time_to_first_token: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str = "length"  # "stop" (return), "tool_call" (call), "length", "interrupted"
    context_tokens: int = 0  # tokens in the cache after the reply
    # Constrained replies (structured outputs): host time spent on token masks, how many were made,
    # and whether the end was forced to fit max_tokens (constrained.py).
    mask_seconds: float = 0.0
    masked_tokens: int = 0
    closed_to_fit: bool = False

    @property
    def mask_ms_per_token(self) -> float:
        return 1e3 * self.mask_seconds / self.masked_tokens if self.masked_tokens else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prefilled_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        rates = {"prompt_tps": self.prompt_tps, "generation_tps": self.generation_tps}
        return {**self.__dict__, **rates, "mask_ms_per_token": self.mask_ms_per_token}


@dataclass
class TokenStream:
    """What generate_tokens reports besides the tokens themselves."""

    stats: GenerationStats = field(default_factory=GenerationStats)
    tokens: list[int] = field(default_factory=list)


class TokenConstraint(Protocol):
    """Which tokens may come next (constrained.TurnConstraint): an int32 bitmask [1, ceil(vocab/32)],
    bit i of word i // 32 allowing token i."""

    closed: bool  # the end was forced to fit the token budget

    def begin(self, remaining: int) -> mx.array: ...

    def advance(self, token: int, remaining: int) -> mx.array: ...


def masked(logits: mx.array, words: mx.array) -> mx.array:
    """`logits` [B, vocab] with every token the bitmask `words` [B, W] does not allow set to -inf."""
    # (made here, not at import: an array belongs to the thread that made it, and the server
    # generates on a worker thread)
    bits = mx.right_shift(words[..., None], mx.arange(32, dtype=mx.int32)) & 1
    allowed = bits.reshape(words.shape[0], -1)[:, : logits.shape[-1]].astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


# One fused kernel instead of five 201k-wide ones (measured on the CPU: 1.3 ms -> 0.2 ms a token).
_masked = mx.compile(masked)


def prefill(
    model: Transformer,
    tokens: list[int],
    cache: ModelCache,
    step: int = PREFILL_STEP,
    mark_at: Iterable[int] = (),
    while_running: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Run `tokens` (at least one) through the model into the cache; logits of the last [1, vocab].

    mark_at: positions within `tokens` after which the cache is marked (places a later prompt may
    diverge: message starts, the end of the prompt); chunks are split there, which changes nothing.
    while_running: called once the last chunk is queued, before waiting for it (it may change the
    cache's arrays: they are evaluated after it).
    progress: called as progress(tokens done, total) after each chunk is in the cache (it only
    reports: the chunks and the results are the same with or without it).
    """
    if not tokens:
        raise ValueError("prefill needs at least one token")
    marks = {m for m in mark_at if 0 < m <= len(tokens)}
    # Chunks end at multiples of `step` counted from position 0, not from this prompt's start: a
    # follow-up then makes the chunk shapes a fresh prompt makes (on MLX-CUDA a new shape builds new
    # attention graphs; attention.QueryBlock). The last token goes alone: before it only the caches are
    # evaluated, so the last layer's attention and MoE never run over the rest of the prompt.
    aligned = range(step - cache.offset % step, len(tokens), step)
    cuts = sorted(marks | set(aligned) | {max(len(tokens) - 1, 1), len(tokens)})
    logits, start = None, 0
    for end in cuts:
        if end <= start:
            continue
        logits = model(mx.array(tokens[start:end])[None], cache=cache, last_logits_only=True, block_step=step)
        # Before the last chunk only the caches are needed: evaluating just them lets MLX skip the
        # last block's MoE and the unembedding for those chunks.
        if end < len(tokens):
            mx.eval(*cache.arrays())
            if progress is not None:
                progress(end, len(tokens))
        else:
            if while_running is not None:  # host work for after the prompt, done while the GPU runs it
                mx.async_eval(logits, *cache.arrays())
                while_running()
            mx.eval(logits, *cache.arrays())
        if end in marks:
            cache.mark()
        start = end
    return logits[:, -1, :]


def decode_step(model: Transformer) -> DecodeStep:
    """The model's decode step, made once: its compiled traces are kept with it across requests."""
    step = getattr(model, "_decode_step", None)
    if step is None:
        step = DecodeStep(model)
        model._decode_step = step  # a plain attribute (not an array): not a parameter
    return step


def generate_tokens(
    model: Transformer,
    new_tokens: list[int],
    cache: ModelCache,
    options: SamplingOptions,
    stop_ids: set[int],
    report: TokenStream | None = None,
    mark_at: Iterable[int] = (),
    prefill_step: int | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    constraint: TokenConstraint | None = None,
) -> Iterator[int]:
    """Prefill `new_tokens` after what the cache holds, then sample until a stop id or max_tokens.

    Decoding is pipelined: step n+1 is queued before token n reaches Python; each step is the
    model's compiled decode step (decode.py). A stop token is
    therefore fed to the cache too; callers read `cache.offset` to know what the cache holds.
    prefill_step: the prefill chunk; default the model's (`load` picks it for the machine's memory).
    on_prefill(done, total): after each prefill chunk; the stats (tokens prefilled, seconds, peak
    memory) are kept up to date with it, so a prefill cut short reports what it really did.
    constraint: masks the logits before sampling (greedy and sampled alike). The mask for token n+1
    depends on token n, so the forward pass of step n+1 is queued first and the mask is computed on
    the host while the GPU runs it; only the sampling waits for the mask.
    A distributed model's loop runs where a dead rank cannot hang the caller (distributed/runtime.py).
    """
    tokens = _generate_tokens(
        model, new_tokens, cache, options, stop_ids, report, mark_at, prefill_step, on_prefill, constraint
    )
    guard = getattr(model, "guard", None)
    return tokens if guard is None else guard(tokens)


def _generate_tokens(
    model: Transformer,
    new_tokens: list[int],
    cache: ModelCache,
    options: SamplingOptions,
    stop_ids: set[int],
    report: TokenStream | None,
    mark_at: Iterable[int],
    prefill_step: int | None,
    on_prefill: Callable[[int, int], None] | None,
    constraint: TokenConstraint | None,
) -> Iterator[int]:
    report = report if report is not None else TokenStream()
    stats = report.stats
    stats.prefilled_tokens = 0
    sampler = options.sampler()
    if options.seed is not None:
        mx.random.seed(options.seed)
    mx.reset_peak_memory()

    greedy = options.temperature == 0
    bias: list[mx.array] = []  # made at the first step, as wide as the logits

    def sample(logits: mx.array, mask: mx.array | None = None) -> mx.array:
        if options.logit_bias:
            if not bias:
                bias.append(options.bias_vector(logits.shape[-1]).astype(logits.dtype))
            logits = logits + bias[0]
        if mask is not None:
            logits = _masked(logits, mask)
        if greedy:  # the argmax of the logits is the argmax of the log-probabilities: no 201k-wide
            return sampler(logits)  # logsumexp and subtraction (two launches) in every step
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs)

    def next_mask(call: Callable[[], mx.array]) -> mx.array:
        begun = time.perf_counter()
        mask = call()
        stats.mask_seconds += time.perf_counter() - begun
        stats.masked_tokens += 1
        return mask

    prefill_start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        stats.prefilled_tokens = done
        stats.prompt_seconds = time.perf_counter() - prefill_start
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        if on_prefill is not None:
            on_prefill(done, total)

    mask = None
    step = prefill_step or getattr(model, "prefill_step", PREFILL_STEP)
    decode = decode_step(model)

    def while_prefilling() -> None:  # host work for after the prompt, done while the GPU runs it
        nonlocal mask
        decode.prepare(cache)
        if constraint is not None:
            mask = next_mask(lambda: constraint.begin(options.max_tokens))

    progress(0, len(new_tokens))
    try:
        logits = prefill(
            model,
            new_tokens,
            cache,
            step=step,
            mark_at=mark_at,
            while_running=while_prefilling,
            progress=progress,
        )
    except BaseException:  # cut short (Ctrl-C): the time it did take
        stats.prompt_seconds = time.perf_counter() - prefill_start
        raise
    token = sample(logits, mask)
    mx.eval(token)
    progress(len(new_tokens), len(new_tokens))
    start = time.perf_counter()
    for n in range(options.max_tokens):
        more = n + 1 < options.max_tokens
        if more:
            next_logits = decode(token[:, None], cache)[:, -1, :]
            if constraint is None:
                next_token = sample(next_logits)
                mx.async_eval(next_token)
            else:
                mx.async_eval(next_logits)
        value = token.item()
        if n == 0:
            stats.time_to_first_token = stats.prompt_seconds + time.perf_counter() - start
        if constraint is not None and more and value not in stop_ids:
            remaining = options.max_tokens - n - 1
            mask = next_mask(lambda value=value, remaining=remaining: constraint.advance(value, remaining))
            next_token = sample(next_logits, mask)
            mx.async_eval(next_token)
            stats.closed_to_fit = constraint.closed
        report.tokens.append(value)
        stats.generated_tokens = n + 1
        stats.generation_seconds = time.perf_counter() - start
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        yield value
        if value in stop_ids:
            stats.finish_reason = "stop"
            return
        if more:
            token = next_token
    stats.finish_reason = "length"

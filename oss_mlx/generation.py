"""What a generation is asked and reports: sampling options, stats, where a prompt is cut into prefill
chunks. The token loop itself is the scheduler (scheduler.py); runtime.generate_tokens runs one sequence."""

from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Protocol

import mlx.core as mx
import numpy as np

# Prefill in chunks: bounded activation memory for long prompts, same logits (tested).
PREFILL_CHUNK = 2048


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
        """log-probabilities [1, vocab] -> token [1] (logits when greedy). With a seed, the draws come
        from a random key of this sampler's own, so a seeded reply is the same alone or beside others
        (MLX's global random state is shared by every sequence of a batch)."""
        if self.temperature == 0:  # greedy: our argmax (faster over 201k, and no mlx_lm import)
            return greedy_tokens
        # mlx-lm's samplers are well tested and compiled; no reason to write our own.
        su = mlx_lm_samplers()

        if self.seed is None or self.temperature == 0:
            return su.make_sampler(
                temp=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k
            )
        key = [mx.random.key(self.seed % (1 << 64))]  # MLX's seed is unsigned 64-bit, as the server's

        def sample(logprobs: mx.array) -> mx.array:
            # make_sampler's filters in its order, then the draw with this sampler's key
            if 0 < self.top_p < 1.0:
                logprobs = su.apply_top_p(logprobs, self.top_p)
            if self.min_p != 0.0:
                logprobs = su.apply_min_p(logprobs, self.min_p)
            if self.top_k > 0:
                logprobs = su.apply_top_k(logprobs, self.top_k)
            key[0], draw = mx.random.split(key[0])
            return mx.random.categorical(logprobs * (1.0 / self.temperature), key=draw)

        return sample

    def check(self, vocab_size: int) -> None:
        """Raise ValueError / TypeError naming the first bad option. Called once per reply, before the
        scheduler sees it: a bad value there fails on the scheduler's thread, an out-of-range
        logit_bias id writes outside the bias vector (a crash on the CPU), and a wrong type raised
        inside one of MLX's compiled samplers leaves that sampler broken for every later reply."""
        _whole("max_tokens", self.max_tokens, low=1)
        _real("temperature", self.temperature, 0.0, math.inf, "0 is greedy")
        _real("top_p", self.top_p, 0.0, 1.0, "1 turns it off")
        _real("min_p", self.min_p, 0.0, 1.0, "0 turns it off")
        _whole("top_k", self.top_k, low=0, high=vocab_size - 1, hint="0 turns it off")
        if self.seed is not None:
            _whole("seed", self.seed)
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, Mapping):
            raise TypeError(
                f"logit_bias must be a dict of token id -> bias, not {type(self.logit_bias).__name__}"
            )
        for token, bias in self.logit_bias.items():
            _whole("a logit_bias token id", token, low=0, high=vocab_size - 1, hint="this model's vocabulary")
            _real(f"logit_bias[{token}]", bias, -math.inf, math.inf)

    @property
    def plain_greedy(self) -> bool:
        """The choice is the argmax of the logits, nothing else (the decode batch takes one argmax
        for all such rows): greedy, no logit bias, and the sampler not replaced (a test hook's)."""
        return self.temperature == 0 and not self.logit_bias and type(self).sampler is _SAMPLER

    def bias_vector(self, width: int) -> mx.array:
        """``logit_bias`` as a vector added to the logits before sampling."""
        ids = mx.array(list(self.logit_bias or {}), dtype=mx.int32)
        values = mx.array(list((self.logit_bias or {}).values()), dtype=mx.float32)
        return mx.zeros((width,), dtype=mx.float32).at[ids].add(values)


def _whole(name: str, value: object, low: int | None = None, high: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{name} must be {bounds}{f' ({hint})' if hint else ''}, not {value}")


def _real(name: str, value: object, low: float, high: float, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {value!r}")
    if not (low <= value <= high and math.isfinite(value)):  # NaN fails both
        bounds = "a finite number" if math.isinf(low) else f"a finite number from {low} to {high}"
        if math.isinf(high) and not math.isinf(low):
            bounds = f"a finite number of at least {low}"
        raise ValueError(f"{name} must be {bounds}{f' ({hint})' if hint else ''}, not {value}")


def _argmax_rows(width: int) -> int:
    """Rows to split a `width`-wide argmax into: the largest divisor of width up to 512 that leaves
    rows of at least 256 (1: none)."""
    return next((r for r in range(min(512, width // 256), 1, -1) if width % r == 0), 1)


@functools.lru_cache(maxsize=1)
def mlx_lm_samplers() -> ModuleType:
    """mlx-lm's `sample_utils` without running the `mlx_lm` package's __init__, which imports its
    generate, convert and utils and through them transformers and torch: seconds of a process's start
    (docs/PERFORMANCE.md, the first prompt). The module needs only mlx.core. If mlx_lm is already
    imported, or its file cannot be found, the usual import."""
    if "mlx_lm" in sys.modules:
        from mlx_lm import sample_utils

        return sample_utils
    spec = importlib.util.find_spec("mlx_lm")  # finds the package without importing it
    path = Path(spec.origin).parent / "sample_utils.py" if spec and spec.origin else None
    if path is None or not path.is_file():
        from mlx_lm import sample_utils

        return sample_utils
    module_spec = importlib.util.spec_from_file_location("oss_mlx._mlx_lm_sample_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


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
    max_batch: int = 0  # the most sequences it was decoded together with (itself included)
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


_SAMPLER = SamplingOptions.sampler


def prefill_cuts(n: int, chunk: int, marks: Iterable[int] = (), start: int = 0) -> list[int]:
    """Where a prompt of n new tokens, after `start` cached ones, is cut into prefill chunks: at
    multiples of `chunk` counted from position 0, not from this prompt's start (a follow-up then
    makes the chunk shapes a fresh prompt makes: on MLX-CUDA a new shape builds new attention graphs,
    attention.QueryBlock), at the marks (places a later prompt may diverge: the cache is marked there;
    cutting changes nothing), and before the last token, which goes alone: before it only the caches
    are evaluated, so the last layer's attention and MoE never run over the rest of the prompt."""
    aligned = range(chunk - start % chunk, n, chunk)
    cuts = set(aligned) | {m for m in marks if 0 < m <= n} | {max(n - 1, 1), n}
    return sorted(c for c in cuts if c <= n)


class TokenConstraint(Protocol):
    """Which tokens may come next (constrained.TurnConstraint): an int32 bitmask [1, ceil(vocab/32)]
    on the host (numpy), bit i of word i // 32 allowing token i. `advance` may run on another thread
    than the one that samples (the scheduler's mask thread), one call at a time per constraint."""

    closed: bool  # the end was forced to fit the token budget

    def begin(self, remaining: int) -> np.ndarray: ...

    def advance(self, token: int, remaining: int) -> np.ndarray: ...


def masked(logits: mx.array, words: mx.array) -> mx.array:
    """`logits` [B, vocab] with every token the bitmask `words` [B, W] does not allow set to -inf."""
    # (made here, not at import: an array belongs to the thread that made it, and the server
    # generates on a worker thread)
    bits = mx.right_shift(words[..., None], mx.arange(32, dtype=mx.int32)) & 1
    allowed = bits.reshape(words.shape[0], -1)[:, : logits.shape[-1]].astype(mx.bool_)
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


# One fused kernel instead of five 201k-wide ones (measured on the CPU: 1.3 ms -> 0.2 ms a token): what
# the scheduler's samplers apply.
masked_fused = mx.compile(masked)

"""Continuous batching: requests become sequences; each step decodes every running sequence together
and runs at most one prefill chunk of a joining one.

A step, in order:
  1. sequences leave the decode batch: cancelled ones, finished ones (a stop token or their last
     token read), and those whose unread token is their last (it is read, never fed);
  2. admission: waiting sequences start their prefill, in order, while the batch has room (max_batch
     sequences, those prefilling included) and the memory planner says their KV caches fit;
  3. the batch's decode step is queued (decode.py): one token per sequence, each at its own position;
  4. one prefill chunk runs, of the prefilling sequences in turn (a short prompt does not wait for a
     long one to finish), on that sequence's own cache (generation.prefill_cuts: the chunks a lone
     prompt takes, so its keys and values are exactly a lone prompt's); after its last chunk its
     first token is sampled and it joins the batch (batch_cache.py);
  5. the tokens sampled one step earlier are read (the GPU meanwhile runs this step's): each
     sequence's `emit` gets them, and a stop token or max_tokens finishes it;
  6. with a constrained sequence in the batch (structured outputs: constrained.py), the batch's
     sampling waits until here: a row's mask depends on the token the step was fed. The mask is made
     on the mask thread, handed that token before step 3 queues the forward pass (which does not
     need the mask), so the grammar's host work runs beside the host's queuing of the step, not after
     it (a decode step is bound by that queuing at 20b shapes: a mask on this thread added its whole
     time to every token).

Every sequence sees exactly what it would alone: its prompt prefilled the same way, its decode steps
at its own positions over its own keys (per-row masks and rings), its own sampler and random key.
A cancelled sequence leaves within one step, or between two prefill chunks. `emit` and `on_end` are
called on the thread that steps the scheduler (runtime.py runs one per model; generate_tokens steps
one inline); `submit` and `Sequence.cancel` may come from any thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .batch_cache import BatchCache, grown, row_bucket
from .cache import ModelCache
from .decode import DecodeStep
from .generation import (
    SamplingOptions,
    TokenConstraint,
    TokenStream,
    greedy_tokens,
    masked_fused,
    prefill_cuts,
)

# ---- what a sequence reports --------------------------------------------------------------------------


@dataclass
class Progress:
    """The prompt's processing: `done` of `total` new tokens are in the cache."""

    done: int
    total: int


@dataclass
class Token:
    id: int


@dataclass
class End:
    """The last output of a sequence: its cache is back in its hands (settled by `on_end` first).
    error: what stopped it, when something failed."""

    error: BaseException | None = None


Output = Progress | Token | End


class Busy(Exception):
    """The scheduler's waiting queue is full (the server answers 429)."""

    def __init__(self, waiting: int):
        super().__init__(f"{waiting} requests are waiting already")
        self.waiting = waiting


_WAITING, _PREFILL, _DECODE, _DRAIN, _DONE = "waiting", "prefill", "decode", "drain", "done"


class Sequence:
    """One request in the scheduler: `tokens` to prefill after what `cache` holds, then sampling
    until a stop id or `options.max_tokens`. The scheduler owns `cache` from submit until End."""

    def __init__(
        self,
        cache: ModelCache,
        tokens: list[int],
        options: SamplingOptions,
        stop_ids: Iterable[int],
        *,
        mark_at: Iterable[int] = (),
        report: TokenStream | None = None,
        emit: Callable[[Output], None] | None = None,
        on_end: Callable[[], None] | None = None,
        constraint: TokenConstraint | None = None,
    ):
        if not tokens:
            raise ValueError("a sequence needs at least one new token (to get the next one's logits)")
        if options.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {options.max_tokens}")
        self.cache, self.tokens, self.options = cache, list(tokens), options
        self.stop_ids = frozenset(stop_ids)
        self.marks = {m for m in mark_at if 0 < m <= len(self.tokens)}
        self.report = report if report is not None else TokenStream()
        self.emit = emit or (lambda output: None)
        self.on_end = on_end
        self.constraint = constraint  # masks the logits of every token it samples
        self.state = _WAITING
        self.finish: str | None = None  # "stop" | "length" | "interrupted" once decided
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self._start_offset = cache.offset
        self._wake: Callable[[], None] | None = None  # the scheduler's, set at submit
        # prefill
        self._cuts: list[int] = []
        self._prefilled = 0
        self._started = 0.0
        # decode
        self._sample: Callable[[mx.array], mx.array] | None = None
        self.produced = 0  # tokens sampled so far, read or not
        self.pending: tuple[mx.array, int] | None = None  # the token to feed next: (array, index)
        self._unread: list[tuple[mx.array, int, int]] = []  # (array, index, step sampled at)
        self._first_read = 0.0
        # constrained: the pending token again, in an array only the mask thread reads (an MLX array
        # waited on from two threads at once races on its event), and that thread's next mask
        self._readable: tuple[mx.array, int] | None = None
        self._next_mask: Future | None = None

    @property
    def projected(self) -> int:
        """The most positions this sequence may hold: what its cache had, its prompt, its reply."""
        return self._start_offset + len(self.tokens) + self.options.max_tokens

    def cancel(self) -> None:
        """Stop it (from any thread): it leaves within one scheduler step or one prefill chunk, and
        End follows."""
        self._cancel.set()
        if self._wake is not None:
            self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self.state == _DONE


# ---- sampling ----------------------------------------------------------------------------------------


class _Sampler:
    """A sequence's next-token choice from logits [1, vocab]: its options' logit bias, its constraint's
    mask, then greedy on the logits, or its sampler on the log-probabilities."""

    def __init__(self, options: SamplingOptions, vocab: int, dtype: mx.Dtype, constrained: bool = False):
        # the batch takes one argmax for all such rows
        self.greedy = options.plain_greedy and not constrained
        self.draw = options.sampler()
        self.bias = options.bias_vector(vocab).astype(dtype) if options.logit_bias else None
        self.argmax = options.temperature == 0

    def __call__(self, logits: mx.array, mask: mx.array | None = None) -> mx.array:
        if self.bias is not None:
            logits = logits + self.bias
        if mask is not None:
            logits = masked_fused(logits, mask)
        if self.argmax:  # the argmax of the logits is the argmax of the log-probabilities: no
            return self.draw(logits)  # vocab-wide logsumexp and subtraction in every step
        return self.draw(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


# ---- the scheduler -----------------------------------------------------------------------------------


class Scheduler:
    """Admission, the decode batch and the prefill of joining sequences (see the module doc).

    max_batch: sequences decoding or prefilling at once. max_waiting: submitted ones that may wait
    (None: no limit; past it submit raises Busy). memory_limit: bytes MLX may hold once a sequence
    is admitted (weights and every cache included, the batch's buffers projected to each sequence's
    most positions); a sequence that does not fit waits. None: no check. Alone a sequence is always
    admitted, as a single generation always was.
    """

    def __init__(
        self,
        model,
        decode: DecodeStep,
        *,
        prefill_chunk: int,
        max_batch: int = 8,
        max_waiting: int | None = None,
        memory_limit: int | None = None,
        kv_bytes: Callable[[int], int] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model, self.decode = model, decode
        self.prefill_chunk = prefill_chunk
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.memory_limit = memory_limit
        self.kv_bytes = kv_bytes  # one sequence's keys and values at a context (memory.kv_bytes)
        self.batch = BatchCache.for_model(model)
        self._lock = threading.Lock()
        self._submitted: deque[Sequence] = deque()
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, prefilled a chunk at a time in turn
        self.decoding: list[Sequence] = []  # in the batch
        self.draining: list[Sequence] = []  # out of the batch, tokens still to read
        self._sampled: mx.array | None = None  # the last step's tokens, one per row
        self._rows_changed = True
        self._deferred: tuple[mx.array, list] | None = None  # logits and rows waiting for masks
        self._masks: ThreadPoolExecutor | None = None  # the mask thread, made at the first constraint
        self._step = 0
        self.wake = threading.Condition()  # notified on submit and cancel (runtime.py waits on it)

    # ---- from any thread ----------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence (raises Busy when max_waiting are waiting already)."""
        with self._lock:
            waiting = self._full()
            if waiting is not None:
                raise Busy(waiting)
            seq._start_offset = seq.cache.offset
            seq._wake = self.notify
            self._submitted.append(seq)
        self.notify()

    def full(self) -> int | None:
        """How many wait when the queue is full (submit would raise Busy), else None."""
        with self._lock:
            return self._full()

    def _full(self) -> int | None:
        waiting = len(self._submitted) + len(self.waiting)
        if self.max_waiting is not None and waiting >= self.max_waiting + max(0, self.room()):
            return waiting
        return None

    def notify(self) -> None:
        with self.wake:
            self.wake.notify_all()

    def room(self) -> int:
        """How many more sequences could start now (max_batch less those running)."""
        return self.max_batch - self.running

    @property
    def running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._submitted) + len(self.waiting)

    def counts(self) -> tuple[int, int, int]:
        """(running, prefilling, waiting) at one moment (the server's /health): every move between
        the lists is made under the same lock (_move), so no sequence is seen in two lists or none."""
        with self._lock:
            prefilling = len(self.prefilling)
            return len(self.decoding) + prefilling, prefilling, len(self._submitted) + len(self.waiting)

    @property
    def idle(self) -> bool:
        with self._lock:
            submitted = bool(self._submitted)
        return not (submitted or self.waiting or self.prefilling or self.decoding or self.draining)

    # ---- the step (one thread) ----------------------------------------------------------------------

    def step(self) -> None:
        """One iteration (see the module doc)."""
        self._step += 1
        with self._lock:
            self.waiting.extend(self._submitted)
            self._submitted.clear()
        self._retire()
        self._admit()
        try:
            self._decode()
        except Exception as e:  # an MLX error in the batch: every sequence in it fails, others go on
            self._fail_batch(e)
        self._prefill()
        self._read()
        if self._deferred is not None:
            try:
                self._sample_deferred()
            except Exception as e:
                self._fail_batch(e)

    def fail_all(self, error: BaseException) -> None:
        """End every sequence with `error` (the stepping thread is stopping, or a bug)."""
        self._fail_batch(error)
        with self._lock:  # (see _move); the submitted too: no step may come to take them in
            ended = [*self._submitted, *self.waiting, *self.prefilling, *self.draining]
            self._submitted.clear()
            self.waiting.clear()
            self.prefilling = []
            self.draining = []
            for seq in ended:
                seq.state = _DONE
        for seq in ended:
            seq.error = seq.error or error
            self._end(seq)

    def _move(self, seq: Sequence, source: list | deque | None, target: list | None, state: str) -> None:
        """seq out of `source` into `target` (either may be None), its state set, as one change for
        `counts` on other threads. Taken once per transition (admission, a prefill chunk, the end),
        never per token: the lock is uncontended but for /health and submit."""
        with self._lock:
            if source is not None:
                source.remove(seq)
            if target is not None:
                target.append(seq)
            seq.state = state

    def _retire(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self._move(seq, self.waiting, None, _DONE)
            seq.finish = "interrupted"
            self._end(seq)
        for seq in [s for s in self.prefilling if s.cancelled]:
            self._move(seq, self.prefilling, None, _DONE)
            seq.finish = "interrupted"
            self._end(seq)
        for seq in list(self.decoding):
            if seq.cancelled or seq.finish or seq.error is not None:
                seq.finish = seq.finish or "interrupted"
                seq._unread.clear()  # what was sampled after the end is never read
            elif seq.produced < seq.options.max_tokens:
                continue
            self.batch.leave(seq)
            self._rows_changed = True
            if seq._unread:  # its last token is read next
                self._move(seq, self.decoding, self.draining, _DRAIN)
            else:
                self._move(seq, self.decoding, None, _DONE)
                self._end(seq)

    def _admit(self) -> None:
        while self.waiting and self.room() >= 1 and self._fits(self.waiting[0]):
            self._start(self.waiting[0])

    def _start(self, seq: Sequence) -> None:
        if not (self.decoding or self.draining or self.prefilling):  # alone: its peak is its own
            mx.reset_peak_memory()
        self._move(seq, self.waiting, self.prefilling, _PREFILL)
        seq._cuts = prefill_cuts(len(seq.tokens), self.prefill_chunk, seq.marks, seq.cache.offset)
        seq._started = time.perf_counter()
        seq._sample = _Sampler(
            seq.options, self.model.config.vocab_size, self.model.dtype, seq.constraint is not None
        )
        seq.report.stats.prefilled_tokens = 0
        self._progress(seq, 0)

    def _fits(self, seq: Sequence) -> bool:
        others = [*self.decoding, *self.prefilling]
        if self.memory_limit is None or self.kv_bytes is None or not others:
            return True  # alone, a sequence always runs (as a single generation always did)
        rows = row_bucket(len(others) + 1)
        longest = max([seq.projected, *(s.projected for s in others)])
        window = max((w for w in self.batch.windows if w), default=0)
        after = rows * self.kv_bytes(max(grown(0, longest), window))
        prompts = sum(self.kv_bytes(s._start_offset + len(s.tokens)) for s in [*self.prefilling, seq])
        need = mx.get_active_memory() - self.batch.nbytes + after + prompts
        return need <= self.memory_limit

    def _decode(self) -> None:
        if not self.decoding:
            return
        batch = self.batch
        if self._rows_changed:
            pieces = []
            for key in batch.keys:
                if key is None:
                    pieces.append(mx.zeros((1,), dtype=mx.uint32))
                else:
                    array, i = key.pending
                    pieces.append(array[i : i + 1].astype(mx.uint32))
            tokens = mx.concatenate(pieces)
        else:
            tokens = self._sampled
        keys = list(batch.keys)  # the rows as they are now (a sequence joining in _prefill may add one)
        constrained = [s for s in keys if s is not None and s.constraint is not None]
        for seq in constrained:  # their masks, made while the step below is queued and run
            self._ask_mask(seq)
        logits = self.decode(tokens[:, None], batch)[:, -1, :]
        self._rows_changed = False
        if constrained:
            mx.async_eval(logits)  # sampled once the masks are made (_sample_deferred)
            self._deferred = (logits, keys)
            return
        self._sampled_rows(self._sample_rows(logits, keys), keys)

    def _ask_mask(self, seq: Sequence) -> None:
        """Hand seq's fed token to the mask thread: the mask for the token after it (none once it
        stops the reply: the row's sample is then never read)."""
        if self._masks is None:
            self._masks = ThreadPoolExecutor(1, thread_name_prefix="oss-mlx-masks")
        array, index = seq._readable
        remaining = seq.options.max_tokens - seq.produced
        seq._next_mask = self._masks.submit(_next_mask, seq, array, index, remaining)

    def _sample_deferred(self) -> None:
        """The batch's sampling with each constrained row's mask, as the mask thread made it from the
        token the row was fed (asked in _decode); a row whose token stopped its reply, or whose
        grammar failed, samples unmasked (its token is never read)."""
        logits, keys = self._deferred
        self._deferred = None
        masks = {}
        for r, seq in enumerate(keys):
            if seq is None or seq._next_mask is None:
                continue
            future, seq._next_mask = seq._next_mask, None
            try:
                words, seconds = future.result()
            except Exception as e:  # the grammar failed: this sequence ends with it, the others go on
                seq.error = seq.error or e
                continue
            if words is None or seq.finish is not None or seq.error is not None:
                continue  # (a finished row's token is never read)
            masks[r] = self._counted(seq, mx.array(words), seconds)
        self._sampled_rows(self._sample_rows(logits, keys, masks), keys)

    def _sampled_rows(self, sampled: mx.array, keys: list) -> None:
        readable = None
        if any(s is not None and s.constraint is not None for s in keys):
            readable = mx.stop_gradient(sampled)  # the same tokens, an array of their own
        mx.async_eval(sampled, *([readable] if readable is not None else []))
        size = sum(s is not None for s in keys)
        for r, seq in enumerate(keys):
            if seq is not None:
                seq.report.stats.max_batch = max(seq.report.stats.max_batch, size)
                seq.pending = (sampled, r)
                seq._unread.append((sampled, r, self._step))
                seq.produced += 1
                if seq.constraint is not None:
                    seq._readable = (readable, r)
        self._sampled = sampled

    @staticmethod
    def _counted(seq: Sequence, mask: mx.array, seconds: float) -> mx.array:
        """A mask of seq's constraint, its host time counted in the sequence's stats."""
        stats = seq.report.stats
        stats.mask_seconds += seconds
        stats.masked_tokens += 1
        stats.closed_to_fit = seq.constraint.closed
        return mask

    @staticmethod
    def _sample_rows(logits: mx.array, keys: list, masks: dict | None = None) -> mx.array:
        """logits [R, vocab] -> uint32 [R]: one argmax for the plain greedy rows, each other row its
        own sampler with its mask (free rows: 0)."""
        masks = masks or {}
        plain = [s is None or s._sample.greedy for s in keys]
        if all(plain):
            return greedy_tokens(logits)
        if len(keys) == 1:  # one sequence (batch 1): its own sampler, no slicing or joining (host time)
            return keys[0]._sample(logits, masks.get(0)).astype(mx.uint32)
        greedy = greedy_tokens(logits) if any(plain) else None
        parts = [
            greedy[r : r + 1] if plain[r] else s._sample(logits[r : r + 1], masks.get(r)).astype(mx.uint32)
            for r, s in enumerate(keys)
        ]
        return mx.concatenate(parts)

    def _prefill(self) -> None:
        """Prefill chunks of at most prefill_chunk tokens in all this step: the prefilling sequences
        in turn, each going on while its next chunk fits (a short prompt is read in one step, a long
        one a chunk a step)."""
        used = 0
        for _ in range(len(self.prefilling)):
            seq = self.prefilling[0]  # kept in the list while its chunk runs (other threads count it)
            done = False
            try:
                while not done and (used == 0 or used + self._next_chunk(seq) <= self.prefill_chunk):
                    used += self._next_chunk(seq)
                    done = self._prefill_chunk(seq)
            except Exception as e:  # bad ids, an MLX error: this sequence fails, the others go on
                self._move(seq, self.prefilling, None, _DONE)
                seq.error = e
                self._end(seq)
                continue
            if not done:  # more chunks to come, after the others' turn (done: _prefill_chunk moved it)
                self._move(seq, self.prefilling, self.prefilling, _PREFILL)
            if used >= self.prefill_chunk:
                return

    @staticmethod
    def _next_chunk(seq: Sequence) -> int:
        return next(c for c in seq._cuts if c > seq._prefilled) - seq._prefilled

    def _prefill_chunk(self, seq: Sequence) -> bool:
        """One chunk of seq's prompt; True once the prompt is done (and seq decoding)."""
        cut = next(c for c in seq._cuts if c > seq._prefilled)
        chunk = mx.array(seq.tokens[seq._prefilled : cut])[None]
        logits = self.model(chunk, cache=seq.cache, last_logits_only=True, block_step=self.prefill_chunk)
        last = cut == len(seq.tokens)
        if not last:
            # Only the caches: MLX then skips the last block's MoE and the unembedding of the chunk.
            mx.eval(*seq.cache.arrays())
            seq._prefilled = cut
            if cut in seq.marks:
                seq.cache.mark()
            self._progress(seq, cut)
            return False
        mx.async_eval(logits, *seq.cache.arrays())
        joins = seq.options.max_tokens > 1
        if joins:  # host work while the GPU runs the chunk: the step traced for the batch it joins
            held = max((layer.held().shape[3] for layer in seq.cache if layer.held() is not None), default=0)
            self.decode.trace_ahead(self.batch, *self.batch.shape_after_join(seq.cache.offset, held))
        if cut in seq.marks:
            seq.cache.mark()
        mask = None
        if seq.constraint is not None:  # made while the GPU runs the chunk
            begun = time.perf_counter()
            words = seq.constraint.begin(seq.options.max_tokens)
            mask = self._counted(seq, mx.array(words), time.perf_counter() - begun)
        token = seq._sample(logits[:, -1, :], mask).astype(mx.uint32)
        if seq.constraint is not None:
            readable = mx.stop_gradient(token)  # (see _sampled_rows)
            mx.async_eval(token, readable)
            seq._readable = (readable, 0)
        else:
            mx.async_eval(token)
        seq._prefilled = cut
        seq.produced, seq.pending = 1, (token, 0)
        seq._unread.append((token, 0, self._step - 1))  # read in this step: the first token waits on nothing
        if joins:
            self.batch.join(seq, seq.cache)
            mx.async_eval(self.batch.buffers)  # its rows copied (or grown) now, not in the next step
            self._rows_changed = True
            self._move(seq, self.prefilling, self.decoding, _DECODE)
        else:
            self._move(seq, self.prefilling, self.draining, _DRAIN)
        return True

    def _read(self) -> None:
        values: dict[int, list[int]] = {}
        for seq in [*self.decoding, *self.draining]:
            ready = [u for u in seq._unread if u[2] < self._step]
            if not ready:
                continue
            seq._unread = [u for u in seq._unread if u[2] >= self._step]
            for array, i, _ in ready:
                if id(array) not in values:
                    values[id(array)] = array.tolist()
                if seq.finish is None:
                    self._deliver(seq, values[id(array)][i])
        for seq in [s for s in self.draining if not s._unread]:
            self.draining.remove(seq)
            seq.finish = seq.finish or "length"
            self._end(seq)

    def _deliver(self, seq: Sequence, token: int) -> None:
        stats, now = seq.report.stats, time.perf_counter()
        if not seq.report.tokens:
            stats.prompt_seconds = now - seq._started
            stats.time_to_first_token = stats.prompt_seconds
            seq._first_read = now
            self._progress(seq, len(seq.tokens))
        seq.report.tokens.append(token)
        stats.generated_tokens = len(seq.report.tokens)
        stats.generation_seconds = now - seq._first_read
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        seq.emit(Token(token))
        if token in seq.stop_ids:
            seq.finish = "stop"
        elif stats.generated_tokens >= seq.options.max_tokens:
            seq.finish = "length"

    def _progress(self, seq: Sequence, done: int) -> None:
        stats = seq.report.stats
        stats.prefilled_tokens = done
        stats.prompt_seconds = time.perf_counter() - seq._started
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        seq.emit(Progress(done, len(seq.tokens)))

    def _fail_batch(self, error: BaseException) -> None:
        with self._lock:  # (see _move)
            failed, self.decoding = self.decoding, []
            for seq in failed:
                seq.state = _DONE
        for seq in failed:
            seq.cache.rewind_to(0)  # its keys and values were in the batch
            seq.error = seq.error or error
            self._end(seq)
        self.batch = BatchCache.for_model(self.model)
        self._rows_changed = True
        self._deferred = None

    def _end(self, seq: Sequence) -> None:
        seq.state = _DONE
        stats = seq.report.stats
        if seq.finish is not None:
            stats.finish_reason = seq.finish
        if seq._started and not seq.report.tokens:  # stopped in the prefill: the time it did take
            stats.prompt_seconds = time.perf_counter() - seq._started
        try:
            if seq.on_end is not None:
                seq.on_end()
        finally:
            seq.emit(End(seq.error))


def _next_mask(seq: Sequence, tokens: mx.array, row: int, remaining: int) -> tuple[np.ndarray | None, float]:
    """On the mask thread: the mask after the token in row `row` of `tokens` (waited for here, on
    the device's sampling of it) and the host seconds it took; None after a stop token."""
    token = tokens.tolist()[row]
    if token in seq.stop_ids:
        return None, 0.0
    begun = time.perf_counter()
    words = seq.constraint.advance(token, remaining)
    return words, time.perf_counter() - begun

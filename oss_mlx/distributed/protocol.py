"""What rank 0 tells the other ranks, step by step; the others only compute.

Rank 0 runs the ordinary stack (Session, generation, the server) on its part of the model; every call
into the model first broadcasts a command (an all_sum in which the others add zeros), so each worker
runs the same call on its own part, with its own caches, in the same order:

    header  int32[HEADER + INLINE]: op, cache id, batch, tokens, flags, the cache's offset, a count,
            then up to INLINE token ids (a decode step's tokens travel here)
    payload int32[...] when the header says so: a prefill chunk's tokens, or cache operations

    FORWARD  model(tokens, cache, last_logits_only)  (a prefill chunk, or a forward without cache)
    DECODE   one decode step (the compiled step, decode.py) of the tokens in the header
    CACHE    cache operations, in the order rank 0 did them: MARK, REWIND(offset), FREE
    PARK     nothing to do for a while (a request ended): workers wait on the control link, not in a
             collective, until rank 0 wakes them before its next command. (MLX's ring backend polls
             while it waits: an idle worker in an all_sum kept a core 20-45% busy.)
    STOP     the end: workers leave their loop

The header of a decode step carries the token sampled from the previous step as a lazy array, so the
step is queued before that token reaches Python (generation.py's pipelined decode) and every rank
still sees it. Each command's input depends on the previous command, and the compute depends on the
command, so on rank 0 the collectives run in the order the workers run them. A cache's operations
(Session's rewind to the reused prefix, the marks at message starts) are sent before the next command
that uses the cache, so multi-turn prefix reuse works on every rank; each command carries rank 0's
cache offset and a worker refuses to run on a cache that disagrees (a bug, reported as such).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from ..cache import ModelCache
from .group import DistributedError, Group

HEADER = 8
INLINE = 64
FORWARD, DECODE, CACHE, STOP, PARK = 1, 2, 3, 4, 5
MARK, REWIND, FREE = 1, 2, 3
NO_CACHE = -1
LAST_LOGITS_ONLY = 1
COMPILED = 2  # a decode step through decode.DecodeStep (else the model's own decode_into)


class ProtocolError(DistributedError):
    """A worker's state disagrees with rank 0's command (a bug: said so, with the numbers)."""


class SharedCache(ModelCache):
    """Rank 0's cache of its layers; what changes it besides the model's steps (marks, rewinds) is
    recorded for the other ranks' copies (`Controller`)."""

    def __init__(self, layers, controller: Controller, cache_id: int) -> None:
        super().__init__(layers)
        self.cache_id = cache_id
        self._controller = controller
        weakref.finalize(self, controller.record, FREE, cache_id, 0)

    def mark(self) -> None:
        super().mark()
        self._controller.record(MARK, self.cache_id, 0)

    def rewind_to(self, offset: int) -> None:
        super().rewind_to(offset)  # raises if impossible: then nothing is recorded
        self._controller.record(REWIND, self.cache_id, offset)


class Controller:
    """Rank 0's side: turns each model call into a command for the other ranks (module docstring)."""

    def __init__(
        self, group: Group, on_step: Callable[[], None] | None = None, wake: Callable[[], None] | None = None
    ) -> None:
        self.group = group.group
        self._ops: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()
        self._ids = 0
        self._last: mx.array | None = None  # the previous command: the next one depends on it
        self.on_step = on_step
        self._wake = wake
        self.parked = False

    # -- caches ----------------------------------------------------------------------------------

    def share(self, cache: ModelCache) -> SharedCache:
        with self._lock:
            self._ids += 1
            return SharedCache(cache.layers, self, self._ids)

    def record(self, op: int, cache_id: int, arg: int) -> None:
        with self._lock:  # FREE comes from the garbage collector, any thread
            self._ops.append((op, cache_id, arg))

    # -- commands --------------------------------------------------------------------------------

    def _broadcast(self, values: mx.array) -> mx.array:
        """values (int32) on every rank, after the previous command."""
        if self._last is not None:
            (values,) = mx.depends([values], [self._last])
        out = mx.distributed.all_sum(values, group=self.group)
        self._last = out
        return out

    def _command(
        self, op: int, cache: ModelCache | None, batch: int, tokens: int, flags: int, count: int, inline=None
    ):
        if self.parked:
            self.parked = False
            if self._wake is not None:
                self._wake()
        cache_id = cache.cache_id if isinstance(cache, SharedCache) else NO_CACHE
        offset = cache.offset if cache is not None else 0
        head = mx.array([op, cache_id, batch, tokens, flags, offset, count, 0], dtype=mx.int32)
        rest = mx.zeros((INLINE,), mx.int32) if inline is None else inline
        return self._broadcast(mx.concatenate([head, rest]))

    def flush(self) -> None:
        """Send the cache operations recorded since the last command."""
        with self._lock:
            ops, self._ops = self._ops, []
        if ops:
            self._command(CACHE, None, 0, 0, 0, len(ops))
            self._broadcast(mx.array(np.array(ops, dtype=np.int32).reshape(-1)))

    def forward(self, tokens: mx.array, cache: ModelCache | None, last_logits_only: bool) -> mx.array:
        """Announce model(tokens, cache, last_logits_only); returns the tokens to run (broadcast)."""
        self.flush()
        B, T = tokens.shape
        flags = LAST_LOGITS_ONLY if last_logits_only else 0
        ids = tokens.astype(mx.int32).reshape(-1)
        if B * T <= INLINE:
            inline = mx.concatenate([ids, mx.zeros((INLINE - B * T,), mx.int32)])
            header = self._command(FORWARD, cache, B, T, flags, 0, inline)
            out = header[HEADER : HEADER + B * T]
        else:
            self._command(FORWARD, cache, B, T, flags, 0)
            out = self._broadcast(ids)
        self._stepped()
        return out.reshape(B, T).astype(tokens.dtype)

    def decode(self, tokens: mx.array, cache: ModelCache, compiled: bool) -> mx.array:
        """Announce a decode step of tokens [B, 1] (lazy: the previous step's sample)."""
        self.flush()
        B = tokens.shape[0]
        if B > INLINE:
            raise DistributedError(f"a decode step of {B} sequences: at most {INLINE} go in one command")
        ids = mx.concatenate([tokens.astype(mx.int32).reshape(-1), mx.zeros((INLINE - B,), mx.int32)])
        header = self._command(DECODE, cache, B, 1, COMPILED if compiled else 0, 0, ids)
        self._stepped()
        return header[HEADER : HEADER + B].reshape(B, 1).astype(tokens.dtype)

    def park(self) -> None:
        """Tell the workers to wait off the collectives until the next command."""
        if self.parked:
            return
        self.flush()
        mx.eval(self._command(PARK, None, 0, 0, 0, 0))
        self.parked = True

    def stop(self) -> None:
        self.flush()
        mx.eval(self._command(STOP, None, 0, 0, 0, 0))

    def _stepped(self) -> None:
        if self.on_step is not None:
            self.on_step()


# ---- the workers' side ------------------------------------------------------------------------------


def serve(
    model,
    group: Group,
    on_step: Callable[[], None] | None = None,
    wait_wake: Callable[[], None] | None = None,
) -> None:
    """A worker's loop: run rank 0's commands on this rank's part of the model until STOP;
    wait_wake() blocks until rank 0 wakes a parked worker."""
    from ..decode import DecodeStep

    g = group.group
    caches: dict[int, ModelCache] = {}
    decode = DecodeStep(model)

    def receive(n: int) -> np.ndarray:
        out = mx.distributed.all_sum(mx.zeros((n,), mx.int32), group=g)
        mx.eval(out)
        return np.array(out)

    def cache_of(cache_id: int, offset: int, what: str) -> ModelCache | None:
        if cache_id == NO_CACHE:
            return None
        cache = caches.get(cache_id)
        if cache is None:
            cache = caches[cache_id] = model.make_cache()
        if cache.offset != offset:
            raise ProtocolError(
                f"cache {cache_id} is at offset {cache.offset} here but at {offset} on rank 0 ({what})"
            )
        return cache

    while True:
        h = receive(HEADER + INLINE)
        op, cache_id, B, T, flags, offset, count = (int(v) for v in h[:7])
        if op == STOP:
            return
        if op == PARK:
            if wait_wake is not None:
                wait_wake()
            continue
        if op == CACHE:
            ops = receive(3 * count).reshape(count, 3)
            for kind, cid, arg in ops.tolist():
                if kind == FREE:
                    caches.pop(cid, None)
                elif kind == MARK:
                    caches.setdefault(cid, model.make_cache()).mark()
                elif kind == REWIND:
                    caches.setdefault(cid, model.make_cache()).rewind_to(arg)
                else:
                    raise ProtocolError(f"unknown cache operation {kind}")
            continue
        if op == FORWARD:
            ids = h[HEADER : HEADER + B * T] if B * T <= INLINE else receive(B * T)
            tokens = mx.array(ids.reshape(B, T), dtype=mx.int32)
            cache = cache_of(cache_id, offset, "forward")
            out = model(tokens, cache=cache, last_logits_only=bool(flags & LAST_LOGITS_ONLY))
        elif op == DECODE:
            tokens = mx.array(h[HEADER : HEADER + B].reshape(B, 1), dtype=mx.uint32)
            cache = cache_of(cache_id, offset, "decode")
            out = decode(tokens, cache) if flags & COMPILED else model.decode_into(cache, tokens)
        else:
            raise ProtocolError(f"unknown command {op} from rank 0")
        mx.eval(out, *(cache.arrays() if cache is not None else []))
        if on_step is not None:
            on_step()


class AnnouncedCalls:
    """Mixed into a rank's model (pipeline.PipelineStage, tensor_parallel.TensorParallelRank): on
    rank 0, once `controller` is set, every call is announced to the other ranks first."""

    controller: Controller | None = None

    def __call__(self, tokens: mx.array, cache: ModelCache | None = None, last_logits_only: bool = False):
        if self.controller is None or (tokens.shape[1] == 1 and cache is not None):
            return super().__call__(tokens, cache, last_logits_only)
        self.check_tokens(tokens)  # before the others are told: a refused call must not reach them
        tokens = self.controller.forward(tokens, cache, last_logits_only)
        out = super().__call__(tokens, cache, last_logits_only)
        # Every rank evaluates the whole call (its collectives), even when the caller then evaluates
        # only the cache (generation.prefill before the last chunk).
        mx.async_eval(out)
        return out

    def decode_into(self, cache: ModelCache, tokens: mx.array, step=None) -> mx.array:
        if self.controller is None:
            return super().decode_into(cache, tokens, step)
        tokens = self.controller.decode(tokens, cache, compiled=step is not None)
        logits = super().decode_into(cache, tokens, step)
        mx.async_eval(logits)  # as in __call__: a one-token prefill chunk is followed by the cache only
        return logits

    def make_cache(self) -> ModelCache:
        cache = super().make_cache()
        return cache if self.controller is None else self.controller.share(cache)

"""What rank 0 tells the other ranks, step by step; the others only compute.

Rank 0 runs the ordinary stack (Session, generation, the server) on its part of the model; every call
into the model first broadcasts a command (an all_sum in which the others add zeros), so each worker
runs the same call on its own part, with its own caches, in the same order:

    header  int32[HEADER + INLINE]: op, cache id, batch, tokens, flags, the cache's offset, a count,
            then up to INLINE token ids (a decode step's tokens travel here)
    payload int32[...] when the header says so: a prefill chunk's tokens, or cache operations

    FORWARD  model(tokens, cache, last_logits_only)  (a prefill chunk, or a forward without cache)
    DECODE   one decode step (the compiled step, decode.py) of the tokens in the header, on the
             decode batch of the cache named (one sequence at a time: runtime.Runtime.distributed)
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
cache offset (a decode step: its row's position) and a worker refuses to run on a cache that
disagrees (a bug, reported as such).

A worker mirrors rank 0's decode batch (batch_cache.py) of one row: the cache of the first DECODE
joins it, and leaves it before any other command (rank 0's sequence has left its batch by then: the
scheduler takes it out before the cache is used otherwise), so the cache's offset then includes the
decoded positions on both sides.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from ..batch_cache import BatchCache
from ..cache import ModelCache
from ..runtime import runtime_of
from .group import DistributedError, Group

HEADER = 8
INLINE = 64
FORWARD, DECODE, CACHE, STOP, PARK = 1, 2, 3, 4, 5
MARK, REWIND, FREE = 1, 2, 3
NO_CACHE = -1
LAST_LOGITS_ONLY = 1
COMPILED = 2  # a decode step through decode.DecodeStep (else the model's own step_into, eager)


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
        # Set once the group cannot take commands (a failure, or the workers were stopped): the error
        # each later command raises before any collective, so that nothing waits on a group that is gone.
        self.refusal: Callable[[], DistributedError] | None = None

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
        self,
        op: int,
        cache: ModelCache | None,
        batch: int,
        tokens: int,
        flags: int,
        count: int,
        inline=None,
        offset: int | None = None,
    ):
        if self.refusal is not None:
            raise self.refusal()
        if self.parked:
            self.parked = False
            if self._wake is not None:
                self._wake()
        cache_id = cache.cache_id if isinstance(cache, SharedCache) else NO_CACHE
        if offset is None:
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

    def decode(self, tokens: mx.array, batch: BatchCache, compiled: bool) -> mx.array:
        """Announce a decode step of tokens [1, 1] (lazy: the previous step's sample) on a decode
        batch of one sequence."""
        if batch.rows != 1 or batch.size != 1:
            raise DistributedError(
                f"a decode batch of {batch.size} sequences in {batch.rows} rows: a distributed model "
                "decodes one sequence at a time"
            )
        self.flush()
        ids = mx.concatenate([tokens.astype(mx.int32).reshape(-1), mx.zeros((INLINE - 1,), mx.int32)])
        flags = COMPILED if compiled else 0
        header = self._command(DECODE, batch.caches[0], 1, 1, flags, 0, ids, offset=batch.lengths[0])
        self._stepped()
        return header[HEADER : HEADER + 1].reshape(1, 1).astype(tokens.dtype)

    def park(self) -> None:
        """Tell the workers to wait off the collectives until the next command."""
        if self.parked or self.refusal is not None:  # (no workers to park)
            return
        self.flush()
        mx.eval(self._command(PARK, None, 0, 0, 0, 0))
        self.parked = True

    def stop(self) -> None:
        self.flush()
        mx.eval(self._command(STOP, None, 0, 0, 0, 0))
        # Set here, on the thread that runs the commands: one queued behind the stop (the parking
        # after a last step) must not wait on workers that have left.
        self.refusal = lambda: DistributedError("the distributed group was stopped")

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
    batch = BatchCache.for_model(model)  # rank 0's decode batch, mirrored (module docstring)
    joined: list[int] = []  # the id of the cache in it

    def leave_batch() -> None:
        if joined:
            batch.leave(joined.pop())

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
        if joined and not (op == DECODE and joined[0] == cache_id):
            leave_batch()
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
            if not joined:
                cache = cache_of(cache_id, offset, "decode")
                batch.join(cache_id, cache)
                joined.append(cache_id)
            if batch.lengths[0] != offset:
                here = batch.lengths[0]
                raise ProtocolError(
                    f"cache {cache_id} is at position {here} here but at {offset} on rank 0 (decode)"
                )
            out = decode(tokens, batch) if flags & COMPILED else model.step_into(batch, tokens)
            cache = None
            mx.eval(out, *batch.buffers)
        else:
            raise ProtocolError(f"unknown command {op} from rank 0")
        if op == FORWARD:
            mx.eval(out, *(cache.arrays() if cache is not None else []))
        if on_step is not None:
            on_step()


class AnnouncedCalls:
    """Mixed into a rank's model (pipeline.PipelineStage, tensor_parallel.TensorParallelRank): on
    rank 0, once the model's runtime has the group (runtime.Runtime.distributed), every call is
    announced to the other ranks first."""

    @property
    def controller(self) -> Controller | None:
        group = runtime_of(self).distributed
        return None if group is None else group.controller

    def __call__(
        self,
        tokens: mx.array,
        cache: ModelCache | None = None,
        last_logits_only: bool = False,
        block_step: int | None = None,
    ):
        # block_step only picks attention's fixed shapes (MLX-CUDA), not what it computes: rank 0 keeps
        # it, the others are not told (their calls are the same sums in other launch shapes).
        controller = self.controller
        if controller is None:
            return super().__call__(tokens, cache, last_logits_only, block_step)
        self.check_tokens(tokens)  # before the others are told: a refused call must not reach them
        tokens = controller.forward(tokens, cache, last_logits_only)
        out = super().__call__(tokens, cache, last_logits_only, block_step)
        # Every rank evaluates the whole call (its collectives), even when the caller then evaluates
        # only the cache (the scheduler's prefill before the last chunk).
        mx.async_eval(out)
        return out

    def step_into(self, batch: BatchCache, tokens: mx.array, step=None) -> mx.array:
        controller = self.controller
        if controller is None:
            return super().step_into(batch, tokens, step)
        tokens = controller.decode(tokens, batch, compiled=step is not None)
        return super().step_into(batch, tokens, step)

    def make_cache(self) -> ModelCache:
        cache = super().make_cache()
        controller = self.controller
        return cache if controller is None else controller.share(cache)

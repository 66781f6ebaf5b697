"""A loaded model's runtime: everything it runs with besides its weights.

    runtime_of(model).info           where it came from (loader.LoadInfo; None for a model built here)
    runtime_of(model).prefill_chunk  the prompt chunk the loader picked for this machine's memory
    runtime_of(model).streaming      the expert-streaming plan (streaming.StreamingPlan) or None
    runtime_of(model).adapter        the LoRA adapter attached (adapters.AdapterInfo) or None
    runtime_of(model).warmup_report  what the load-time warm-up did (warmup.WarmupReport) or None
    runtime_of(model).distributed    rank 0's view of a distributed group (distributed/runtime.py) or
                                     None: every step then runs on its compute thread, watched
    runtime_of(model).decode         the compiled decode step and its traces (decode.DecodeStep)
    runtime_of(model).scheduler      the continuous-batching scheduler every Session on the model
                                     shares (scheduler.py), stepped by one thread: `submit` starts it

Kept off the nn.Module: a module's attributes are its parameters and submodules, and runtime state
there was spread over four loose attributes. A runtime is found by the model's identity and holds the
model weakly, so dropping the model frees both.

Why one thread steps the scheduler: MLX streams belong to the thread that made them, and a compiled
trace to the thread that traced it; every Session on a model (from any thread) hands its sequence to
that thread and reads its tokens back. The server's worker thread, which loads the model, steps it
itself (`drive`).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

import mlx.core as mx

from .cache import ModelCache
from .decode import DecodeStep
from .distributed.errors import DistributedError
from .generation import PREFILL_CHUNK, SamplingOptions, TokenConstraint, TokenStream
from .memory import kv_bytes
from .model import Transformer
from .scheduler import End, Progress, Scheduler, Sequence, Token

log = logging.getLogger("oss_mlx")

DEFAULT_MAX_BATCH = 8  # sequences decoding at once (the server's --max-concurrency)
IDLE_WAIT = 1.0  # seconds the stepping thread sleeps between checks that its model still exists


class Runtime:
    """See the module doc. Made by `runtime_of` (the loader fills `info`, `prefill_chunk`, `streaming`)."""

    def __init__(self, model) -> None:
        self._model = weakref.ref(model)
        self.info = None  # loader.LoadInfo
        self.streaming = None  # streaming.StreamingPlan
        self.adapter = None  # adapters.AdapterInfo
        self.warmup_report = None  # warmup.WarmupReport
        self._distributed = None  # distributed.runtime.Runtime (rank 0)
        self._prefill_chunk = PREFILL_CHUNK
        self.max_batch = DEFAULT_MAX_BATCH
        self.max_waiting: int | None = None
        self.memory_limit: int | None = None
        self._decode: DecodeStep | None = None
        self._scheduler: Scheduler | None = None
        self._driver: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per prefill chunk (the loader picks it for the machine's memory)."""
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, tokens: int) -> None:
        self._prefill_chunk = tokens
        if self._scheduler is not None:
            self._scheduler.prefill_chunk = tokens

    @property
    def distributed(self):
        """Rank 0's view of a distributed group (distributed/runtime.py), or None."""
        return self._distributed

    @distributed.setter
    def distributed(self, group) -> None:
        # One sequence at a time: the other ranks mirror rank 0's commands on their own caches, and
        # a decode batch of several rows is not among them (protocol.py).
        self._distributed = group
        self.configure(max_batch=1)

    def run_step(self, scheduler: Scheduler) -> None:
        """One scheduler step, on a distributed group's compute thread where there is one: a rank that
        dies or hangs then ends it with a DistributedError within the heartbeat timeout, whatever
        collective the step waits in; the workers are parked (off the collectives) once it is idle."""
        group = self._distributed
        if group is None:
            scheduler.step()
            return
        group.run(scheduler.step)
        if scheduler.idle:
            group.run(group.controller.park)

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this runtime is gone")
        return model

    def model_changed(self) -> None:
        """The model's modules or weights were replaced (an adapter attached, weights trained in
        place): the compiled step's traces hold the arrays they saw, so the step is made again at
        next use. Not while sequences run."""
        if self._scheduler is not None and not self._scheduler.idle:
            raise RuntimeError("the model changed while sequences were running on it")
        self._decode = None
        if self._driver is None:
            self._scheduler = None
        elif self._scheduler is not None:  # a thread steps it: the same scheduler, a new step
            self._scheduler.decode = self.decode

    @property
    def decode(self) -> DecodeStep:
        """The model's decode step, made once: its compiled traces are kept across requests."""
        if self._decode is None:
            self._decode = DecodeStep(weakref.proxy(self.model))
        return self._decode

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            config = self.model.config
            dtype_bytes = self.model.dtype.size
            self._scheduler = Scheduler(
                weakref.proxy(self.model),
                self.decode,
                prefill_chunk=self.prefill_chunk,
                max_batch=self.max_batch,
                max_waiting=self.max_waiting,
                memory_limit=self.memory_limit,
                kv_bytes=lambda context: kv_bytes(config, context, dtype_bytes),
            )
        return self._scheduler

    def configure(
        self,
        *,
        max_batch: int | None = None,
        max_waiting: int | None = None,
        memory_limit: int | None = None,
        prefill_chunk: int | None = None,
    ) -> None:
        """Set the scheduler's limits (before its first use, or while it is idle)."""
        if self._scheduler is not None and not self._scheduler.idle:
            raise RuntimeError("the scheduler is running sequences: configure it before or between them")
        if max_batch is not None:
            if self._distributed is not None and max_batch > 1:
                log.info("a distributed model decodes one sequence at a time: the others wait their turn")
                max_batch = 1
            self.max_batch = max_batch
        if max_waiting is not None:
            self.max_waiting = max_waiting
        if memory_limit is not None:
            self.memory_limit = memory_limit
        if prefill_chunk is not None:
            self._prefill_chunk = prefill_chunk
        if self._driver is None:
            self._scheduler = None  # made again with these on next use
        else:  # a thread steps it: the same object, new limits
            sched = self._scheduler
            sched.max_batch, sched.max_waiting = self.max_batch, self.max_waiting
            sched.memory_limit, sched.prefill_chunk = self.memory_limit, self._prefill_chunk

    # ---- the stepping thread ----------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a thread steps this model's scheduler and sequences are still in it."""
        with self._lock:
            driver, scheduler = self._driver, self._scheduler
        return driver is not None and driver.is_alive() and scheduler is not None and not scheduler.idle

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence with the shared scheduler (Busy when its queue is full) and make sure a
        thread steps it."""
        scheduler = self.scheduler
        scheduler.submit(seq)
        with self._lock:
            if self._driver is None:
                # Weights must be evaluated here: a lazy array made on this thread's stream cannot be
                # evaluated on another's.
                mx.eval(self.model.parameters())
                parked = threading.Event()
                self._driver = threading.Thread(
                    target=_drive_weakly,
                    args=(weakref.ref(self), parked),
                    name="oss-mlx-scheduler",
                    daemon=True,
                )
                _PARKED[self._driver] = parked
                self._driver.start()

    def drive(
        self,
        stop: threading.Event,
        started: Callable[[], None] | None = None,
        while_idle: Callable[[], bool] | None = None,
    ) -> None:
        """Step the scheduler in this thread until `stop` is set (the server's worker thread, which
        loaded the model); `started` is called once this thread is the one (submits may come then);
        while_idle() runs instead of waiting while no sequence is in (the server's warm-up, a piece
        at a time) and says whether it did something (False: wait as usual)."""
        with self._lock:
            if self._driver is not None:
                raise RuntimeError("another thread steps this model's scheduler already")
            self._driver = threading.current_thread()
        scheduler = self.scheduler
        if started is not None:
            started()
        try:
            while not stop.is_set():
                if while_idle is not None and scheduler.idle and while_idle():
                    continue
                _step_or_wait(self, scheduler, stop.is_set)
        finally:
            scheduler.fail_all(RuntimeError("the server is stopping"))
            _settle_stream()
            with self._lock:
                self._driver = None


def _step_or_wait(runtime: Runtime, scheduler: Scheduler, stopping) -> None:
    if scheduler.idle:
        with scheduler.wake:
            if scheduler.idle and not stopping():
                scheduler.wake.wait(IDLE_WAIT)
        return
    try:
        runtime.run_step(scheduler)
    except DistributedError as e:  # a rank or a link is gone: said in one line, every sequence told
        log.error("%s", e)
        scheduler.fail_all(e)
    except Exception as e:  # a bug: every sequence is told, the thread goes on
        log.exception("scheduler step failed")
        scheduler.fail_all(e)


def _drive_weakly(ref: weakref.ref, parked: threading.Event) -> None:
    """The thread a Runtime starts: steps its scheduler while the runtime (and its model) exists
    and the interpreter is not exiting; at exit it parks (see _stop_threads)."""
    scheduler = None
    try:
        while not _EXITING.is_set():
            runtime = ref()
            if runtime is None:
                return
            scheduler = runtime.scheduler
            _STEPPED.add(scheduler)
            _step_or_wait(runtime, scheduler, _EXITING.is_set)
            del runtime
            scheduler = None
    finally:
        if scheduler is not None:
            scheduler.fail_all(RuntimeError("the interpreter is exiting"))
        _settle_stream()
        if not _EXITING.is_set():  # the model is gone: the thread ends
            _PARKED.pop(threading.current_thread(), None)
        else:
            parked.set()
            threading.Event().wait()  # never returns: the process ends with this thread asleep here


def _settle_stream() -> None:
    """Wait for the work this thread queued (the pipelined step's last tokens are queued and never
    read), so that none is running when the thread ends or parks."""
    try:
        mx.synchronize()
    except Exception:  # noqa: BLE001 - only tidying up on the way out
        pass


# A thread inside MLX while the interpreter exits aborts the process ("terminate called without an
# active exception"), and so does one that ends during the exit: its C++ thread-locals are destroyed
# after Python's join returns, racing MLX's own teardown on the main thread (seen on the CPU, about
# one exit in four under load). So at exit each stepping thread finishes its step, waits for its
# queued work, and parks in a wait that never returns instead of ending.
_EXITING = threading.Event()
_PARKED: dict[threading.Thread, threading.Event] = {}
_STEPPED: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _stop_threads() -> None:
    _EXITING.set()
    for scheduler in list(_STEPPED):
        scheduler.notify()
    for thread, parked in list(_PARKED.items()):
        if thread.is_alive():
            parked.wait(timeout=10)


_RUNTIMES: dict[int, Runtime] = {}


def runtime_of(model) -> Runtime:
    """The model's runtime (made with defaults the first time: a model built in code)."""
    key = id(model)
    runtime = _RUNTIMES.get(key)
    if runtime is None or runtime._model() is not model:
        runtime = Runtime(model)
        _RUNTIMES[key] = runtime
        weakref.finalize(model, _RUNTIMES.pop, key, None)
    return runtime


def generate_tokens(
    model: Transformer,
    new_tokens: list[int],
    cache: ModelCache,
    options: SamplingOptions,
    stop_ids: set[int],
    report: TokenStream | None = None,
    mark_at: Iterable[int] = (),
    prefill_chunk: int | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    constraint: TokenConstraint | None = None,
) -> Iterator[int]:
    """Prefill `new_tokens` after what the cache holds, then sample until a stop id or max_tokens,
    in the caller's thread: the scheduler (scheduler.py) with this one sequence, stepped here.

    Decoding is pipelined: step n+1 is queued before token n reaches Python, so a stop token is fed
    to the cache too; callers read `cache.offset` to know what the cache holds.
    mark_at: positions within `new_tokens` after which the cache is marked.
    prefill_chunk: the prefill chunk; default the model's (`load` picks it for the machine's memory).
    on_prefill(done, total): after each prefill chunk; the stats (tokens prefilled, seconds, peak
    memory) are kept up to date with it, so a prefill cut short reports what it really did.
    constraint: masks the logits before sampling (structured outputs; scheduler.py says when).
    Concurrent generations on one model go through the model's runtime instead (Session, batch_generate).
    """
    if not new_tokens:
        raise ValueError("prefill needs at least one token")
    runtime = runtime_of(model)
    outputs: list = []
    seq = Sequence(
        cache,
        new_tokens,
        options,
        stop_ids,
        mark_at=mark_at,
        report=report,
        emit=outputs.append,
        constraint=constraint,
    )
    scheduler = Scheduler(
        model, runtime.decode, prefill_chunk=prefill_chunk or runtime.prefill_chunk, max_batch=1
    )
    scheduler.submit(seq)
    ended = False
    try:
        while not ended:
            runtime.run_step(scheduler)
            for out in outputs:
                if isinstance(out, Token):
                    yield out.id
                elif isinstance(out, Progress) and on_prefill is not None:
                    on_prefill(out.done, out.total)
                elif isinstance(out, End):
                    ended = True
                    if out.error is not None:
                        raise out.error
            outputs.clear()
    finally:
        if not ended:  # closed early or interrupted: the cache comes back out of the batch
            seq.cancel()
            while not seq.done and (runtime.distributed is None or runtime.distributed.failure is None):
                runtime.run_step(scheduler)

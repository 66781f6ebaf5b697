"""The generation worker: the model, a pool of Sessions whose caches are reused, and the scheduler.

One thread loads the model and steps its scheduler (runtime.py, scheduler.py): MLX streams belong to
the thread that made them. Requests are rendered to tokens off the event loop, then become scheduler
sequences at once: up to ``max_concurrency`` decode together (a new one's prefill runs a chunk at a
time between the others' decode steps, so its first token does not wait for them to finish), at most
``max_queue`` more wait. A submit beyond that raises :class:`QueueFull` (the app answers 429 with
Retry-After, estimated from recent request durations). The scheduler's outputs (tokens, progress,
the end) reach the event loop through each :class:`Job`'s asyncio queue, where they become harmony
events; the event loop never waits on MLX. Cancelling a job (client gone, stop sequence met) frees
its place within one decode step or one prefill chunk, and the cache is settled.

Admission also checks memory: a request waits until its KV cache (projected to its prompt and
max_tokens) fits beside the others' (machine.py's budget for this machine), instead of swapping.

Prefix reuse: up to ``cache_slots`` idle Sessions are kept. A request goes to the idle session whose
cached tokens share the longest prefix with its prompt when that prefix reaches past the system and
developer messages (the same conversation, continued); otherwise to a fresh session while there is
room, else to the least recently used idle one. ``Session.begin`` rewinds the cache itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..distributed.errors import DistributedError
from ..generation import SamplingOptions
from ..harmony import Message, MessageDone, StreamParser, Tool, render_conversation
from ..runtime import runtime_of
from ..scheduler import Busy, End, Progress, Token
from ..session import Reply, ReplyBuilder, Session, Turn
from ..structured import Checked, ConstraintError, OutputConstraint
from ..structured import check as check_constraint

log = logging.getLogger("oss_mlx.server")


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused from the cache
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # completion tokens spent in analysis messages


@dataclass
class Finished:
    """The last event of a job that ran (also after a cancel: what was generated until then)."""

    reply: Reply
    usage: Usage
    cancelled: bool = False


@dataclass
class Failed:
    """The last event of a job that raised. client: the request's own constraint failed on the way
    (a 400 where no answer has begun), not the server."""

    message: str
    client: bool = False

    @property
    def status(self) -> int:
        return 400 if self.client else 500

    @property
    def code(self) -> str:
        return "invalid_request_error" if self.client else "server_error"


@dataclass
class GenerationRequest:
    messages: list[Message]  # the conversation, without system/developer messages
    instructions: str | None = None  # the developer message's instructions
    tools: list[Tool] = field(default_factory=list)
    reasoning_effort: str = "medium"
    options: SamplingOptions = field(default_factory=SamplingOptions)
    max_tokens: int | None = None  # None: whatever context is left
    prompt: list[int] = field(default_factory=list)  # filled by Engine.prepare
    header_tokens: int = 0  # tokens of the system + developer messages
    constraint: OutputConstraint | None = None  # response format, tool calls (structured.py)
    checked: Checked | None = None  # filled by Engine.prepare: None when nothing is constrained
    truncate: bool = False  # drop the oldest turns when the prompt does not fit (truncation: auto)
    dropped_messages: int = 0  # how many Engine.prepare dropped


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class ContextTooLong(Exception):
    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(
            f"The prompt is {prompt_tokens} tokens; this server's context limit is {limit} tokens "
            "(prompt and output together)."
        )


class Job:
    """One request's generation: the scheduler's outputs arrive through an asyncio queue and become
    harmony events here, on the event loop."""

    def __init__(self, engine: Engine, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.engine, self.request, self.loop = engine, request, loop
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.turn: Turn | None = None
        self.builder: ReplyBuilder | None = None
        self.usage: Usage | None = None  # set when the sequence ends (on the worker thread)

    def put(self, output: Any) -> None:
        """From the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancel()

    def cancel(self) -> None:
        """Stop this job (idempotent, any thread): it leaves the scheduler within a step or a chunk."""
        if self.turn is not None:
            self.turn.sequence.cancel()

    async def stream(self, idle: float | None = None) -> AsyncIterator[Any]:
        """Events (TextDelta, ToolCall, MessageDone) until, and including, Finished or Failed; None
        after each ``idle`` seconds without one (waiting for a place, a long prefill), for the caller
        to send a keep-alive."""
        while True:
            try:
                output = await asyncio.wait_for(self.outputs.get(), idle)
            except asyncio.TimeoutError:
                yield None
                continue
            if isinstance(output, Token):
                for event in self.builder.feed(output.id):
                    yield event
            elif isinstance(output, End):
                if output.error is not None:
                    e = output.error  # a DistributedError says which rank, in a sentence of its own
                    if isinstance(e, ConstraintError):
                        yield Failed(str(e), client=True)  # "constrained decoding failed: ..."
                    elif isinstance(e, DistributedError):
                        yield Failed(str(e))
                    else:
                        yield Failed(f"{type(e).__name__}: {e}")
                    return
                for event in self.builder.finish():
                    yield event
                reply = self.builder.reply
                yield Finished(reply, self.usage or Usage(), reply.stats.finish_reason == "interrupted")
                return
            elif not isinstance(output, Progress):
                raise TypeError(f"unexpected scheduler output {output!r}")


def reasoning_token_count(tokens: list[int], tokenizer) -> int:
    """How many of the generated tokens belong to analysis messages (headers and end tokens included)."""
    parser = StreamParser(tokenizer)
    total = run = 0
    for token in tokens:
        run += 1
        for event in parser.feed(token):
            if isinstance(event, MessageDone):
                total += run if event.message.channel == "analysis" else 0
                run = 0
    for event in parser.finish():
        if isinstance(event, MessageDone) and event.message.channel == "analysis":
            total += run
    return total


class Engine:
    def __init__(
        self,
        model_path: str,
        *,
        max_queue: int = 16,
        max_concurrency: int = 8,
        cache_slots: int = 2,
        context_limit: int | None = None,
        prefill_chunk: int | None = None,
        script: Any = None,
        loader: Any = None,
        load_kwargs: dict | None = None,
    ):
        self.model_path = model_path
        self.max_queue = max_queue
        self.max_concurrency = max_concurrency
        self.cache_slots = max(1, cache_slots)
        self.context_limit = context_limit
        self.prefill_chunk = prefill_chunk
        self.script = script  # the test hook (oss_mlx/testing/scripted.py), None in normal use
        self._loader = loader
        self._load_kwargs = dict(load_kwargs or {})
        self.model = self.tokenizer = None
        self.runtime = None
        self.sessions: list[Session] = []  # kept for prefix reuse (idle or busy)
        self._busy: set[int] = set()  # id(session) of those generating
        self._used: dict[int, float] = {}  # id(session) -> last use
        self._lock = threading.Lock()
        self._seconds_per_job = 5.0  # moving average, for Retry-After
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="oss-mlx-generation", daemon=True)
        self._warming = None  # the model's warm-up steps left (warmup.steps), run while idle

    # ---- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread and wait until it has loaded the model (re-raises a load error)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self) -> None:
        self._stop.set()
        if self.runtime is not None:
            self.runtime.scheduler.notify()
        self._thread.join(timeout=10)

    def _main(self) -> None:
        try:
            if self._loader is not None:
                self.model, self.tokenizer = self._loader(self.model_path)
            else:
                import oss_mlx

                # warmed up below, while no request waits, instead of before the server is ready
                kwargs = {"warm_up": False, **self._load_kwargs}
                self.model, self.tokenizer = oss_mlx.load(self.model_path, **kwargs)
            limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
            if self.context_limit is None:
                self.context_limit = int(limit or 131072)
            elif limit and self.context_limit > limit:
                from ..cli_args import UsageError

                raise UsageError(
                    f"--context-limit {self.context_limit:,} is above the model's maximum ({limit:,} tokens)"
                )
            if self.script is not None:
                self.script = self.script(self.tokenizer)
            self.runtime = runtime_of(self.model)
            self.runtime.configure(
                max_batch=self.max_concurrency,
                max_waiting=self.max_queue,
                memory_limit=memory_limit(self.runtime),
                prefill_chunk=self.prefill_chunk,
            )
        except BaseException as e:  # reported by start()
            self._load_error = e
            self._ready.set()
            return

        def started() -> None:
            self._ready.set()
            self._warm_up()

        # This thread steps the scheduler until stop(), and runs the warm-up's pieces while idle.
        self.runtime.drive(self._stop, started, while_idle=self._warm_up_step)

    def _warm_up(self) -> None:
        # The sampler comes from mlx-lm, whose import takes seconds: done now, while the first request
        # is still being written, rather than during it. Constrained replies need the vocabulary in
        # llguidance's form (~1 s to build): built on a thread of its own, so that a first request
        # without a constraint does not wait for it (one with a constraint waits on its lock).
        threading.Thread(target=self._grammar_vocabulary, name="oss-mlx-grammar", daemon=True).start()
        try:
            SamplingOptions().sampler()
        except Exception:  # noqa: BLE001 - only an optimisation
            pass
        # Then the model's warm-up (warmup.py) one piece at a time while no request waits: on this
        # thread, which generates (MLX-CUDA keeps its attention graphs per thread); a request that
        # comes meanwhile waits at most for the piece under way (~0.1 s).
        from .. import warmup
        from ..model import Transformer

        if isinstance(self.model, Transformer) and self.script is None and warmup.wanted():
            self._warming = warmup.steps(
                self.model, context=min(self.context_limit, warmup.SERVER_CONTEXT), batched=True
            )

    def _warm_up_step(self) -> bool:
        """One piece of the warm-up; False once there is none left."""
        if self._warming is None:
            return False
        try:
            log.debug("warm-up: %s", next(self._warming))
        except StopIteration:
            self._warming = None
            log.info("warm-up done")
        except Exception:  # noqa: BLE001 - only an optimisation: requests run without it
            log.exception("warm-up failed")
            self._warming = None
        return True

    def _grammar_vocabulary(self) -> None:
        try:
            self.tokenizer.grammar_tokenizer()
        except Exception:  # noqa: BLE001 - the first constrained request builds it, or says why not
            pass

    # ---- requests --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._load_error is None

    def queue_state(self) -> dict:
        """/health's queue: the scheduler's counts taken at one moment (Scheduler.counts)."""
        scheduler = self.runtime.scheduler if self.runtime is not None else None
        running, prefilling, waiting = scheduler.counts() if scheduler is not None else (0, 0, 0)
        return {
            "running": running,  # prefilling or decoding
            "prefilling": prefilling,
            "waiting": waiting,
            "max_running": self.max_concurrency,
            "max_waiting": self.max_queue,
        }

    def prepare(self, req: GenerationRequest, check: bool = True) -> GenerationRequest:
        """Render the prompt (in a worker-pool thread, not the event loop) and check the context.

        With ``req.truncate`` a prompt that does not fit loses its oldest turns (whole turns, from a
        user message on) until it leaves room for a reply: a quarter of the context, at most 4096 tokens,
        whatever ``max_tokens`` asks (so that a token count, which knows no max_tokens, agrees with the
        prompt a request runs); ``check=False`` only renders (token counting).
        """
        kwargs = dict(
            reasoning_effort=req.reasoning_effort,
            tools=req.tools or None,
            developer_instructions=req.instructions,
        )
        req.prompt = render_conversation(req.messages, self.tokenizer, **kwargs)
        req.header_tokens = len(render_conversation([], self.tokenizer, for_completion=False, **kwargs))
        reserve = min(4096, self.context_limit // 4)
        if req.truncate and len(req.prompt) + reserve > self.context_limit:
            self._truncate(req, kwargs, reserve)
        room = self.context_limit - len(req.prompt)
        if check and room < 1:
            raise ContextTooLong(len(req.prompt), self.context_limit)
        req.options.max_tokens = max(1, min(req.max_tokens or room, room))
        if check and req.constraint is not None and req.constraint.active:
            req.checked = check_constraint(req.constraint, self.tokenizer)  # ConstraintError: its 400
        return req

    def _truncate(self, req: GenerationRequest, kwargs: dict, reserve: int) -> None:
        """Keep the longest tail of whole turns that fits (binary search over the turn starts)."""
        starts = [i for i, m in enumerate(req.messages) if i > 0 and m.role == "user"]
        fits: dict[int, list[int]] = {}

        def fit(start: int) -> bool:
            tokens = render_conversation(req.messages[start:], self.tokenizer, **kwargs)
            fits[start] = tokens
            return len(tokens) + reserve <= self.context_limit

        lo, hi = 0, len(starts)  # the answer is the first start (index into starts) that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if fit(starts[mid]):
                hi = mid
            else:
                lo = mid + 1
        if not starts:
            return
        # Past the last start even the last turn alone does not fit: it is kept, and the context
        # check then says so.
        start = starts[min(lo, len(starts) - 1)]
        req.prompt = fits.get(start) or render_conversation(req.messages[start:], self.tokenizer, **kwargs)
        req.messages = req.messages[start:]
        req.dropped_messages = start

    def submit(self, req: GenerationRequest) -> Job:
        """Start a job (from the event loop): a session for it, its sequence with the scheduler
        (QueueFull when max_queue are waiting already)."""
        waiting = self.runtime.scheduler.full()
        if waiting is not None:  # before a session is picked: begin() would rewind an idle one's cache
            raise self._queue_full(waiting)
        job = Job(self, req, asyncio.get_running_loop())
        options = req.options
        if self.script is not None:
            options = self.script.options(options, req.messages)
        with self._lock:
            session = self._pick_session(req.prompt, req.header_tokens)
            self._busy.add(id(session))
            self._used[id(session)] = time.monotonic()
        session.last_reply = None
        started = time.monotonic()
        try:
            turn = session.begin(req.prompt, options, emit=job.put, constraint=req.checked)
        except BaseException:
            with self._lock:
                self._busy.discard(id(session))
            raise
        job.turn = turn
        job.builder = ReplyBuilder(self.tokenizer, turn.report)
        settle = turn.sequence.on_end

        def on_end() -> None:  # on the worker thread, the cache back: settle, count, free the session
            try:
                settle()
            finally:
                job.usage = self._finish(session, turn, time.monotonic() - started)

        turn.sequence.on_end = on_end
        try:
            self.runtime.submit(turn.sequence)
        except Busy as e:  # filled up since the check above
            with self._lock:
                self._busy.discard(id(session))
            raise self._queue_full(e.waiting) from None
        return job

    def _queue_full(self, waiting: int) -> QueueFull:
        """QueueFull with Retry-After from recent request durations."""
        retry = math.ceil(self._seconds_per_job * (waiting - self.max_queue + 1) / self.max_concurrency)
        return QueueFull(max(1, min(retry, 120)))

    def _finish(self, session: Session, turn: Turn, elapsed: float) -> Usage:
        stats, tokens = turn.report.stats, turn.report.tokens
        session.turn_stats.clear()  # a chat keeps these per turn; a server would only pile them up
        usage = Usage(
            prompt_tokens=stats.prompt_tokens,
            cached_tokens=stats.prompt_tokens - stats.prefilled_tokens,
            completion_tokens=stats.generated_tokens,
            reasoning_tokens=reasoning_token_count(tokens, self.tokenizer),
        )
        log.info(
            "%s: prompt %d tokens (%d cached), %d generated (%d reasoning) at %.1f tok/s, %s, "
            "decoded in a batch of up to %d",
            "cancelled" if stats.finish_reason == "interrupted" else "done",
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
            usage.reasoning_tokens,
            stats.generation_tps,
            stats.finish_reason,
            stats.max_batch,
        )
        with self._lock:
            self._busy.discard(id(session))
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed
            idle = [s for s in self.sessions if id(s) not in self._busy]
            while len(self.sessions) > self.cache_slots and idle:  # past the slots: the oldest goes
                oldest = min(idle, key=lambda s: self._used[id(s)])
                idle.remove(oldest)
                self.sessions.remove(oldest)
                del self._used[id(oldest)]
        return usage

    # ---- sessions --------------------------------------------------------------------------------

    def _pick_session(self, prompt: list[int], header: int) -> Session:
        """Under the lock: an idle session continuing this conversation, else a fresh one while the
        slots allow (or others are busy), else the least recently used idle one.

        Continuing: sharing more than the header and the first message's opening
        (<|start|>user<|message|>), which every conversation with these instructions shares, and at
        least half the session's cache (taking it rewinds the rest, which its own conversation may
        still want: two chats that open with the same words are not one)."""

        def shared(s: Session) -> int:
            a, n = s.cached_tokens, min(len(s.cached_tokens), len(prompt))
            i = 0
            while i < n and a[i] == prompt[i]:
                i += 1
            return i

        try:
            opened = prompt.index(self.tokenizer.MESSAGE, header) + 1
        except ValueError:
            opened = header
        idle = [s for s in self.sessions if id(s) not in self._busy]
        scored = [(shared(s), self._used[id(s)], s) for s in idle]
        if scored:
            n, _, best = max(scored, key=lambda t: t[:2])
            if n > opened and 2 * n >= len(best.cached_tokens):
                return best
        if len(self.sessions) < self.cache_slots or not idle:
            session = Session(self.model, self.tokenizer)
            self.sessions.append(session)
            self._used[id(session)] = 0.0
            return session
        return min(idle, key=lambda s: self._used[id(s)])


def memory_limit(runtime) -> int | None:
    """Bytes MLX may hold with every sequence admitted: this machine's budget (machine.Machine) less
    the transient memory of one prefill chunk (machine.PREFILL_TRANSIENT)."""
    from ..machine import PREFILL_TRANSIENT, Machine

    budget = Machine.detect().working_set_bytes
    transient = PREFILL_TRANSIENT.get(runtime.prefill_chunk, max(PREFILL_TRANSIENT.values()))
    return max(0, budget - transient) if budget else None

"""The one generation worker: the model, a few Sessions whose caches are reused, and a bounded queue.

MLX runs one generation at a time, so a single thread owns the model (it also loads it: MLX streams
belong to the thread that made them). Requests are rendered to tokens in the request handler, then
queued as :class:`Job` objects; the worker streams each job's events back to the event loop. The
event loop never waits on MLX.

Queue semantics: one job runs; at most ``max_queue`` more wait. A submit beyond that raises
:class:`QueueFull` (the app answers 429 with Retry-After, estimated from recent job durations).
Cancelling a job (client gone, stop sequence met) that waits frees its slot at once; one that runs
stops at its next token, which closes the ``Session.stream`` generator and leaves the cache
consistent.

Prefix reuse: up to ``cache_slots`` Sessions are kept. A request goes to the session whose cached
tokens share the longest prefix with its prompt when that prefix reaches past the system and
developer messages (the same conversation, continued); otherwise to a fresh session while there is
room, else to the least recently used one. ``Session.stream(tokens)`` rewinds the cache itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..distributed.errors import DistributedError
from ..generation import SamplingOptions
from ..harmony import Message, MessageDone, StreamParser, Tool, render_conversation
from ..session import Done, Reply, Session
from ..structured import Checked, OutputConstraint
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
    """The last event of a job that raised."""

    message: str


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


_WAITING, _RUNNING, _DONE = "waiting", "running", "done"


class Job:
    """One queued generation; its events arrive on the event loop through an asyncio queue."""

    def __init__(self, engine: Engine, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.engine, self.request, self.loop = engine, request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.state = _WAITING

    def put(self, event: Any) -> None:
        """From the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop this job (idempotent, from the event loop): a waiting job leaves the queue at once."""
        self.cancelled.set()
        self.engine._release_if_waiting(self)

    async def stream(self, idle: float | None = None) -> AsyncIterator[Any]:
        """Events until, and including, Finished or Failed; None after each ``idle`` seconds without
        one (a queued job, a long prefill), for the caller to send a keep-alive."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), idle)
            except asyncio.TimeoutError:
                yield None
                continue
            yield event
            if isinstance(event, Finished | Failed):
                return


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
        cache_slots: int = 2,
        context_limit: int | None = None,
        script: Any = None,
        loader: Any = None,
        load_kwargs: dict | None = None,
    ):
        self.model_path = model_path
        self.max_queue = max_queue
        self.cache_slots = max(1, cache_slots)
        self.context_limit = context_limit
        self.script = script  # the test hook (oss_mlx/testing/scripted.py), None in normal use
        self._loader = loader
        self._load_kwargs = dict(load_kwargs or {})
        self.model = self.tokenizer = None
        self.sessions: list[Session] = []
        self._used: dict[int, float] = {}  # id(session) -> last use
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + running
        self._seconds_per_job = 5.0  # moving average, for Retry-After
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="oss-mlx-generation", daemon=True)
        self._warming = None  # the model's warm-up steps left (warmup.steps), run while idle
        self.running: Job | None = None

    # ---- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread and wait until it has loaded the model (re-raises a load error)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self) -> None:
        if self.running is not None:
            self.running.cancelled.set()
        self._queue.put(None)
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
        except BaseException as e:  # reported by start()
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        self._warm_up()
        while True:
            if self._warming is not None and self._queue.empty():
                self._warm_up_step()
                continue
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.state == _DONE:  # cancelled while waiting
                    continue
                job.state = _RUNNING
                self.running = job
            started = time.monotonic()
            try:
                self._run(job)
            except DistributedError as e:  # a rank or a link is gone: said in one line; the server stops
                log.error("%s", e)
                job.put(Failed(str(e)))
            except Exception as e:  # a bug or an MLX error: the job fails, the server goes on
                log.exception("generation failed")
                job.put(Failed(f"{type(e).__name__}: {e}"))
            finally:
                elapsed = time.monotonic() - started
                with self._lock:
                    job.state = _DONE
                    self.running = None
                    self._admitted -= 1
                    self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed

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
            self._warming = warmup.steps(self.model, context=min(self.context_limit, warmup.SERVER_CONTEXT))

    def _warm_up_step(self) -> None:
        try:
            log.debug("warm-up: %s", next(self._warming))
        except StopIteration:
            self._warming = None
            log.info("warm-up done")
        except Exception:  # noqa: BLE001 - only an optimisation: requests run without it
            log.exception("warm-up failed")
            self._warming = None

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
        with self._lock:
            running = 1 if self.running is not None else 0
            return {"running": running, "waiting": self._admitted - running, "max_waiting": self.max_queue}

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
            req.checked = check_constraint(req.constraint)  # ConstraintError: the request's 400
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
        job = Job(self, req, asyncio.get_running_loop())
        with self._lock:
            if self._admitted >= 1 + self.max_queue:
                retry = math.ceil(self._seconds_per_job * (self._admitted - self.max_queue))
                raise QueueFull(max(1, min(retry, 120)))
            self._admitted += 1
        self._queue.put(job)
        return job

    def _release_if_waiting(self, job: Job) -> None:
        with self._lock:
            if job.state == _WAITING:
                job.state = _DONE
                self._admitted -= 1

    # ---- generation (worker thread) ------------------------------------------------------------

    def _pick_session(self, prompt: list[int], header: int) -> Session:
        def shared(s: Session) -> int:
            a, n = s.cached_tokens, min(len(s.cached_tokens), len(prompt))
            i = 0
            while i < n and a[i] == prompt[i]:
                i += 1
            return i

        best = max(self.sessions, key=lambda s: (shared(s), self._used[id(s)]), default=None)
        if best is not None and shared(best) > header:
            return best
        if len(self.sessions) < self.cache_slots:
            session = Session(self.model, self.tokenizer)
            self.sessions.append(session)
            self._used[id(session)] = 0.0
            return session
        return min(self.sessions, key=lambda s: self._used[id(s)])

    def _run(self, job: Job) -> None:
        req = job.request
        session = self._pick_session(req.prompt, req.header_tokens)
        self._used[id(session)] = time.monotonic()
        options = req.options
        if self.script is not None:
            options = self.script.options(options, req.messages)
        session.last_reply = None
        events = session.stream(req.prompt, options, constraint=req.checked)
        reply = None
        try:
            for event in events:
                if isinstance(event, Done):
                    reply = event.reply
                    break
                if job.cancelled.is_set():
                    break
                job.put(event)
        finally:
            events.close()  # on cancel: stops generation, settles the cache
            session.turn_stats.clear()  # a chat keeps these per turn; a server would only pile them up
        cancelled = reply is None
        reply = reply or session.last_reply or Reply()
        stats = reply.stats
        usage = Usage(
            prompt_tokens=stats.prompt_tokens,
            cached_tokens=stats.prompt_tokens - stats.prefilled_tokens,
            completion_tokens=stats.generated_tokens,
            reasoning_tokens=reasoning_token_count(reply.tokens, self.tokenizer),
        )
        log.info(
            "%s: prompt %d tokens (%d cached), %d generated (%d reasoning) at %.1f tok/s, %s",
            "cancelled" if cancelled else "done",
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
            usage.reasoning_tokens,
            stats.generation_tps,
            stats.finish_reason,
        )
        job.put(Finished(reply, usage, cancelled))

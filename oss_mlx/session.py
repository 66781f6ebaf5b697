"""A conversation with its KV cache: the one object the chat UI, the server and the API drive.

Each reply renders the whole conversation with harmony, then reuses the longest prefix the cache
already holds. Harmony drops the previous turn's analysis, so the new prompt usually diverges
from the cache right after the previous prompt's `<|start|>assistant`; the cache is marked there
after every prefill, which lets sliding-window layers rewind that far (see cache.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .generation import GenerationStats, SamplingOptions, TokenStream
from .harmony import Message, MessageDone, StreamParser, TextDelta, Tool, ToolCall, render_conversation
from .harmony.tools import as_tool
from .model import Transformer
from .runtime import runtime_of
from .scheduler import End, Output, Progress, Token
from .scheduler import Sequence as SchedulerSequence
from .structured import Checked, ConstraintError, OutputConstraint, check
from .tokenizer import HarmonyTokenizer

# Keyword arguments of stream / send / generate that constrain the reply (structured.py) rather than
# set sampling options.
CONSTRAINT_KEYS = ("json_schema", "regex", "grammar", "tool_choice", "reasoning_budget")


@dataclass
class Reply:
    """Everything one reply produced."""

    text: str = ""  # the final channel
    analysis: str = ""  # the chain of thought
    tool_calls: list[ToolCall] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class Done:
    """The last event of a reply."""

    reply: Reply


Event = TextDelta | MessageDone | ToolCall | Done
Prompt = str | Sequence[int] | Sequence[Message | Mapping[str, Any]]


@dataclass
class Turn:
    """One reply in flight (Session.begin): its whole prompt, how much of it the cache already held,
    the scheduler's sequence, and what the scheduler reports into (stats, tokens)."""

    tokens: list[int]
    reused: int
    sequence: SchedulerSequence
    report: TokenStream


class ReplyBuilder:
    """A reply's tokens -> harmony events (TextDelta, ToolCall, MessageDone) and the Reply they make:
    what Session.stream yields, and what the server's jobs stream."""

    def __init__(
        self, tokenizer: HarmonyTokenizer, report: TokenStream, assistant_prefix: Sequence[int] = ()
    ):
        self.parser = StreamParser(tokenizer)
        self.parser.feed_many(assistant_prefix)  # a header only: no events to report
        self.reply = Reply(tokens=report.tokens, stats=report.stats)

    def feed(self, token: int) -> list[Event]:
        events = list(self.parser.feed(token))
        for event in events:
            self._collect(event, self.reply)
        return events

    def finish(self) -> list[Event]:
        """The events the end of the reply completes (an unterminated message); the reply's messages."""
        events = list(self.parser.finish())
        for event in events:
            self._collect(event, self.reply)
        self.reply.messages = list(self.parser.messages)
        return events

    @staticmethod
    def _collect(event: Event, reply: Reply) -> None:
        if isinstance(event, TextDelta):
            if event.channel == "final":
                reply.text += event.text
            elif event.channel == "analysis":
                reply.analysis += event.text
        elif isinstance(event, ToolCall):
            reply.tool_calls.append(event)


def prompt_items(prompt: object) -> list:
    """A prompt that is not a str as a list: token ids or messages (arrays of ids as their lists).
    Raises TypeError / ValueError for anything else, before anything is rendered or fed."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TypeError("a prompt is a str, token ids or messages, not bytes (decode it to a str first)")
    if hasattr(prompt, "tolist") and getattr(prompt, "ndim", 1) == 1:  # numpy / MLX arrays of ids
        prompt = prompt.tolist()
    if not isinstance(prompt, Iterable) or isinstance(prompt, Mapping):
        raise TypeError(f"a prompt is a str, token ids or messages, not {type(prompt).__name__}")
    items = list(prompt)
    if not items:
        raise ValueError("the prompt is empty: give a str, token ids or messages")
    ids = [isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items]
    messages = [isinstance(t, (Message, Mapping)) for t in items]
    if not (all(ids) or all(messages)):
        bad = items[(ids if any(ids) else messages).index(False)]
        raise TypeError(
            f"a prompt's items are all token ids (int) or all messages (Message or dict), not {bad!r}"
        )
    return items


def checked_tools(tools: Sequence[Tool | Mapping[str, Any]] | None) -> list[Tool | Mapping[str, Any]]:
    """`tools` as a list, each a Tool or a dict harmony can render (a name, a JSON schema or none);
    TypeError naming the first that is not, at once rather than at the first reply's rendering."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Iterable):
        raise TypeError(f"tools must be a list of tools, not {type(tools).__name__}")
    tools = list(tools)
    for i, tool in enumerate(tools):
        if not isinstance(tool, (Tool, Mapping)):
            raise TypeError(f"tools[{i}] must be a Tool or a dict, not {type(tool).__name__}")
        try:
            spec = as_tool(tool)
        except (KeyError, AttributeError, TypeError):
            spec = None
        if spec is None or not isinstance(spec.name, str) or not spec.name:
            raise TypeError(f'tools[{i}] needs a "name" (a non-empty str): {tool!r}')
        if spec.parameters is not None and not isinstance(spec.parameters, Mapping):
            raise TypeError(f'tools[{i}] ({spec.name}): "parameters" must be a JSON schema (a dict)')
        if not isinstance(spec.description, str):
            raise TypeError(f'tools[{i}] ({spec.name}): "description" must be a str')
    return tools


def fit_context(options: SamplingOptions, prompt_tokens: int, context: int) -> SamplingOptions:
    """`options` with max_tokens cut to the room a prompt leaves in the context; ValueError if none."""
    room = context - prompt_tokens
    if room < 1:
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens, and this model's context is {context} "
            "(max_position_embeddings in its config.json): it leaves no room for a reply"
        )
    return options if options.max_tokens <= room else dataclasses.replace(options, max_tokens=room)


def _until_end(outputs: queue.SimpleQueue) -> None:
    """Wait for a cancelled sequence's End (one decode step or one prefill chunk away): until then the
    scheduler owns the cache. A Ctrl-C meanwhile is held until the cache is back."""
    interrupted = False
    while True:
        try:
            if isinstance(outputs.get(), End):
                break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Session:
    """History + cache + prefix reuse: one conversation, one reply at a time. Sessions on the same model
    may stream from different threads at once: their replies are decoded together (runtime.py)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: HarmonyTokenizer,
        *,
        reasoning_effort: str = "medium",
        instructions: str | None = None,
        tools: Sequence[Tool | Mapping[str, Any]] | None = None,
        current_date: str | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.reasoning_effort = reasoning_effort
        self.instructions = instructions
        self.tools = checked_tools(tools)
        self.current_date = current_date
        self.messages: list[Message] = []
        self.cache = model.make_cache()
        self.cached_tokens: list[int] = []  # exactly the tokens whose keys/values the cache holds
        self.turn_stats: list[GenerationStats] = []
        self.last_reply: Reply | None = None
        self._streaming = False  # a reply of `stream` is in flight (one at a time: one cache)
        self._streaming_lock = threading.Lock()

    # ---- prompt ---------------------------------------------------------------------------------

    def render(self, messages: Iterable[Message | Mapping[str, Any]] | None = None) -> list[int]:
        return render_conversation(
            self.messages if messages is None else messages,
            self.tokenizer,
            reasoning_effort=self.reasoning_effort,
            tools=self.tools or None,
            developer_instructions=self.instructions,
            current_date=self.current_date,
        )

    def _to_tokens(self, prompt: Prompt | None) -> list[int]:
        if prompt is None:
            return self.render()
        if isinstance(prompt, str):
            return self.render([*self.messages, Message("user", prompt)])
        items = prompt_items(prompt)
        if all(isinstance(t, numbers.Integral) for t in items):
            return [int(t) for t in items]
        return self.render(items)

    # ---- cache ----------------------------------------------------------------------------------

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Rewind the cache to the longest reusable prefix of `prompt`; return its length."""
        # At least one token must be fed, to get the logits of the next one.
        limit = min(_common_prefix(prompt, self.cached_tokens), len(prompt) - 1)
        point = self.cache.rewind_point(limit)
        self.cache.rewind_to(point)
        self.cached_tokens = self.cached_tokens[:point]
        return point

    def _settle(self, fed: list[int]) -> None:
        """Make cached_tokens match the cache, undoing a step that was cut off half-way."""
        target = min(min(c.offset for c in self.cache), len(fed))
        if any(c.offset != target for c in self.cache):
            self.cache.rewind_to(target)
        self.cached_tokens = fed[:target]

    def reset(self) -> None:
        self.messages.clear()
        self.cache = self.model.make_cache()
        self.cached_tokens = []
        self.turn_stats.clear()

    # ---- replies --------------------------------------------------------------------------------

    def constraint(self, constraint: OutputConstraint | Checked | None = None, **keys: Any) -> Checked | None:
        """The checked constraint of a reply: `constraint`, or one made of CONSTRAINT_KEYS with the
        session's tools (None when nothing is constrained). Raises ConstraintError."""
        if constraint is not None and keys:
            raise ConstraintError(f"Give either constraint= or {', '.join(keys)}, not both.")
        if constraint is None:
            if not keys:
                return None
            constraint = OutputConstraint(tools=self.tools, **keys)
        checked = constraint if isinstance(constraint, Checked) else check(constraint, self.tokenizer)
        return checked if checked.constraint.active else None

    def stream(
        self,
        prompt: Prompt | None = None,
        options: SamplingOptions | None = None,
        assistant_prefix: Sequence[int] = (),
        on_prefill: Callable[[int, int], None] | None = None,
        constraint: OutputConstraint | Checked | None = None,
        **sampling: Any,
    ) -> Iterator[Event]:
        """Generate the assistant's reply to `prompt` (default: the session's history).

        prompt: a user message (str, appended to the history), a list of messages, or token ids.
        Yields TextDelta / ToolCall / MessageDone as they happen, and Done last. The history is not
        changed; use `send` for a chat that remembers.
        assistant_prefix: tokens the reply is forced to start with (after `<|start|>assistant`), e.g.
        a tool-call header when a call is required; they count as prompt, and the parser reads them.
        on_prefill(done, total): progress of the prompt's processing (the part not in the cache).
        Structured outputs (structured.py): json_schema=, regex= or grammar= (Lark) make the final
        answer follow it; tool_choice= ("auto", "none", "required" or a function's name) constrains
        calls to the session's tools, their arguments to each tool's parameters; reasoning_budget=
        bounds the analysis (default 3/4 of max_tokens); or pass a whole `constraint`. The reasoning
        stays free; the answer always ends properly within max_tokens when it can fit at all.

        The reply is generated by the model's scheduler (runtime.py), beside those of other Sessions
        on the same model (other threads may stream theirs at the same time); this generator reads
        its tokens, and closing it (or Ctrl-C) stops the reply within one decode step or one prefill
        chunk, with the cache settled.
        """
        keys = {k: sampling.pop(k) for k in CONSTRAINT_KEYS if k in sampling}
        checked = self.constraint(constraint, **keys)
        options = options or SamplingOptions(**sampling)
        with self._one_reply():
            yield from self._stream(prompt, options, assistant_prefix, on_prefill, checked)

    @contextlib.contextmanager
    def _one_reply(self) -> Iterator[None]:
        """Hold the session for one reply: a second one at the same time (another thread, or a new
        stream while one is still open) would rewind the cache the first is filling."""
        with self._streaming_lock:
            if self._streaming:
                raise RuntimeError(
                    "this Session is already generating a reply (one at a time: finish or close that "
                    "stream first, or give each thread a Session of its own)"
                )
            self._streaming = True
        try:
            yield
        finally:
            self._streaming = False

    def _stream(
        self,
        prompt: Prompt | None,
        options: SamplingOptions,
        assistant_prefix: Sequence[int],
        on_prefill: Callable[[int, int], None] | None,
        checked: Checked | None,
    ) -> Iterator[Event]:
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        turn = self.begin(
            prompt,
            options,
            assistant_prefix,
            emit=outputs.put,
            constraint=checked,
            context=self.model.config.max_position_embeddings,
        )
        builder = ReplyBuilder(self.tokenizer, turn.report, assistant_prefix)
        runtime_of(self.model).submit(turn.sequence)
        ended = finished = False
        try:
            while True:
                out = outputs.get()
                if isinstance(out, Token):
                    yield from builder.feed(out.id)
                elif isinstance(out, Progress):
                    if on_prefill is not None:
                        on_prefill(out.done, out.total)
                else:
                    ended = True
                    if out.error is not None:
                        raise out.error
                    break
            finished = True
            yield from builder.finish()
        finally:
            if not ended:
                turn.sequence.cancel()
                _until_end(outputs)
            if not finished:
                builder.finish()  # keep what was generated before the interruption
            self.last_reply = builder.reply
        yield Done(builder.reply)

    def begin(
        self,
        prompt: Prompt | None,
        options: SamplingOptions,
        assistant_prefix: Sequence[int] = (),
        emit: Callable[[Output], None] | None = None,
        constraint: Checked | None = None,
        context: int | None = None,
    ) -> Turn:
        """A reply as the scheduler's sequence (not submitted): the prompt rendered, the cache rewound
        to the longest prefix it can reuse, the marks where a later prompt may leave this one. When
        it ends (End, on the scheduler's thread) the cache is settled and the stats completed before
        `emit` hears of it. `stream` submits and reads it; the server does the same from its event loop.
        constraint: the reply's checked constraint (Session.constraint), enforced token by token.
        context: the most positions the reply may reach (the prompt must leave room; max_tokens is
        cut to what is left); None: no limit (the server applies its own).
        Raises ValueError / TypeError for a bad prompt or options, before the cache is touched."""
        options.check(self.model.config.vocab_size)
        tokens = self._to_tokens(prompt) + list(assistant_prefix)
        if context is not None:
            options = fit_context(options, len(tokens), context)
        turn_constraint = None
        if constraint is not None:
            from .constrained import TurnConstraint  # llguidance is imported only when it is used

            turn_constraint = TurnConstraint(constraint, self.tokenizer, options.max_tokens, assistant_prefix)
        reused = self._reuse_prefix(tokens)
        report = TokenStream()
        report.stats.prompt_tokens = len(tokens)
        report.stats.finish_reason = "interrupted"
        new = tokens[reused:]
        # Mark where a later prompt may leave this one: before each message, and at the end (also one
        # token before it, so regenerating the same prompt needs no prefill).
        marks = [i for i, t in enumerate(new) if t == self.tokenizer.START] + [len(new) - 1, len(new)]
        turn = Turn(tokens, reused, None, report)  # type: ignore[arg-type]
        turn.sequence = SchedulerSequence(
            self.cache,
            new,
            options,
            self.tokenizer.stop_ids,
            mark_at=marks,
            report=report,
            emit=emit,
            on_end=lambda: self._end(turn),
            constraint=turn_constraint,
        )
        return turn

    def _end(self, turn: Turn) -> None:
        """The turn's sequence ended and its cache is back: settle it and complete the stats."""
        report, stats = turn.report, turn.report.stats
        self._settle(turn.tokens + report.tokens)
        stats.context_tokens = self.cache.offset
        if not report.tokens:  # stopped in the prefill: what the cache really took of the prompt
            new = len(turn.tokens) - turn.reused
            stats.prefilled_tokens = max(0, min(new, self.cache.offset - turn.reused))
        if report.tokens and report.tokens[-1] == self.tokenizer.CALL:
            stats.finish_reason = "tool_call"
        self.turn_stats.append(stats)

    def send(self, text: str | None = None, **sampling: Any) -> Iterator[Event]:
        """Chat: add a user message (if given), reply, and keep the reply in the history.

        If the reply is cut off (Ctrl-C, max tokens), what was generated is kept as well, so the
        conversation shown is the conversation remembered. Takes the structured-output keys of
        `stream`; a constraint that cannot be enforced raises ConstraintError before the message is
        added.
        """
        if text is not None and not isinstance(text, str):
            raise TypeError(f"send takes the user's message as a str, not {type(text).__name__}")
        keys = {k: sampling.pop(k) for k in CONSTRAINT_KEYS if k in sampling}
        checked = self.constraint(sampling.pop("constraint", None), **keys)
        prefix, on_prefill = sampling.pop("assistant_prefix", ()), sampling.pop("on_prefill", None)
        options = sampling.pop("options", None) or SamplingOptions(**sampling)
        with self._one_reply():
            if text is not None:
                self.messages.append(Message("user", text))
            self.last_reply = None
            events = self._stream(None, options, prefix, on_prefill, checked)
            try:
                yield from events
            except BaseException:
                if self.last_reply is None and text is not None:  # refused before it began
                    self.messages.pop()
                raise
            finally:
                events.close()  # settles the cache now, not at garbage collection
                if self.last_reply is not None:
                    self.messages.extend(self.last_reply.messages)

    def add_tool_result(self, name: str, content: str) -> None:
        """Record a function tool's output (name without the `functions.` prefix) on the channel of its
        call, as gpt-oss's reference tools answer: a call the model made on analysis is then dropped
        together with its output once the turn is complete (harmony's rule), not leaving it behind."""
        recipient = f"functions.{name}"
        call = next((m for m in reversed(self.messages) if m.recipient == recipient), None)
        channel = call.channel if call is not None and call.channel else "commentary"
        self.messages.append(Message("tool", content, channel=channel, recipient="assistant", name=recipient))


def stream_generate(
    model: Transformer,
    tokenizer: HarmonyTokenizer,
    prompt: Prompt,
    *,
    reasoning_effort: str = "medium",
    instructions: str | None = None,
    tools: Sequence[Tool | Mapping[str, Any]] | None = None,
    **sampling: Any,
) -> Iterator[Event]:
    """Stream one reply: TextDelta events (channel-tagged), ToolCall, MessageDone, then Done.

    sampling: temperature, top_p, min_p, top_k, seed, max_tokens (see SamplingOptions), and the
    structured-output keys json_schema, regex, grammar, tool_choice, reasoning_budget (Session.stream).
    """
    session = Session(
        model, tokenizer, reasoning_effort=reasoning_effort, instructions=instructions, tools=tools
    )
    yield from session.stream(prompt, **sampling)


def generate(model: Transformer, tokenizer: HarmonyTokenizer, prompt: Prompt, **kwargs: Any) -> Reply:
    """One reply, whole: `.text` (final answer), `.analysis`, `.tool_calls`, `.stats`."""
    reply = Reply()
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        if isinstance(event, Done):
            reply = event.reply
    return reply


def batch_generate(
    model: Transformer,
    tokenizer: HarmonyTokenizer,
    prompts: Sequence[Prompt],
    *,
    reasoning_effort: str = "medium",
    instructions: str | None = None,
    tools: Sequence[Tool | Mapping[str, Any]] | None = None,
    max_tokens: int | Sequence[int] = 4096,
    **sampling: Any,
) -> list[Reply]:
    """One reply per prompt, decoded together (continuous batching: runtime.py, scheduler.py), in
    order; each is what `generate` gives for its prompt alone (greedy: the same tokens).

    prompts: each a user message (str), a list of messages, or token ids. max_tokens: one for all,
    or one per prompt. sampling: temperature, top_p, min_p, top_k, seed, logit_bias (each reply with
    a seed draws from a key of its own), and the structured-output keys of Session.stream (each
    reply constrained alike). Up to the runtime's max_batch decode at once (8 by default:
    `runtime_of(model).configure(max_batch=N)`), the rest start as places free up.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of prompts, not {type(prompts).__name__}")
    keys = {k: sampling.pop(k) for k in CONSTRAINT_KEYS if k in sampling}
    many = isinstance(max_tokens, Sequence) and not isinstance(max_tokens, str)
    limits = list(max_tokens) if many else [max_tokens] * len(prompts)  # each checked as an option
    if len(limits) != len(prompts):
        raise ValueError(f"max_tokens: {len(limits)} values for {len(prompts)} prompts")
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    turns, builders = [], []
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        session = Session(
            model, tokenizer, reasoning_effort=reasoning_effort, instructions=instructions, tools=tools
        )
        options = SamplingOptions(max_tokens=limit, **sampling)
        checked = session.constraint(**keys)
        turn = session.begin(
            prompt,
            options,
            emit=lambda out, i=i: outputs.put((i, out)),
            constraint=checked,
            context=model.config.max_position_embeddings,
        )
        turns.append(turn)
        builders.append(ReplyBuilder(tokenizer, turn.report))
    runtime = runtime_of(model)
    ended: set[int] = set()
    submitted = 0
    try:
        for turn in turns:
            runtime.submit(turn.sequence)
            submitted += 1
        while len(ended) < len(turns):
            i, out = outputs.get()
            if isinstance(out, Token):
                builders[i].feed(out.id)
            elif isinstance(out, End):
                ended.add(i)
                if out.error is not None:
                    raise out.error
    finally:
        if len(ended) < submitted:  # an error or Ctrl-C: the others stop too, their caches settle
            for turn in turns[:submitted]:
                turn.sequence.cancel()
            while len(ended) < submitted:
                i, out = outputs.get()
                if isinstance(out, End):
                    ended.add(i)
    replies = []
    for builder in builders:
        builder.finish()
        replies.append(builder.reply)
    return replies

"""A conversation with its KV cache: the one object the chat UI, the server and the API drive.

Each reply renders the whole conversation with harmony, then reuses the longest prefix the cache
already holds. Harmony drops the previous turn's analysis, so the new prompt usually diverges
from the cache right after the previous prompt's `<|start|>assistant`; the cache is marked there
after every prefill, which lets sliding-window layers rewind that far (see cache.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .generation import GenerationStats, SamplingOptions, TokenStream, generate_tokens
from .harmony import Message, MessageDone, StreamParser, TextDelta, Tool, ToolCall, render_conversation
from .model import Transformer
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Session:
    """History + cache + prefix reuse. Not thread-safe: one reply at a time."""

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
        self.tools = list(tools or [])
        self.current_date = current_date
        self.messages: list[Message] = []
        self.cache = model.make_cache()
        self.cached_tokens: list[int] = []  # exactly the tokens whose keys/values the cache holds
        self.turn_stats: list[GenerationStats] = []
        self.last_reply: Reply | None = None

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
        if prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return self.render(prompt)

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
        checked = constraint if isinstance(constraint, Checked) else check(constraint)
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
        """
        keys = {k: sampling.pop(k) for k in CONSTRAINT_KEYS if k in sampling}
        checked = self.constraint(constraint, **keys)
        options = options or SamplingOptions(**sampling)
        turn = None
        if checked is not None:
            from .constrained import TurnConstraint  # llguidance is imported only when it is used

            turn = TurnConstraint(checked, self.tokenizer, options.max_tokens, assistant_prefix)
        tokens = self._to_tokens(prompt) + list(assistant_prefix)
        reused = self._reuse_prefix(tokens)
        report = TokenStream()
        report.stats.prompt_tokens = len(tokens)
        parser = StreamParser(self.tokenizer)
        parser.feed_many(assistant_prefix)  # a header only: no events to report
        reply = Reply(tokens=report.tokens, stats=report.stats)
        report.stats.finish_reason = "interrupted"
        new = tokens[reused:]
        # Mark where a later prompt may leave this one: before each message, and at the end (also one
        # token before it, so regenerating the same prompt needs no prefill).
        marks = [i for i, t in enumerate(new) if t == self.tokenizer.START] + [len(new) - 1, len(new)]
        finished = False
        try:
            for token in generate_tokens(
                self.model,
                new,
                self.cache,
                options,
                set(self.tokenizer.stop_ids),
                report,
                mark_at=marks,
                on_prefill=on_prefill,
                constraint=turn,
            ):
                for event in parser.feed(token):
                    self._collect(event, reply)
                    yield event
            finished = True
            for event in parser.finish():
                self._collect(event, reply)
                yield event
        finally:
            if not finished:
                parser.finish()  # keep what was generated before the interruption
            self._settle(tokens + report.tokens)
            stats = report.stats
            stats.context_tokens = self.cache.offset
            if not report.tokens:  # stopped in the prefill: what the cache really took of the prompt
                stats.prefilled_tokens = max(0, min(len(new), self.cache.offset - reused))
            if report.tokens and report.tokens[-1] == self.tokenizer.CALL:
                stats.finish_reason = "tool_call"
            reply.messages = list(parser.messages)
            self.turn_stats.append(stats)
            self.last_reply = reply
        yield Done(reply)

    @staticmethod
    def _collect(event: Event, reply: Reply) -> None:
        if isinstance(event, TextDelta):
            if event.channel == "final":
                reply.text += event.text
            elif event.channel == "analysis":
                reply.analysis += event.text
        elif isinstance(event, ToolCall):
            reply.tool_calls.append(event)

    def send(self, text: str | None = None, **sampling: Any) -> Iterator[Event]:
        """Chat: add a user message (if given), reply, and keep the reply in the history.

        If the reply is cut off (Ctrl-C, max tokens), what was generated is kept as well, so the
        conversation shown is the conversation remembered. Takes the structured-output keys of
        `stream`; a constraint that cannot be enforced raises ConstraintError before the message is
        added.
        """
        keys = {k: sampling.pop(k) for k in CONSTRAINT_KEYS if k in sampling}
        checked = self.constraint(sampling.pop("constraint", None), **keys)
        if text is not None:
            self.messages.append(Message("user", text))
        self.last_reply = None
        events = self.stream(constraint=checked, **sampling)
        try:
            yield from events
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

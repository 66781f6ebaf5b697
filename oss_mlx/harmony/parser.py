"""The tolerant streaming parser of the model's harmony output: events as tokens arrive (text per
channel, tool calls, finished messages), never an exception on malformed output."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..tokenizer import HarmonyTokenizer, StreamingDecoder
from .messages import CHANNELS, ROLES, Message


@dataclass
class TextDelta:
    """Content text as it streams; ``recipient`` is set for tool-call arguments."""

    channel: str
    text: str
    recipient: str | None = None


@dataclass
class MessageDone:
    """A message ended; ``end_token`` is the id that ended it (``None``: cut off or implicit end)."""

    message: Message
    end_token: int | None = None


@dataclass
class ToolCall:
    """A completed tool call. ``name`` has no ``functions.`` prefix; ``recipient`` is the full address."""

    name: str
    arguments: str
    channel: str
    recipient: str = ""
    content_type: str | None = None


Event = TextDelta | MessageDone | ToolCall

# Past this many header tokens without <|message|>, the "header" is taken to be text.
_MAX_HEADER_TOKENS = 64
_EXPECT_START, _HEADER, _CONTENT = "expect_start", "header", "content"


@dataclass
class _Header:
    role: str | None  # None: not read yet (the header began with <|start|>)
    ids: list[int] = field(default_factory=list)


class StreamParser:
    """Incremental, tolerant parser of the model's harmony output, fed one token id at a time.

    It starts after the prompt's ``<|start|>assistant`` (``role=None``: expects ``<|start|>`` first);
    output that repeats ``<|start|>assistant`` is accepted too. It never raises: a missing
    ``<|channel|>`` means the final channel, a header that cannot be read becomes text (on the final
    channel, or on the known channel it names), stray special tokens inside content are skipped
    (``<|start|>`` and ``<|channel|>`` begin a new message), text after ``<|return|>`` starts a new
    message, and :meth:`finish` flushes a message cut off by the end of the stream.
    """

    def __init__(self, tokenizer: HarmonyTokenizer, role: str | None = "assistant") -> None:
        self.tokenizer = tokenizer
        self.messages: list[Message] = []
        self._specials = {
            name: tokenizer.token_id(f"<|{name}|>")
            for name in ("start", "end", "return", "call", "channel", "message", "constrain", "endoftext")
        }
        self._ends = {self._specials[k] for k in ("end", "return", "call", "endoftext")}
        self._state = _HEADER if role is not None else _EXPECT_START
        self._header = _Header(role)
        self._decoder: StreamingDecoder = tokenizer.streaming_decoder()
        self._message: Message | None = None
        self._parts: list[str] = []

    # -- state, for callers -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``"expect_start"``, ``"header"`` or ``"content"``."""
        return self._state

    @property
    def current_channel(self) -> str | None:
        """Channel of the message whose content is streaming, if any."""
        return self._message.channel if self._message is not None else None

    @property
    def current_recipient(self) -> str | None:
        """Recipient of the message whose content is streaming, if any."""
        return self._message.recipient if self._message is not None else None

    # -- feeding ------------------------------------------------------------------------------------

    def feed(self, token_id: int) -> list[Event]:
        """Process one generated token; return the events it completes."""
        events: list[Event] = []
        sp = self._specials
        if self._state == _EXPECT_START:
            if token_id == sp["start"]:
                self._begin_header(None)
            elif token_id == sp["channel"]:  # <|start|>assistant left out
                self._begin_header("assistant", [token_id])
            elif not self.tokenizer.is_special(token_id):  # text after the end: a new message
                self._begin_header("assistant")
                self._header_token(token_id, events)
            # other special tokens between messages carry nothing: skipped
        elif self._state == _HEADER:
            if token_id == sp["message"]:
                self._open_from_header(events)
            elif token_id in self._ends:
                # A header without content: kept as text only if it is not a header at all.
                if self._header_is_text():
                    self._degrade_header(events)
                    self._close(token_id, events)
                else:
                    self._state = _EXPECT_START
            elif token_id == sp["start"]:
                if self._header_is_text():
                    self._degrade_header(events)
                    self._close(None, events)
                self._begin_header(None)
            else:
                self._header_token(token_id, events)
        else:  # content
            if token_id in self._ends:
                self._close(token_id, events)
            elif token_id == sp["start"]:
                self._close(None, events)
                self._begin_header(None)
            elif token_id == sp["channel"]:
                self._close(None, events)
                self._begin_header("assistant", [token_id])
            elif not self.tokenizer.is_special(token_id):
                self._text(self._decoder.feed(token_id), events)
            # <|message|>, <|constrain|>, reserved ids inside content: skipped
        return events

    def feed_many(self, token_ids: Iterable[int]) -> list[Event]:
        """Process several tokens; return all their events."""
        events: list[Event] = []
        for t in token_ids:
            events += self.feed(t)
        return events

    def finish(self) -> list[Event]:
        """End of stream: flush a message cut off mid-way (as its current channel)."""
        events: list[Event] = []
        if self._state == _HEADER and self._header_is_text():
            self._degrade_header(events)
        if self._state == _CONTENT:
            self._close(None, events)
        self._state = _EXPECT_START
        return events

    # -- internals ----------------------------------------------------------------------------------

    def _begin_header(self, role: str | None, ids: list[int] | None = None) -> None:
        self._state = _HEADER
        self._header = _Header(role, list(ids or ()))

    def _header_is_text(self) -> bool:
        """For a header cut short (no <|message|>): whether it holds words beyond author, channel and
        recipient — those are kept as text, since a header that ends there cannot have a content type."""
        if not self._header.ids:
            return False
        text = self._header_text()
        last = text.replace("<|constrain|>", " <|constrain|>").split()[-1:]
        if last and ("to=".startswith(last[0]) or last[0].startswith(("to=", "<|constrain|>"))):
            return False  # cut inside a recipient or content type: a call's header, never prose
        parsed = self._parse_header(text, self._header.role)
        return parsed is None or parsed.content_type is not None

    def _header_token(self, token_id: int, events: list[Event]) -> None:
        self._header.ids.append(token_id)
        if len(self._header.ids) > _MAX_HEADER_TOKENS or not self._could_be_header():
            self._degrade_header(events)

    def _header_text(self) -> str:
        return self.tokenizer.decode(self._header.ids)

    def _could_be_header(self) -> bool:
        """Whether the header so far can still become a valid one (checked while the role is known,
        so that plain text written without any header streams at once instead of waiting)."""
        if self._header.role is None or self.tokenizer.CHANNEL in self._header.ids:
            return True
        text = self._header_text()
        if "assistant".startswith(text):
            return True
        text = text.removeprefix("assistant")
        return (
            text == ""
            or " to=".startswith(text)
            or text.startswith((" to=", "<|channel|>", "<|constrain|>", " <|constrain|>"))
        )

    def _degrade_header(self, events: list[Event]) -> None:
        """The header is not one: its text becomes content, on the final channel — or on the channel
        named right after <|channel|> when that is a known one, so that garbled analysis stays analysis.
        A leading role word and the channel word are not repeated in the text."""
        ids = self._header.ids
        cut = ids.index(self.tokenizer.CHANNEL) if self.tokenizer.CHANNEL in ids else len(ids)
        head = self.tokenizer.decode_bytes(t for t in ids[:cut] if not self.tokenizer.is_special(t))
        tail = self.tokenizer.decode_bytes(t for t in ids[cut:] if not self.tokenizer.is_special(t))
        role, channel = self._header.role or "assistant", "final"
        first = head.split()[:1]
        if self._header.role is None and first and first[0].decode(errors="replace") in ROLES:
            role = first[0].decode()
            head = head.lstrip()[len(first[0]) :].lstrip()
        first = tail.split()[:1]
        if first and first[0].decode(errors="replace") in CHANNELS:
            channel = first[0].decode()
            tail = tail.lstrip()[len(first[0]) :].lstrip()
        # An address (`to=functions.x`) is header syntax, never text for the reader.
        head, tail = (
            _ADDRESS.sub(b"", part).lstrip() if _ADDRESS.search(part) else part for part in (head, tail)
        )
        self._open(Message(role, "", channel))
        self._text(self._decoder.feed_bytes(head + tail), events)

    def _open_from_header(self, events: list[Event]) -> None:
        parsed = self._parse_header(self._header_text(), self._header.role)
        if parsed is None:
            self._degrade_header(events)
        else:
            self._open(parsed)

    @staticmethod
    def _parse_header(text: str, role: str | None) -> Message | None:
        """Read ``[author] [to=R] [<|channel|>C] [to=R] [content type]``; None if it is not a header."""
        before, sep, after = text.partition("<|channel|>")
        # <|constrain|> is glued to the content type, and may be glued to the word before it.
        words = before.replace("<|constrain|>", " <|constrain|>").split()
        name = None
        if role is None:
            if not words:
                return None
            author = words.pop(0)
            role, _, name = author.partition(":")
            if role not in ROLES:  # an author like functions.get_weather is a tool
                role, name = "tool", author
            name = name or None
        elif words and words[0] == "assistant":  # <|start|>assistant repeated
            words.pop(0)
        channel = None
        after_words = after.replace("<|constrain|>", " <|constrain|>").split()
        if sep and after_words and not after_words[0].startswith(("to=", "<|constrain|>")):
            channel = after_words.pop(0)
        recipient = content_type = None
        for w in words + after_words:
            if w.startswith("to=") and recipient is None:
                recipient = w[3:]
            elif content_type is None:
                content_type = w
            else:
                return None  # more than a header holds
        if content_type == "<|constrain|>":  # a lone constrain: drop it
            content_type = None
        if channel is None:
            is_call = recipient is not None and recipient.startswith("functions.")
            channel = "commentary" if is_call else "final"
        return Message(role, "", channel, recipient, content_type, name)

    def _open(self, message: Message) -> None:
        self._state = _CONTENT
        self._message = message
        self._parts = []
        self._decoder = self.tokenizer.streaming_decoder()

    def _text(self, text: str, events: list[Event]) -> None:
        if text and self._message is not None:
            self._parts.append(text)
            events.append(TextDelta(self._message.channel or "final", text, self._message.recipient))

    def _close(self, end_token: int | None, events: list[Event]) -> None:
        message = self._message
        if message is None:
            self._state = _EXPECT_START
            return
        self._text(self._decoder.finish(), events)
        message.content = "".join(self._parts)
        self.messages.append(message)
        events.append(MessageDone(message, end_token))
        recipient = message.recipient
        if recipient is not None and recipient not in ("all", "assistant", "user"):
            # <|call|> is a tool call; a functions.* message ended by <|end|>/<|return|> is treated as one
            # too (the model meant to call). A message cut off (end_token None) is not executed.
            sp = self._specials
            ended_as_call = end_token == sp["call"] or (
                end_token in (sp["end"], sp["return"]) and recipient.startswith("functions.")
            )
            if ended_as_call:
                events.append(
                    ToolCall(
                        name=recipient.removeprefix("functions."),
                        arguments=message.content,
                        channel=message.channel or "commentary",
                        recipient=recipient,
                        content_type=message.content_type,
                    )
                )
        self._message = None
        self._parts = []
        self._state = _EXPECT_START


_ADDRESS = re.compile(rb"(?:^|\s+)to=\S*")


def parse_completion(
    token_ids: Iterable[int], tokenizer: HarmonyTokenizer, role: str | None = "assistant"
) -> list[Message]:
    """All messages in generated tokens (the tolerant :class:`StreamParser`, then ``finish``)."""
    parser = StreamParser(tokenizer, role=role)
    parser.feed_many(token_ids)
    parser.finish()
    return parser.messages

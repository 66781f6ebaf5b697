"""The harmony chat format of gpt-oss: rendering conversations to tokens and parsing model output.

Our own pure-Python renderer and parser, rather than openai-harmony's, for two reasons: it works
from the vocabulary in the model folder (openai-harmony needs its own download / cache of the
vocabulary), and the parser must be tolerant — openai-harmony's ``StreamableParser`` raises on
malformed output, which a sampled model produces now and then. Rendering is token-for-token identical
to openai-harmony (``render_conversation_for_completion(conv, Role.ASSISTANT)`` and
``render_conversation``); the tests compare the two.

A message renders as::

    <|start|>{author}[ to={recipient}][<|channel|>{channel}][ {content_type}]<|message|>{content}<|end|>

ending in ``<|call|>`` instead when an assistant message has a recipient (a tool call).

The package: `messages` (Message, Tool, the roles and channels), `tools` (a tool's JSON schema as the
TypeScript-like text the model reads), `render` (system, developer and conversation to tokens), `parser`
(the tolerant streaming parser of the model's output). Everything is importable from `oss_mlx.harmony`.
"""

from __future__ import annotations

from .messages import (
    CHANNELS,
    DEFAULT_KNOWLEDGE_CUTOFF,
    DEFAULT_MODEL_IDENTITY,
    REASONING_EFFORTS,
    ROLES,
    Message,
    Tool,
)
from .parser import Event, MessageDone, StreamParser, TextDelta, ToolCall, parse_completion
from .render import render_conversation, render_developer, render_message, render_system
from .tools import as_tool, render_tools

__all__ = [
    "ROLES",
    "CHANNELS",
    "REASONING_EFFORTS",
    "DEFAULT_MODEL_IDENTITY",
    "DEFAULT_KNOWLEDGE_CUTOFF",
    "Message",
    "Tool",
    "as_tool",
    "TextDelta",
    "MessageDone",
    "ToolCall",
    "Event",
    "render_system",
    "render_developer",
    "render_tools",
    "render_message",
    "render_conversation",
    "StreamParser",
    "parse_completion",
]

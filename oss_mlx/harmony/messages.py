"""The harmony message and function tool, and the roles, channels and defaults of the format."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"


@dataclass
class Message:
    """One harmony message.

    A tool call is an assistant message on channel ``"commentary"`` with recipient
    ``"functions.NAME"`` and content type ``"<|constrain|>json"``; its result is a ``"tool"`` message
    whose ``name`` is ``"functions.NAME"`` (rendered as the author) with recipient ``"assistant"``.
    For other roles ``name`` renders as ``role:name``.
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None


@dataclass
class Tool:
    """A function tool; ``parameters`` is a JSON schema (``None``: the function takes no argument).

    ``strict`` is read only when a reply is constrained (structured.py): True, the arguments follow
    ``parameters`` or the request is refused; None, they do when the engine supports the schema, else
    they are any JSON object; False, any JSON object. It does not change the rendering.
    """

    name: str
    description: str = ""
    parameters: dict | None = None
    strict: bool | None = None

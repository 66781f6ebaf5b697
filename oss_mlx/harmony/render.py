"""Rendering to tokens, token-for-token as openai-harmony does: the system message (identity, dates,
reasoning effort, channels), the developer message (instructions, tools) and whole conversations (the
previous turns' analysis dropped, as harmony's rule says)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..tokenizer import HarmonyTokenizer
from .messages import (
    CHANNELS,
    DEFAULT_KNOWLEDGE_CUTOFF,
    DEFAULT_MODEL_IDENTITY,
    REASONING_EFFORTS,
    ROLES,
    Message,
    Tool,
)
from .tools import as_tool, render_tools


def render_system(
    reasoning_effort: str | None = "medium",
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    current_date: str | None = None,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    has_function_tools: bool = False,
) -> str:
    """Text of the system message (``None`` leaves a line out, as openai-harmony does).

    ``has_function_tools`` adds the line routing function calls to the commentary channel; harmony
    adds it whenever the conversation's developer message declares function tools.
    """
    head = []
    if model_identity is not None:
        head.append(model_identity)
    if knowledge_cutoff is not None:
        head.append(f"Knowledge cutoff: {knowledge_cutoff}")
    if current_date is not None:
        head.append(f"Current date: {current_date}")
    sections = ["\n".join(head)] if head else []
    if reasoning_effort is not None:
        sections.append(f"Reasoning: {_effort(reasoning_effort)}")
    channels = "# Valid channels: " + ", ".join(CHANNELS) + ". Channel must be included for every message."
    if has_function_tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections.append(channels)
    return "\n\n".join(sections)


def _effort(effort: Any) -> str:
    value = str(getattr(effort, "value", effort)).lower()
    if value not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, not {effort!r}")
    return value


def render_developer(instructions: str | None = None, tools: Sequence[Tool] | None = None) -> str:
    """Text of the developer message: ``# Instructions`` and the ``functions`` tool namespace."""
    sections = []
    if instructions is not None:
        sections.append(f"# Instructions\n\n{instructions}")
    if tools:
        sections.append("# Tools\n\n" + render_tools(tools))
    return "\n\n".join(sections)


def _as_message(message: Message | Mapping[str, Any]) -> Message:
    if isinstance(message, Message):
        return message
    return Message(**message)


def render_message(message: Message, tokenizer: HarmonyTokenizer) -> list[int]:
    """Tokens of one message, ``<|start|>`` to its end token."""
    m = _as_message(message)
    if m.role not in ROLES:
        raise ValueError(f"unknown role {m.role!r}; expected one of {ROLES}")
    if m.role == "tool":
        if not m.name:
            raise ValueError("a tool message needs the tool's name, e.g. name='functions.get_weather'")
        author = m.name
    else:
        author = f"{m.role}:{m.name}" if m.name is not None else m.role
    ids = [tokenizer.START, *tokenizer.encode(author)]
    # "all" is the implicit recipient: never written out (but it still makes an assistant message a call).
    if m.recipient is not None and m.recipient != "all":
        ids += tokenizer.encode(f" to={m.recipient}")
    if m.channel is not None:
        ids += [tokenizer.CHANNEL, *tokenizer.encode(m.channel)]
    if m.content_type is not None:
        # Only a leading <|constrain|> is the special token (as openai-harmony renders it).
        constrain = "<|constrain|>"
        if m.content_type.startswith(constrain):
            ids += [
                *tokenizer.encode(" "),
                tokenizer.CONSTRAIN,
                *tokenizer.encode(m.content_type[len(constrain) :]),
            ]
        else:
            ids += tokenizer.encode(f" {m.content_type}")
    ids += [tokenizer.MESSAGE, *tokenizer.encode(m.content)]
    ids.append(tokenizer.CALL if m.role == "assistant" and m.recipient is not None else tokenizer.END)
    return ids


def _drop_old_analysis(messages: list[Message]) -> list[Message]:
    # Harmony's rule: the chain of thought of completed turns is not shown again, i.e. every message on
    # the analysis channel before the last final answer is dropped, whoever wrote it: the reasoning,
    # built-in tool calls made in it (python, browser.*, functions called on analysis) and those tools'
    # outputs, which come back on the call's channel. The current turn's (after the last final answer:
    # reasoning and tool use that lead to a pending answer) stays. This is the spec, what transformers'
    # gpt-oss chat template renders, and what openai/harmony PR #96 fixes: openai-harmony 0.0.8 drops
    # the same messages, but only those before the FIRST final answer and only when the conversation
    # ends on one, so from the third turn on it would show the model reasoning it never saw in
    # training. Elsewhere we render token-for-token as openai-harmony does (tested).
    last_final = max(
        (i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"), default=None
    )
    if last_final is None:
        return messages
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]


def render_conversation(
    messages: Iterable[Message | Mapping[str, Any]],
    tokenizer: HarmonyTokenizer,
    *,
    reasoning_effort: str | None = None,
    tools: Sequence[Tool] | None = None,
    developer_instructions: str | None = None,
    for_completion: bool = True,
    current_date: str | None = None,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    drop_analysis: bool = True,
) -> list[int]:
    """Tokens of a conversation, ending with ``<|start|>assistant`` when ``for_completion``.

    A system message (and a developer message, when ``developer_instructions`` or ``tools`` are given)
    is put in front unless ``messages`` already has one of that role. ``reasoning_effort`` defaults to
    medium. Previous turns' analysis is dropped as harmony does (``drop_analysis``).
    """
    msgs = [_as_message(m) for m in messages]
    tool_list = [as_tool(t) for t in tools or ()]
    prefix: list[Message] = []
    if not any(m.role == "system" for m in msgs):
        system = render_system(
            reasoning_effort=reasoning_effort or "medium",
            knowledge_cutoff=knowledge_cutoff,
            current_date=current_date,
            model_identity=model_identity,
            has_function_tools=bool(tool_list),
        )
        prefix.append(Message("system", system))
    if (developer_instructions is not None or tool_list) and not any(m.role == "developer" for m in msgs):
        developer = Message("developer", render_developer(developer_instructions, tool_list))
        # After the caller's own system message(s), if any.
        n_system = next((i for i, m in enumerate(msgs) if m.role != "system"), len(msgs))
        msgs = msgs[:n_system] + [developer] + msgs[n_system:]
    msgs = prefix + msgs
    if drop_analysis:
        msgs = _drop_old_analysis(msgs)
    ids: list[int] = []
    for m in msgs:
        ids += render_message(m, tokenizer)
    if for_completion:
        ids += [tokenizer.START, *tokenizer.encode("assistant")]
    return ids

"""Structured outputs: what a reply must look like, as one grammar over the whole harmony assistant turn.

The grammar covers everything the model writes after the prompt's ``<|start|>assistant``::

    [<|channel|>analysis<|message|> REASONING <|end|><|start|>assistant]     optional, bounded
    then one of
    <|channel|>final<|message|> ANSWER <|return|>
    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|> ARGUMENTS <|call|>

REASONING is any run of ordinary tokens (special tokens are not text), at most ``reasoning_budget``
of them, after which the grammar allows only ``<|end|>``: the chain of thought is not constrained, only
bounded. ANSWER is JSON for a schema, a regular expression, a Lark grammar (llguidance's dialect) or
free text; NAME is one of the offered functions and ARGUMENTS follow that function's ``parameters``.
The call header is accepted in both orders harmony uses (channel first, as the model writes it, or
recipient first, as the renderer writes history). The engine is llguidance (a Rust Earley parser
over byte-level lexers: masks in tens of microseconds, used by llama.cpp, vLLM and SGLang); a schema
it cannot enforce is refused by :func:`check` with its message, naming the keyword.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .harmony import Tool, as_tool

__all__ = ["ConstraintError", "OutputConstraint", "Part", "check", "turn_grammar", "DEFAULT_REASONING_SHARE"]

# Without an explicit budget the reasoning may take this share of max_tokens; the rest is kept for the
# answer (which can always be closed in time: constrained.py).
DEFAULT_REASONING_SHARE = 0.75
# JSON whitespace is matched at most once between two tokens of JSON, at most this long: enough for
# pretty-printing, and a model stuck emitting spaces (OpenAI warns of it in JSON mode) must move on.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,32}"
ANY_JSON: dict = {}  # any JSON value
ANY_OBJECT: dict = {"type": "object"}
NO_ARGUMENTS: dict = {"type": "object", "properties": {}, "additionalProperties": False}
TOOL_CHOICES = ("auto", "none", "required")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class ConstraintError(ValueError):
    """A constraint that cannot be enforced. ``param`` names where it came from (e.g.
    ``response_format.json_schema.schema``), ``keywords`` the schema keywords at fault, if known."""

    def __init__(self, message: str, param: str | None = None, keywords: Sequence[str] = ()):
        super().__init__(message)
        self.message, self.param, self.keywords = message, param, tuple(keywords)


@dataclass
class OutputConstraint:
    """What a reply must be. Exactly one answer format may be set (none: free text); tools and
    tool_choice say which calls may (auto), must (required, a name) or may not (none) be made.

    strict: for the answer's json_schema (a tool's own ``Tool.strict`` for its arguments). True: the
    schema is enforced, or :func:`check` raises naming what the engine cannot enforce. None: enforced
    when the engine supports its keywords, else only valid JSON is (a schema that is wrong, such as an
    unknown type or an unsatisfiable one, raises either way). False: only valid JSON (the schema is
    still shown to the model in the prompt by the caller), OpenAI's non-strict "best effort".
    param / tools_param: how errors name the answer format and the tools' parameters (``{i}`` is the
    tool's index; or a mapping of function name -> name).
    """

    json_schema: Mapping[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None
    tools: Sequence[Tool | Mapping[str, Any]] = ()
    tool_choice: str = "auto"
    reasoning_budget: int | None = None
    strict: bool | None = True
    param: str = "json_schema"
    tools_param: str | Mapping[str, str] = "tools[{i}].parameters"

    @property
    def active(self) -> bool:
        """Whether anything is constrained at all (free text, no tools: nothing is)."""
        has_calls = bool(self.tools) and self.tool_choice != "none"
        formats = (self.json_schema, self.regex, self.grammar)
        return has_calls or any(f is not None for f in formats) or self.reasoning_budget is not None


@dataclass(frozen=True)
class Part:
    """One constrained part of the turn, as the engine will enforce it."""

    grammar: dict  # one llguidance grammar: {"json_schema": ...} | {"lark_grammar": ...}
    enforced: bool = True  # False: a JSON schema fell back to plain JSON (strict None / False)
    note: str = ""  # why it fell back


@dataclass(frozen=True)
class Checked:
    """A constraint whose parts were each compiled once and found enforceable."""

    constraint: OutputConstraint
    answer: Part | None  # None: free text
    calls: tuple[tuple[str, Part], ...] = field(default_factory=tuple)  # (function name, its arguments)

    @property
    def enforced_tools(self) -> dict[str, bool]:
        """Function name -> whether its parameters schema (not only JSON syntax) is enforced."""
        return {name: part.enforced for name, part in self.calls}


def _validate(grammar: dict) -> str | None:
    """llguidance's own error for a grammar, or None when it compiles."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        json.dumps({"grammars": [grammar]})
    )
    return messages[0] if is_error and messages else None


# The largest repetition count a pattern may ask for, nested counts multiplied (`(a{100}){100}` asks
# for 10,000): llguidance's lexer builds a state per count, and its time grows faster than the count
# (docs/SERVER.md, "What a schema may cost"). maxLength / maxItems bound lengths without this cost.
MAX_REPEAT = 10_000
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def repeat_count(pattern: str) -> int:
    """The largest repetition `pattern` (a regex, or Lark text) asks for: counted quantifiers, each
    times the counts of the groups around it. A scan, not a parse (any dialect: escapes, classes and
    groups are all it needs), so it errs high, never low."""
    frames = [[1, 1]]  # per open group: [the largest count inside, the last atom's count]
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            frames[-1][1] = 1
            i += 2
            continue
        if ch == "[":  # a class: one atom, skipped whole ("]" first in it is literal)
            j = i + 1 + (pattern[i + 1 : i + 2] == "^")
            j += pattern[j : j + 1] == "]"
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            frames[-1][1] = 1
            i = j + 1
            continue
        if ch == "(":
            frames.append([1, 1])
        elif ch == ")" and len(frames) > 1:
            inner = frames.pop()[0]
            frames[-1][1] = inner
            frames[-1][0] = max(frames[-1][0], inner)
        elif ch == "{" and (count := _COUNT.match(pattern, i)):
            low, high = count.group(1), count.group(2)
            n = max(int(low), int(high) if high else 0)
            frames[-1][1] *= max(n, 1)
            frames[-1][0] = max(frames[-1][0], frames[-1][1])
            i = count.end()
            continue
        else:
            frames[-1][1] = 1
        i += 1
    while len(frames) > 1:  # unclosed groups (the engine refuses them anyway)
        inner = frames.pop()[0]
        frames[-1][0] = max(frames[-1][0], inner)
    return frames[0][0]


def _patterns(schema: Any) -> list[str]:
    """The regular expressions in a JSON schema: pattern values and patternProperties keys."""
    found, todo = [], [(schema, False)]  # (node, whether it maps names to schemas)
    while todo:
        node, names = todo.pop()
        if isinstance(node, list):
            todo += [(v, False) for v in node]
        elif isinstance(node, Mapping) and names:
            todo += [(v, False) for v in node.values()]
        elif isinstance(node, Mapping):
            for k, v in node.items():
                if k in _DATA_KEYS:
                    continue
                if k == "pattern" and isinstance(v, str):
                    found.append(v)
                if k == "patternProperties" and isinstance(v, Mapping):
                    found += [key for key in v if isinstance(key, str)]
                todo.append((v, k in _SCHEMA_MAPS))
    return found


def _bounded_repeats(patterns: Sequence[str], what: str, param: str) -> None:
    for pattern in patterns:
        n = repeat_count(pattern)
        if n > MAX_REPEAT:
            raise ConstraintError(
                f"{param}: the {what} {pattern[:60]!r} asks for {n:,} repetitions; at most {MAX_REPEAT:,} "
                "can be enforced. Use smaller counts (for a length limit on a JSON string, maxLength).",
                param,
            )


def first_line(message: str) -> str:
    """llguidance's message without the parser state and grammar it appends (kilobytes)."""
    return message.split("\n", 1)[0].strip()


def _start(part: Part, param: str, tokenizer) -> None:
    """Start `part` alone on the model's vocabulary: its first mask. A grammar that admits no text
    (a schema that is only a reference to itself) or whose lexer grows past llguidance's limits fails
    here, before the request is queued, not in the middle of a reply."""
    problem = _start_problem(json.dumps({"grammars": [part.grammar]}), tokenizer)
    if problem is not None:
        raise ConstraintError(f"{param}: {problem}", param)


@functools.lru_cache(maxsize=1024)  # clients send the same tools with every request (~1 ms a part)
def _start_problem(grammar: str, tokenizer) -> str | None:
    import llguidance
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    grammar_tokenizer = tokenizer.grammar_tokenizer()
    m = llguidance.LLMatcher(grammar_tokenizer, grammar, log_level=0)
    words = allocate_token_bitmask(1, grammar_tokenizer.vocab_size)
    if not m.is_error():
        fill_next_token_bitmask(m, words)
    if m.is_error() and "NoExtensionBias" not in m.get_error():  # that one is an empty language
        return f"this constraint cannot be enforced: {first_line(m.get_error())}"
    if m.is_error() or (not words.any() and not m.is_accepting()):
        return "no text satisfies this constraint."
    return None


def _keywords(message: str) -> list[str]:
    """The schema keywords named in llguidance's message, e.g. 'Unimplemented keys: ["not"]'."""
    found = re.search(r"Unimplemented keys: (\[.*?\])", message)
    if found:
        try:
            return [str(k) for k in json.loads(found.group(1))]
        except ValueError:
            pass
    found = re.search(r"Unknown format: (\S+)", message)
    return ["format"] if found else []


def _json_part(schema: Any, strict: bool | None, param: str, fallback: dict) -> Part:
    if not isinstance(schema, Mapping):
        raise ConstraintError(
            f"{param}: a JSON schema must be an object, got {type(schema).__name__}.", param
        )
    if strict is False:
        return Part(_json_grammar(fallback), enforced=False, note="strict is false")
    _bounded_repeats(_patterns(schema), "pattern", param)
    try:
        error = _validate(_json_grammar(schema))
    except RecursionError:
        raise ConstraintError(f"{param}: the JSON schema is nested too deeply.", param) from None
    if error is None:
        return Part(_json_grammar(schema))
    keywords = _keywords(error)
    if strict is None and keywords:  # OpenAI's default, strict where the schema allows it: a feature
        return Part(_json_grammar(fallback), enforced=False, note=error)  # the engine lacks, not an error
    named = f" ({', '.join(keywords)})" if keywords else ""
    raise ConstraintError(
        f"{param}: this JSON schema cannot be enforced{named}: {error}. Remove or rewrite that part of "
        "the schema, or set strict to false to have the schema shown to the model without enforcement.",
        param,
        keywords,
    )


def _json_grammar(schema: Mapping[str, Any]) -> dict:
    # x-guidance (the engine's options) is read at the top level only; the caller's own is replaced.
    body = {k: v for k, v in _dated(schema).items() if k != "x-guidance"}
    return {"json_schema": {**body, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}}


# llguidance's date / time / date-time follow RFC 3339's grammar: year 0000, second 60 and Feb 29 of any
# year pass. Python's datetime, Pydantic and jsonschema refuse those, so the client that asked for the
# format could not read the answer; these patterns allow only what they accept (T and Z upper case,
# fractions to the microsecond, offsets to 23:59).
_YEAR = "(?:000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (
    "(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    "|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
_DATE = f"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP}-02-29)"
_TIME = (
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
DATE_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$"}
_DATA_KEYS = ("enum", "const", "default", "examples")  # values, not schemas: left as they are


def _dated(schema: Any) -> Any:
    """`schema` with each date / time / date-time format (without a pattern of its own) as a pattern."""
    if isinstance(schema, list):
        return [_dated(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: (v if k in _DATA_KEYS else _dated(v)) for k, v in schema.items()}
    fmt = out.get("format")
    if isinstance(fmt, str) and fmt in DATE_PATTERNS and "pattern" not in out:
        del out["format"]
        out["pattern"] = DATE_PATTERNS[fmt]
    return out


def _text_part(grammar: dict, what: str, param: str, source: str) -> Part:
    _bounded_repeats([source], what, param)
    error = _validate(grammar)
    if error is not None:
        raise ConstraintError(f"{param}: the {what} cannot be used: {error}", param)
    return Part(grammar)


def _answer(c: OutputConstraint) -> Part | None:
    given = [k for k in ("json_schema", "regex", "grammar") if getattr(c, k) is not None]
    if len(given) > 1:
        raise ConstraintError(f"Give one answer format, not {' and '.join(given)}.", c.param)
    if c.json_schema is not None:
        return _json_part(c.json_schema, c.strict, c.param, ANY_JSON)
    if c.regex is not None:
        import llguidance

        if not isinstance(c.regex, str):
            raise ConstraintError(f"{c.param}: a regex must be a string.", c.param)
        return _text_part(json.loads(llguidance.LLMatcher.grammar_from_regex(c.regex))["grammars"][0],
                          "regular expression", c.param, c.regex)  # fmt: skip
    if c.grammar is not None:
        if not isinstance(c.grammar, str):
            raise ConstraintError(f"{c.param}: a grammar must be Lark text.", c.param)
        return _text_part({"lark_grammar": c.grammar}, "Lark grammar", c.param, c.grammar)
    return None


def check(constraint: OutputConstraint, tokenizer=None) -> Checked:
    """Compile every part once; raise :class:`ConstraintError` for what cannot be enforced. With the
    model's tokenizer (a HarmonyTokenizer) each part is also started on its vocabulary (_start)."""
    c = constraint
    choice = c.tool_choice
    tools = [as_tool(t) for t in c.tools]
    names = [t.name for t in tools]
    if choice not in TOOL_CHOICES and choice not in names:
        raise ConstraintError(
            f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or the name of an offered function "
            f"({', '.join(names) or 'none offered'}), got {choice!r}.",
            "tool_choice",
        )
    if choice == "required" and not tools:
        raise ConstraintError("tool_choice 'required' needs at least one tool.", "tool_choice")
    if c.reasoning_budget is not None and (
        not isinstance(c.reasoning_budget, int)
        or isinstance(c.reasoning_budget, bool)
        or c.reasoning_budget < 0
    ):
        raise ConstraintError(
            f"reasoning_budget must be a whole number of tokens, 0 or more, got {c.reasoning_budget!r}.",
            "reasoning_budget",
        )
    answer = _answer(c)
    calls: list[tuple[str, Part]] = []
    if choice != "none":
        seen = set()
        for i, tool in enumerate(tools):
            if isinstance(c.tools_param, Mapping):
                param = c.tools_param.get(tool.name, f"tools[{i}].parameters")
            else:
                param = c.tools_param.format(i=i)
            if not _NAME.fullmatch(tool.name):
                raise ConstraintError(
                    f"Invalid function name {tool.name!r}: use letters, digits, '_', '-' and '.'.", param
                )
            if tool.name in seen or (choice not in TOOL_CHOICES and tool.name != choice):
                continue
            seen.add(tool.name)
            schema = NO_ARGUMENTS if tool.parameters is None else tool.parameters
            calls.append((tool.name, _json_part(schema, tool.strict, param, ANY_OBJECT)))
            if tokenizer is not None:
                _start(calls[-1][1], param, tokenizer)
    if tokenizer is not None and answer is not None:
        _start(answer, c.param, tokenizer)
    return Checked(c, answer, tuple(calls))


def reasoning_budget(constraint: OutputConstraint, max_tokens: int) -> int:
    """The reasoning budget in force: the given one, else a share of max_tokens."""
    if constraint.reasoning_budget is not None:
        return constraint.reasoning_budget
    return int(max_tokens * DEFAULT_REASONING_SHARE)


def _literal(text: str) -> str:
    return json.dumps(text)  # Lark string literals take JSON's escapes


def turn_grammar(checked: Checked, max_tokens: int) -> str:
    """The llguidance grammar (its JSON list form) of a whole assistant turn under ``checked``."""
    c = checked.constraint
    budget = reasoning_budget(c, max_tokens)
    grammars: list[dict] = []
    lines = []
    if budget > 0:
        lines += [
            'start: (analysis <|start|> "assistant")? reply',
            'analysis: <|channel|> "analysis" <|message|> thought <|end|>',
            f"thought[max_tokens={budget}]: /(?s:.*)/",
        ]
    else:
        lines.append("start: reply")
    replies = []
    answer_only = c.tool_choice == "none" or not checked.calls
    if c.tool_choice in ("auto", "none") or answer_only:
        replies.append("final")
        if checked.answer is None:
            lines.append('final: <|channel|> "final" <|message|> /(?s:.*)/ <|return|>')
        else:
            grammars.append({**checked.answer.grammar, "name": "answer"})
            lines.append('final: <|channel|> "final" <|message|> @answer <|return|>')
    if not answer_only:
        for i, (name, part) in enumerate(checked.calls):
            grammars.append({**part.grammar, "name": f"arguments_{i}"})
            lines += [
                f"call_{i}: call_head_{i} @arguments_{i} <|call|>",
                f"call_head_{i}: <|channel|> {_literal(f'commentary to=functions.{name} ')} <|constrain|> "
                f'"json" <|message|> | {_literal(f" to=functions.{name}")} <|channel|> "commentary " '
                '<|constrain|> "json" <|message|>',
            ]
            replies.append(f"call_{i}")
    lines.insert(1 if budget <= 0 else 3, "reply: " + " | ".join(replies))
    return json.dumps({"grammars": [{"lark_grammar": "\n".join(lines) + "\n"}, *grammars]})

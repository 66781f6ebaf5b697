"""Request validation shared by both APIs, and the OpenAI-style error object.

Every client mistake becomes an :class:`APIError`, answered as
``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the offending field
(dotted / indexed: ``input[2].call_id``, ``messages[0].content``). Unknown fields are ignored, as
OpenAI's SDKs and agent frameworks send many this server has no use for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ..generation import SamplingOptions
from ..harmony import Tool
from ..structured import ConstraintError, OutputConstraint
from ..tokenizer import HarmonyTokenizer

EFFORTS = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}


class APIError(Exception):
    """An error answered to the client as an OpenAI-style JSON error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 `invalid_json` otherwise)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=no_constants)
        # Lone surrogates ("\ud800") and overflowing numbers (1e999 -> inf) parse, but no JSON answer
        # could quote them back.
        json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


_KINDS = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def field(
    data: Mapping[str, Any],
    key: str,
    kind: str | tuple[str, ...],
    *,
    param: str | None = None,
    required: bool = False,
    default: Any = None,
) -> Any:
    """``data[key]`` checked against one or more JSON kinds; ``null`` counts as absent."""
    param = param or key
    value = data.get(key)
    if value is None:
        if required:
            raise APIError(
                400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
            )
        return default
    kinds = (kind,) if isinstance(kind, str) else kind
    for k in kinds:
        if isinstance(value, _KINDS[k]) and not (k in ("integer", "number") and isinstance(value, bool)):
            if k == "number" and not math.isfinite(value):
                break
            return value
    names = " or ".join(f"{'an' if k[0] in 'aeiou' else 'a'} {k}" for k in kinds)
    raise invalid(
        param, f"Invalid type for '{param}': expected {names}, got {_json_kind(value)}.", "invalid_type"
    )


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def number_in(data: Mapping, key: str, lo: float, hi: float, *, param: str | None = None) -> float | None:
    value = field(data, key, "number", param=param)
    if value is not None and not lo <= value <= hi:
        raise invalid(param or key, f"'{param or key}' must be between {lo} and {hi}, got {value}.")
    return value


def positive_int(data: Mapping, key: str, *, param: str | None = None) -> int | None:
    value = field(data, key, "integer", param=param)
    if value is not None and value < 1:
        raise invalid(param or key, f"'{param or key}' must be at least 1, got {value}.")
    return value


def seed(data: Mapping, key: str = "seed") -> int | None:
    """Any integer; MLX takes an unsigned 64-bit seed, so it is taken modulo 2**64."""
    value = field(data, key, "integer")
    return None if value is None else value % (1 << 64)


def top_k(data: Mapping, vocab_size: int, key: str = "top_k") -> int:
    """0 (off) or a positive count; beyond the vocabulary it is the same as off."""
    value = field(data, key, "integer", default=0)
    if value < 0:
        raise invalid(key, f"'{key}' must be at least 0, got {value}.")
    return 0 if value >= vocab_size else value


def sampling_options(body: Mapping) -> SamplingOptions:
    """temperature (0-2, default 1), top_p (0-1, default 1), and the extras min_p, top_k, seed.
    max_tokens is set later, when the prompt length is known."""
    temperature = number_in(body, "temperature", 0, 2)
    top_p_ = number_in(body, "top_p", 0, 1)
    return SamplingOptions(
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p_ is None else float(top_p_),
        min_p=float(number_in(body, "min_p", 0, 1) or 0.0),
        top_k=top_k(body, HarmonyTokenizer.vocab_size),
        seed=seed(body),
    )


def reasoning_effort(value: Any, param: str) -> str | None:
    """low / medium / high; OpenAI's none / minimal map to low and xhigh to high (gpt-oss has three)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(
            param, f"Invalid type for '{param}': expected a string, got {_json_kind(value)}.", "invalid_type"
        )
    effort = EFFORTS.get(value.lower())
    if effort is None:
        raise invalid(param, f"'{param}' must be one of {', '.join(EFFORTS)}, got {value!r}.")
    return effort


def text_of_parts(content: Any, param: str, text_types: tuple[str, ...]) -> str:
    """A message's content: a string, or a list of text parts (joined). Images, audio, files: 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(
            param,
            f"Invalid type for '{param}': expected a string or an array of content parts.",
            "invalid_type",
        )
    texts = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
        kind = field(part, "type", "string", param=f"{p}.type", required=True)
        if kind == "refusal":
            texts.append(field(part, "refusal", "string", param=f"{p}.refusal", default=""))
        elif kind in text_types:
            texts.append(field(part, "text", "string", param=f"{p}.text", required=True))
        else:
            raise invalid(
                f"{p}.type",
                f"Content parts of type {kind!r} are not supported by this model (text only).",
                "unsupported_value",
            )
    return "".join(texts)


def function_name(name: str, param: str, dotted: bool = False) -> str:
    """A function name as OpenAI allows it (letters, digits, '_', '-'; 1-64); in a conversation's
    history also a dotted address such as ``browser.search``. It is written into harmony headers."""
    allowed = "_-." if dotted else "_-"
    if not 0 < len(name) <= 128 or not all(c.isascii() and (c.isalnum() or c in allowed) for c in name):
        raise invalid(param, f"Invalid function name {name!r}: use letters, digits, '_' and '-'.")
    return name


def function_tool(spec: Mapping[str, Any], param: str) -> Tool:
    """A function tool from ``{"name", "description", "parameters", "strict"}`` (already unwrapped).

    strict (structured.py): true, the arguments follow ``parameters`` or the request is refused (400
    naming what cannot be enforced); absent, they follow it when the engine supports the schema, else
    they are any JSON object (OpenAI: Responses strict by default, Chat Completions best effort; both
    get the stronger of the two here); false, any JSON object."""
    name = function_name(field(spec, "name", "string", param=f"{param}.name", required=True), f"{param}.name")
    description = field(spec, "description", "string", param=f"{param}.description", default="")
    parameters = field(spec, "parameters", "object", param=f"{param}.parameters")
    strict = field(spec, "strict", "boolean", param=f"{param}.strict")
    return Tool(name, description, parameters, strict)


REQUIRED = "You must call one of the functions in the functions namespace before you answer."


def tool_choice_rules(
    choice: Any, tools: list[Tool], param: str = "tool_choice"
) -> tuple[list[Tool], str | None]:
    """Which tools to render, and a sentence added to the instructions (or None).

    auto: all tools. none: no tools are rendered, so the model cannot see them. required / a named
    function: the tools (only the named one) are rendered and the instructions ask for a call; the
    reply is constrained to be such a call (tool_choice_mode, structured.py).
    """
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return [], None
    if choice == "required":
        if not tools:
            raise invalid(param, "tool_choice 'required' needs at least one tool in 'tools'.")
        return tools, REQUIRED
    if isinstance(choice, dict):
        kind = field(choice, "type", "string", param=f"{param}.type", required=True)
        if kind == "function":
            fn = field(choice, "function", "object", param=f"{param}.function", default=choice)
            name = field(fn, "name", "string", param=f"{param}.name", required=True)
            chosen = [t for t in tools if t.name == name]
            if not chosen:
                raise invalid(param, f"tool_choice names function {name!r}, which is not in 'tools'.")
            return chosen, f"You must call the function functions.{name} before you answer."
        if kind == "allowed_tools":
            # Responses: {type, mode, tools}; Chat Completions: {type, allowed_tools: {mode, tools}}
            choice = field(choice, "allowed_tools", "object", param=f"{param}.allowed_tools", default=choice)
            names = set()
            for i, t in enumerate(field(choice, "tools", "array", param=f"{param}.tools", required=True)):
                p = f"{param}.tools[{i}]"
                if not isinstance(t, dict):
                    raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
                fn = field(t, "function", "object", param=f"{p}.function", default=t)
                names.add(field(fn, "name", "string", param=f"{p}.name", required=True))
            allowed = [t for t in tools if t.name in names]
            mode = field(choice, "mode", "string", param=f"{param}.mode", default="auto")
            if mode not in ("auto", "required"):
                raise invalid(
                    f"{param}.mode", f"tool_choice.mode must be 'auto' or 'required', got {mode!r}."
                )
            if mode == "required":
                if not allowed:
                    raise invalid(param, "tool_choice allows no tool that is in 'tools'.")
                return allowed, REQUIRED
            return allowed, None
        raise invalid(
            f"{param}.type",
            f"Unsupported tool_choice type {kind!r}; use function or allowed_tools.",
            "unsupported_value",
        )
    raise invalid(param, f"tool_choice must be 'auto', 'none', 'required' or an object, got {choice!r}.")


def join_instructions(*parts: str | None) -> str | None:
    texts = [p for p in parts if p]
    return "\n\n".join(texts) if texts else None


def tool_choice_mode(choice: Any, rendered: list[Tool]) -> str:
    """The constraint's tool_choice for the tools `tool_choice_rules` rendered: "auto", "none",
    "required" (one of them) or a function's name (checked there already)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto"
    if choice.get("type") == "allowed_tools":
        inner = choice.get("allowed_tools", choice)
        return "required" if inner.get("mode") == "required" else "auto"
    return rendered[0].name  # type function: rendered is the named tool


def _format_spec(fmt: Any, param: str) -> tuple[str | None, Mapping[str, Any]]:
    """(type, the object holding name / schema / strict) of a response format; 400 if malformed."""
    if fmt is None:
        return None, {}
    if not isinstance(fmt, dict):
        raise invalid(param, f"Invalid type for '{param}': expected an object.", "invalid_type")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None, {}
    if kind == "json_object":
        return kind, {}
    if kind == "json_schema":
        nested = isinstance(fmt.get("json_schema"), dict)  # Chat Completions nests it, Responses not
        spec = fmt["json_schema"] if nested else fmt
        where = f"{param}.json_schema" if nested else param
        if not isinstance(spec.get("schema"), dict):
            raise invalid(f"{where}.schema", "A json_schema response format needs a 'schema' object.")
        field(spec, "strict", "boolean", param=f"{where}.strict")
        return kind, {**spec, "_param": f"{where}.schema"}
    raise invalid(f"{param}.type", f"Unsupported response format type {kind!r}.", "unsupported_value")


def response_format_text(fmt: Any, param: str) -> str | None:
    """Harmony's ``# Response Formats`` section for a JSON schema (the model is told the schema; the
    answer is also constrained to it: answer_constraint)."""
    kind, spec = _format_spec(fmt, param)
    if kind == "json_object":
        return "Respond with a single JSON object and nothing else."
    if kind != "json_schema":
        return None
    name = spec.get("name") if isinstance(spec.get("name"), str) else "response"
    description = spec.get("description")
    comment = f"// {description}\n" if isinstance(description, str) and description else ""
    body = json.dumps(spec["schema"], separators=(",", ":"), ensure_ascii=False)
    return f"# Response Formats\n\n## {name}\n\n{comment}{body}"


def output_constraint(
    fmt: Any, param: str, tools: list[Tool], choice: Any, tool_params: dict
) -> OutputConstraint:
    """What the reply is constrained to: the response format's JSON (json_object: any object;
    json_schema: its schema, strict as the request says), calls of the rendered tools per tool_choice.
    tool_params: function name -> the request field of its parameters (for errors)."""
    kind, spec = _format_spec(fmt, param)
    answer: dict[str, Any] = {}
    if kind == "json_object":
        answer = {"json_schema": {"type": "object"}, "param": param}
    elif kind == "json_schema":
        answer = {"json_schema": spec["schema"], "strict": spec.get("strict"), "param": spec["_param"]}
    return OutputConstraint(
        tools=tools, tool_choice=tool_choice_mode(choice, tools), tools_param=tool_params, **answer
    )


def constraint_error(e: ConstraintError) -> APIError:
    """A constraint the engine cannot enforce, as the 400 naming the field and the keyword."""
    code = "unsupported_json_schema" if e.keywords else "invalid_value"
    return APIError(400, e.message, e.param, code)

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

from ..harmony import Tool

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
    except (ValueError, UnicodeDecodeError) as e:
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


def function_tool(spec: Mapping[str, Any], param: str) -> Tool:
    """A function tool from ``{"name", "description", "parameters"}`` (already unwrapped)."""
    name = field(spec, "name", "string", param=f"{param}.name", required=True)
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise invalid(f"{param}.name", f"Invalid function name {name!r}: use letters, digits, '_' and '-'.")
    description = field(spec, "description", "string", param=f"{param}.description", default="")
    parameters = field(spec, "parameters", "object", param=f"{param}.parameters")
    return Tool(name, description, parameters)


def tool_choice_rules(
    choice: Any, tools: list[Tool], param: str = "tool_choice"
) -> tuple[list[Tool], str | None]:
    """Which tools to render, and a sentence added to the instructions (or None).

    auto: all tools. none: no tools are rendered, so the model cannot see them. required / a named
    function: the tools (only the named one) are rendered and the instructions ask for a call; this is
    not enforced by constrained decoding — the model may still answer in text.
    """
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return [], None
    if choice == "required":
        if not tools:
            raise invalid(param, "tool_choice 'required' needs at least one tool in 'tools'.")
        return tools, "You must call one of the functions in the functions namespace before you answer."
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            spec = choice.get("function") if isinstance(choice.get("function"), dict) else choice
            name = spec.get("name")
            chosen = [t for t in tools if t.name == name]
            if not isinstance(name, str) or not chosen:
                raise invalid(param, f"tool_choice names function {name!r}, which is not in 'tools'.")
            return chosen, f"You must call the function functions.{name} before you answer."
        if kind == "allowed_tools":
            names = set()
            for t in choice.get("tools") or []:
                if isinstance(t, dict):
                    spec = t.get("function") if isinstance(t.get("function"), dict) else t
                    names.add(spec.get("name"))
            allowed = [t for t in tools if t.name in names]
            mode = choice.get("mode", "auto")
            if mode not in ("auto", "required"):
                raise invalid(
                    f"{param}.mode", f"tool_choice.mode must be 'auto' or 'required', got {mode!r}."
                )
            if mode == "required":
                if not allowed:
                    raise invalid(param, "tool_choice allows no tool that is in 'tools'.")
                return (
                    allowed,
                    "You must call one of the functions in the functions namespace before you answer.",
                )
            return allowed, None
        raise invalid(
            f"{param}.type", f"Unsupported tool_choice type {kind!r}; use function or allowed_tools."
        )
    raise invalid(param, f"tool_choice must be 'auto', 'none', 'required' or an object, got {choice!r}.")


def response_format_text(fmt: Any, param: str) -> str | None:
    """Harmony's ``# Response Formats`` section for a JSON schema (a request to the model, not enforced)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid(param, f"Invalid type for '{param}': expected an object.", "invalid_type")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return "Respond with a single JSON object and nothing else."
    if kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else fmt
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise invalid(f"{param}.schema", "A json_schema response format needs a 'schema' object.")
        name = spec.get("name") if isinstance(spec.get("name"), str) else "response"
        description = spec.get("description")
        comment = f"// {description}\n" if isinstance(description, str) and description else ""
        body = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        return f"# Response Formats\n\n## {name}\n\n{comment}{body}"
    raise invalid(f"{param}.type", f"Unsupported response format type {kind!r}.", "unsupported_value")


def join_instructions(*parts: str | None) -> str | None:
    texts = [p for p in parts if p]
    return "\n\n".join(texts) if texts else None

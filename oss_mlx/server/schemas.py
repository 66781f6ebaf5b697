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

EFFORTS = {
    "none": "low",
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}

# Bounds on what a request may hold (docs/SERVER.md "Limits" says which are OpenAI's own).
MAX_DEPTH = 64  # nesting of JSON objects and arrays in a body; deep enough for any real schema
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's
IDENTIFIER_CHARS = 64  # user, safety_identifier, prompt_cache_key, call ids (OpenAI: 64)
FUNCTION_NAME_CHARS = 64  # OpenAI's
MAX_TOOLS = 128  # OpenAI's, also for tool_calls in one message and allowed_tools
MAX_STOP = 4  # OpenAI's
SHOWN_CHARS = 80  # of a client's value quoted back in an error message


def clip(text: str) -> str:
    """A client's text shown in an error message, cut short: errors must not echo megabytes."""
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def brief(value: Any) -> str:
    """A client's value quoted (repr) in an error message, cut short."""
    return clip(repr(value))


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
    """The request body as a JSON object: 400 ``invalid_json`` if it is not one, 400
    ``nesting_too_deep`` past :data:`MAX_DEPTH` levels (before anything recursive sees it)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    too_deep = f"The request body nests JSON objects and arrays deeper than {MAX_DEPTH} levels"
    try:
        data = json.loads(raw, parse_constant=no_constants)
    except RecursionError:  # the C parser's own guard, far past MAX_DEPTH
        raise APIError(400, too_deep + ".", code="nesting_too_deep") from None
    except ValueError as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    path = deepest_path(data, MAX_DEPTH)
    if path is not None:
        top = path.split(".")[0].split("[")[0]
        raise APIError(400, f"{too_deep} (at '{clip(path)}').", top, "nesting_too_deep")
    try:
        # Lone surrogates ("\ud800") and overflowing numbers (1e999 -> inf) parse, but no JSON answer
        # could quote them back.
        json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    return data


def deepest_path(data: Any, limit: int) -> str | None:
    """The path (``tools[0].parameters.properties``) of the first value nested more than ``limit``
    levels deep, or None. Iterative: the point is to refuse before recursive code (deepcopy, the
    renderer, json.dumps) runs into Python's recursion limit."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    deepest = 0
    while stack:
        value, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if depth > limit:
                break
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in children if isinstance(v, dict | list))
    if deepest <= limit:
        return None
    # Found: walk again with paths (only on this error path, so the common case builds none).
    paths: list[tuple[Any, int, str]] = [(data, 1, "")]
    while paths:
        value, depth, path = paths.pop()
        if depth > limit:
            return path
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if isinstance(v, dict | list):
                key = str(k)[:32]
                sub = f"{path}[{k}]" if isinstance(k, int) else (f"{path}.{key}" if path else key)
                paths.append((v, depth + 1, sub))
    return None


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
            if k == "number" and not _finite(value):
                raise invalid(param, f"Invalid '{param}': the number {brief(value)} is out of range.")
            return value
    names = " or ".join(f"{'an' if k[0] in 'aeiou' else 'a'} {k}" for k in kinds)
    raise invalid(
        param, f"Invalid type for '{param}': expected {names}, got {_json_kind(value)}.", "invalid_type"
    )


def _finite(value: int | float) -> bool:
    """Whether a JSON number is a finite float (an integer beyond float's range is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


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


def bounded_string(
    data: Mapping, key: str, limit: int, *, param: str | None = None, required: bool = False
) -> str | None:
    """A string of at most ``limit`` characters."""
    param = param or key
    value = field(data, key, "string", param=param, required=required)
    if value is not None and len(value) > limit:
        raise invalid(
            param,
            f"Invalid '{param}': string too long ({len(value)} characters; at most {limit} are allowed).",
            "string_above_max_length",
        )
    return value


def bounded_array(data: Mapping, key: str, limit: int, *, param: str | None = None) -> list:
    """An array of at most ``limit`` entries (absent: empty)."""
    param = param or key
    value = field(data, key, "array", param=param, default=[])
    if len(value) > limit:
        raise invalid(
            param,
            f"Invalid '{param}': array too long ({len(value)} entries; at most {limit} are allowed).",
            "array_above_max_length",
        )
    return value


def metadata(data: Mapping, key: str = "metadata") -> dict[str, str]:
    """OpenAI's metadata: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    value = field(data, key, "object", default={})
    if len(value) > METADATA_KEYS:
        raise invalid(
            key,
            f"Invalid '{key}': {len(value)} keys; at most {METADATA_KEYS} are allowed.",
            "object_above_max_properties",
        )
    for k, v in value.items():
        if len(k) > METADATA_KEY_CHARS:
            raise invalid(
                key,
                f"Invalid '{key}': the key {brief(k)} is {len(k)} characters long; at most "
                f"{METADATA_KEY_CHARS} are allowed.",
                "string_above_max_length",
            )
        param = f"{key}.{clip(k)}"
        if not isinstance(v, str):
            raise invalid(param, f"Invalid '{param}': metadata values must be strings.", "invalid_type")
        bounded_string(value, k, METADATA_VALUE_CHARS, param=param)
    return dict(value)


def identifiers(data: Mapping, keys: tuple[str, ...]) -> dict[str, str | None]:
    """Opaque end-user / cache identifiers (``user``, ``safety_identifier``, ``prompt_cache_key``):
    strings of at most 64 characters, with no effect on the reply."""
    return {k: bounded_string(data, k, IDENTIFIER_CHARS) for k in keys}


SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast")


def refuse_unsupported(body: Mapping, names: tuple[str, ...]) -> None:
    """Parameters this server does not implement: a 400 naming the first one set."""
    for name in names:
        if body.get(name) not in (None, False):
            raise invalid(name, f"'{name}' is not supported by this server.", "unsupported_parameter")


def no_effect_parameters(body: Mapping) -> dict[str, Any]:
    """Parameters that change nothing here, checked and echoed as what was done: ``service_tier``
    (one tier, 'default') and ``prompt_cache_retention`` (the prompt cache is in memory only)."""
    tier = field(body, "service_tier", "string")
    if tier is not None and tier not in SERVICE_TIERS:
        raise invalid(
            "service_tier", f"'service_tier' must be one of {', '.join(SERVICE_TIERS)}, got {brief(tier)}."
        )
    retention = field(body, "prompt_cache_retention", "string")
    if retention not in (None, "in-memory", "in_memory"):
        raise invalid(
            "prompt_cache_retention",
            f"prompt_cache_retention {brief(retention)} is not supported: this server keeps its prompt "
            "cache in memory only ('in-memory').",
            "unsupported_value",
        )
    return {"service_tier": "default", "prompt_cache_retention": retention}


def number_in(data: Mapping, key: str, lo: float, hi: float, *, param: str | None = None) -> float | None:
    value = field(data, key, "number", param=param)
    if value is not None and not lo <= value <= hi:
        raise invalid(param or key, f"'{param or key}' must be between {lo} and {hi}, got {brief(value)}.")
    return value


def positive_int(data: Mapping, key: str, *, param: str | None = None) -> int | None:
    value = field(data, key, "integer", param=param)
    if value is not None and value < 1:
        raise invalid(param or key, f"'{param or key}' must be at least 1, got {brief(value)}.")
    return value


def seed(data: Mapping, key: str = "seed") -> int | None:
    """Any integer; MLX takes an unsigned 64-bit seed, so it is taken modulo 2**64."""
    value = field(data, key, "integer")
    return None if value is None else value % (1 << 64)


def top_k(data: Mapping, vocab_size: int, key: str = "top_k") -> int:
    """0 (off) or a positive count; beyond the vocabulary it is the same as off."""
    value = field(data, key, "integer", default=0)
    if value < 0:
        raise invalid(key, f"'{key}' must be at least 0, got {brief(value)}.")
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
        raise invalid(param, f"'{param}' must be one of {', '.join(EFFORTS)}, got {brief(value)}.")
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
                f"Content parts of type {brief(kind)} are not supported by this model (text only).",
                "unsupported_value",
            )
    return "".join(texts)


def function_name(name: str, param: str, dotted: bool = False) -> str:
    """A function name as OpenAI allows it (letters, digits, '_', '-'; 1-64); in a conversation's
    history also a dotted address such as ``browser.search``. It is written into harmony headers."""
    allowed = "_-." if dotted else "_-"
    limit = 2 * FUNCTION_NAME_CHARS if dotted else FUNCTION_NAME_CHARS
    if not 0 < len(name) <= limit or not all(c.isascii() and (c.isalnum() or c in allowed) for c in name):
        raise invalid(
            param, f"Invalid function name {brief(name)}: use 1-{limit} letters, digits, '_' and '-'."
        )
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


def tool_list(body: Mapping, parse_one: Any) -> list[Tool]:
    """``tools`` (at most 128, OpenAI's limit), each an object read by ``parse_one(spec, param)``;
    a name given twice is a 400 (a call could not say which one it meant)."""
    tools: list[Tool] = []
    for i, spec in enumerate(bounded_array(body, "tools", MAX_TOOLS)):
        p = f"tools[{i}]"
        if not isinstance(spec, dict):
            raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
        tool = parse_one(spec, p)
        if any(t.name == tool.name for t in tools):
            raise invalid(p, f"The function name {brief(tool.name)} is used by two tools.")
        tools.append(tool)
    return tools


REQUIRED = "You must call one of the functions in the functions namespace before you answer."


def tool_choice_rules(
    choice: Any, tools: list[Tool], param: str = "tool_choice"
) -> tuple[list[Tool], str | None]:
    """Which tools to render, and a sentence added to the instructions (or None).

    auto: all tools. none: no tools are rendered, so the model cannot see them. required / a named
    function: the tools (only the named one) are rendered and the instructions ask for a call; the
    reply is constrained to be such a call (output_constraint, structured.py).
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
                raise invalid(param, f"tool_choice names function {brief(name)}, which is not in 'tools'.")
            return chosen, f"You must call the function functions.{name} before you answer."
        if kind == "allowed_tools":
            # Responses: {type, mode, tools}; Chat Completions: {type, allowed_tools: {mode, tools}}
            choice = field(choice, "allowed_tools", "object", param=f"{param}.allowed_tools", default=choice)
            names = set()
            for i, t in enumerate(bounded_array(choice, "tools", MAX_TOOLS, param=f"{param}.tools")):
                p = f"{param}.tools[{i}]"
                if not isinstance(t, dict):
                    raise invalid(p, f"Invalid type for '{p}': expected an object.", "invalid_type")
                fn = field(t, "function", "object", param=f"{p}.function", default=t)
                names.add(field(fn, "name", "string", param=f"{p}.name", required=True))
            if not names:
                raise invalid(f"{param}.tools", "tool_choice allowed_tools needs at least one tool.")
            allowed = [t for t in tools if t.name in names]
            mode = field(choice, "mode", "string", param=f"{param}.mode", default="auto")
            if mode not in ("auto", "required"):
                raise invalid(
                    f"{param}.mode", f"tool_choice.mode must be 'auto' or 'required', got {brief(mode)}."
                )
            if mode == "required":
                if not allowed:
                    raise invalid(param, "tool_choice allows no tool that is in 'tools'.")
                return allowed, REQUIRED
            return allowed, None
        raise invalid(
            f"{param}.type",
            f"Unsupported tool_choice type {brief(kind)}; use function or allowed_tools.",
            "unsupported_value",
        )
    raise invalid(param, f"tool_choice must be 'auto', 'none', 'required' or an object, got {brief(choice)}.")


def tool_choice_echo(choice: Any) -> Any:
    """A validated tool_choice as the Responses API writes it back (only the fields that mean
    something, so that nothing else a client sent is kept in the response store)."""
    if not isinstance(choice, dict):
        return choice if choice is not None else "auto"
    if choice["type"] == "function":
        return {"type": "function", "name": choice.get("function", choice)["name"]}
    inner = choice.get("allowed_tools", choice)
    return {
        "type": "allowed_tools",
        "mode": inner.get("mode") or "auto",
        "tools": [{"type": "function", "name": t.get("function", t)["name"]} for t in inner["tools"]],
    }


def response_format(fmt: Any, param: str) -> tuple[str | None, dict]:
    """Harmony's ``# Response Formats`` section for a JSON schema (the model is told the schema; the
    answer is also held to it: output_constraint) or None, and the format as the Responses API echoes
    it (its meaningful fields only)."""
    if fmt is None:
        return None, {"type": "text"}
    if not isinstance(fmt, dict):
        raise invalid(param, f"Invalid type for '{param}': expected an object.", "invalid_type")
    kind = field(fmt, "type", "string", param=f"{param}.type", default="text")
    if kind == "text":
        return None, {"type": "text"}
    if kind == "json_object":
        return "Respond with a single JSON object and nothing else.", {"type": "json_object"}
    if kind == "json_schema":
        nested = isinstance(fmt.get("json_schema"), dict)  # Chat Completions nests it
        spec, p = (fmt["json_schema"], f"{param}.json_schema") if nested else (fmt, param)
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise invalid(f"{p}.schema", "A json_schema response format needs a 'schema' object.")
        name = field(spec, "name", "string", param=f"{p}.name", default="response")
        if not 0 < len(name) <= FUNCTION_NAME_CHARS or not all(
            c.isascii() and (c.isalnum() or c in "_-") for c in name
        ):
            raise invalid(
                f"{p}.name",
                f"Invalid response format name {brief(name)}: use 1-{FUNCTION_NAME_CHARS} letters, digits, "
                "'_' and '-'.",
            )
        description = field(spec, "description", "string", param=f"{p}.description")
        strict = field(spec, "strict", "boolean", param=f"{p}.strict")
        comment = f"// {description}\n" if description else ""
        body = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        echo = {
            "type": "json_schema",
            "name": name,
            "schema": schema,
            "description": description,
            "strict": strict,
        }
        return f"# Response Formats\n\n## {name}\n\n{comment}{body}", echo
    raise invalid(f"{param}.type", f"Unsupported response format type {brief(kind)}.", "unsupported_value")


def join_instructions(*parts: str | None) -> str | None:
    texts = [p for p in parts if p]
    return "\n\n".join(texts) if texts else None


def tool_choice_mode(choice: Any, rendered: list[Tool]) -> str:
    """The constraint's tool_choice for the tools `tool_choice_rules` rendered: "auto", "none",
    "required" (one of them) or a function's name (validated there already)."""
    if not isinstance(choice, dict):
        return choice or "auto"
    if choice.get("type") == "allowed_tools":
        inner = choice.get("allowed_tools", choice)
        return "required" if inner.get("mode") == "required" else "auto"
    return rendered[0].name  # type function: rendered is the named tool


def output_constraint(
    fmt: Any, param: str, tools: list[Tool], choice: Any, tool_params: Mapping[str, str]
) -> OutputConstraint:
    """What the reply is held to: the response format's JSON (json_object: any object; json_schema:
    its schema, strict as the request says) and calls of the rendered tools as tool_choice says.
    tool_params: function name -> the request field of its parameters (for errors)."""
    _, echo = response_format(fmt, param)  # validated there
    answer: dict[str, Any] = {}
    if echo["type"] == "json_object":
        answer = {"json_schema": {"type": "object"}, "param": param}
    elif echo["type"] == "json_schema":
        where = f"{param}.json_schema" if isinstance(fmt.get("json_schema"), dict) else param
        answer = {"json_schema": echo["schema"], "strict": echo["strict"], "param": f"{where}.schema"}
    return OutputConstraint(
        tools=tools, tool_choice=tool_choice_mode(choice, tools), tools_param=dict(tool_params), **answer
    )


def constraint_error(e: ConstraintError) -> APIError:
    """A constraint the engine cannot enforce, as the 400 naming the field and the keyword."""
    code = "unsupported_json_schema" if e.keywords else "invalid_value"
    message = e.message if len(e.message) <= 600 else e.message[:599] + "…"  # llguidance may quote a lot
    return APIError(400, message, e.param, code)

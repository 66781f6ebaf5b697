"""Function tools as the model reads them: a namespace of TypeScript-like declarations, each tool's
JSON schema turned into text exactly as openai-harmony writes it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from .messages import Tool


def render_tools(tools: Sequence[Tool], namespace: str = "functions") -> str:
    """The TypeScript-like declaration of function tools that harmony puts in the developer message."""
    body = "\n\n".join(_render_tool(as_tool(t)) for t in tools)
    return f"## {namespace}\n\nnamespace {namespace} {{\n\n{body}\n\n}} // namespace {namespace}"


def as_tool(tool: Tool | Mapping[str, Any]) -> Tool:
    if isinstance(tool, Tool):
        return tool
    # OpenAI-style {"type": "function", "function": {...}} or a bare {"name", "description", "parameters"}.
    spec = tool.get("function", tool)
    return Tool(spec["name"], spec.get("description") or "", spec.get("parameters"), spec.get("strict"))


def _render_tool(tool: Tool) -> str:
    # The description is split like Rust's str::lines(): a final newline adds no empty comment line.
    lines = tool.description.split("\n")
    if tool.description.endswith("\n"):
        lines.pop()
    out = "".join(f"// {line.removesuffix(chr(13))}\n" for line in lines if tool.description)
    if tool.parameters is None:
        return f"{out}type {tool.name} = () => any;"
    return f"{out}type {tool.name} = (_: {_ts_type(tool.parameters, '')}) => any;"


# JSON schema -> TypeScript-like text. The layout (indents, where comments go, which keywords count)
# follows openai-harmony's output exactly, quirks included, since the model was trained on it.
# Handled: object/string/number/integer/boolean/array types, type lists, string enums, nullable,
# oneOf, required, description/title/examples/default comments. Anything else renders as `any`.


def _ts_type(schema: Any, indent: str) -> str:
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        return _ts_inline_union(one_of, indent)
    typ = schema.get("type")
    if isinstance(typ, list):
        names = ["number" if t == "integer" else t for t in typ if isinstance(t, str)]
        return " | ".join(names) if names else "any"
    if typ == "object":
        return _ts_object(schema, indent)
    if typ == "string":
        enum = schema.get("enum")
        values = [f'"{v}"' for v in enum if isinstance(v, str)] if isinstance(enum, list) else []
        return " | ".join(values) if values else "string"
    if typ in ("number", "integer"):
        return "number"
    if typ == "boolean":
        return "boolean"
    if typ == "array":
        return f"{_ts_type(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _nullable(schema: Any, ts: str) -> str:
    if isinstance(schema, dict) and schema.get("nullable") is True and "null" not in ts:
        return f"{ts} | null"
    return ts


def _text(schema: Mapping[str, Any], key: str) -> str | None:
    value = schema.get(key)
    return value if isinstance(value, str) else None


def _ts_inline_union(variants: list, indent: str) -> str:
    # A oneOf in type position (parameters, array items): each variant on its own line.
    out = ""
    for variant in variants:
        ts = _nullable(variant, _ts_type(variant, indent + "   "))
        comments = []
        if isinstance(variant, dict):
            if (desc := _text(variant, "description")) is not None:
                comments.append(desc)
            if "default" in variant:
                comments.append(f"default: {_default_text(variant['default'], quote_strings=True)}")
        out += f"\n{indent} | {ts}" + (f" // {' '.join(comments)}" if comments else "")
    return out


def _ts_object(schema: Mapping[str, Any], indent: str) -> str:
    out = f"{indent}// {desc}\n" if (desc := _text(schema, "description")) is not None else ""
    out += "{\n"
    props = schema.get("properties")
    if isinstance(props, dict):
        req = schema.get("required")
        required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
        for key, prop in props.items():
            out += _ts_property(key, prop, key in required, indent)
    return out + f"{indent}}}"


def _ts_property(key: str, prop: Any, required: bool, indent: str) -> str:
    opt = "" if required else "?"
    if not isinstance(prop, dict):
        return f"{indent}{key}{opt}: any,\n"
    out = ""
    if (title := _text(prop, "title")) is not None:
        out += f"{indent}// {title}\n{indent}//\n"
    desc = _text(prop, "description")
    one_of = prop.get("oneOf")
    if desc is not None and not isinstance(one_of, list):
        out += f"{indent}// {desc}\n"
    examples = prop.get("examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
    if isinstance(one_of, list):
        return out + _ts_union_property(key, opt, prop, one_of, desc, indent)
    ts = _nullable(prop, _ts_type(prop, indent + "    "))
    out += f"{indent}{key}{opt}: {ts}"
    if "default" in prop:
        return out + f", // default: {_default_text(prop['default'], quote_strings=not _has_enum(prop))}\n"
    return out + ",\n"


def _ts_union_property(
    key: str, opt: str, prop: Mapping, variants: list, desc: str | None, indent: str
) -> str:
    # With a property description, the first variant's description is not repeated (and the property's
    # is left out when it equals the first variant's) — openai-harmony's behaviour.
    first = variants[0] if variants else None
    first_desc = _text(first, "description") if isinstance(first, dict) else None
    out = ""
    if desc is not None and first_desc != desc:
        out += f"{indent}// {desc}\n"
    if "default" in prop:
        out += f"{indent}// default: {_default_text(prop['default'], quote_strings=True)}\n"
    out += f"{indent}{key}{opt}:\n"
    for i, variant in enumerate(variants):
        ts = _nullable(variant, _ts_type(variant, indent + "   "))
        comments = []
        if isinstance(variant, dict):
            vdesc = _text(variant, "description")
            if vdesc is not None and not (desc is not None and (i == 0 or vdesc == desc)):
                comments.append(vdesc)
            if "default" in variant:
                quote = not _has_enum(variant)
                comments.append(f"default: {_default_text(variant['default'], quote_strings=quote)}")
        out += f"{indent} | {ts}" + (f" // {' '.join(comments)}" if comments else "") + "\n"
    return out + f"{indent},\n"


def _has_enum(schema: Mapping[str, Any]) -> bool:
    # Next to a property, a string default is shown bare when the schema lists an enum (its values are
    # already shown quoted), else in quotes.
    enum = schema.get("enum")
    return isinstance(enum, list) and len(enum) > 0


def _default_text(value: Any, quote_strings: bool) -> str:
    if isinstance(value, str):
        return f'"{value}"' if quote_strings else value
    return _json(value)


def _json(value: Any) -> str:
    """Compact JSON as serde_json (Rust) writes it: no spaces, UTF-8 kept, floats in shortest form."""
    if isinstance(value, float) and math.isfinite(value):
        return _float_text(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json(str(k))}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _float_text(value: float) -> str:
    """Shortest round-trip digits, laid out as Rust's ryu does (Python's repr switches to exponent
    notation at other magnitudes: 1e-05 vs 0.00001, 1e+16 vs 1e16)."""
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    _, digit_tuple, exp = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    sign_text = "-" if value < 0 else ""
    n, point = len(digits), len(digits) + exp  # value = 0.digits * 10**point
    if exp >= 0 and point <= 16:
        text = digits + "0" * exp + ".0"
    elif 0 < point <= 16:
        text = f"{digits[:point]}.{digits[point:]}"
    elif -5 < point <= 0:
        text = "0." + "0" * -point + digits
    elif n == 1:
        text = f"{digits}e{point - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign_text + text

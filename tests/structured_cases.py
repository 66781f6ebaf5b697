"""JSON schemas the structured-output tests generate against (random weights), and their validation.

Each covers a feature the engine enforces; together: nested objects, arrays with min/max items,
enums, anyOf / oneOf / allOf, required and optional properties, string formats, patterns and
lengths, numbers with bounds and multipleOf, additionalProperties false, $defs/$ref (recursive too),
const, type lists with null, tuples (prefixItems), top-level arrays.
"""

from __future__ import annotations

import json

import jsonschema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict] = {
    "object": PERSON,
    "nested": {
        "type": "object",
        "properties": {
            "person": PERSON,
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["person", "address"],
        "additionalProperties": False,
    },
    "array-bounds": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "any-of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 10}, {"type": "boolean"}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "number"}, "c": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "date-time": {
        "type": "object",
        "properties": {"at": {"type": "string", "format": "date-time"}},
        "required": ["at"],
    },
    "date-and-time": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "clock": {"type": "string", "format": "time"},
        },
        "required": ["day", "clock"],
        "additionalProperties": False,
    },
    "email": {
        "type": "object",
        "properties": {"email": {"type": "string", "format": "email"}},
        "required": ["email"],
        "additionalProperties": False,
    },
    "uuid-ip": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "v4": {"type": "string", "format": "ipv4"},
            "v6": {"type": "string", "format": "ipv6"},
        },
        "required": ["id", "v4", "v6"],
        "additionalProperties": False,
    },
    "number-bounds": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "temp": {"type": "number", "minimum": -40.5, "exclusiveMaximum": 60},
        },
        "required": ["ratio", "temp"],
        "additionalProperties": False,
    },
    "multiple-of": {
        "type": "object",
        "properties": {"step": {"type": "integer", "multipleOf": 5, "minimum": 5, "maximum": 100}},
        "required": ["step"],
        "additionalProperties": False,
    },
    "defs-ref": {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "minLength": 3, "maxLength": 8},
                    "qty": {"type": "integer"},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 2}
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "recursive": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["v", "kids"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
        "items": False,
        "minItems": 3,
    },
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "event"}, "version": {"const": 2}},
        "required": ["kind", "version"],
        "additionalProperties": False,
    },
    "nullable": {
        "type": "object",
        "properties": {
            "note": {"type": ["string", "null"]},
            "count": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
        "required": ["note", "count"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "one-of": {
        "oneOf": [
            {
                "type": "object",
                "properties": {"type": {"const": "circle"}, "r": {"type": "number", "minimum": 0}},
                "required": ["type", "r"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"type": {"const": "square"}, "side": {"type": "number", "minimum": 0}},
                "required": ["type", "side"],
                "additionalProperties": False,
            },
        ]
    },
    "string-length": {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 4, "maxLength": 6}},
        "required": ["word"],
        "additionalProperties": False,
    },
    "top-level-array": {
        "type": "array",
        "items": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
        "minItems": 1,
        "maxItems": 3,
    },
    "all-of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "string", "maxLength": 5}}, "required": ["b"]},
        ]
    },
    "map": {
        "type": "object",
        "additionalProperties": {"type": "integer", "minimum": 0},
        "maxProperties": 3,
    },
}

CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


def validate(text: str, schema: dict) -> object:
    """Parse `text` as JSON and validate it against `schema` (formats checked); return the value."""
    value = json.loads(text)
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator, format_checker=CHECKER)
    return value

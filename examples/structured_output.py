"""Structured outputs with the Python API: the answer follows a JSON schema, enforced token by token.

python examples/structured_output.py [MODEL] [--max-tokens N]     (default: openai/gpt-oss-20b, 1024)

The model reasons freely first (the analysis is not constrained), then writes its final answer, which
can only be JSON valid for the schema; the reply always ends properly within max_tokens when the
shortest valid JSON fits at all. regex= and grammar= (Lark) work the same way; tool_choice= forces
tool calls (see forced_tool_call.py for that through the server).
"""

import argparse
import json

import oss_mlx
from oss_mlx.harmony import TextDelta

RECIPE = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "servings": {"type": "integer", "minimum": 1, "maximum": 12},
        "ingredients": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"item": {"type": "string"}, "grams": {"type": "number", "minimum": 0}},
                "required": ["item", "grams"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 8,
        },
        "vegetarian": {"type": "boolean"},
    },
    "required": ["name", "servings", "ingredients", "vegetarian"],
    "additionalProperties": False,
}

parser = argparse.ArgumentParser(description="A JSON answer, enforced, with the oss-mlx Python API.")
parser.add_argument("model", nargs="?", default="openai/gpt-oss-20b", help="hub id or folder")
parser.add_argument("--max-tokens", type=int, default=1024, help="cap on the reply (reasoning included)")
args = parser.parse_args()
model, tokenizer = oss_mlx.load(args.model)

# Whole: reply.text is the JSON, reply.analysis the reasoning before it.
question = "A simple pancake recipe, as JSON."
reply = oss_mlx.generate(
    model, tokenizer, question, json_schema=RECIPE, reasoning_effort="low", max_tokens=args.max_tokens
)
recipe = json.loads(reply.text)
print("recipe:", json.dumps(recipe, ensure_ascii=False))
print(f"finish: {reply.stats.finish_reason}, mask {reply.stats.mask_ms_per_token:.3f} ms/token")

# Streamed, in a conversation: the JSON arrives as it is written.
chat = oss_mlx.Session(model, tokenizer, reasoning_effort="low")
text = ""
for event in chat.send("Now a soup, as JSON.", json_schema=RECIPE, max_tokens=args.max_tokens):
    if isinstance(event, TextDelta) and event.channel == "final":
        text += event.text
print("soup:", json.dumps(json.loads(text), ensure_ascii=False))

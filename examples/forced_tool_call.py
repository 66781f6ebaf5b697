"""A forced tool call through the `openai` client against `oss-mlx serve`: tool_choice "required"
(one of the offered functions) and a named function, in both APIs.

    oss-mlx serve --model openai/gpt-oss-20b            # in another terminal
    python examples/forced_tool_call.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]

With tool_choice required or named, the reply is always a well-formed call of an offered function
(the model may reason first), its arguments valid for the function's parameters (enforced unless
the tool says strict: false). Harmony writes one call per reply, with or without parallel_tool_calls.
"""

from __future__ import annotations

import argparse
import json
import os

from openai import OpenAI

MODEL = "gpt-oss"

FUNCTIONS = [
    {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
    {
        "name": "get_time",
        "description": "Current time in an IANA timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
        "strict": True,
    },
]


def compact(arguments: str) -> str:
    """The arguments on one line (they are always valid JSON here: the server enforces it)."""
    return json.dumps(json.loads(arguments), ensure_ascii=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("OSS_MLX_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("OSS_MLX_API_KEY", "not-needed"))
    p.add_argument("--max-tokens", type=int, default=1024, help="cap on each reply (reasoning included)")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    question = "I am flying to Tokyo tomorrow."

    for choice in ("required", {"type": "function", "name": "get_time"}):
        r = client.responses.create(
            model=MODEL,
            input=question,
            tools=[{"type": "function", **f} for f in FUNCTIONS],
            tool_choice=choice,
            max_output_tokens=args.max_tokens,
        )
        for call in (item for item in r.output if item.type == "function_call"):
            print(f"responses ({json.dumps(choice)}): {call.name}({compact(call.arguments)})")

    chat_choice = {"type": "function", "function": {"name": "get_time"}}
    for choice in ("required", chat_choice):
        c = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            tools=[{"type": "function", "function": f} for f in FUNCTIONS],
            tool_choice=choice,
            max_completion_tokens=args.max_tokens,
        )
        for call in c.choices[0].message.tool_calls or []:
            print(f"chat ({json.dumps(choice)}): {call.function.name}({compact(call.function.arguments)})")


if __name__ == "__main__":
    main()

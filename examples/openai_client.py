"""The official `openai` Python client against `oss-mlx serve`: Responses API and Chat Completions,
plain, streamed, and a tool-call round trip in each.

    oss-mlx serve --model openai/gpt-oss-20b            # in another terminal
    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]

gpt-oss reasons before it answers: the server returns that chain of thought apart from the answer
(Responses: `reasoning` items; Chat Completions: `message.reasoning_content`), never inside the text.
"""

from __future__ import annotations

import argparse
import json
import os

from openai import OpenAI

MODEL = "gpt-oss"  # any name the server accepts for its model (see GET /v1/models)


def get_weather(city: str) -> dict:
    """The 'tool' the model may call; a real one would ask a weather service."""
    return {"city": city, "temp_c": 21, "sky": "clear"}


TOOLS = {"get_weather": get_weather}
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
    "required": ["city"],
}
RESPONSES_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_SCHEMA,
    }
]
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_SCHEMA,
        },
    }
]


def run_tool(name: str, arguments: str) -> str:
    try:
        result = TOOLS[name](**json.loads(arguments))
    except Exception as e:  # noqa: BLE001 - a model can write bad arguments; tell it so
        result = {"error": f"{type(e).__name__}: {e}"}
    return json.dumps(result)


# ---- Responses API -------------------------------------------------------------------------------------


def responses_demo(client: OpenAI) -> None:
    print("== responses: plain")
    r = client.responses.create(
        model=MODEL,
        instructions="Answer in one sentence.",
        input="Why is the sky blue?",
        reasoning={"effort": "low"},
        max_output_tokens=1024,
    )
    for item in r.output:
        if item.type == "reasoning":
            print("  [reasoning]", " ".join(c.text for c in item.content or []))
    print("  [answer]", r.output_text)
    print(
        f"  usage: {r.usage.input_tokens} in ({r.usage.input_tokens_details.cached_tokens} cached), "
        f"{r.usage.output_tokens} out ({r.usage.output_tokens_details.reasoning_tokens} reasoning)"
    )

    print("== responses: streamed")
    stream = client.responses.create(
        model=MODEL, input="Name three prime numbers.", reasoning={"effort": "low"}, stream=True
    )
    for event in stream:
        if event.type == "response.reasoning_text.delta":
            print(f"\x1b[2m{event.delta}\x1b[0m", end="", flush=True)
        elif event.type == "response.output_text.delta":
            print(event.delta, end="", flush=True)
        elif event.type == "response.output_item.done" and event.item.type == "reasoning":
            print()
        elif event.type in ("response.completed", "response.incomplete"):
            print(f"\n  ({event.response.status}, {event.response.usage.output_tokens} tokens)")

    print("== responses: tool call round trip (previous_response_id)")
    r = client.responses.create(model=MODEL, input="What's the weather in Paris?", tools=RESPONSES_TOOLS)
    for _ in range(5):  # a few rounds at most
        calls = [item for item in r.output if item.type == "function_call"]
        if not calls:
            break
        outputs = []
        for call in calls:
            print(f"  model calls {call.name}({call.arguments})")
            outputs.append(
                {
                    "type": "function_call_output",
                    "call_id": call.call_id,
                    "output": run_tool(call.name, call.arguments),
                }
            )
        # The server keeps the conversation: send only the tool outputs. Tools are not carried over.
        r = client.responses.create(
            model=MODEL, previous_response_id=r.id, input=outputs, tools=RESPONSES_TOOLS
        )
    print("  [answer]", r.output_text)
    print(f"  cached prompt tokens: {r.usage.input_tokens_details.cached_tokens} of {r.usage.input_tokens}")


# ---- Chat Completions ----------------------------------------------------------------------------------


def chat_demo(client: OpenAI) -> None:
    print("== chat: plain")
    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        reasoning_effort="low",
    )
    message = r.choices[0].message
    print("  [reasoning]", (message.model_extra or {}).get("reasoning_content"))
    print("  [answer]", message.content, f"({r.choices[0].finish_reason})")

    print("== chat: streamed")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three prime numbers."}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage:
            print(f"\n  ({chunk.usage.completion_tokens} tokens)")
        for choice in chunk.choices:
            thought = (choice.delta.model_extra or {}).get("reasoning_content")
            if thought:
                print(f"\x1b[2m{thought}\x1b[0m", end="", flush=True)
            if choice.delta.content:
                print(choice.delta.content, end="", flush=True)

    print("== chat: tool call round trip")
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    for _ in range(5):
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=CHAT_TOOLS)
        message = r.choices[0].message
        if not message.tool_calls:
            break
        # Send the assistant turn back as it came (reasoning_content included: gpt-oss keeps its
        # chain of thought across the tool calls of one turn), then one tool message per call.
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            print(f"  model calls {call.function.name}({call.function.arguments})")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call.id,
                    "content": run_tool(call.function.name, call.function.arguments),
                }
            )
    print("  [answer]", message.content)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("OSS_MLX_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("OSS_MLX_API_KEY", "not-needed"))
    p.add_argument("--only", choices=["responses", "chat"], help="run one half only")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    if args.only != "chat":
        responses_demo(client)
    if args.only != "responses":
        chat_demo(client)


if __name__ == "__main__":
    main()

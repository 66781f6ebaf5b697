"""An OpenAI Agents SDK agent with a tool, running on gpt-oss through `oss-mlx serve`.

    pip install openai-agents                    # not a dependency of oss-mlx
    oss-mlx serve --model openai/gpt-oss-20b      # in another terminal
    python examples/agents_sdk.py [--api chat|responses] [--stream] [--base-url URL] [--api-key KEY]

Both of the SDK's model classes work against the server: OpenAIChatCompletionsModel
(/v1/chat/completions, the default here) and OpenAIResponsesModel (/v1/responses). Tracing is switched
off: it would upload traces to OpenAI's platform, which a local model has no account with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from openai.types.shared import Reasoning


@function_tool
def get_weather(city: str) -> str:
    """Current weather in a city.

    Args:
        city: The city's name, e.g. Paris.
    """
    return json.dumps({"city": city, "temp_c": 21, "sky": "clear"})


async def main() -> None:
    p = argparse.ArgumentParser(description="OpenAI Agents SDK on oss-mlx serve")
    p.add_argument("--base-url", default=os.environ.get("OSS_MLX_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("OSS_MLX_API_KEY", "not-needed"))
    p.add_argument("--model", default="gpt-oss")
    p.add_argument("--api", choices=["chat", "responses"], default="chat")
    p.add_argument("--stream", action="store_true", help="print the answer as it is written")
    p.add_argument("question", nargs="?", default="What's the weather in Paris? Answer in one sentence.")
    args = p.parse_args()

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key)
    if args.api == "chat":
        model = OpenAIChatCompletionsModel(model=args.model, openai_client=client)
    else:
        model = OpenAIResponsesModel(model=args.model, openai_client=client)
    agent = Agent(
        name="Weather assistant",
        instructions="You help with the weather. Use the get_weather tool; never guess.",
        tools=[get_weather],
        model=model,
        model_settings=ModelSettings(reasoning=Reasoning(effort="low"), max_tokens=2048),
    )

    if not args.stream:
        result = await Runner.run(agent, args.question, max_turns=5)
        print(result.final_output)
        return
    result = Runner.run_streamed(agent, args.question, max_turns=5)
    async for event in result.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            print(event.data.delta, end="", flush=True)
        elif event.type == "run_item_stream_event" and event.item.type == "tool_call_item":
            raw = event.item.raw_item
            print(f"[calls {getattr(raw, 'name', '?')}({getattr(raw, 'arguments', '')})]", flush=True)
    print()


if __name__ == "__main__":
    asyncio.run(main())

"""Structured outputs through the official `openai` client against `oss-mlx serve`: `.parse()` with a
Pydantic model, in the Responses API and in Chat Completions.

    oss-mlx serve --model openai/gpt-oss-20b            # in another terminal
    python examples/openai_structured.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]

The client sends the model's JSON schema (strict); the server enforces it while the model writes its
final answer (its reasoning stays free), so the answer always parses into the model class. A schema
the server cannot enforce is refused with a 400 that names the keyword.
"""

from __future__ import annotations

import argparse
import os
from typing import Literal

from openai import OpenAI
from pydantic import BaseModel, Field

MODEL = "gpt-oss"  # any name the server accepts for its model (see GET /v1/models)


class Ingredient(BaseModel):
    item: str
    grams: float = Field(ge=0)


class Recipe(BaseModel):
    name: str
    kind: Literal["sweet", "savory"]
    servings: int = Field(ge=1, le=12)
    ingredients: list[Ingredient] = Field(min_length=1, max_length=6)
    note: str | None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=os.environ.get("OSS_MLX_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("OSS_MLX_API_KEY", "not-needed"))
    p.add_argument("--max-tokens", type=int, default=2048, help="cap on each reply (reasoning included)")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    r = client.responses.parse(
        model=MODEL,
        input="A pancake recipe.",
        text_format=Recipe,
        reasoning={"effort": "low"},
        max_output_tokens=args.max_tokens,
    )
    recipe = r.output_parsed
    print("responses:", type(recipe).__name__, recipe.model_dump_json())

    c = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "A tomato soup recipe."}],
        response_format=Recipe,
        reasoning_effort="low",
        max_completion_tokens=args.max_tokens,
    )
    recipe = c.choices[0].message.parsed
    print("chat:", type(recipe).__name__, recipe.model_dump_json())


if __name__ == "__main__":
    main()

"""The Python API in a few lines: load, one reply, streaming, a multi-turn session, several prompts at once.

python examples/python_api.py [MODEL] [--max-tokens N]     (default: openai/gpt-oss-20b, 2048 tokens a reply)
"""

import argparse

import oss_mlx
from oss_mlx.harmony import TextDelta

parser = argparse.ArgumentParser(description="The oss-mlx Python API in a few lines.")
parser.add_argument("model", nargs="?", default="openai/gpt-oss-20b", help="hub id or folder")
parser.add_argument("--max-tokens", type=int, default=2048, help="cap on each reply (reasoning included)")
args = parser.parse_args()
cap = args.max_tokens
model, tokenizer = oss_mlx.load(args.model)

# One reply, whole.
reply = oss_mlx.generate(
    model, tokenizer, "Why is the sky blue? One sentence.", reasoning_effort="low", max_tokens=cap
)
print("reasoning:", reply.analysis)
print("answer:", reply.text)
print(f"{reply.stats.generated_tokens} tokens at {reply.stats.generation_tps:.1f} tok/s")

# Streaming: the answer as it is written, the chain of thought kept apart.
for event in oss_mlx.stream_generate(model, tokenizer, "Write a haiku about MLX.", max_tokens=cap):
    if isinstance(event, TextDelta) and event.channel == "final":
        print(event.text, end="", flush=True)
print()

# A conversation: history and KV cache are kept, so turn 2 only processes what is new.
chat = oss_mlx.Session(model, tokenizer, reasoning_effort="medium")
for question in ["My name is Ada.", "What is my name?"]:
    events = chat.send(question, max_tokens=cap)
    answer = "".join(e.text for e in events if isinstance(e, TextDelta) and e.channel == "final")
    print(f"> {question}\n{answer}")
print("prefilled per turn:", [s.prefilled_tokens for s in chat.turn_stats])

# Several prompts decoded together (continuous batching): each reply is what `generate` gives it alone.
questions = ["Name a prime number.", "Name a colour.", "Name a planet."]
replies = oss_mlx.batch_generate(model, tokenizer, questions, reasoning_effort="low", max_tokens=cap)
for question, r in zip(questions, replies):
    print(f"{question} -> {r.text!r} ({r.stats.generated_tokens} tokens)")

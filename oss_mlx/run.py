"""`oss-mlx generate`: one prompt in, the answer out (streams to stdout; reasoning to stderr)."""

from __future__ import annotations

import argparse
import sys

from .distributed import cli as distributed
from .loader import DEFAULT_MODEL


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="oss-mlx generate", description=__doc__)
    p.add_argument("prompt", nargs="?", help="the user message (default: read standard input)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, checkpoint folder or converted folder")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--system", help="developer instructions")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument(
        "--temperature", type=float, default=1.0, help="0 = greedy (default 1.0, as OpenAI advises)"
    )
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--show-reasoning", action="store_true", help="print the chain of thought to stderr")
    p.add_argument("--stats", action="store_true", help="print speed and memory to stderr at the end")
    p.add_argument("--memory-budget", metavar="SIZE", help='e.g. "6GB": stream experts from disk')
    distributed.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.max_tokens < 1:
        print("oss-mlx generate: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        print("oss-mlx generate: empty prompt (pass it as an argument or on standard input)", file=sys.stderr)
        return 2

    import oss_mlx
    from oss_mlx.config import ConfigError
    from oss_mlx.distributed.errors import DistributedError
    from oss_mlx.tokenizer import TokenizerError
    from oss_mlx.weights import CheckpointError

    try:
        if distributed.requested(args):  # several ranks: this is rank 0 (the others never return)
            model, tokenizer = distributed.load(args.model, args)
        else:
            model, tokenizer = oss_mlx.load(args.model, memory_budget=args.memory_budget)
    except (CheckpointError, ConfigError, TokenizerError, ValueError, DistributedError) as e:
        print(f"oss-mlx generate: {e}", file=sys.stderr)
        return 1
    try:
        return _answer(args, prompt, model, tokenizer)
    except DistributedError as e:
        sys.stdout.write("\n")
        print(f"oss-mlx generate: {e}", file=sys.stderr)
        return 1


def _answer(args: argparse.Namespace, prompt: str, model, tokenizer) -> int:
    import oss_mlx
    from oss_mlx.harmony import TextDelta
    from oss_mlx.session import Done

    events = oss_mlx.stream_generate(
        model,
        tokenizer,
        prompt,
        reasoning_effort=args.reasoning_effort,
        instructions=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    for event in events:
        if isinstance(event, TextDelta):
            if event.channel == "final":
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif event.channel == "analysis" and args.show_reasoning:
                sys.stderr.write(event.text)
        elif isinstance(event, Done):
            sys.stdout.write("\n")
            s = event.reply.stats
            if args.stats:
                print(
                    f"prompt {s.prompt_tokens} tok at {s.prompt_tps:.1f} tok/s, "
                    f"generated {s.generated_tokens} tok at {s.generation_tps:.1f} tok/s, "
                    f"peak {s.peak_memory_gb:.2f} GB ({s.finish_reason})",
                    file=sys.stderr,
                )
    return 0

"""`oss-mlx generate`: one prompt in, the answer out (streams to stdout; reasoning to stderr)."""

from __future__ import annotations

import argparse
import sys

from .distributed import cli as distributed
from .hub import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    from . import cli_args as A

    p = A.parser("oss-mlx generate", __doc__)
    p.add_argument("prompt", nargs="?", help="the user message (default: read standard input)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, checkpoint folder or converted folder")
    p.add_argument(
        "--reasoning-effort", choices=("low", "medium", "high"), default="medium", help="how long it thinks"
    )
    p.add_argument("--system", help="developer instructions")
    p.add_argument("--max-tokens", type=A.MAX_TOKENS, default=2048, help="per reply, reasoning included")
    p.add_argument(
        "--temperature", type=A.TEMPERATURE, default=1.0, help="0 = greedy; 1.0 as OpenAI advises; 0 to 2"
    )
    p.add_argument("--top-p", type=A.TOP_P, default=1.0, help="nucleus sampling, above 0 and at most 1")
    p.add_argument("--seed", type=A.SEED, help="0 to 2^64-1; -1 or none: random (default: random)")
    p.add_argument("--show-reasoning", action="store_true", help="print the chain of thought to stderr")
    p.add_argument("--stats", action="store_true", help="print speed and memory to stderr at the end")
    p.add_argument("--ignore-memory", action="store_true", help="load even if the planner says it won't fit")
    p.add_argument(
        "--memory-budget", type=A.size, metavar="SIZE", help='e.g. "6GB": stream experts from disk'
    )
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (oss-mlx finetune's or PEFT's)")
    distributed.add_arguments(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if sys.stdout is None:  # closed (`>&-`): the answer could go nowhere; said before the model loads
        print(
            "oss-mlx generate: error: standard output is closed: send it to a file or a pipe", file=sys.stderr
        )
        return 2
    if args.prompt is not None:
        prompt = args.prompt
    else:
        if sys.stdin is None:  # closed (`<&-`), not empty
            print(
                "oss-mlx generate: error: standard input is closed: pass the prompt as an argument or on "
                "standard input",
                file=sys.stderr,
            )
            return 2
        if sys.stdin.isatty():
            print(
                "oss-mlx generate: type the prompt, then Ctrl-D (or pass it as an argument)", file=sys.stderr
            )
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            print(
                f"oss-mlx generate: standard input is not UTF-8 text ({e.reason} at byte {e.start})",
                file=sys.stderr,
            )
            return 2
    if not prompt.strip():
        print("oss-mlx generate: empty prompt (pass it as an argument or on standard input)", file=sys.stderr)
        return 2

    import oss_mlx
    from oss_mlx.harmony import TextDelta
    from oss_mlx.plan_cli import refuse_unless_fits
    from oss_mlx.session import Done

    if distributed.requested(args):  # several ranks: this is rank 0 (the others never return)
        model, tokenizer = distributed.load(args.model, args)
    else:
        if not (args.memory_budget or args.ignore_memory) and refuse_unless_fits(
            "oss-mlx generate", args.model
        ):
            return 1
        model, tokenizer = oss_mlx.load(args.model, memory_budget=args.memory_budget, adapter=args.adapter)
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

"""`oss-mlx SUBCOMMAND ...`: argument dispatch only; each subcommand lives in its own module.

Each module exposes `main(argv: list[str]) -> int` and parses its own arguments, so start-up stays
fast (nothing heavy is imported until a subcommand runs).
"""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "chat": ("oss_mlx.chat.main", "terminal chat (default)"),
    "generate": ("oss_mlx.run", "one prompt in, the answer out (scripts, pipes)"),
    "convert": ("oss_mlx.convert.cli", "checkpoint -> MLX layout resharded for unified memory"),
    "serve": ("oss_mlx.server.app", "OpenAI-compatible server (Responses, Chat Completions)"),
    "bench": ("oss_mlx.bench", "prefill/decode speed and memory, side by side with mlx-lm"),
    "plan": ("oss_mlx.plan_cli", "will a model fit this machine? memory plan per preset and context"),
    "models": ("oss_mlx.models_cli", "the models on this machine: list, path, remove"),
    "synthetic": ("oss_mlx.synthetic", "write a random gpt-oss checkpoint (tests, benchmarks)"),
    "finetune": ("oss_mlx.finetune.cli", "LoRA fine-tuning on the MXFP4 base from JSONL chat data"),
    "fuse": ("oss_mlx.fuse", "merge an adapter into a converted model (experts re-quantized to MXFP4)"),
}


def usage() -> str:
    lines = [
        "usage: oss-mlx [--debug] SUBCOMMAND [options]   (oss-mlx SUBCOMMAND --help for its options)",
        "",
    ]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "  --debug    on an unexpected error, print the traceback (also OSS_MLX_DEBUG=1)"]
    return "\n".join(lines)


def _one_line_warnings(prog: str) -> None:
    """Warnings (an unused checkpoint tensor, kernels turned off) as one line naming the command,
    not Python's file:line and source line, which mean nothing to a user (--debug keeps those)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prog}: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def _fill_closed_standard_fds() -> None:
    """/dev/null on a closed stdin, stdout or stderr (`oss-mlx ... <&-`): else the next file opened (a
    model's shard) gets fd 0, which MLX's safetensors loader takes for a failed open. sys.stdin and
    sys.stdout stay None, so a command that needs them says so; diagnostics to a closed stderr are dropped."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def main(argv: list[str] | None = None) -> int:
    try:
        _fill_closed_standard_fds()
        return _main(argv)
    except BrokenPipeError:  # the reader left (`oss-mlx --help | head -3`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (exit's flush must not raise)
        return 141
    except KeyboardInterrupt:  # also while the subcommand's modules are imported (numpy, MLX: ~1 s)
        print("\ninterrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"oss-mlx {version('oss-mlx')}")
        return 0
    from .cli_args import debug_requested, report

    debug = debug_requested(argv)
    if argv and argv[0] == "--debug":  # `oss-mlx --debug SUB ...`: the subcommand after it
        argv.pop(0)
    name = argv.pop(0) if argv and not argv[0].startswith("-") else "chat"
    if name not in SUBCOMMANDS:
        print(f"oss-mlx: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if not debug:
        _one_line_warnings(f"oss-mlx {name}")
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        return int(module.main(argv) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the project's errors in one line; a bug names itself (--debug: traceback)
        return report(f"oss-mlx {name}", e, debug)


if __name__ == "__main__":
    sys.exit(main())

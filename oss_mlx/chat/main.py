"""`oss-mlx chat`: a terminal chat with gpt-oss.

    oss-mlx chat [--model M] [--reasoning-effort low|medium|high] [--system TEXT]
                 [--reasoning summary|show|hide] [--tools FILE] [--python] [--max-tokens N]
                 [--temperature T] [--top-p P] [--seed S] [--history FILE] [--no-autosave]

One `Session` holds the conversation and its KV cache: each turn prefills only what the cache does
not hold yet. Replies stream as markdown, block by block (render.py); the chain of thought is shown
apart. Ctrl-C stops a reply and keeps what was said; the conversation is saved after every turn.
docs/CHAT.md is the user's guide.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from .. import cli_args
from ..harmony import REASONING_EFFORTS, Message
from .app import ChatApp
from .history import ChatFileError, load_conversation, new_autosave_path
from .render import REASONING_MODES, plural
from .slash import today
from .tools import FunctionTool, PythonSandbox, ToolFileError, load_tools

DEFAULT_MAX_TOKENS = 8192


def context_limit(model: Any) -> int | None:
    """max_position_embeddings, lowered to what fits in memory when the memory planner knows."""
    from ..runtime import runtime_of

    info = runtime_of(model).info  # loader.LoadInfo (None for a model built in code)
    config = getattr(info, "config", None)
    if config is None:
        return None
    limit = config.max_position_embeddings
    try:
        from ..memory import Machine, MemoryPlan

        raw = getattr(info, "raw_config", {}) or {}
        section = raw.get("oss_mlx") or {}
        plan = MemoryPlan(
            config,
            section.get("preset") or "reference",
            quantization=section.get("quantization") or None,
        )
        fits = plan.max_context(Machine.detect().working_set_bytes)
        if fits > 0:
            limit = min(limit, fits)
    except Exception:  # no planner, or it cannot tell: the model's own limit
        pass
    return limit


def prepare_model(model: str, console: Console) -> Path:
    """The folder to load: a local folder as is; a hub id (the default, openai/gpt-oss-20b) by the
    model store's rule (its converted copy, else the Hugging Face cache, else downloaded and
    converted once into the store, announced here)."""
    from ..model_store import resolve

    return resolve(model, say=lambda text: console.print(Text(text, style="bold")))


def unwritable(path: Path) -> str | None:
    """Why the conversation could not be saved to `path`, or None. Checked once at start: a chat
    whose turns cannot be kept must not start (and lose them), rather than warn after each."""
    import tempfile

    if path.is_dir():
        return f"{path} is a folder, not a file"
    if path.exists() and not path.is_file():
        return f"{path} is not a regular file"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # What a save does: a temporary file beside it, renamed over it.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"cannot write in {path.parent} ({e.strerror or e})"
    return None


def _import_sampler() -> None:
    try:
        import mlx_lm.sample_utils  # noqa: F401
    except Exception:  # the reply will say what is wrong, in words
        pass


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ..hub import DEFAULT_MODEL

    A = cli_args
    ap = A.parser(
        "oss-mlx chat", "Chat with gpt-oss in the terminal. /help inside the chat lists the commands."
    )
    ap.add_argument(
        "--model",
        "-m",
        default=os.environ.get("OSS_MLX_MODEL", DEFAULT_MODEL),
        help="hub repo id, checkpoint folder or converted folder "
        f"(default: $OSS_MLX_MODEL, else {DEFAULT_MODEL})",
    )
    ap.add_argument(
        "--reasoning-effort", "-e", choices=REASONING_EFFORTS, default="medium", help="how long it thinks"
    )
    ap.add_argument("--system", "-s", metavar="TEXT", help="instructions (harmony's developer message)")
    ap.add_argument(
        "--reasoning",
        choices=REASONING_MODES,
        default="summary",
        help="chain of thought: summary (one dim line, default), show (in full, dim), hide",
    )
    ap.add_argument(
        "--tools",
        metavar="FILE",
        action="append",
        default=[],
        help="function tools: a .py module of typed functions (called for real) or a .json list of schemas "
        "(you type the results); may be repeated",
    )
    ap.add_argument(
        "--python", action="store_true", help="let the model run Python in a sandboxed subprocess"
    )
    ap.add_argument(
        "--python-timeout",
        type=A.SECONDS,
        default=10.0,
        metavar="S",
        help="seconds per run of the python tool",
    )
    ap.add_argument(
        "--python-memory",
        type=A.Number(int, 32, 2**22),
        default=2048,
        metavar="MB",
        help="address space of the python tool (Linux)",
    )
    ap.add_argument("--max-tokens", type=A.MAX_TOKENS, default=DEFAULT_MAX_TOKENS, help="per reply")
    ap.add_argument(
        "--temperature", type=A.TEMPERATURE, default=1.0, help="0 to 2; 0 is greedy; 1.0 as OpenAI advises"
    )
    ap.add_argument("--top-p", type=A.TOP_P, default=1.0, help="nucleus sampling, above 0 and at most 1")
    ap.add_argument(
        "--seed", type=A.SEED, help="0 to 2^64-1 for every reply; -1 or none: random (the default)"
    )
    ap.add_argument(
        "--history",
        metavar="FILE",
        help="keep this conversation in FILE: resumed if it exists, saved after every turn "
        "(default: a new file in the data folder's chats/)",
    )
    ap.add_argument("--no-autosave", action="store_true", help="do not save the conversation automatically")
    ap.add_argument("--no-markdown", action="store_true", help="print replies as plain text")
    ap.add_argument("--ignore-memory", action="store_true", help="load even if the planner says it won't fit")
    ap.add_argument(
        "--memory-budget",
        type=A.size,
        metavar="SIZE",
        help='e.g. "6GB": keep only hot experts in memory and read the rest from disk (slower, smaller)',
    )
    ap.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (oss-mlx finetune's or PEFT's)")
    from ..distributed import cli as distributed

    distributed.add_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)

    def fail(message: str, code: int = 1) -> int:
        err.print(f"oss-mlx chat: [red]error:[/] {escape(message)}", soft_wrap=True)
        return code

    tools: list[FunctionTool] = []
    try:
        for file in args.tools:
            tools += load_tools(file)
    except ToolFileError as e:
        return fail(str(e), 2)
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        return fail(f"two tools have the same name: {sorted(n for n in set(names) if names.count(n) > 1)}", 2)

    resumed: tuple[list[Message], dict] | None = None
    autosave = None
    if not args.no_autosave:
        autosave = Path(args.history).expanduser() if args.history else new_autosave_path()
    if autosave is not None:
        why = unwritable(autosave)
        if why is not None:
            fix = (
                "give --history a file in a folder you can write"
                if args.history
                else "set OSS_MLX_HOME to a folder you can write"
            )
            return fail(f"cannot keep the conversation: {why}; {fix}, or pass --no-autosave", 2)
    if args.history and Path(args.history).expanduser().exists():
        try:
            resumed = load_conversation(args.history)
        except ChatFileError as e:
            return fail(f"--history: {e}", 2)

    # The model: a hub id is downloaded and converted on first use (with progress bars).
    start = time.perf_counter()
    try:
        import oss_mlx

        console.print(Text(f"loading {args.model} …", style="dim"))
        # Checked from config.json alone (a hub model's too), before any download or load.
        from ..distributed import cli as distributed
        from ..plan_cli import refuse_unless_fits

        several = distributed.requested(args)  # the distributed planner checks each machine instead
        unchecked = args.memory_budget or args.ignore_memory or several
        if not unchecked and refuse_unless_fits("oss-mlx chat", args.model):
            return 1
        path = prepare_model(args.model, console)
        if several:  # this process is rank 0; the other ranks only compute (and never get here).
            # The name as given: each machine resolves a hub id by its own store (rank 0's is ready).
            model, tokenizer = distributed.load(args.model, args)
        else:
            model, tokenizer = oss_mlx.load(path, memory_budget=args.memory_budget, adapter=args.adapter)
    except KeyboardInterrupt:
        return 130
    except (*cli_args.user_errors(), OSError) as e:  # bad folder, offline, no vocabulary: in words
        return fail(f"cannot load {args.model}: {cli_args.describe_error(e)}")
    loaded_in = time.perf_counter() - start

    from ..testing.scripted import ENV, Script

    try:
        script = Script.from_file(os.environ[ENV], tokenizer) if os.environ.get(ENV) else None
    except Exception as e:  # a test hook's file, written by hand: say what is wrong, in one line
        why = str(e).removeprefix(f"{ENV}: ") if isinstance(e, (OSError, ValueError)) else f"{e!r}"
        return fail(
            f"{ENV}={os.environ[ENV]}: {why} (a JSON list of rules, e.g. "
            '[{"reply": "<|channel|>final<|message|>Hi!<|return|>", "once": true}]; see docs/CHAT.md)',
            2,
        )
    if script is None:
        # The sampler comes from mlx_lm, whose import takes seconds: done while the user types.
        import threading

        threading.Thread(target=_import_sampler, daemon=True).start()

    from ..session import Session

    session = Session(
        model,
        tokenizer,
        reasoning_effort=args.reasoning_effort,
        instructions=args.system,
        current_date=today(),  # as OpenAI's reference chat: the conversation's start date
    )
    sampling: dict[str, Any] = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
    }
    if args.seed is not None:
        sampling["seed"] = args.seed
    python = PythonSandbox(timeout=args.python_timeout, memory_mb=args.python_memory) if args.python else None
    app = ChatApp(
        session,
        console,
        model_name=Path(str(args.model).rstrip("/")).name or str(args.model),
        reasoning=args.reasoning,
        markdown=not args.no_markdown,
        sampling=sampling,
        tools=tools,
        python=python,
        autosave=autosave,
        context_limit=context_limit(model),
        script=script,
    )
    from ..runtime import runtime_of

    layout = getattr(runtime_of(model).info, "layout", "?")
    limit = f" · context limit {app.limit:,}" if app.limit else ""
    console.print(
        Text.assemble(
            ("oss-mlx chat", "bold"),
            (f" · {app.model_name} ({layout}) loaded in {loaded_in:.1f} s{limit}", "dim"),
            (f" · effort {session.reasoning_effort}", "dim"),
        ),
        soft_wrap=True,
    )
    if tools:
        app.say(f"tools: {', '.join(t.name for t in tools)}")
    if python is not None:
        app.say(f"python tool: {python.limits}")
    if resumed is not None:
        app.apply_loaded(*resumed)
        app.say(f"resumed {plural(len(resumed[0]), 'message')} from {args.history}")
        app.show_last_exchange()
    if autosave is not None:
        app.say(f"autosave: {autosave}")
    app.say("/help for commands · Ctrl-C stops a reply · Ctrl-D quits")
    return app.run()


if __name__ == "__main__":
    sys.exit(main())

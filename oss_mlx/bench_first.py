"""`oss-mlx bench` on the first prompt: cold start, time to first token, follow-up at depth.

    --cold              each prompt length as the first prompt of a fresh process (one per engine and
                        length), then again in that process (warm); load time apart
    --ttft              a chat's first message (system + user, rendered by our harmony renderer) as a
                        fresh process's first prompt: time to its first token from the process's start
                        and from the end of the load
    --follow-up D,D     N new tokens (--follow-up-tokens, default 2,048) prefilled on top of D cached
                        ones, beside a fresh N-token prompt's rate, in the bench's process

What "cold" includes: a new Python process (interpreter and imports: `imports_s`), the model's
construction or load (`load_s`: the random weights or the checkpoint, the kernels' start-up self-test,
and the load-time warm-up where it runs: `warmup_s`, warmup.py), then the first prompt, timed alone.
MLX's own JIT kernels are cached on disk across processes (MLX_PTX_CACHE_DIR on CUDA): each row says
how many files that cache held when its process started (`ptx_cache_files`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

CHILD_MARK = "oss-mlx-bench-first: "
FOLLOW_UP_TOKENS = 2048  # --follow-up-tokens
COLD_TIMEOUT = 900.0  # --cold-timeout, seconds
# The chat-like first message (~300 tokens rendered): developer instructions and a user's question.
CHAT_SYSTEM = (
    "You are a careful assistant for a small engineering team. Answer in plain English, keep answers "
    "short unless asked for detail, show code in fenced blocks with the language named, and say so when "
    "you are not sure. Prefer standard-library solutions, explain trade-offs in a sentence or two, and "
    "never invent an API: if a function may not exist, say how to check."
)
CHAT_USER = (
    "We run a Python service that reads sensor readings from a message queue, one JSON object per "
    "message with a device id, a timestamp in milliseconds and a temperature in Celsius. Readings arrive "
    "out of order by up to thirty seconds, and some devices send duplicates when their connection drops. "
    "Every minute we need, per device, the mean, minimum and maximum of the readings whose timestamps fall "
    "in that minute, written to a Postgres table, and each minute must be written exactly once, even when "
    "the service restarts. Today we keep everything in a dictionary and write on a timer, which loses "
    "data on a restart and sometimes writes a minute twice. How would you restructure this? Please cover "
    "where the state should live, how to decide that a minute is complete, how to make the writes "
    "idempotent, and what to test."
)


def chat_prompt(model_dir: str | None = None) -> list[int]:
    """The chat-like first message's tokens, as `oss-mlx chat` renders a first turn."""
    from .harmony import Message, render_conversation
    from .tokenizer import load_tokenizer

    return render_conversation(
        [Message("user", CHAT_USER)],
        load_tokenizer(model_dir),
        developer_instructions=CHAT_SYSTEM,
        current_date="2026-11-27",
    )


def ptx_cache_files() -> int:
    """Files in MLX-CUDA's on-disk cache of compiled JIT kernels (0 where there is none)."""
    import mlx.core as mx

    folder = os.environ.get("MLX_PTX_CACHE_DIR") or os.path.join("/tmp", "mlx", mx.__version__, "ptx")
    return sum(len(files) for _, _, files in os.walk(folder)) if os.path.isdir(folder) else 0


# ---- one fresh process ------------------------------------------------------------------------------


@dataclass
class ChildSpec:
    """What a fresh process measures (passed to it as JSON)."""

    engine: str  # oss-mlx | oss-mlx:reference | mlx-lm
    prompt: str  # "chat", or a token count
    decode: int
    config: str | None
    model: str | None
    seed: int
    prefill_chunk: int | None
    spawned: float  # time.time() in the parent just before the process started
    warm_up: bool | None = None  # the load-time warm-up: None as the loader decides (warmup.wanted)
    memory_budget: str | None = None  # with model: stream its experts within this budget


@dataclass
class FirstPrompt:
    """A fresh process's first prompt, then the same prompt again."""

    engine: str
    prompt: str
    tokens: int
    imports_s: float  # process start -> this module running (interpreter, mlx, oss_mlx)
    load_s: float  # -> the model ready (weights, self-test, warm-up)
    warmup_s: float | None
    warmup: str | None  # what the warm-up did
    cold_prefill_tps: float
    warm_prefill_tps: float
    cold_decode_tps: float
    warm_decode_tps: float
    ttft_from_start_s: float  # process start -> the first token of the first prompt
    ttft_from_load_s: float  # model ready -> that token
    warm_ttft_s: float  # the same prompt again: its first token
    ptx_cache_files: int
    kernels: str
    peak_gb: float
    extra: dict = field(default_factory=dict)

    @property
    def cold_over_warm(self) -> float:
        """How many times longer the cold prefill took than the warm one."""
        return self.warm_prefill_tps / self.cold_prefill_tps if self.cold_prefill_tps else float("inf")


def run_fresh_process(spec: ChildSpec, timeout: float) -> FirstPrompt | str:
    """`spec` measured in a new Python process; the result, or why there is none (in words)."""
    env = dict(os.environ)
    if spec.engine.endswith(":reference") or spec.engine == "mlx-lm":
        env["OSS_MLX_KERNELS"] = "reference"  # no self-test of kernels that will not run
    spec.spawned = time.time()
    cmd = [sys.executable, "-m", "oss_mlx.bench_child", json.dumps(asdict(spec))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"no result within {timeout:.0f} s"
    for line in out.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            fields = json.loads(line[len(CHILD_MARK) :])
            return FirstPrompt(**fields)
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return f"the process exited with {out.returncode}: {tail}"


# ---- the bench's options and rows ---------------------------------------------------------------------


def add_arguments(p) -> None:
    """This module's options of `oss-mlx bench`."""
    from . import cli_args as A

    p.add_argument(
        "--cold",
        action="store_true",
        help="each prompt length as the first prompt of a fresh process (one per engine and length), "
        "then again in it; load time apart (the in-process rows are not run)",
    )
    p.add_argument(
        "--ttft",
        action="store_true",
        help="time to first token of a chat's first message (system + user, ~300 tokens) in a fresh "
        "process, from the process's start and from the end of the load",
    )
    p.add_argument(
        "--follow-up",
        type=A.NumberList(A.Number(int, 1, 2**20)),
        default=[],
        metavar="D,D,...",
        help="prefill --follow-up-tokens new tokens after D cached ones, beside a fresh prompt's rate",
    )
    p.add_argument(
        "--follow-up-tokens",
        type=A.Number(int, 1, 2**20),
        metavar="N",
        help=f"with --follow-up: new tokens after the cached ones (default {FOLLOW_UP_TOKENS:,})",
    )
    p.add_argument(
        "--load-warmup",
        choices=("auto", "on", "off"),
        default="auto",
        help="the load-time warm-up (warmup.py) of oss-mlx's model: auto runs it where a GPU runs the "
        "model, as loading does",
    )
    p.add_argument(
        "--cold-timeout",
        type=A.Number(float, 1, 86400),
        metavar="S",
        help=f"seconds for each fresh process of --cold / --ttft (default {COLD_TIMEOUT:g})",
    )


def resolve_defaults(args) -> None:
    """The defaults of the options above, once the bench has checked that they apply (their parser
    default is None, so that an option given where it does nothing is refused)."""
    if args.follow_up_tokens is None:
        args.follow_up_tokens = FOLLOW_UP_TOKENS
    if args.cold_timeout is None:
        args.cold_timeout = COLD_TIMEOUT


def warm_up_flag(args) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.load_warmup]


def fresh_process_rows(args, engines: list[str], row_type, add) -> int:
    """--cold and --ttft: each measurement in a fresh process; `add(row)` for each result. Returns
    how many processes gave no result (the bench then exits with an error)."""
    prompts = [str(n) for n in args.prompt_lengths] if args.cold else []
    prompts += ["chat"] if args.ttft else []
    results: list[FirstPrompt] = []
    failed = 0
    for engine in engines:
        for prompt in prompts:
            spec = ChildSpec(
                engine=engine,
                prompt=prompt,
                decode=args.decode_tokens,
                config=None if args.model else args.config,
                model=args.model,
                seed=args.seed,
                prefill_chunk=args.prefill_step,
                spawned=0.0,
                warm_up=warm_up_flag(args),
                memory_budget=args.memory_budget,
            )
            got = run_fresh_process(spec, args.cold_timeout)
            if isinstance(got, str):
                print(f"  {engine:<18} fresh process, prompt {prompt}: {got}", flush=True)
                failed += 1
                continue
            results.append(got)
            print(
                f"  {engine:<18} fresh process, prompt {prompt} ({got.tokens:,} tokens): cold prefill "
                f"{got.cold_prefill_tps:,.1f} tok/s, warm {got.warm_prefill_tps:,.1f} "
                f"({got.cold_over_warm:.2f}x the time); first token {got.ttft_from_start_s:.2f} s after "
                f"the start, {got.ttft_from_load_s:.3f} s after the load ({got.load_s:.1f} s"
                + (f", warm-up {got.warmup}" if got.warmup else "")
                + f"); PTX cache held {got.ptx_cache_files} files",
                flush=True,
            )
            detail = asdict(got)
            label = engine
            engine_name = engine.split(":")[0]
            phase = "ttft" if prompt == "chat" else "cold prefill"
            add(
                row_type(
                    engine_name,
                    phase,
                    got.tokens,
                    got.cold_prefill_tps,
                    got.peak_gb,
                    got.kernels,
                    label,
                    detail=detail,
                )
            )
            add(
                row_type(
                    engine_name,
                    "warm prefill",
                    got.tokens,
                    got.warm_prefill_tps,
                    got.peak_gb,
                    got.kernels,
                    label,
                    detail={"in": "the same fresh process, second run", "prompt": prompt},
                )
            )
    if results:  # each prompt's engines side by side
        results.sort(key=lambda r: prompts.index(r.prompt))
        print_first_prompts(results, "first prompt of a fresh process")
    return failed


def follow_up_rows(
    engine: str, label: str, kern: str, measure: Callable[[int, int], dict], args, row_type, add
) -> list[tuple[str, dict]]:
    """--follow-up: each depth's row (`add(row)`), measure(depth, new tokens) giving its numbers
    (bench.follow_up); returns them for the table."""
    out = []
    for depth in args.follow_up:
        r = measure(depth, args.follow_up_tokens)
        print(
            f"  {label:<18} {r['new']:,} new after {depth:,} cached: {r['follow_up_tps']:,.1f} tok/s, fresh "
            f"{r['fresh_tps']:,.1f} ({r['ratio']:.2f})",
            flush=True,
        )
        import mlx.core as mx

        add(
            row_type(
                engine,
                "follow-up",
                depth,
                r["follow_up_tps"],
                mx.get_peak_memory() / 1e9,
                kern,
                label,
                detail=r,
            )
        )
        out.append((label, r))
    return out


# ---- output ---------------------------------------------------------------------------------------


def _console():
    from rich.console import Console

    # Into a log (the GPU machine's runs) the wide tables would be cut to 80 columns and lose digits.
    return Console() if sys.stdout.isatty() else Console(width=180)


def print_first_prompts(results: list[FirstPrompt], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for name in (
        "engine",
        "prompt",
        "tokens",
        "cold tok/s",
        "warm tok/s",
        "cold / warm time",
        "TTFT from start s",
        "TTFT after load s",
        "load s (warm-up)",
        "decode tok/s",
    ):
        table.add_column(name, justify="left" if name in ("engine", "prompt") else "right")
    for r in results:
        warm_up = f" ({r.warmup_s:.1f})" if r.warmup_s is not None else ""
        table.add_row(
            r.engine,
            r.prompt,
            f"{r.tokens:,}",
            f"{r.cold_prefill_tps:,.1f}",
            f"{r.warm_prefill_tps:,.1f}",
            f"{r.cold_over_warm:.2f}x",
            f"{r.ttft_from_start_s:.3f}",
            f"{r.ttft_from_load_s:.3f}",
            f"{r.load_s:.1f}{warm_up}",
            f"{r.cold_decode_tps:,.1f}",
        )
    _console().print(table)


def print_follow_ups(rows: list[tuple[str, dict]], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for name in ("engine", "cached", "new", "fresh tok/s", "follow-up tok/s", "follow-up / fresh"):
        table.add_column(name, justify="left" if name == "engine" else "right")
    for engine, r in rows:
        table.add_row(
            engine,
            f"{r['depth']:,}",
            f"{r['new']:,}",
            f"{r['fresh_tps']:,.1f}",
            f"{r['follow_up_tps']:,.1f}",
            f"{r['ratio']:.2f}",
        )
    _console().print(table)

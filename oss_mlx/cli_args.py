"""Command-line values checked in one place: every subcommand's parser and the chat's slash commands.

Each type below is a callable for argparse's ``type=`` that parses one string and checks its range,
raising ``argparse.ArgumentTypeError`` with the range in words ("must be between 0 and 2 (got -3)");
argparse then prints ``oss-mlx SUB: error: argument --flag: must be ...`` and exits with status 2. The
chat's ``/set`` calls the same objects, so a flag and its slash command accept exactly the same values.

Also here: the help formatter that shows defaults, the one parser factory every subcommand uses,
and the list of the project's own error types (`user_errors`), which `oss-mlx` prints as one line.
Nothing heavy is imported: every subcommand's start-up goes through this module.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """A bad value found after parsing (an environment variable, two flags that do not go together)."""


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A value out of range or of the wrong kind: argparse prints it after the flag's name; other
    callers (the chat's /set, environment variables) catch it as a ValueError."""


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    if isinstance(value, int) and value >= 2**32:
        exp = int(math.log2(value + 1))
        if value + 1 == 2**exp:
            return f"2^{exp}-1"
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else str(value)


@dataclass(frozen=True)
class Number:
    """An int or a float within [low, high] (``low_open``: strictly above low). ``random`` lists
    spellings that mean "none" (a random seed)."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    random: tuple[str, ...] = ()

    @property
    def __name__(self) -> str:  # argparse names the type in some of its messages
        return "whole number" if self.kind is int else "number"

    def describe(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            if self.low_open:
                return f"greater than {_number(lo)} and at most {_number(hi)}"
            return f"between {_number(lo)} and {_number(hi)}"
        if lo is not None:
            return f"greater than {_number(lo)}" if self.low_open else f"at least {_number(lo)}"
        if hi is not None:
            return f"at most {_number(hi)}"
        return "a number"

    def __call__(self, text: str | float) -> Any:
        raw = str(text).strip()
        if raw.lower() in self.random:
            return None
        noun = "a whole number" if self.kind is int else "a number"
        try:
            value = int(raw.replace("_", "")) if self.kind is int else float(raw)
        except ValueError:
            raise BadValue(f"must be {noun} {self.describe()} (got {raw!r})") from None
        if self.kind is float and not math.isfinite(value):
            raise BadValue(f"must be a finite number {self.describe()} (got {raw!r})")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise BadValue(f"must be {self.describe()} (got {raw})")
        return value


# MLX's random seed is an unsigned 64-bit integer; -1 is llama.cpp's (and many UIs') "random".
SEED = Number(int, -1, 2**64 - 1, random=("-1", "random", "none"))
TEMPERATURE = Number(float, 0.0, 2.0)  # OpenAI's range; 0 is greedy
TOP_P = Number(float, 0.0, 1.0, low_open=True)  # mlx-lm reads 0 as "off", which would surprise
MAX_TOKENS = Number(int, 1, 10**7)
POSITIVE_INT = Number(int, 1)
NON_NEGATIVE_INT = Number(int, 0)
CONTEXT = Number(int, 1, 2**24)  # tokens; the model's own limit is checked once it is known
SECONDS = Number(float, 0.0, 7 * 24 * 3600.0, low_open=True)
MEMORY_GB = Number(float, 0.0, 1e6, low_open=True)
SEED_NON_NEGATIVE = Number(int, 0, 2**63 - 1)  # deterministic content (synthetic weights, bench prompts)
CONCURRENCY = Number(int, 1, 256)  # sequences decoded together (the decode batch's largest bucket)
PREFILL_CHUNK = Number(int, 16, 2**16)  # prompt tokens per prefill chunk

HEARTBEAT_SECONDS = Number(float, 1.0, 3600.0)  # ranks beat twice a second: a shorter wait fails at once
DELAY_SECONDS = Number(float, 0.0, 60.0)  # the tests' slow-down switches (OSS_MLX_*_DELAY)


def env_number(name: str, kind: Number, default: Any = None, hint: str = "") -> Any:
    """The environment variable `name` checked by `kind`, read where it is used (a bad value breaks only
    what needs it, with a UsageError naming the variable, its range and `hint`); `default` if unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError as e:
        raise UsageError(f"{name} {e}{f' ({hint})' if hint else ''}") from None


# The chat's /set: the same checks as the flags.
SAMPLING: dict[str, Number] = {
    "temperature": TEMPERATURE,
    "top_p": TOP_P,
    "max_tokens": MAX_TOKENS,
    "seed": SEED,
}


# ---- sizes ------------------------------------------------------------------------------------------

SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int) -> int:
    """'6GB' (10^9), '6.5GiB' (2^30), '800MB', '800MiB', '12G' or a number of bytes (text or int) ->
    bytes (> 0). ValueError (without the name of what is sized: callers add it) otherwise."""
    m = _SIZE.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise ValueError(f"expected a size like '6GB', '6.5GiB', '800MB' or a number of bytes (got {text!r})")
    value = int(float(m.group(1)) * SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"must be a positive size (got {text!r})")
    return value


def size(text: str) -> str:
    """argparse type of a size flag (--memory-budget): checked here, passed on as written."""
    try:
        parse_size(text)
    except ValueError as e:
        raise BadValue(str(e)) from None
    return text.strip()


def size_bytes(text: str) -> int:
    """argparse type of a size flag read as a number of bytes (--max-stored-bytes)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise BadValue(str(e)) from None


# ---- lists --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NumberList:
    """Comma-separated numbers, each checked by ``item`` (``--prompt-lengths 128,2048``)."""

    item: Number

    def __call__(self, text: str) -> list:
        parts = [p.strip() for p in str(text).split(",")]
        if not any(parts):
            raise BadValue(f"must be a comma-separated list (got {text!r})")
        values = []
        for part in parts:
            if not part:
                continue
            try:
                values.append(self.item(part))
            except BadValue:
                raise BadValue(
                    f"must be a comma-separated list of whole numbers, each {self.item.describe()} "
                    f"(got {part!r} in {text!r})"
                ) from None
        return values


@dataclass(frozen=True)
class ChoiceList:
    """Comma-separated names from ``choices`` (``--engines oss-mlx,mlx-lm``), without repeats."""

    choices: tuple[str, ...]

    def __call__(self, text: str) -> list[str]:
        names = [p.strip() for p in str(text).split(",") if p.strip()]
        bad = [n for n in names if n not in self.choices]
        if bad or not names:
            raise BadValue(f"must be a comma-separated list of {', '.join(self.choices)} (got {text!r})")
        return list(dict.fromkeys(names))


def layer_spans(text: str) -> list[range]:
    """'0-3,7,-1' -> the ranges it names (a negative number counts from the last layer), checked as
    written: BadValue for a part that is not a number or a range, or a range that runs backwards."""
    spans = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:  # 5-2 would select nothing
                raise BadValue(f"{part!r} runs backwards; write the lower layer first ({hi}-{lo})")
            spans.append(range(lo, hi + 1))
        elif re.fullmatch(r"-?\d+", part):
            spans.append(range(int(part), int(part) + 1))
        else:
            raise BadValue(f"{part!r} is not a layer number or range like 0-11")
    return spans


def layers(text: str) -> str:
    """argparse type of --layers: its spelling checked now, the layers against the model once loaded."""
    if text.strip() not in ("", "all"):
        layer_spans(text)
    return text


def non_empty(what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not str(text).strip():
            raise BadValue(f"{what} must not be empty")
        return text

    check.__name__ = what
    return check


def hub_id(text: str) -> str:
    """A Hugging Face repo id (`oss-mlx models path ID`): ORG/NAME, nothing that reads as a path."""
    from .hub import is_repo_id

    value = str(text).strip()
    if not is_repo_id(value):
        raise BadValue(f"must be a hub repo id like openai/gpt-oss-20b (got {text!r})")
    return value


def output_file(text: str) -> str:
    """A file this process will write later (--json): its folder must exist and be writable now,
    not after an hour of benchmarks."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise BadValue(f"{text} is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadValue(f"the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadValue(f"the folder {folder} is not writable")
    return str(path)


# ---- parsers --------------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option that has a default says it, unless its help already does."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
            or not action.option_strings
            or "default" in text.lower()
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def parser(prog: str, description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """The ArgumentParser of a subcommand: defaults in --help, and --debug (read by `oss-mlx` itself)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an unexpected error, print the full traceback (also OSS_MLX_DEBUG=1)",
    )
    return p


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """--debug among the arguments (before a `--`), or OSS_MLX_DEBUG set to something true."""
    args = list(argv)
    if "--" in args:
        args = args[: args.index("--")]
    env = os.environ.get("OSS_MLX_DEBUG", "").strip().lower()
    return "--debug" in args or env not in ("", "0", "false", "no", "off")


def user_errors() -> tuple[type[BaseException], ...]:
    """The project's own error types: bad input, said in words (printed without a traceback)."""
    from .chat.history import ChatFileError
    from .chat.tools import ToolFileError
    from .convert.verify import VerifyError
    from .distributed.errors import DistributedError
    from .distributed.hosts import HostsError
    from .errors import ConvertError, LoadError, LoRAError, MemoryBudgetError
    from .finetune.errors import DataError, TrainError

    return (
        UsageError,
        LoadError,  # config, checkpoint and tokenizer errors derive from it
        MemoryBudgetError,
        ChatFileError,
        ToolFileError,
        ConvertError,
        VerifyError,
        LoRAError,  # adapter folders (AdapterError) and LoRA settings
        DataError,
        TrainError,
        DistributedError,  # a rank died or hangs, ranks disagree: said with the rank
        HostsError,
    )


def describe_error(e: BaseException) -> str:
    """One line for a user error; an OSError says what failed on which file, without its errno."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        return f"{e.strerror}: {where}" if where else e.strerror
    return str(e) or type(e).__name__


def report(prog: str, e: BaseException, debug: bool | None = None, doing: str = "") -> int:
    """Print an error the way every subcommand does; the exit status.

    The project's own errors (and OSError: a file, a folder, the network) are one line,
    `PROG: error: ...`, status 1 (2 for a bad argument). Anything else is a bug: one line naming the
    exception and how to see where it happened, or with --debug / OSS_MLX_DEBUG=1 the traceback.
    doing: what failed, in words ("cannot load M"), put before the error's own message.
    """
    import sys
    import traceback

    debug = debug_requested() if debug is None else debug
    doing = f"{doing}: " if doing else ""
    if isinstance(e, (*user_errors(), OSError)):
        if debug:
            traceback.print_exception(e)
        print(f"{prog}: error: {doing}{describe_error(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    if debug:
        traceback.print_exception(e)
        print(f"{prog}: internal error: {doing}{type(e).__name__}: {e}", file=sys.stderr)
    else:
        print(
            f"{prog}: internal error: {doing}{type(e).__name__}: {e} (a bug in oss-mlx; run again with "
            "--debug or OSS_MLX_DEBUG=1 to see the traceback, and please report it)",
            file=sys.stderr,
        )
    return 1

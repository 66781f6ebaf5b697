"""The benchmarks' results file: one JSON object a line, appended, one file per device.

`oss-mlx bench --results benchmarks/results/h200.jsonl` appends a row per measurement as soon as
it is measured (a run cut by a time limit keeps what it measured); nothing is ever rewritten, so the
file is the history of every number the docs quote. Each row carries what it takes to read it
later: when, on what (device, versions), by what (the command, the git commit of the code) and the
measurement itself. docs/PERFORMANCE.md reads the current tables out of these files.

Row keys (schema 1): schema, date (UTC, ISO 8601), device, versions {oss-mlx, mlx, mlx-lm, python},
commit (the checkout's HEAD, "+dirty" when it had uncommitted changes; null outside a git checkout;
OSS_MLX_COMMIT when set),
command, kind ("bench" for `oss-mlx bench` rows), then the measurement's own fields (for bench: engine,
label, kernels, phase, context, tokens_per_s, peak_gb, first_step_ms, steady_tokens_per_s, source,
decode_tokens, repeat, kept; the first-prompt rows add detail: bench_first.py).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = 1


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    import mlx.core as mx

    return {
        "oss-mlx": _version("oss-mlx"),
        "mlx": mx.__version__,
        "mlx-lm": _version("mlx-lm"),
        "python": platform.python_version(),
    }


COMMIT_ENV = "OSS_MLX_COMMIT"


def git_commit(folder: Path | None = None) -> str | None:
    """HEAD of the checkout holding this code ("+dirty" with uncommitted changes); None outside git.
    OSS_MLX_COMMIT overrides it: a copied working tree whose .git is not its code's (the GPU machine
    receives the tree with the git metadata of an older commit) says which commit it runs."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    folder = folder or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command_line(argv: list[str], prog: str = "oss-mlx bench") -> str:
    return " ".join([prog, *(shlex.quote(a) for a in argv)])


def provenance(argv: list[str], device: str, prog: str = "oss-mlx bench") -> dict[str, Any]:
    """The fields every row of one run shares (the date is each row's own)."""
    return {
        "schema": SCHEMA,
        "device": device,
        "versions": versions(),
        "commit": git_commit(),
        "command": command_line(argv, prog),
    }


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ResultsFile:
    """Appends rows to one JSONL file; each row is one write of one line, flushed to disk."""

    def __init__(self, path: str | os.PathLike, shared: dict[str, Any]):
        self.path = Path(path)
        self.shared = shared

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps({"date": now(), **self.shared, **row}, sort_keys=False) + "\n"
        # O_APPEND: a line lands whole at the end even if two runs share the file.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _ends_unterminated(fd):  # a line cut short (a crash, a full disk): ours must not join it
                line = "\n" + line
            data = line.encode()
            while data:  # a regular file takes it in one write; a short one (a signal) goes on
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def _ends_unterminated(fd: int) -> bool:
    """Whether the file's last byte is not a newline (an empty file is terminated)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of a results file (a line that does not parse is named, with its number)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON row ({e})") from None
    return rows

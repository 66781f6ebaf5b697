"""Files written whole or not at all: the content goes to a temporary file beside the target, is
flushed to disk, then renamed over it, so a crash, a full disk or Ctrl-C leaves the old file or the
new one, never part of one. The one writer of the package's small files (conversations, adapters,
training state, bench results)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path


def write_text(
    path: str | os.PathLike, text: str, *, private: bool = False, make_parents: bool = False
) -> None:
    """`text` (UTF-8) to `path`. A file replaced keeps its permissions; a new one gets the umask's
    default, or 0600 when `private` (conversations are personal)."""
    data = text.encode("utf-8")
    replace_with(path, lambda tmp: tmp.write_bytes(data), private=private, make_parents=make_parents)


def replace_with(
    path: str | os.PathLike,
    write: Callable[[Path], object],
    *,
    private: bool = False,
    make_parents: bool = False,
) -> None:
    """`path` replaced by what `write(tmp)` puts in a temporary file beside it (a writer that only
    takes a file name, as mx.save_safetensors does). The temporary name keeps the suffix: some
    writers add theirs otherwise."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) if path.is_file() else None
    except OSError:
        mode = None
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.close(fd)
        fd = -1
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

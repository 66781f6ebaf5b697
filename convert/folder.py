"""The destination folder, written atomically: everything goes into `DEST.partial-<pid>`, renamed
into place once complete (an old DEST, with --force, is moved aside only then); leftovers of killed
converters are cleaned up by the next run. Ctrl-C, a full disk or a crash never leave a half DEST."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from oss_mlx.errors import ConvertError

# A converter's working folders beside DEST: DEST.partial-<pid>, DEST.old-<pid>.
WORKING = re.compile(r"\.(partial|old)-(\d+)$")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dest: Path) -> list[Path]:
    """Remove `DEST.partial-<pid>` folders of dead converters; restore an old DEST a killed --force run
    had moved aside (`DEST.old-<pid>`) when no new DEST replaced it. Returns what was removed."""
    removed = []
    parent = dest.parent
    if not parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for p in sorted(parent.glob(f"{dest.name}.{kind}-*")):
            m = WORKING.search(p.name)
            if m is None:
                continue
            if pid_alive(int(m.group(2))):
                continue
            if kind == "old" and not dest.exists():
                p.rename(dest)
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_disk(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest.parent).free
    if free < needed:
        raise ConvertError(
            f"not enough free disk space in {dest.parent}: the conversion needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free. Free some space or choose another DEST."
        )


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(dest: Path, force: bool = False, needed_bytes: int = 0) -> Iterator[Path]:
    """`with atomic_folder(DEST) as partial:` write into `partial`; on a normal exit it becomes DEST
    (replacing an old DEST only with `force`), on any error or interrupt it is removed."""
    if dest.exists() and not force:
        raise ConvertError(
            f"{dest} already exists; pass --force to replace it (once the new one is complete)"
        )
    if dest.exists() and not dest.is_dir():
        raise ConvertError(f"{dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    check_disk(dest, needed_bytes)
    partial = dest.parent / f"{dest.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        yield partial
        fsync_dir(partial)
        if dest.exists():  # --force: the old DEST goes only now that the new one is complete
            old = dest.parent / f"{dest.name}.old-{os.getpid()}"
            dest.rename(old)
            partial.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(dest)
        fsync_dir(dest.parent)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if e.errno == 28:  # ENOSPC
            raise ConvertError(
                f"the disk of {dest.parent} filled up while {dest.name} was written; nothing of it was kept"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

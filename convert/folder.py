"""The destination folder, written atomically: everything goes into `DEST.partial-<pid>`, renamed
into place once complete (an old DEST, with --force, is moved aside only then); leftovers of killed
converters are cleaned up by the next run. Ctrl-C, a full disk or a crash never leave a half DEST."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from oss_mlx.cli_args import UsageError
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


class DestError(ConvertError, UsageError):
    """A DEST that must not be written (or replaced): a bad argument, so the commands exit with 2."""


def is_converted(folder: Path) -> bool:
    """An oss-mlx conversion (convert's, fuse's output): its config.json has the oss_mlx section."""
    try:
        return isinstance(json.loads((folder / "config.json").read_text()).get("oss_mlx"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _within(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def check_dest(
    dest: Path,
    force: bool = False,
    *,
    keep: Iterable[Path] = (),
    ours: Callable[[Path], bool] | None = is_converted,
    ours_is: str = "an earlier conversion (no config.json with an oss_mlx section)",
    flag: str = "--force",
) -> None:
    """Refuse a DEST whose writing would lose something the user made: one holding or inside a folder in
    `keep` (the source, an adapter), and unless `force` any existing DEST; with `force`, one holding the
    current folder or one that is neither empty nor `ours` (None: the caller owns every DEST)."""
    dest = Path(dest).absolute()
    for folder in keep:
        if _within(Path(folder), dest):  # replacing DEST would delete it
            raise DestError(f"DEST {dest} contains {folder}, which it would replace; choose another DEST")
        if _within(dest, Path(folder)):
            raise DestError(f"DEST {dest} is (inside) {folder}; choose another DEST")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise DestError(f"{dest} exists and is a file, not a folder; choose another DEST")
    if not force:
        raise DestError(f"{dest} already exists; pass {flag} to replace it (once the new one is complete)")
    if _within(Path.cwd(), dest):
        raise DestError(f"DEST {dest} holds the current folder; {flag} would delete it: choose another DEST")
    if ours is not None and any(dest.iterdir()) and not ours(dest):
        raise DestError(
            f"{dest} is not {ours_is}; {flag} replaces only that, so its files were left alone: "
            "choose another DEST, or empty or remove it yourself"
        )


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
def atomic_folder(
    dest: Path,
    force: bool = False,
    needed_bytes: int = 0,
    **check: object,
) -> Iterator[Path]:
    """`with atomic_folder(DEST) as partial:` write into `partial`; on a normal exit it becomes DEST
    (replacing an old DEST only with `force`, and only one `check_dest` accepts: `check` are its
    keywords), on any error or interrupt it is removed."""
    check_dest(dest, force, **check)  # type: ignore[arg-type]
    partial = dest.parent / f"{dest.name}.partial-{os.getpid()}"
    try:  # before the disk check, so a folder that cannot be written (/proc) is not taken for a full disk
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dest)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    except OSError as e:
        raise ConvertError(
            f"cannot write {dest}: {dest.parent} is not a writable folder ({e.strerror or e}); "
            "choose another DEST"
        ) from None
    try:
        check_disk(dest, needed_bytes)
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

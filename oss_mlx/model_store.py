"""Where a model named by a hub id is on this machine: one rule for every entry point.

`oss-mlx chat`, `generate`, `serve`, `plan`, `bench --model` and `oss_mlx.load` all resolve a hub id
(``openai/gpt-oss-20b``) through `resolve`:

1. the converted copy in the store, ``DATA/models/ORG--NAME`` (DATA: $OSS_MLX_HOME, else
   $XDG_DATA_HOME/oss-mlx, else ~/.local/share/oss-mlx);
2. else a complete snapshot in the Hugging Face cache (HF_HUB_CACHE / HF_HOME), used as it is;
3. else the hub's files are downloaded into the store's own download cache (``DATA/models/.downloads``,
   a Hugging Face cache layout: resumable, the commit recorded) and converted once into the store;
   the download is deleted once the converted copy is complete, so the model is on disk once.

A local folder is used as it is (or its ``original/``). The conversion is `oss-mlx convert`'s, which
writes ``ORG--NAME.partial-<pid>`` and renames it into place only once complete: a killed conversion
never leaves a folder that looks complete, and its leftover is removed by the next conversion of
that id or by `oss-mlx models`. `oss-mlx models` lists, locates and removes what the store holds
(and lists, but never removes, gpt-oss models in the Hugging Face cache).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .convert.folder import WORKING, clean_stale, is_converted, pid_alive
from .weights import CheckpointError, checkpoint_files

DOWNLOADS = ".downloads"


def data_dir() -> Path:
    """oss-mlx's data folder: $OSS_MLX_HOME, else $XDG_DATA_HOME/oss-mlx, else ~/.local/share/oss-mlx."""
    home = os.environ.get("OSS_MLX_HOME")
    if home:
        return Path(home).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(base).expanduser() / "oss-mlx"


def store_dir() -> Path:
    return data_dir() / "models"


def downloads_dir() -> Path:
    return store_dir() / DOWNLOADS


def entry_name(repo_id: str) -> str:
    """The store's folder name of a hub id (huggingface_hub's own spelling: ORG--NAME)."""
    from .hub import is_repo_id

    if not is_repo_id(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a hub repo id like 'openai/gpt-oss-20b'")
    return repo_id.replace("/", "--", 1)


def converted_folder(repo_id: str) -> Path:
    """Where the converted copy of `repo_id` is, or will be, in the store."""
    return store_dir() / entry_name(repo_id)


def converted(repo_id: str) -> Path | None:
    """The complete converted copy of `repo_id` in the store, or None."""
    folder = converted_folder(repo_id)
    return folder if folder.is_dir() and is_converted(folder) else None


def damage(folder: Path) -> str | None:
    """What is wrong with a converted copy, from what is cheap to check (the shards its config.json
    records exist, each header reads and its data is all there), or None. A copy damaged after its
    conversion (a shard deleted or cut short) is then named as the store's, with the store's fix,
    instead of failing as a download would. Checksums are `oss-mlx convert --verify`'s."""
    from .safetensors_file import read_header

    try:
        shards = json.loads((folder / "config.json").read_text())["oss_mlx"].get("shards")
        missing = [name for name in shards or () if not (folder / name).is_file()]
        if missing:
            return f"{', '.join(missing)} missing"
        for path in checkpoint_files(folder):
            read_header(path)
    except CheckpointError as e:
        return str(e).split(". ")[0]  # what is wrong, without the advice meant for a download
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        return f"{folder / 'config.json'} cannot be read ({e})"
    return None


def _usable_copy(repo_id: str) -> Path | None:
    """The store's converted copy of `repo_id` if there is one; CheckpointError if it is damaged."""
    folder = converted(repo_id)
    problem = None if folder is None else damage(folder)
    if problem is not None:
        raise CheckpointError(
            f"the converted copy of {repo_id} in the model store is damaged: {problem}. Remove it "
            f"(oss-mlx models remove {repo_id}); the next use converts it again."
        )
    return folder


def _complete(folder: Path) -> bool:
    """A snapshot holding config.json and every shard its index names (a half download is not)."""
    if not (folder / "config.json").is_file():
        return False
    try:
        checkpoint_files(folder)
    except CheckpointError:
        return False
    return True


def hub_cached(
    repo_id: str, cache_dir: str | os.PathLike | None = None, need: str = "weights"
) -> Path | None:
    """The snapshot folder of `repo_id` in a Hugging Face cache (its "main"), when it holds what is
    needed: config.json alone for "config", every shard for "weights". Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # an unreadable cache counts as no cache
        return None
    if not isinstance(found, str):
        return None
    folder = Path(found).parent
    return folder if need == "config" or _complete(folder) else None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve(
    path_or_repo: str | os.PathLike,
    need: Literal["weights", "config"] = "weights",
    say: Callable[[str], None] | None = None,
) -> Path:
    """The folder to read for a local path or a hub id, by the rule at the top of this module.

    need="config": only config.json is wanted (`oss-mlx plan`, fit checks); a hub id missing from
    both the store and the Hugging Face cache then downloads config.json alone, nothing is converted.
    say: how to tell the user that a first download and conversion starts (default: stderr).
    """
    from .hub import download, is_repo_id

    if not isinstance(path_or_repo, (str, os.PathLike)):
        raise TypeError(f"a model is a folder or a hub repo id, not {type(path_or_repo).__name__}")
    if not str(path_or_repo).strip():  # Path("") is the current folder
        raise CheckpointError(
            "no model given: pass a checkpoint folder or a hub repo id like 'openai/gpt-oss-20b'"
        )
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the folder that holds config.json")
        if not (path / "config.json").is_file() and (path / "original" / "config.json").is_file():
            return path / "original"
        return path
    repo_id = str(path_or_repo)
    if not is_repo_id(repo_id):
        raise CheckpointError(f"{repo_id}: no such folder, and not a hub repo id like 'openai/gpt-oss-20b'")
    found = _usable_copy(repo_id) or hub_cached(repo_id, need=need)
    if found is not None:
        return found
    if need == "config":
        staged = hub_cached(repo_id, downloads_dir(), need="config")
        return staged or download(repo_id, cache_dir=downloads_dir(), config_only=True)
    return download_and_convert(repo_id, say or _stderr)


def download_and_convert(repo_id: str, say: Callable[[str], None]) -> Path:
    """Step 3 of the rule: the hub's files into the store's download cache, converted once into the
    store, the download deleted. Offline, it fails before any output, saying what to do."""
    from rich.console import Console

    from .convert.cli import main as convert
    from .hub import download

    dest = converted_folder(repo_id)
    staging = downloads_dir()
    if hub_cached(repo_id, staging) is None:
        download(repo_id, cache_dir=staging, config_only=True)  # offline or unknown: said now, in words
    say(f"first use of {repo_id}: downloaded and converted once, into {dest}")
    # Progress and the converter's summary go to stderr: stdout may be a reply (`generate`).
    code = convert([repo_id, str(dest), "--cache-dir", str(staging)], out=Console(stderr=True))
    if code == 130:
        raise KeyboardInterrupt
    done = converted(repo_id)  # also when another process finished the same conversion first
    if done is None:
        raise CheckpointError(f"could not convert {repo_id} into {dest} (the reason is above)")
    shutil.rmtree(staging / f"models--{entry_name(repo_id)}", ignore_errors=True)
    return done


# ---- what the store holds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredModel:
    repo_id: str
    path: Path
    bytes: int
    where: str  # "store" | "hf-cache"
    preset: str = ""  # the conversion's quality preset (store entries)
    damage: str | None = None  # what is wrong with a store entry (model_store.damage)


def folder_bytes(folder: Path) -> int:
    """Bytes on disk of the files under `folder`, each counted once: links are followed (a hub
    snapshot's files are links to its blobs), a blob reached twice counts once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _repo_of(folder: Path) -> str:
    section = json.loads((folder / "config.json").read_text())["oss_mlx"]
    source = section.get("source")
    from .hub import is_repo_id

    if isinstance(source, str) and is_repo_id(source) and entry_name(source) == folder.name:
        return source
    return folder.name.replace("--", "/", 1)


def stored_models() -> list[StoredModel]:
    """The complete converted models in the store (unfinished conversions are not models)."""
    root = store_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or WORKING.search(folder.name) or not folder.is_dir():
            continue
        if not is_converted(folder):
            continue
        section = json.loads((folder / "config.json").read_text())["oss_mlx"]
        found.append(
            StoredModel(
                _repo_of(folder),
                folder,
                folder_bytes(folder),
                "store",
                section.get("preset", ""),
                damage(folder),
            )
        )
    return found


def cached_models() -> list[StoredModel]:
    """gpt-oss snapshots in the Hugging Face cache that `resolve` would use (complete ones)."""
    from huggingface_hub import scan_cache_dir

    try:
        repos = scan_cache_dir().repos
    except Exception:  # no cache, or not readable
        return []
    found = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        folder = hub_cached(repo.repo_id)
        if folder is None:
            continue
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            continue
        if model_type == "gpt_oss":
            found.append(StoredModel(repo.repo_id, folder, folder_bytes(folder), "hf-cache"))
    return found


def unfinished() -> list[tuple[Path, bool]]:
    """Leftovers in the store: (folder, alive) for each converter's working folder (alive: its
    process still runs) and each download of the download cache not yet converted."""
    root = store_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        m = WORKING.search(folder.name)
        if m and folder.is_dir():
            found.append((folder, pid_alive(int(m.group(2)))))
    staging = root / DOWNLOADS
    if staging.is_dir():
        found += [(p, False) for p in sorted(staging.glob("models--*")) if p.is_dir()]
    return found


def clean_unfinished() -> list[Path]:
    """Remove the working folders of conversions whose process is gone (or restore an old copy a
    killed `--force` moved aside: the converter's own rule). Downloads are kept: they resume."""

    removed: list[Path] = []
    for folder, alive in unfinished():
        if not alive and WORKING.search(folder.name):
            removed += clean_stale(folder.parent / WORKING.sub("", folder.name))
    return removed


def _inside_store(path: Path) -> bool:
    root = store_dir().resolve()
    try:
        return path.parent.resolve() in (root, root / DOWNLOADS) and path.name not in ("", ".", "..")
    except OSError:
        return False


def removable(repo_id: str) -> list[Path]:
    """What `remove(repo_id)` deletes: the converted copy, its dead working folders, its download."""
    name = entry_name(repo_id)
    root = store_dir()
    paths = [root / name] if (root / name).exists() or (root / name).is_symlink() else []
    for folder, alive in unfinished():
        base = WORKING.sub("", folder.name)
        if (base == name and not alive) or folder.name == f"models--{name}":
            paths.append(folder)
    return [p for p in paths if _inside_store(p)]


def remove(repo_id: str) -> list[Path]:
    """Delete what the store holds of `repo_id` (nothing outside the store; a link is unlinked, its
    target kept). Returns what was removed."""
    removed = []
    for path in removable(repo_id):
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)
        removed.append(path)
    return removed

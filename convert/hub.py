"""Where a SOURCE is: a local folder (any layout the loader reads) or a hub repo id, downloaded.

Downloads go through `huggingface_hub.snapshot_download` (its cache, progress bars, resumption of
partial files, offline mode with HF_HUB_OFFLINE=1), restricted to the files a conversion needs: the
top-level config, index and safetensors shards (not `original/` or `metal/`, which hold second and
third copies of the weights), and the small tokenizer / generation files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from oss_mlx.hub import download as download_snapshot
from oss_mlx.hub import is_repo_id
from oss_mlx.model_store import resolve
from oss_mlx.weights import CheckpointError


@dataclass(frozen=True)
class Source:
    folder: Path  # the folder holding config.json and the shards
    name: str  # what the user gave: repo id, or the folder's absolute path
    revision: str | None  # hub commit hash (also for a folder inside a hub cache snapshot)
    hub: bool


def _snapshot_revision(folder: Path) -> str | None:
    """The commit of a folder inside a hub cache (…/models--org--name/snapshots/<commit>/…)."""
    parts = folder.resolve().parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts) and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
            return parts[i + 1]
    return None


def resolve_source(
    source: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Source:
    """A local folder as is (or its `original/`), else a hub repo id, downloaded or found in the cache."""
    path = Path(source).expanduser()
    if path.exists():
        folder = resolve(path)
        return Source(folder, str(folder.resolve()), _snapshot_revision(folder), False)
    if not is_repo_id(source):
        raise CheckpointError(f"{source}: no such folder, and not a hub repo id like 'openai/gpt-oss-20b'")
    return download(source, revision, cache_dir)


def download(repo_id: str, revision: str | None = None, cache_dir=None, config_only: bool = False) -> Source:
    folder = download_snapshot(repo_id, revision, cache_dir, config_only)
    return Source(
        folder, repo_id, folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision, True
    )

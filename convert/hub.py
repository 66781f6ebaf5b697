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

from oss_mlx.loader import resolve_model_path
from oss_mlx.weights import CheckpointError

# fnmatch's "*" crosses "/", so every pattern names a top-level file explicitly.
DOWNLOAD_PATTERNS = [
    "config.json",
    "model.safetensors.index.json",
    "model.safetensors",
    "model-*.safetensors",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    folder: Path  # the folder holding config.json and the shards
    name: str  # what the user gave: repo id, or the folder's absolute path
    revision: str | None  # hub commit hash (also for a folder inside a hub cache snapshot)
    hub: bool


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


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
        folder = resolve_model_path(path)
        return Source(folder, str(folder.resolve()), _snapshot_revision(folder), False)
    if not is_repo_id(source):
        raise CheckpointError(f"{source}: no such folder, and not a hub repo id like 'openai/gpt-oss-20b'")
    return download(source, revision, cache_dir)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def download(repo_id: str, revision: str | None = None, cache_dir=None, config_only: bool = False) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=["config.json"] if config_only else DOWNLOAD_PATTERNS,
                local_files_only=_offline(),
            )
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id} is not in the Hugging Face cache and cannot be downloaded "
            "(offline, or HF_HUB_OFFLINE=1). Connect once, or pass a local checkpoint folder."
        ) from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(f"{repo_id}: no such repository on the hub, or no access to it ({e})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: no revision {revision!r} on the hub") from None
    except Exception as e:  # network, disk: reported in words
        raise CheckpointError(f"cannot download {repo_id} from the Hugging Face hub: {e}") from None
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{repo_id}: the repository has no top-level config.json (not a gpt-oss model?)"
        )
    return Source(
        folder, repo_id, folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision, True
    )

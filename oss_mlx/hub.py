"""The Hugging Face hub: what a hub id is, whether the network answers (the hub, or the vocabulary's
server for the tokenizer: one rule for both), and the download of a model's files (huggingface_hub
does the work: resumable downloads, progress bars, its cache)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from .errors import CheckpointError

DEFAULT_MODEL = "openai/gpt-oss-20b"
# Only what the model needs. The hub repos also carry original/ and metal/ copies of the weights,
# and fnmatch's "*" crosses "/", so every pattern names a top-level file.
HUB_PATTERNS = [
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


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "OSS_MLX_OFFLINE")
HUB_CONNECT_TIMEOUT = 3.0  # seconds; huggingface_hub itself retries for ~25 s before it gives up


def offline_mode() -> str | None:
    """The variable that sets offline mode ("HF_HUB_OFFLINE=1"), None when none does. The values
    huggingface_hub takes for true (1, true, yes, on) count, in either variable."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={os.environ[name]}"
    return None


def network_unavailable(url: str | None = None) -> str | None:
    """Why not to try a download from `url` (default: the hub), or None: offline mode is set, or one
    quick connect fails. Every download (model files, the tokenizer's vocabulary) asks this first, so
    none waits on retries when there is no network."""
    setting = offline_mode()
    if setting is not None:
        return f"offline mode is set ({setting})"
    return hub_unreachable(url)


@functools.lru_cache(maxsize=4)  # one probe per process and endpoint: a plan and a load share it
def hub_unreachable(endpoint: str | None = None, timeout: float = HUB_CONNECT_TIMEOUT) -> str | None:
    """Why `endpoint` (default: the Hugging Face hub) cannot be reached (None: it can), from one TCP
    connect.

    The hub's endpoint is huggingface_hub's (HF_ENDPOINT); behind a proxy (HTTPS_PROXY, ALL_PROXY) the
    proxy is what must answer. A connect is enough to tell "no network" from "slow network".
    """
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(endpoint or constants.ENDPOINT)
    names = ("HTTPS_PROXY", "https_proxy") if url.scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((os.environ[n] for n in (*names, "ALL_PROXY", "all_proxy") if os.environ.get(n)), None)
    target = urlsplit(proxy if "://" in (proxy or "://") else f"http://{proxy}") if proxy else url
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        what = "the proxy " if proxy else ""
        return f"cannot connect to {what}{host}:{port}: {e.strerror or e}"
    return None


def offline_advice(repo_id: str, reason: str) -> str:
    """What to do when `repo_id` is neither cached nor downloadable: steps that work offline."""
    name = repo_id.rsplit("/", 1)[-1]
    return (
        f"{repo_id} is not in the Hugging Face cache here, and the hub cannot be reached ({reason}). "
        "Any one of these works:\n"
        "  - connect to the network and run the same command again (downloads resume where they stopped);\n"
        f"  - on a machine with network, run `oss-mlx convert {repo_id} {name}`, copy the folder {name} "
        f"here and give its path instead of {repo_id} (`oss-mlx chat --model path/to/{name}`; a "
        "converted folder holds its vocabulary: no network needed);\n"
        "  - if a Hugging Face cache holding it is on this machine, set HF_HUB_CACHE to that folder "
        "(HF_HUB_OFFLINE=1 skips the network check)."
    )


def download(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    config_only: bool = False,
) -> Path:
    """The snapshot folder of a hub repo: huggingface_hub downloads (resumable, with progress bars)
    or finds it in its cache. With HF_HUB_OFFLINE=1, or when the hub does not answer a quick connect,
    only the cache is looked at: no retries, and a message saying what to do if it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    reason = network_unavailable()
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=["config.json"] if config_only else HUB_PATTERNS,
                local_files_only=reason is not None,
            )
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            offline_advice(repo_id, reason or "the download failed and the cache does not hold it")
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
    if reason is not None and not config_only and not any(folder.glob("*.safetensors")):
        # A plan cached config.json alone; the weights were never downloaded.
        raise CheckpointError(offline_advice(repo_id, f"{reason}; the cache holds only its config.json"))
    return folder

"""Find a checkpoint (folder or hub id), build the model from its config, fill it lazily."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import kernels
from .config import ModelConfig, read_config
from .memory import DEFAULT_CONTEXT, Machine, kv_bytes, prefill_step_for, wire_weights
from .model import Transformer
from .weights import (
    CheckpointError,
    LazyTensors,
    canonical_recipes,
    checkpoint_files,
    detect_layout,
    hf_recipes,
    iter_canonical,
    original_recipes,
)

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


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def download(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    config_only: bool = False,
) -> Path:
    """The snapshot folder of a hub repo: huggingface_hub downloads (resumable, with progress bars)
    or finds it in its cache; HF_HUB_OFFLINE=1 only looks in the cache."""
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
                allow_patterns=["config.json"] if config_only else HUB_PATTERNS,
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
    return folder


def resolve_model_path(path_or_repo: str | os.PathLike) -> Path:
    """A local folder as is (or its original/); otherwise a hub repo id, downloaded or from the cache."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the folder that holds config.json")
        if not (path / "config.json").is_file() and (path / "original" / "config.json").is_file():
            return path / "original"
        return path
    if not is_repo_id(str(path_or_repo)):
        raise CheckpointError(
            f"{path_or_repo}: no such folder, and not a hub repo id like 'openai/gpt-oss-20b'"
        )
    return download(str(path_or_repo))


@dataclass
class LoadInfo:
    """Where a model came from (a dataclass, not a dict: nn.Module would treat a dict as parameters)."""

    layout: str
    path: Path
    config: ModelConfig
    raw_config: dict = field(repr=False)

    def __getitem__(self, key: str):
        return getattr(self, key)


@dataclass
class Checkpoint:
    """A checkpoint folder, opened: its config, its tensors (lazy) and how they map to the model's
    canonical names (weights.py recipes)."""

    folder: Path
    config: ModelConfig
    raw: dict = field(repr=False)
    tensors: LazyTensors = field(repr=False)
    layout: str
    recipes: dict = field(repr=False)
    float_experts: bool  # the model's experts stay float (a fine-tune kept so, or converted so)

    @property
    def quantize_float_experts(self) -> bool:
        return self.layout == "hf-float" and not self.float_experts


def open_checkpoint(path_or_repo: str | os.PathLike, quantize_experts: bool = True) -> Checkpoint:
    """Resolve, read the config and the tensors' headers, detect the layout (nothing else is read)."""
    folder = resolve_model_path(path_or_repo)
    config, raw = read_config(folder)
    tensors = LazyTensors(checkpoint_files(folder))
    layout = detect_layout(folder, raw, tensors.names())
    keep_float = layout == "hf-float" and not quantize_experts
    if layout == "oss-mlx":
        keep_float = not raw["oss_mlx"].get("experts_mxfp4", True)
    if layout == "hf-mxfp4":
        recipes = hf_recipes(config, mxfp4=True)
    elif layout == "hf-float":
        recipes = hf_recipes(config, mxfp4=False)
    elif layout == "original":
        recipes = original_recipes(config)
    else:
        recipes = canonical_recipes(tensors.names())
    return Checkpoint(folder, config, raw, tensors, layout, recipes, keep_float)


def load_model(
    path_or_repo: str | os.PathLike,
    dtype: mx.Dtype | None = None,
    quantize_experts: bool = True,
    memory_budget: str | int | None = None,
) -> tuple[Transformer, LoadInfo]:
    """Build and fill a Transformer. Returns (model, info): layout, path, config.

    dtype: cast float weights (None keeps the checkpoint's, usually bfloat16). MXFP4 experts stay MXFP4.
    quantize_experts: float experts (a transformers fine-tune) are quantized to MXFP4 unless False.
    memory_budget: e.g. "6GB"; keep only the hot experts in memory, read the others on demand
    (streaming.py). None keeps every expert resident.
    """
    ckpt = open_checkpoint(path_or_repo, quantize_experts)
    model = Transformer(ckpt.config, quantized_experts=not ckpt.float_experts)
    quantize_dense(model, ckpt.raw.get("oss_mlx", {}).get("quantization"))
    expected = {k: (v.shape, v.dtype) for k, v in tree_flatten(model.parameters())}
    weights = list(
        iter_canonical(
            ckpt.tensors,
            ckpt.recipes,
            expected,
            dtype=dtype,
            quantize_float_experts=ckpt.quantize_float_experts,
            folder=ckpt.folder,
        )
    )
    model.load_weights(weights, strict=True)
    if memory_budget is not None:
        from .streaming import stream_experts

        stream_experts(
            model, ckpt.tensors, ckpt.recipes, memory_budget, layout=ckpt.layout, folder=ckpt.folder
        )
    resident = None
    if memory_budget is not None:  # streamed experts are cached up to the budget, not parameters
        from .streaming import parse_budget

        resident = parse_budget(memory_budget)
    return finish_loading(model, ckpt, resident)


def finish_loading(
    model: Transformer, ckpt: Checkpoint, resident: int | None = None, kv: int | None = None
) -> tuple[Transformer, LoadInfo]:
    """A filled model made ready to run: eval mode, the backend's weight shapes, weights wired (Metal),
    the prefill chunk for this machine's memory. resident: at least this many bytes stay in memory
    (expert streaming's budget); kv: the KV cache at the default context (default: the whole model's)."""
    model.eval()
    kernels.prepare(model)  # backend-specific weight shapes (CUDA: padded down rows)
    resident = max(resident or 0, sum(v.nbytes for _, v in tree_flatten(model.parameters())))
    wire_weights(resident)
    # Smaller prefill chunks where memory is tight (read by generation.generate_tokens).
    kv = kv_bytes(ckpt.config, DEFAULT_CONTEXT) if kv is None else kv
    model.prefill_step = prefill_step_for(resident, kv, Machine.detect().working_set_bytes)
    model.info = LoadInfo(ckpt.layout, ckpt.folder, ckpt.config, ckpt.raw)
    return model, model.info


def quantize_dense(model: Transformer, spec: dict | None) -> None:
    """Apply the converter's quantization of dense layers (attention, embeddings) before loading.

    spec: {"attention" | "embedding" | "unembedding": {"bits", "group_size", "mode"}}; router, sinks
    and norms are never quantized (they are not nn.Linear / nn.Embedding here).
    """
    if not spec:
        return
    for part, q in spec.items():
        if not q:
            continue

        def wanted(path: str, module: nn.Module, part: str = part) -> bool:
            if part == "attention":
                return ".attn." in f".{path}." and isinstance(module, nn.Linear)
            return path == part

        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=wanted,
        )


def model_config(path_or_repo: str | os.PathLike) -> ModelConfig:
    return read_config(resolve_model_path(path_or_repo))[0]

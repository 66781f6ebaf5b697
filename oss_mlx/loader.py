"""Find a checkpoint (folder or hub id), build the model from its config, fill it lazily."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig, read_config
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
# Only what the model needs: the hub repos also carry original/ and metal/ copies of the weights.
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*.json",
    "generation_config.json",
    "chat_template.jinja",
]


def resolve_model_path(path_or_repo: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (or found in the hub cache)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the folder that holds config.json")
        if not (path / "config.json").is_file() and (path / "original" / "config.json").is_file():
            return path / "original"
        return path
    text = str(path_or_repo)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such folder, and not a hub repo id like 'openai/gpt-oss-20b'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{text} is not in the Hugging Face cache and cannot be downloaded (offline?). "
            "Connect once, or pass a local checkpoint folder."
        ) from None
    except Exception as e:  # network, auth, missing repo: all reported in words
        raise CheckpointError(f"cannot download {text} from the Hugging Face hub: {e}") from None


@dataclass
class LoadInfo:
    """Where a model came from (a dataclass, not a dict: nn.Module would treat a dict as parameters)."""

    layout: str
    path: Path
    config: ModelConfig
    raw_config: dict = field(repr=False)

    def __getitem__(self, key: str):
        return getattr(self, key)


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
    folder = resolve_model_path(path_or_repo)
    config, raw = read_config(folder)
    tensors = LazyTensors(checkpoint_files(folder))
    layout = detect_layout(folder, raw, tensors.names())

    keep_float = layout == "hf-float" and not quantize_experts
    if layout == "oss-mlx":
        keep_float = not raw["oss_mlx"].get("experts_mxfp4", True)
    model = Transformer(config, quantized_experts=not keep_float)
    _quantize_dense(model, raw.get("oss_mlx", {}).get("quantization"))

    if layout == "hf-mxfp4":
        recipes = hf_recipes(config, mxfp4=True)
    elif layout == "hf-float":
        recipes = hf_recipes(config, mxfp4=False)
    elif layout == "original":
        recipes = original_recipes(config)
    else:
        recipes = canonical_recipes(tensors.names())

    expected = {k: (v.shape, v.dtype) for k, v in tree_flatten(model.parameters())}
    weights = list(
        iter_canonical(
            tensors,
            recipes,
            expected,
            dtype=dtype,
            quantize_float_experts=layout == "hf-float" and not keep_float,
            folder=folder,
        )
    )
    model.load_weights(weights, strict=True)
    if memory_budget is not None:
        from .streaming import stream_experts

        stream_experts(model, tensors, recipes, memory_budget, layout=layout, folder=folder)
    model.eval()
    model.info = LoadInfo(layout, folder, config, raw)
    return model, model.info


def _quantize_dense(model: Transformer, spec: dict | None) -> None:
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

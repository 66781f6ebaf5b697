"""oss-mlx: OpenAI's gpt-oss models on MLX, exact to the reference.

import oss_mlx
model, tokenizer = oss_mlx.load("openai/gpt-oss-20b")
print(oss_mlx.generate(model, tokenizer, "Why is the sky blue?").text)
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from .errors import LoadError

if TYPE_CHECKING:
    import mlx.core as mx

    from .generation import SamplingOptions
    from .loader import load_model
    from .model import Transformer
    from .session import Done, Reply, Session, batch_generate, generate, stream_generate
    from .structured import ConstraintError, OutputConstraint
    from .tokenizer import HarmonyTokenizer, load_tokenizer

# Imported on first use (PEP 562), not with the package: `oss-mlx` starts without loading MLX and
# numpy, so its Ctrl-C handler and its --help are there at once.
_LAZY = {
    "SamplingOptions": "generation",
    "load_model": "loader",
    "Transformer": "model",
    "Done": "session",
    "Reply": "session",
    "Session": "session",
    "batch_generate": "session",
    "generate": "session",
    "stream_generate": "session",
    "ConstraintError": "structured",
    "OutputConstraint": "structured",
    "HarmonyTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:  # `oss_mlx.config` after a bare `import oss_mlx`, as when the package imported everything
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = [
    "Done",
    "Reply",
    "SamplingOptions",
    "load",
    "generate",
    "batch_generate",
    "stream_generate",
    "Session",
    "load_model",
    "LoadError",
    "load_tokenizer",
    "HarmonyTokenizer",
    "OutputConstraint",
    "ConstraintError",
]


def load(
    path_or_repo: str | os.PathLike = "openai/gpt-oss-20b",
    dtype: mx.Dtype | None = None,
    quantize_experts: bool = True,
    memory_budget: str | int | None = None,
    adapter: str | os.PathLike | None = None,
    warm_up: bool | None = None,
) -> tuple[Transformer, HarmonyTokenizer]:
    """Load a gpt-oss checkpoint in any supported layout. Returns (model, tokenizer).

    path_or_repo: a local folder (hub layout, transformers fine-tune, OpenAI `original/`, or one
    made by `oss-mlx convert`) or a hub repo id. dtype: cast float weights (MXFP4 experts stay
    MXFP4). quantize_experts: quantize float experts of a fine-tune to MXFP4 (default) or keep float.
    memory_budget: e.g. "6GB" streams experts from the checkpoint, keeping only hot ones in memory.
    adapter: a LoRA adapter folder (`oss-mlx finetune`'s, or PEFT's `adapter_config.json` +
    `adapter_model.safetensors`), run beside the base weights, which stay as loaded (MXFP4 experts).
    warm_up: pay the first prompts' one-time costs at load (default: where a GPU runs the model).
    Raises LoadError (its message names the file, tensor or key, and the fix) for anything that
    cannot be loaded.
    """
    from .config import read_config
    from .loader import check_vocabulary, load_model
    from .model_store import resolve
    from .tokenizer import load_tokenizer

    folder = resolve(path_or_repo)
    tokenizer = load_tokenizer(folder)
    check_vocabulary(read_config(folder)[0], tokenizer.vocab_size, folder)  # before any weight is read
    # With an adapter the warm-up comes after it: the compiled step's traces hold the arrays they saw.
    model, _ = load_model(
        folder,
        dtype=dtype,
        quantize_experts=quantize_experts,
        memory_budget=memory_budget,
        warm_up=False if adapter is not None else warm_up,
    )
    if adapter is not None:
        from .adapters import load_adapter
        from .loader import wants_warm_up, warm_up_loaded

        load_adapter(model, adapter)
        if wants_warm_up(memory_budget, warm_up):
            warm_up_loaded(model)
    return model, tokenizer

"""Find a checkpoint (folder or hub id), build the model from its config, fill it lazily."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import kernel_selftest, kernels, warmup
from .config import ModelConfig, read_config
from .machine import Machine, prefill_chunk_for, wire_weights
from .memory import DEFAULT_CONTEXT, kv_bytes
from .model import Transformer
from .model_store import resolve
from .moe import Experts
from .runtime import runtime_of
from .weights import (
    CheckpointError,
    LazyTensors,
    canonical_recipes,
    detect_layout,
    hf_recipes,
    iter_canonical,
    original_recipes,
)


@dataclass
class LoadInfo:
    """Where a model came from (a dataclass, not a dict: nn.Module would treat a dict as parameters)."""

    layout: str
    path: Path
    config: ModelConfig
    raw_config: dict = field(repr=False)


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
    folder = resolve(path_or_repo)
    config, raw = read_config(folder)
    tensors = LazyTensors.from_folder(folder)
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
    warm_up: bool | None = None,
) -> tuple[Transformer, LoadInfo]:
    """Build and fill a Transformer. Returns (model, info): layout, path, config.

    dtype: cast float weights (None keeps the checkpoint's, usually bfloat16). MXFP4 experts stay MXFP4.
    quantize_experts: float experts (a transformers fine-tune) are quantized to MXFP4 unless False.
    memory_budget: e.g. "6GB"; keep only the hot experts in memory, read the others on demand
    (streaming.py). None keeps every expert resident.
    warm_up: pay the first prompts' one-time costs now (warmup.py), for prompts up to warmup.WARM_CONTEXT;
    None: where a GPU runs the model (warmup.wanted). What it took: `runtime_of(model).warmup_report`.
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
            config=ckpt.config,
        )
    )
    model.load_weights(weights, strict=True)
    resident = None
    if memory_budget is not None:  # streamed experts are cached up to the budget, not parameters
        from .streaming import parse_budget, stream_experts

        runtime_of(model).streaming = stream_experts(
            model, ckpt.tensors, ckpt.recipes, memory_budget, layout=ckpt.layout, folder=ckpt.folder
        )
        resident = parse_budget(memory_budget)
    return finish_loading(model, ckpt, resident, warm_up=wants_warm_up(memory_budget, warm_up))


def wants_warm_up(memory_budget: str | int | None, warm_up: bool | None) -> bool:
    """Whether a load warms up: as asked, or where a GPU runs the model (warmup.wanted); never with
    streamed experts (the dummy prompt would read experts from disk and skew the hot set)."""
    return memory_budget is None and (warmup.wanted() if warm_up is None else warm_up)


def warm_up_loaded(model: Transformer) -> None:
    """The load-time warm-up of a loaded model (runtime_of(model).warmup_report says what it took;
    None if it failed: a warning, not a failed load)."""
    runtime_of(model).warmup_report = warmup.warm_up_or_warn(model, context=warmup.WARM_CONTEXT)


def finish_loading(
    model: Transformer,
    ckpt: Checkpoint,
    resident: int | None = None,
    kv: int | None = None,
    warm_up: bool = False,
) -> tuple[Transformer, LoadInfo]:
    """A filled model made ready to run: eval mode, the backend's weight shapes, weights wired (Metal),
    the prefill chunk for this machine's memory. resident: at least this many bytes stay in memory
    (expert streaming's budget); kv: the KV cache at the default context (default: the whole model's);
    warm_up: pay the first prompts' one-time costs now (warmup.py)."""
    model.eval()
    prepare_for_backend(model)  # backend-specific weight shapes (CUDA: padded down rows), kernel self-test
    resident = max(resident or 0, sum(v.nbytes for _, v in tree_flatten(model.parameters())))
    wire_weights(resident)
    runtime = runtime_of(model)
    runtime.info = LoadInfo(ckpt.layout, ckpt.folder, ckpt.config, ckpt.raw)
    # Smaller prefill chunks where memory is tight.
    kv = kv_bytes(ckpt.config, DEFAULT_CONTEXT) if kv is None else kv
    runtime.prefill_chunk = prefill_chunk_for(resident, kv, Machine.detect().working_set_bytes)
    runtime.warmup_report = None
    if warm_up:
        warm_up_loaded(model)
    return model, runtime.info


# MLX-CUDA's tensor-core gather_qmm needs the output size to be a multiple of this.
CUDA_GATHER_QMM_ROWS = 128


def prepare_for_backend(model: Transformer) -> None:
    """What this machine needs of a loaded model before its first forward: on CUDA, the experts'
    down rows padded (pad_down_rows; it serves the pure-MLX prefill path, so it applies with the
    kernels off too, and Metal's gather_qmm has no such condition); where kernels would run, their
    start-up self-test (kernel_selftest), which turns them off if one fails here."""
    if kernels.available_backend() == "cuda":
        for block in getattr(model, "blocks", []):
            experts = getattr(block.mlp, "experts", None)
            if isinstance(experts, Experts):
                pad_down_rows(experts, CUDA_GATHER_QMM_ROWS)
    kernel_selftest.check()


def pad_down_rows(experts: Experts, multiple: int) -> None:
    """Pad the MXFP4 down projection's output rows with zeros to a multiple of `multiple`.

    MLX-CUDA's tensor-core gather_qmm (prefill) needs the output size to be a multiple of 128;
    gpt-oss's 2,880 is not, so its down projection took a naive kernel. Zero codes with zero
    scales give exact zeros, cut off after the matmul (Experts._matmul): results are unchanged, for
    64 more rows per expert (2% of the down weights). The decode kernel reads the padded rows' stride.
    """
    E, rows, cols = experts.down_weight.shape
    pad = -rows % multiple
    if not experts.quantized or pad == 0:
        return
    experts.down_weight = mx.concatenate([experts.down_weight, mx.zeros((E, pad, cols), mx.uint32)], axis=1)
    scales = experts.down_scales
    experts.down_scales = mx.concatenate([scales, mx.zeros((E, pad, scales.shape[2]), mx.uint8)], axis=1)
    mx.eval(experts.down_weight, experts.down_scales)


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


def check_vocabulary(config: ModelConfig, tokenizer_vocab: int, folder: Path) -> None:
    """The model's embedding must have a row for every id the tokenizer makes: MLX does not check the
    lookup, and an id past the end crashes the process (segfault) or reads other memory."""
    if config.vocab_size < tokenizer_vocab:
        raise CheckpointError(
            f"{folder / 'config.json'}: vocab_size is {config.vocab_size}, but the tokenizer's ids go up to "
            f"{tokenizer_vocab - 1}: the model cannot read the prompts it would be given. gpt-oss has "
            f"vocab_size {tokenizer_vocab} (a synthetic checkpoint to chat with needs at least that many)."
        )

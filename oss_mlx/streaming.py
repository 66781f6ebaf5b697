"""Expert streaming: keep the hot experts of each layer in memory, read the others from the checkpoint.

`oss_mlx.load(path, memory_budget="6GB")` builds the model as usual (every tensor lazy), then swaps each
layer's `Experts` for a `StreamingExperts`. Everything that is not an expert weight (embeddings,
attention, norms, router, the experts' biases) stays resident; each layer keeps an LRU cache of at
most `slots` experts (MXFP4 values + scales) and reads a missing expert straight from its safetensors
file: the experts lie along axis 0 of the stored tensor, so expert e of a tensor of E experts is the
contiguous byte range [start + e*S, start + (e+1)*S) of its data (S = nbytes / E). That holds for the
hub layout (`*_blocks` [E, out, in/32, 16] uint8, `*_scales`), OpenAI's original layout
(`mlp1_weight.blocks` ...) and the converted one (canonical names); float experts (a transformers
fine-tune) are refused: convert them to MXFP4 first.

The math is `moe.Experts`'s, run over a compact stack of the experts a call needs (indices remapped
to positions in that stack, in expert order), so the results are bit for bit the resident model's.
On a GPU the fused decode kernels are skipped (they index the full expert tensors): streaming uses
the gather_qmm path, as the reference backend does.

Slots per layer = (budget - resident weights - KV/activation allowance) / ((layers + 1) x bytes per
expert): the +1 is the transient compact stack of one layer. At least top-k slots are needed.
"""

from __future__ import annotations

import os
import re
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import safetensors_file as st
from . import weights as W
from .cli_args import parse_size
from .config import ModelConfig
from .errors import MemoryBudgetError
from .host_head import model_copy_bytes
from .memory import ACTIVATION_ALLOWANCE, kv_bytes, min_budget
from .moe import SORT_THRESHOLD, Experts, clamped_swiglu
from .partial_read import header_of, pread_into

if TYPE_CHECKING:
    from .model import Transformer

# The KV cache is budgeted for this many tokens (sliding layers only ever hold their window).
DEFAULT_CONTEXT = 4096
_EXPERT_TENSORS = ("gate_up_weight", "gate_up_scales", "down_weight", "down_scales")
_EXPERT_PARAM = re.compile(r"\.experts\.(gate_up|down)_(weight|scales)$")


def parse_budget(budget: str | int) -> int:
    """`memory_budget` in bytes: a size like '6GB' or a number of bytes (cli_args.parse_size)."""
    try:
        return parse_size(budget)
    except ValueError as e:
        raise ValueError(f"memory_budget={budget!r}: {e}") from None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ---- where each expert lives on disk ----------------------------------------------------------------


@dataclass(frozen=True)
class ExpertSource:
    """One canonical expert tensor of one layer: expert e is bytes [offset + e*stride, +stride) of path."""

    path: Path
    offset: int
    stride: int
    dtype: np.dtype
    shape: tuple[int, ...]  # of one expert


class _Files:
    """Open file descriptors, shared by all layers; closed when the model is collected."""

    def __init__(self):
        self.fds: dict[Path, int] = {}
        self._finalizer = weakref.finalize(self, _close_all, self.fds)

    def open(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def read(self, src: ExpertSource, expert: int) -> np.ndarray:
        fd = self.open(src.path)
        out = np.empty(src.shape, dtype=src.dtype)
        try:
            pread_into(
                fd, memoryview(out).cast("B"), src.offset + expert * src.stride, src.path, f"expert {expert}"
            )
        except OSError as e:
            if e.errno is not None:  # a read error (the disk), not the end of the file
                raise
            # The file is open since the load: only a change in place makes it shorter.
            raise OSError(
                f"{e}; the checkpoint changed after it was loaded (streamed weights are read from it "
                "while the model runs): load it again"
            ) from None
        return out


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


_CONVERT_FIRST = (
    "expert streaming reads MXFP4 experts byte for byte from the checkpoint, but {what}. "
    "Convert it to MXFP4 first (`oss-mlx convert {folder} OUT`) and load OUT with memory_budget, "
    "or load it without memory_budget."
)


def expert_sources(
    model: Transformer, tensors: W.LazyTensors, recipes: dict, layout: str, folder: Path | None = None
) -> list[dict[str, ExpertSource]]:
    """For each layer, canonical expert tensor -> where its experts are stored (checked against the model)."""
    if layout == "hf-float":
        raise MemoryBudgetError(
            _CONVERT_FIRST.format(
                what="this checkpoint (a transformers fine-tune) stores float experts [E, in, out]",
                folder=folder or "CHECKPOINT",
            )
        )
    headers: dict[Path, st.Header] = {}
    layers = []
    for i, block in enumerate(model.blocks):
        experts = block.mlp.experts
        if not isinstance(experts, Experts) or not experts.quantized:
            raise MemoryBudgetError(
                _CONVERT_FIRST.format(what="this model's experts are float", folder=folder or "CHECKPOINT")
            )
        E = experts.gate_up_weight.shape[0]
        layer = {}
        for name in _EXPERT_TENSORS:
            canonical = f"blocks.{i}.mlp.experts.{name}"
            param = getattr(experts, name)
            srcs, build = recipes.get(canonical, ([], None))
            if len(srcs) != 1 or build not in (W.identity, W.blocks_to_uint32):
                raise MemoryBudgetError(
                    f"{folder}: {canonical} is not stored as one tensor of experts along axis 0 "
                    f"({layout} layout), so its experts cannot be read one by one. "
                    + _CONVERT_FIRST.format(
                        what="this layout is not streamable", folder=folder or "CHECKPOINT"
                    )
                )
            path = tensors.file_of[srcs[0]]
            header = header_of(path, headers)
            info = header.tensors[srcs[0]]
            lo, hi = info["data_offsets"]
            per_expert = int(np.prod(param.shape[1:])) * param.dtype.size
            if info["dtype"] not in st.INTEGERS or st.ITEMSIZE[info["dtype"]] > 4:
                raise MemoryBudgetError(
                    _CONVERT_FIRST.format(
                        what=f"{srcs[0]!r} in {path.name} is {info['dtype']}, not packed MXFP4",
                        folder=folder or "CHECKPOINT",
                    )
                )
            if not info["shape"] or info["shape"][0] != E or hi - lo != E * per_expert:
                raise MemoryBudgetError(
                    f"{path}: {srcs[0]!r} has shape {info['shape']} ({hi - lo} bytes); expected {E} experts "
                    f"of {per_expert} bytes along axis 0 for {canonical}"
                )
            np_dtype = np.dtype(np.uint32 if param.dtype == mx.uint32 else np.uint8).newbyteorder("<")
            layer[name] = ExpertSource(
                path, header.data_start + lo, per_expert, np_dtype, tuple(param.shape[1:])
            )
        layers.append(layer)
    return layers


# ---- the embedding table, row by row ------------------------------------------------------------------


def embedding_source(
    model: Transformer, tensors: W.LazyTensors, recipes: dict, headers: dict
) -> tuple[ExpertSource, mx.Dtype] | None:
    """Where row t of the token embedding is stored (row = one contiguous read), or None when it is
    not a plain float table in one tensor (a quantized embedding stays resident)."""
    emb = model.embedding
    srcs, build = recipes.get("embedding.weight", ([], None))
    if not isinstance(emb, nn.Embedding) or len(srcs) != 1 or build is not W.identity:
        return None
    path = tensors.file_of[srcs[0]]
    header = header_of(path, headers)
    info = header.tensors[srcs[0]]
    if info["dtype"] not in st.FLOATS or tuple(info["shape"]) != tuple(emb.weight.shape):
        return None
    stored, np_dtype = st.FLOATS[info["dtype"]], st.DTYPES[info["dtype"]].numpy
    V, H = emb.weight.shape
    return ExpertSource(path, header.offset(srcs[0]), H * np_dtype.itemsize, np_dtype, (H,)), stored


class StreamingEmbedding(nn.Module):
    """The token embedding read from the checkpoint a row per token (pread), never held whole.

    gpt-oss's table is 201,088 x 2,880 (1.16 GB in bf16); a step needs one row. Bit-identical to
    the resident table (same bytes, same cast).
    """

    def __init__(self, source: ExpertSource, stored: mx.Dtype, files: _Files, dtype: mx.Dtype):
        super().__init__()
        self._source, self._stored, self._files, self._dtype = source, stored, files, dtype
        self.rows_read = 0

    @property
    def dtype(self) -> mx.Dtype:
        return self._dtype

    def __call__(self, tokens: mx.array) -> mx.array:
        ids = np.asarray(tokens).reshape(-1)  # a host sync on token ids, which come from the host
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = np.stack([self._files.read(self._source, int(t)) for t in unique])
        self.rows_read += len(unique)
        table = mx.array(rows)
        if self._stored == mx.bfloat16:
            table = table.view(mx.bfloat16)
        table = table.astype(self._dtype)
        return table[mx.array(inverse.reshape(-1))].reshape(*tokens.shape, -1)


# ---- statistics ---------------------------------------------------------------------------------------


@dataclass
class StreamingStats:
    """Counts over calls: a lookup is one distinct expert needed by one call of one layer."""

    lookups: int = 0
    hits: int = 0
    experts_read: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    evictions: int = 0

    @property
    def misses(self) -> int:
        return self.lookups - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def __add__(self, other: StreamingStats) -> StreamingStats:
        return StreamingStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def summary(self) -> str:
        mb_s = self.bytes_read / self.read_seconds / 1e6 if self.read_seconds else 0.0
        return (
            f"expert cache hit rate {self.hit_rate:.1%} ({self.hits}/{self.lookups}), "
            f"read {self.experts_read} experts = {self.bytes_read / 1e9:.2f} GB in {self.read_seconds:.2f} s"
            + (f" ({mb_s:.0f} MB/s)" if mb_s else "")
        )


@dataclass
class StreamingPlan:
    """How a budget was split (bytes); the model's runtime keeps it (`runtime_of(model).streaming`)."""

    budget: int
    resident_bytes: int
    allowance_bytes: int
    expert_bytes: int
    layers: int
    slots: int
    num_experts: int
    top_k: int

    @property
    def expert_cache_bytes(self) -> int:
        return self.slots * self.layers * self.expert_bytes

    @property
    def minimum_budget(self) -> int:
        return min_budget(
            self.resident_bytes, self.allowance_bytes, self.expert_bytes, self.layers, self.top_k
        )


# ---- the module ---------------------------------------------------------------------------------------


class _Compact:
    """`moe.Experts`'s math (its very methods) over a compact stack of experts."""

    quantized = True
    _matmul = Experts._matmul
    __call__ = Experts.__call__

    def __init__(self, alpha: float, limit: float, arrays: dict[str, mx.array]):
        self.alpha, self.limit = alpha, limit
        for name, a in arrays.items():
            setattr(self, name, a)


class _LRU:
    """expert id -> {tensor name: mx.array}, most recently used last. A plain object on purpose:
    nn.Module would make a dict attribute part of the model's parameters."""

    def __init__(self, slots: int):
        self.slots = slots
        self.entries: OrderedDict[int, dict[str, mx.array]] = OrderedDict()
        self.stats = StreamingStats()


class StreamingExperts(nn.Module):
    """Drop-in for `moe.Experts`: biases resident, at most `slots` experts' weights cached (LRU)."""

    def __init__(self, experts: Experts, sources: dict[str, ExpertSource], files: _Files, slots: int):
        super().__init__()
        self.gate_up_bias = experts.gate_up_bias
        self.down_bias = experts.down_bias
        self.alpha, self.limit = experts.alpha, experts.limit
        self.num_experts = experts.gate_up_weight.shape[0]
        # No `quantized` attribute: moe.mxfp4_weights then finds no weights for the fused kernels (they
        # index the full expert tensors, which are not here): the layer takes __call__.
        self.streaming = True
        self._sources = sources
        self._files = files
        self._lru = _LRU(slots)

    @property
    def slots(self) -> int:
        return self._lru.slots

    @property
    def stats(self) -> StreamingStats:
        return self._lru.stats

    def cached_experts(self) -> list[int]:
        return list(self._lru.entries)

    def _ensure(self, wanted: np.ndarray) -> list[dict[str, mx.array]]:
        """The weights of `wanted` (sorted expert ids, at most `slots`): hits first, then reads in file
        order, evicting the least recently used experts not wanted now."""
        lru, stats = self._lru, self._lru.stats
        stats.lookups += len(wanted)
        for e in wanted:
            if int(e) in lru.entries:
                stats.hits += 1
                lru.entries.move_to_end(int(e))
        keep = {int(e) for e in wanted}
        for e in wanted:
            e = int(e)
            if e in lru.entries:
                continue
            while len(lru.entries) >= lru.slots:
                victim = next(v for v in lru.entries if v not in keep)
                del lru.entries[victim]
                stats.evictions += 1
            t0 = time.perf_counter()
            arrays = {name: mx.array(self._files.read(src, e)) for name, src in self._sources.items()}
            mx.eval(*arrays.values())  # own the bytes now; the numpy buffers go
            stats.read_seconds += time.perf_counter() - t0
            stats.experts_read += 1
            stats.bytes_read += sum(src.stride for src in self._sources.values())
            lru.entries[e] = arrays
        return [lru.entries[int(e)] for e in wanted]

    def _compact(self, wanted: np.ndarray) -> tuple[_Compact, np.ndarray]:
        """A `_Compact` over `wanted`'s experts and the map expert id -> position in it."""
        cached = self._ensure(wanted)
        arrays = {name: mx.stack([c[name] for c in cached]) for name in _EXPERT_TENSORS}
        ids = mx.array(wanted.astype(np.uint32))
        arrays["gate_up_bias"] = self.gate_up_bias[ids]
        arrays["down_bias"] = self.down_bias[ids]
        remap = np.zeros(self.num_experts, dtype=np.uint32)
        remap[wanted] = np.arange(len(wanted), dtype=np.uint32)
        return _Compact(self.alpha, self.limit, arrays), remap

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, H], indices [N, k] -> each selected expert's output [N, k, H], as Experts computes it."""
        # A host sync: the experts to read must be known on the host before reading them, so this
        # evaluates the graph up to this layer's router. It only costs the overlap of building the
        # next layers' graph with this one's compute, which is nothing next to reading an expert.
        idx = np.array(indices)
        needed = np.unique(idx)  # sorted: positions in the stack keep the experts' order
        if len(needed) <= self.slots:
            compact, remap = self._compact(needed)
            return compact(x, mx.array(remap[idx]).astype(indices.dtype))
        # More distinct experts than slots (a prefill, or a batch): a group of `slots` experts at a
        # time, each computing only its own (token, expert) pairs, in the form Experts.__call__ uses
        # for this many pairs (token order below SORT_THRESHOLD, sorted by expert above), one
        # independent row per pair either way, so every row is computed as the resident model does.
        # The experts already cached go first (a group of hits), then the rest: consecutive calls (the
        # chunks of a prefill) then read only what does not fit, instead of every expert again.
        N, k = idx.shape
        flat = idx.reshape(-1)
        by_expert = N * k >= SORT_THRESHOLD
        order = np.argsort(flat, kind="stable") if by_expert else np.arange(N * k)
        in_order = flat[order]
        cached = np.isin(needed, np.fromiter(self._lru.entries, dtype=needed.dtype))
        queue = np.concatenate([needed[cached], needed[~cached]])
        parts, done = [], []
        for start in range(0, len(queue), self.slots):
            # Sorted within the group: on the sorted path the local ids must ascend with the pairs.
            group = np.sort(queue[start : start + self.slots])
            pairs = order[np.isin(in_order, group)]  # still sorted by expert on the sorted path
            compact, remap = self._compact(group)
            local = mx.array(remap[flat[pairs]]).astype(indices.dtype)
            h = x[mx.array(pairs // k)]
            if by_expert:
                h = h[:, None, :]  # [P, 1, H] against sorted [P]
            else:
                h, local = h[:, None, None, :], local[:, None]  # [P, 1, 1, H] against [P, 1]
            h = compact._matmul(h, "gate_up", local, by_expert)
            h = clamped_swiglu(h, self.alpha, self.limit)
            h = compact._matmul(h, "down", local, by_expert).reshape(len(pairs), -1)
            mx.eval(h)  # frees this group's stack (and evicted experts) before the next one is built
            parts.append(h)
            done.append(pairs)
        y = mx.concatenate(parts, axis=0)
        return y[mx.array(np.argsort(np.concatenate(done)))].reshape(N, k, -1)


# ---- planning and installing ---------------------------------------------------------------------------


def plan_streaming(
    model: Transformer, budget: str | int, context: int = DEFAULT_CONTEXT, allowance: int | None = None
) -> StreamingPlan:
    """Split `budget` into resident weights, KV/activations and expert slots per layer (checked)."""
    total = parse_budget(budget)
    config: ModelConfig = model.config
    resident = expert = 0
    for name, p in tree_flatten(model.parameters()):
        if _EXPERT_PARAM.search(name):
            expert += p.nbytes
        else:
            resident += p.nbytes
    resident += model_copy_bytes(model)  # the CPU decode step's float32 unembedding (host_head.py)
    L, E, k = config.num_layers, config.num_experts, config.experts_per_token
    per_expert = expert // (L * E)
    if allowance is None:
        act = model.dtype if mx.issubdtype(model.dtype, mx.floating) else mx.bfloat16
        allowance = kv_bytes(config, context, act.size) + ACTIVATION_ALLOWANCE
    slots = min(E, (total - resident - allowance) // ((L + 1) * per_expert)) if total > resident else 0
    plan = StreamingPlan(total, resident, allowance, per_expert, L, max(int(slots), 0), E, k)
    if slots < k:
        need = plan.minimum_budget
        suggest = f"{np.ceil(need / 1e8) / 10:.1f}GB"
        raise MemoryBudgetError(
            f"memory_budget={budget!r} ({_gb(total)}) is too small for this model: it needs at least "
            f"{_gb(need)} = resident weights {_gb(resident)} + KV cache and activations {_gb(allowance)} "
            f"+ {k} experts (top-k) x ({L} layers + 1) x {per_expert / 1e6:.3g} MB. "
            f"Use memory_budget='{suggest}' (--memory-budget {suggest}) or more."
        )
    return plan


def stream_experts(
    model: Transformer,
    tensors: W.LazyTensors,
    recipes: dict,
    budget: str | int,
    *,
    layout: str,
    folder: Path | None = None,
    context: int = DEFAULT_CONTEXT,
) -> StreamingPlan:
    """Swap every layer's Experts for StreamingExperts within `budget` (and a plain float embedding
    table for StreamingEmbedding); load the resident weights."""
    sources = expert_sources(model, tensors, recipes, layout, folder)  # refuses hf-float first
    files = _Files()
    row_source = embedding_source(model, tensors, recipes, {})
    # Open every file now: the offsets above are these files' headers, so a file deleted or replaced
    # later (a re-conversion into the same folder) must not be read in their place.
    for path in {src.path for layer in sources for src in layer.values()}:
        files.open(path)
    if row_source is not None:
        files.open(row_source[0].path)
    if row_source is not None:  # before planning: the table no longer counts as resident
        source, stored = row_source
        model.embedding = StreamingEmbedding(source, stored, files, model.embedding.weight.dtype)
    plan = plan_streaming(model, budget, context)
    for block, layer_sources in zip(model.blocks, sources):
        block.mlp.experts = StreamingExperts(block.mlp.experts, layer_sources, files, plan.slots)
    mx.eval(model.parameters())  # the resident part only: the expert tensors are gone, never read
    mx.clear_cache()  # the loads' transient buffers (q, k, v before their concatenation ...)
    return plan


def streaming_layers(model: Transformer) -> list[StreamingExperts]:
    return [b.mlp.experts for b in model.blocks if isinstance(b.mlp.experts, StreamingExperts)]


def model_streaming_stats(model: Transformer) -> StreamingStats | None:
    """Hit rate, bytes read ... summed over layers; None for a model loaded without memory_budget."""
    layers = streaming_layers(model)
    if not layers:
        return None
    total = StreamingStats()
    for layer in layers:
        total = total + layer.stats
    return total


def reset_streaming_stats(model: Transformer) -> None:
    for layer in streaming_layers(model):
        layer._lru.stats = StreamingStats()

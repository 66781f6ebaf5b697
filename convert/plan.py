"""Planning a conversion from the source's headers alone: every output tensor, its producer, its shard.

A `ConversionPlan` lists the shards of the converted layout and, per shard, the jobs that produce its
tensors in file order. Nothing is read while planning except safetensors headers (the loader's
`LazyTensors`, `iter_canonical` with its checks: missing tensors, shapes, dtypes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from oss_mlx import safetensors_file as st
from oss_mlx import weights as W
from oss_mlx.config import ModelConfig, read_config
from oss_mlx.errors import ConvertError
from oss_mlx.memory import weight_bytes
from oss_mlx.model import Transformer

from .presets import Preset
from .produce import StreamingTensors, _float_expert_producer, _plain_producer, _quantized_producer
from .writer import TensorSpec

DTYPES = {name: st.FLOATS[code] for name, code in st.FLOAT_NAMES.items()}  # --dtype -> mx dtype
EXPERT_ORDER = ("gate_up_weight", "gate_up_scales", "down_weight", "down_scales", "gate_up_bias", "down_bias")


@dataclass
class Job:
    """Produces `outputs` (consecutive in their shard) chunk by chunk: each step yields one array per
    output, the next rows of each (any leading shape, with the tensor's last axis). Only the first
    output is written as it comes; the others (scales, biases: small) are kept until the first is
    complete."""

    outputs: list[TensorSpec]
    produce: Callable[[], Iterator[tuple[mx.array, ...]]]
    component: str

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass
class ShardPlan:
    name: str
    kind: str  # "embedding" | "layer" | "unembedding"
    layer: int | None
    jobs: list[Job] = field(default_factory=list)

    @property
    def tensors(self) -> list[TensorSpec]:
        return [t for j in self.jobs for t in j.outputs]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


@dataclass
class ConversionPlan:
    folder: Path
    config: ModelConfig
    raw_config: dict
    layout: str
    preset: Preset
    dtype: str
    shards: list[ShardPlan]
    # The source's tensors and the recipes that map them to canonical names (fuse.py builds jobs of
    # its own from them), and entries added to config.json's oss_mlx section (fuse.py: the adapter).
    tensors: W.LazyTensors | None = field(default=None, repr=False)
    recipes: dict | None = field(default=None, repr=False)
    provenance: dict = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def file_bytes_estimate(self) -> int:
        """Tensor bytes + headers (< 4 KiB + 100 B per tensor each) + the vocabulary (~3.6 MB)."""
        headers = sum(4096 + 200 * len(s.tensors) for s in self.shards)
        return self.tensor_bytes + headers + 4 * 1024 * 1024

    def component_bytes(self) -> dict[str, int]:
        out = {c: 0 for c in ("experts", "attention", "embedding", "unembedding", "other")}
        for s in self.shards:
            for j in s.jobs:
                out[j.component] += j.nbytes
        return out

    def expected_component_bytes(self) -> dict[str, int]:
        """The memory planner's arithmetic for the same model (equal to component_bytes, tested)."""
        return weight_bytes(self.config, self.preset.spec(), DTYPES[self.dtype].size)


def component_of(name: str) -> str:
    if ".mlp.experts." in name:
        return "experts"
    if ".attn." in name and not name.endswith("norm.weight"):
        return "attention"
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("unembedding."):
        return "unembedding"
    return "other"


def _dense_part(name: str) -> str | None:
    """Which preset part quantizes this canonical tensor (None: never quantized)."""
    if name in ("embedding.weight", "unembedding.weight"):
        return name.split(".")[0]
    if name.endswith((".attn.qkv.weight", ".attn.out.weight")):
        return "attention"
    return None


def plan_conversion(folder: Path, preset: Preset, dtype: str = "bfloat16") -> ConversionPlan:
    """Read the source's config and headers, check every tensor, and lay out the converted shards."""
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    config, raw = read_config(folder)
    tensors = StreamingTensors.from_folder(folder)
    layout = W.detect_layout(folder, raw, tensors.names())
    if layout == "oss-mlx":
        section = raw["oss_mlx"]
        if any((section.get("quantization") or {}).values()) or not section.get("experts_mxfp4", True):
            raise ConvertError(
                f"{folder} is already converted (preset {section.get('preset')!r}, quantized layers): "
                "convert from the original checkpoint instead, so nothing is quantized twice."
            )
        recipes = W.canonical_recipes(tensors.names())
    elif layout == "original":
        recipes = W.original_recipes(config)
    else:
        recipes = W.hf_recipes(config, mxfp4=layout == "hf-mxfp4")
    float_experts = layout == "hf-float"
    H = config.hidden_size
    for part, q in preset.spec().items():
        if q:
            cols = [H] if part != "attention" else [H, config.num_attention_heads * config.head_dim]
            if any(c % q["group_size"] for c in cols):
                raise ConvertError(
                    f"preset {preset.name}: {part} rows of {cols} values are not a multiple of its group "
                    f"size {q['group_size']}; use --quality reference"
                )

    model = Transformer(config, quantized_experts=True)  # lazy: nothing is allocated
    expected = {k: (v.shape, v.dtype) for k, v in tree_flatten(model.parameters())}
    del model
    # Every check of the loader (missing tensors, shapes, dtypes), on lazy arrays: reads headers only.
    canon = {
        name: (tuple(a.shape), a.dtype)
        for name, a in W.iter_canonical(
            tensors,
            recipes,
            expected,
            dtype=target,
            quantize_float_experts=float_experts,
            folder=folder,
            config=config,
        )
    }

    jobs: dict[str, Job] = {}
    for name, (shape, out_dtype) in canon.items():
        if name in jobs or (float_experts and name.endswith("_scales") and ".mlp.experts." in name):
            continue
        srcs, build = recipes[name]
        part = _dense_part(name)
        q = preset.spec().get(part) if part else None
        if float_experts and W.EXPERT_WEIGHT.search(name):
            scales = name.replace("_weight", "_scales")
            outs = [TensorSpec(name, shape, out_dtype), TensorSpec(scales, *canon[scales])]
            jobs[name] = Job(outs, _float_expert_producer(tensors, srcs, build), "experts")
        elif q:
            base = name[: -len(".weight")]
            rows, cols = shape
            groups = cols // q["group_size"]
            outs = [TensorSpec(name, (rows, cols * q["bits"] // 32), mx.uint32)]
            outs.append(TensorSpec(f"{base}.scales", (rows, groups), target))
            if q.get("mode", "affine") == "affine":
                outs.append(TensorSpec(f"{base}.biases", (rows, groups), target))
            else:
                outs[1] = TensorSpec(f"{base}.scales", (rows, groups), mx.uint8)
            jobs[name] = Job(outs, _quantized_producer(tensors, srcs, build, target, q), component_of(name))
        else:
            outs = [TensorSpec(name, shape, out_dtype)]
            jobs[name] = Job(outs, _plain_producer(tensors, srcs, build, target, shape), component_of(name))

    shards = _assign_shards(config, jobs)
    return ConversionPlan(folder, config, raw, layout, preset, dtype, shards, tensors, recipes)


def _assign_shards(config: ModelConfig, jobs: dict[str, Job]) -> list[ShardPlan]:
    width = max(2, len(str(config.num_layers - 1)))
    emb = ShardPlan("model-embedding.safetensors", "embedding", None)
    layers = [
        ShardPlan(f"model-layer-{i:0{width}d}.safetensors", "layer", i) for i in range(config.num_layers)
    ]
    unemb = ShardPlan("model-unembedding.safetensors", "unembedding", None)
    for name, job in jobs.items():
        if name.startswith("blocks."):
            layers[int(name.split(".")[1])].jobs.append(job)
        elif name.startswith("embedding."):
            emb.jobs.append(job)
        else:  # unembedding, final norm
            unemb.jobs.append(job)

    def key(job: Job) -> tuple:
        first = job.outputs[0]
        tail = first.name.rsplit(".", 1)[-1]
        if ".mlp.experts." in first.name:
            return (0, EXPERT_ORDER.index(tail), "")
        if len(job.outputs) > 1:  # quantized dense: uint32 values + scales (+ biases), kept together
            return (1, 0, first.name)
        # the rest by decreasing item size (alignment), then name
        return (2, -first.dtype.size, first.name)

    shards = [emb, *layers, unemb]
    for s in shards:
        s.jobs.sort(key=key)
    return shards

"""Checkpoint layouts -> the model's canonical parameter names (see model.py), lazily.

Layouts read:
  hf-mxfp4   the hub's openai/gpt-oss-* (experts as `*_blocks` + `*_scales`), kept MXFP4 byte for byte
  hf-float   a fine-tune saved by transformers (experts `gate_up_proj` [E, H, 2I], `down_proj` [E, I, H])
  original   OpenAI's `original/` folder (`block.N.attn.qkv`, `mlp1_weight.blocks` ...)
  oss-mlx    our converted layout (canonical names already; config.json has an `oss_mlx` section)

Every tensor stays lazy (mx.load maps it; nothing is read until evaluated), so loading a 65 GB
checkpoint costs nothing until the weights are used. Problems are reported with the file, the
tensor and what was expected.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

from .config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says what and how to fix it."""


LAYOUTS = ("hf-mxfp4", "hf-float", "original", "oss-mlx")


# ---- reading safetensors files -----------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checking the file holds all the data it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a valid safetensors file (unreadable header)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: it holds {size} bytes but its header describes {8 + n + end}. "
            "Re-download or re-copy this file."
        )
    return header


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards of a folder, following model.safetensors.index.json when present."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard(s) {', '.join(missing)} listed in {index.name} are missing. "
                "Download the checkpoint again (huggingface_hub resumes partial downloads)."
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors files: not a gpt-oss checkpoint folder")
    return files


class LazyTensors:
    """name -> lazily loaded mx.array over all shards, remembering which file holds what."""

    def __init__(self, files: list[Path]):
        self.file_of: dict[str, Path] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self._loaded: dict[Path, dict[str, mx.array]] = {}
        for path in files:
            for name, info in read_safetensors_header(path).items():
                if name != "__metadata__":
                    self.file_of[name] = path
                    self.shape_of[name] = tuple(info["shape"])

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def __getitem__(self, name: str) -> mx.array:
        path = self.file_of[name]
        if path not in self._loaded:
            try:
                self._loaded[path] = mx.load(str(path))
            except Exception as e:  # mlx raises RuntimeError/ValueError with little context
                raise CheckpointError(f"{path}: cannot read ({e})") from None
        return self._loaded[path][name]


# ---- layout detection ----------------------------------------------------------------------------


def detect_layout(folder: Path, raw_config: dict, tensor_names: list[str]) -> str:
    if "oss_mlx" in raw_config:
        return "oss-mlx"
    if "experts_per_token" in raw_config and "num_experts" in raw_config:
        return "original"
    if any(n.endswith("experts.gate_up_proj_blocks") for n in tensor_names):
        return "hf-mxfp4"
    if any(n.endswith("experts.gate_up_proj") for n in tensor_names):
        return "hf-float"
    raise CheckpointError(
        f"{folder}: cannot tell the checkpoint layout: no expert tensors named like "
        "'model.layers.0.mlp.experts.gate_up_proj[_blocks]' (Hugging Face) or "
        "'block.0.mlp.mlp1_weight.blocks' (OpenAI original)."
    )


# ---- mappings: (canonical name) <- recipe over source tensors -------------------------------------

# A recipe lists the source tensor names and a function that builds the canonical tensor from them.
Recipe = tuple[list[str], Callable[..., mx.array]]


def blocks_to_uint32(blocks: mx.array) -> mx.array:
    """[..., out, in/32, 16] uint8 -> [..., out, in/8] uint32: the same bytes, MLX's mxfp4 packing."""
    shape = blocks.shape
    return blocks.view(mx.uint32).reshape(*shape[:-2], shape[-2] * shape[-1] // 4)


def identity(x: mx.array) -> mx.array:
    return x


def concat_rows(*xs: mx.array) -> mx.array:
    return mx.concatenate(xs, axis=0)


def transpose_last(x: mx.array) -> mx.array:
    return x.swapaxes(-1, -2)


def hf_recipes(config: ModelConfig, mxfp4: bool) -> dict[str, Recipe]:
    r: dict[str, Recipe] = {
        "embedding.weight": (["model.embed_tokens.weight"], identity),
        "norm.weight": (["model.norm.weight"], identity),
        "unembedding.weight": (["lm_head.weight"], identity),
    }
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}", f"blocks.{i}"
        a = f"{src}.self_attn"
        r[f"{dst}.attn.norm.weight"] = ([f"{src}.input_layernorm.weight"], identity)
        for kind in ("weight", "bias"):
            r[f"{dst}.attn.qkv.{kind}"] = ([f"{a}.{p}_proj.{kind}" for p in "qkv"], concat_rows)
            r[f"{dst}.attn.out.{kind}"] = ([f"{a}.o_proj.{kind}"], identity)
            r[f"{dst}.mlp.router.{kind}"] = ([f"{src}.mlp.router.{kind}"], identity)
        r[f"{dst}.attn.sinks"] = ([f"{a}.sinks"], identity)
        r[f"{dst}.mlp.norm.weight"] = ([f"{src}.post_attention_layernorm.weight"], identity)
        e = f"{src}.mlp.experts"
        for proj, name in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
            r[f"{dst}.mlp.experts.{name}_bias"] = ([f"{e}.{proj}_bias"], identity)
            if mxfp4:
                r[f"{dst}.mlp.experts.{name}_weight"] = ([f"{e}.{proj}_blocks"], blocks_to_uint32)
                r[f"{dst}.mlp.experts.{name}_scales"] = ([f"{e}.{proj}_scales"], identity)
            else:  # transformers stores [E, in, out]; we keep [E, out, in] like the blocks
                r[f"{dst}.mlp.experts.{name}_weight"] = ([f"{e}.{proj}"], transpose_last)
    return r


def original_recipes(config: ModelConfig) -> dict[str, Recipe]:
    r: dict[str, Recipe] = {
        "embedding.weight": (["embedding.weight"], identity),
        "norm.weight": (["norm.scale"], identity),
        "unembedding.weight": (["unembedding.weight"], identity),
    }
    for i in range(config.num_layers):
        src, dst = f"block.{i}", f"blocks.{i}"
        r[f"{dst}.attn.norm.weight"] = ([f"{src}.attn.norm.scale"], identity)
        r[f"{dst}.attn.sinks"] = ([f"{src}.attn.sinks"], identity)
        r[f"{dst}.mlp.norm.weight"] = ([f"{src}.mlp.norm.scale"], identity)
        for kind in ("weight", "bias"):
            r[f"{dst}.attn.qkv.{kind}"] = ([f"{src}.attn.qkv.{kind}"], identity)
            r[f"{dst}.attn.out.{kind}"] = ([f"{src}.attn.out.{kind}"], identity)
            r[f"{dst}.mlp.router.{kind}"] = ([f"{src}.mlp.gate.{kind}"], identity)
        for mlp, name in (("mlp1", "gate_up"), ("mlp2", "down")):
            r[f"{dst}.mlp.experts.{name}_weight"] = ([f"{src}.mlp.{mlp}_weight.blocks"], blocks_to_uint32)
            r[f"{dst}.mlp.experts.{name}_scales"] = ([f"{src}.mlp.{mlp}_weight.scales"], identity)
            r[f"{dst}.mlp.experts.{name}_bias"] = ([f"{src}.mlp.{mlp}_bias"], identity)
    return r


def canonical_recipes(names: list[str]) -> dict[str, Recipe]:
    return {n: ([n], identity) for n in names}


# ---- putting it together --------------------------------------------------------------------------

EXPERT_WEIGHT = re.compile(r"\.mlp\.experts\.(gate_up|down)_weight$")


def iter_canonical(
    tensors: LazyTensors,
    recipes: dict[str, Recipe],
    expected: dict[str, tuple[tuple[int, ...], mx.Dtype]],
    *,
    dtype: mx.Dtype | None = None,
    quantize_float_experts: bool = False,
    folder: Path | None = None,
) -> Iterator[tuple[str, mx.array]]:
    """Yield (canonical name, lazy array) for every parameter the model expects.

    `expected` maps canonical names to (shape, dtype) of the model being filled. Float tensors are
    cast to `dtype` when given; packed MXFP4 values and scales are never touched.
    """
    missing = [
        (name, src)
        for name, (srcs, _) in recipes.items()
        if name in expected
        for src in srcs
        if src not in tensors
    ]
    if missing:
        shown = ", ".join(f"{src!r} (for {name})" for name, src in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{folder}: missing tensor(s) {shown}{more}. The checkpoint is incomplete or not a "
            "gpt-oss model of this config (check num_hidden_layers / num_local_experts in config.json)."
        )
    for name, (shape, want_dtype) in expected.items():
        if name.endswith("_scales") and quantize_float_experts and name not in recipes:
            continue  # produced together with the weight below
        if name not in recipes:
            raise CheckpointError(f"{folder}: no source for parameter {name!r} in this layout")
        srcs, build = recipes[name]
        array = build(*(tensors[s] for s in srcs))
        if quantize_float_experts and EXPERT_WEIGHT.search(name):
            # A float fine-tune: quantize to MXFP4 like the released experts.
            unpacked = (*shape[:-1], shape[-1] * 8)  # eight 4-bit values per uint32
            _check_shape(name, array.shape, unpacked, srcs, tensors)
            # One expert at a time: MLX's CPU quantizer needs ~77 bytes of scratch per value, so a
            # whole 20b layer at once would need ~41 GB.
            parts = [
                mx.quantize(array[e].astype(mx.float32), group_size=32, bits=4, mode="mxfp4")
                for e in range(array.shape[0])
            ]
            w, scales = mx.stack([p[0] for p in parts]), mx.stack([p[1] for p in parts])
            yield name, w
            yield name.replace("_weight", "_scales"), scales
            continue
        _check_shape(name, array.shape, shape, srcs, tensors)
        if mx.issubdtype(array.dtype, mx.floating):
            target = dtype if dtype is not None else array.dtype
            if mx.issubdtype(want_dtype, mx.floating) or dtype is not None:
                array = array.astype(target)
        elif array.dtype != want_dtype:
            raise CheckpointError(
                f"{tensors.file_of[srcs[0]]}: tensor {srcs[0]!r} has dtype {array.dtype}, "
                f"expected {want_dtype}"
            )
        yield name, array


def _check_shape(name, got, want, srcs, tensors) -> None:
    if tuple(got) != tuple(want):
        where = ", ".join(f"{s!r} {list(tensors.shape_of[s])} in {tensors.file_of[s]}" for s in srcs)
        raise CheckpointError(
            f"tensor {where}: gives {name} of shape {list(got)}, expected {list(want)} from config.json. "
            "The weights do not match the config (wrong config.json, or a different model)."
        )

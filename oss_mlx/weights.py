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
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx

from . import mxfp4
from . import safetensors_file as st
from .config import ModelConfig, defaults_note, is_original_dialect
from .errors import CheckpointError

LAYOUTS = ("hf-mxfp4", "hf-float", "original", "oss-mlx")


# ---- reading safetensors files -----------------------------------------------------------------


def read_index(folder: Path) -> dict[str, str] | None:
    """model.safetensors.index.json's weight_map (tensor -> shard file name), None without one."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{index} cannot be read ({e.strerror or e})") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    return weight_map


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards of a folder, following model.safetensors.index.json when present."""
    weight_map = read_index(folder)
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard(s) {', '.join(missing)} listed in model.safetensors.index.json are "
                "missing. Download the checkpoint again (huggingface_hub resumes partial downloads)."
            )
        if not names:
            raise CheckpointError(f"{folder}: model.safetensors.index.json lists no tensors")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors files: not a gpt-oss checkpoint folder")
    return files


class LazyTensors:
    """name -> lazily loaded mx.array over all shards, remembering which file holds what.

    weight_map (the index's, tensor -> shard path): each tensor is read from the shard the index
    names, which must hold it.
    Without an index a name may be in one file only (a stale copy beside new shards is refused).
    """

    def __init__(self, files: list[Path], weight_map: dict[str, Path] | None = None):
        self.file_of: dict[str, Path] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.dtype_of: dict[str, str] = {}  # the safetensors dtype, e.g. "BF16"
        self._loaded: dict[Path, dict[str, mx.array]] = {}
        for path in files:
            for name, info in st.read_header(path).tensors.items():
                if weight_map is not None and weight_map.get(name) != path:
                    continue  # the index puts it elsewhere (or nowhere): that copy is not read
                if name in self.file_of:
                    raise CheckpointError(
                        f"tensor {name!r} is in both {self.file_of[name]} and {path}: remove the stale "
                        "file (or add a model.safetensors.index.json saying which shard holds what)"
                    )
                self.file_of[name] = path
                self.shape_of[name] = tuple(info["shape"])
                self.dtype_of[name] = info["dtype"]
        if weight_map is not None:
            absent = [n for n in weight_map if n not in self.file_of]
            if absent:
                shown = ", ".join(f"{n!r} (in {weight_map[n].name})" for n in absent[:3])
                raise CheckpointError(
                    f"model.safetensors.index.json lists {len(absent)} tensor(s) its shards do not hold: "
                    f"{shown}. The shards and the index are from different downloads: download again."
                )

    @classmethod
    def from_folder(cls, folder: Path) -> LazyTensors:
        """The tensors of a checkpoint folder (its index, if any, and its shards, all checked)."""
        weight_map = read_index(folder)
        files = checkpoint_files(folder)
        return cls(files, None if weight_map is None else {k: folder / v for k, v in weight_map.items()})

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
    if is_original_dialect(raw_config):
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

Shape = tuple[int, ...]
# What a source tensor must be: its shape and dtype (any float dtype stands for all three floats).
Expected = tuple[Shape, mx.Dtype]


class Build:
    """Builds a canonical tensor from its source tensors, and says what those must be, so that every
    layout's sources are checked (from the file headers) before any array is made."""

    what = ""  # how the sources are stored, for error messages

    def __call__(self, *xs: mx.array) -> mx.array:
        raise NotImplementedError

    def sources(self, shape: Shape, dtype: mx.Dtype) -> list[Expected]:
        """(shape, dtype) of each source for a canonical tensor of this shape and dtype."""
        return [(shape, dtype)]


class Identity(Build):
    def __call__(self, x: mx.array) -> mx.array:
        return x


class TransposeLast(Build):
    what = "transformers stores expert weights [experts, in, out]"

    def __call__(self, x: mx.array) -> mx.array:
        return x.swapaxes(-1, -2)

    def sources(self, shape: Shape, dtype: mx.Dtype) -> list[Expected]:
        return [((*shape[:-2], shape[-1], shape[-2]), dtype)]


class BlocksToUint32(Build):
    """[..., out, in/32, 16] uint8 -> [..., out, in/8] uint32: the same bytes, MLX's mxfp4 packing."""

    what = "MXFP4 blocks are uint8, 16 bytes per 32 values"

    def __call__(self, blocks: mx.array) -> mx.array:
        shape = blocks.shape
        return blocks.view(mx.uint32).reshape(*shape[:-2], shape[-2] * shape[-1] // 4)

    def sources(self, shape: Shape, dtype: mx.Dtype) -> list[Expected]:
        return [((*shape[:-1], shape[-1] // 4, 16), mx.uint8)]


class ConcatRows(Build):
    """Sources of `rows` rows each (q, k, v projections), stacked on axis 0."""

    what = "q, k and v projections of (heads x head_dim) rows each"

    def __init__(self, rows: tuple[int, ...]):
        self.rows = rows

    def __call__(self, *xs: mx.array) -> mx.array:
        return mx.concatenate(xs, axis=0)

    def sources(self, shape: Shape, dtype: mx.Dtype) -> list[Expected]:
        return [((r, *shape[1:]), dtype) for r in self.rows]


identity, transpose_last, blocks_to_uint32 = Identity(), TransposeLast(), BlocksToUint32()

# A recipe lists the source tensor names and how the canonical tensor is built from them.
Recipe = tuple[list[str], Build]


def hf_recipes(config: ModelConfig, mxfp4: bool) -> dict[str, Recipe]:
    D, hq, hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    qkv = ConcatRows((hq * D, hkv * D, hkv * D))
    # tie_word_embeddings: transformers' lm_head is the embedding (lm_head.weight, if saved, unused).
    lm_head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    r: dict[str, Recipe] = {
        "embedding.weight": (["model.embed_tokens.weight"], identity),
        "norm.weight": (["model.norm.weight"], identity),
        "unembedding.weight": ([lm_head], identity),
    }
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}", f"blocks.{i}"
        a = f"{src}.self_attn"
        r[f"{dst}.attn.norm.weight"] = ([f"{src}.input_layernorm.weight"], identity)
        for kind in ("weight", "bias"):
            r[f"{dst}.attn.qkv.{kind}"] = ([f"{a}.{p}_proj.{kind}" for p in "qkv"], qkv)
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
_LAYER = re.compile(r"\.(\d+)\.")


class CheckpointWarning(UserWarning):
    """Something in a checkpoint that is not used (the model loads without it)."""


def check_checkpoint(
    tensors: LazyTensors,
    recipes: dict[str, Recipe],
    expected: dict[str, tuple[Shape, mx.Dtype]],
    *,
    quantize_float_experts: bool = False,
    folder: Path | None = None,
    config: ModelConfig | None = None,
) -> None:
    """Every check of a checkpoint against the model it fills, from the file headers only (no array
    is made): each parameter has its source tensors, each source has the shape and dtype the config
    implies, and every tensor of the checkpoint is used.

    Raises CheckpointError naming the tensor, its file and what was expected. Tensors left over are
    refused when they belong to layers the config does not have (almost certainly the wrong
    config.json: loading would silently drop part of the model), and otherwise named in a
    CheckpointWarning, as transformers reports UNEXPECTED keys.
    """
    where = folder or "the checkpoint"
    names = [
        name
        for name in expected
        if not (quantize_float_experts and name.endswith("_scales") and name not in recipes)
    ]
    # A parameter without a recipe (the canonical layout: one per tensor present) misses its tensor.
    missing = [
        (name, src) for name in names for src in recipes.get(name, ([name], None))[0] if src not in tensors
    ]
    if missing:
        shown = ", ".join(f"{src!r} (for {name})" for name, src in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{where}: missing tensor(s) {shown}{more}. The checkpoint is incomplete or not a gpt-oss "
            f"model of this config (check num_hidden_layers / num_local_experts in config.json)"
            f"{_defaults_note(config)}."
        )
    needed = {name: recipes[name] for name in names}
    for name, (srcs, build) in needed.items():
        shape, dtype = expected[name]
        if quantize_float_experts and EXPERT_WEIGHT.search(name):
            shape, dtype = (*shape[:-1], shape[-1] * mxfp4.VALUES_PER_WORD), mx.float32
        for src, (want_shape, want_dtype) in zip(srcs, build.sources(tuple(shape), dtype)):
            _check_source(tensors, src, name, want_shape, want_dtype, build, config)
    used = {src for srcs, _ in needed.values() for src in srcs}
    _check_leftovers([n for n in tensors.names() if n not in used], used, tensors, where, config)


def _kind(dtype: mx.Dtype) -> str:
    if mx.issubdtype(dtype, mx.floating):
        return "float (bfloat16, float16 or float32)"
    return str(dtype).removeprefix("mlx.core.")


def _dtype_name(st_dtype: str) -> str:
    known = st_dtype in st.MLX_DTYPES
    return str(st.MLX_DTYPES[st_dtype]).removeprefix("mlx.core.") if known else st_dtype


def _check_source(tensors, src, name, want_shape, want_dtype, build, config) -> None:
    got_shape, got_dtype = tensors.shape_of[src], tensors.dtype_of[src]
    if mx.issubdtype(want_dtype, mx.floating):
        dtype_ok = got_dtype in st.FLOATS
    else:
        dtype_ok = st.MLX_DTYPES.get(got_dtype) == want_dtype
    if tuple(got_shape) == tuple(want_shape) and dtype_ok:
        return
    why = (
        "The weights do not match the config (wrong config.json, or a different model)"
        if tuple(got_shape) != tuple(want_shape)
        else "The tensor was saved in another dtype: re-save it as the original checkpoint stores it"
    )
    hint = f" ({build.what})" if build.what else ""
    if name.endswith("_scales") and ".experts." in name:
        hint = f" (MXFP4 scales are uint8 e8m0 exponents, one per {mxfp4.GROUP_SIZE} values)"
    got = f"{list(got_shape)} {_dtype_name(got_dtype)}"
    raise CheckpointError(
        f"{tensors.file_of[src]}: tensor {src!r} is {got}, expected {list(want_shape)} {_kind(want_dtype)} "
        f"from config.json for {name}{hint}. {why}{_defaults_note(config)}."
    )


def _defaults_note(config: ModelConfig | None) -> str:
    return defaults_note(config.defaulted) if config is not None else ""


def _check_leftovers(unused: list[str], used: set[str], tensors: LazyTensors, where, config) -> None:
    if not unused:
        return
    # A left-over tensor named like a used one but for another index is a layer the config
    # does not have: loading would silently drop part of the model.
    pattern = {_LAYER.sub(".#.", n) for n in used}
    extra = [n for n in unused if _LAYER.search(n) and _LAYER.sub(".#.", n) in pattern]
    if extra:
        layers = sorted({int(_LAYER.search(n).group(1)) for n in extra})
        shown = ", ".join(str(i) for i in layers[:8]) + (" ..." if len(layers) > 8 else "")
        have = f" (num_hidden_layers = {config.num_layers})" if config else ""
        raise CheckpointError(
            f"{where}: the checkpoint holds layer(s) {shown} that config.json does not have{have}, e.g. "
            f"{extra[0]!r} in {tensors.file_of[extra[0]]}. Loading would silently drop them: this "
            "config.json is not the checkpoint's (fix num_hidden_layers or use the matching config)."
        )
    shown = ", ".join(repr(n) for n in sorted(unused)[:8]) + (" ..." if len(unused) > 8 else "")
    warnings.warn(
        CheckpointWarning(f"{where}: {len(unused)} tensor(s) of the checkpoint are not used: {shown}"),
        stacklevel=3,
    )


def iter_canonical(
    tensors: LazyTensors,
    recipes: dict[str, Recipe],
    expected: dict[str, tuple[Shape, mx.Dtype]],
    *,
    dtype: mx.Dtype | None = None,
    quantize_float_experts: bool = False,
    folder: Path | None = None,
    config: ModelConfig | None = None,
) -> Iterator[tuple[str, mx.array]]:
    """Yield (canonical name, lazy array) for every parameter the model expects, after checking the
    whole checkpoint first (check_checkpoint).

    `expected` maps canonical names to (shape, dtype) of the model being filled. Float tensors are
    cast to `dtype` when given; packed MXFP4 values and scales are never touched.
    """
    check_checkpoint(
        tensors,
        recipes,
        expected,
        quantize_float_experts=quantize_float_experts,
        folder=folder,
        config=config,
    )
    for name, (_, want_dtype) in expected.items():
        if name.endswith("_scales") and quantize_float_experts and name not in recipes:
            continue  # produced together with the weight below
        srcs, build = recipes[name]
        array = build(*(tensors[s] for s in srcs))
        if quantize_float_experts and EXPERT_WEIGHT.search(name):
            # A float fine-tune: quantize to MXFP4 like the released experts. One expert at a time:
            # MLX's CPU quantizer needs ~77 bytes of scratch per value, so a whole 20b layer at once
            # would need ~41 GB.
            parts = [mxfp4.quantize(array[e]) for e in range(array.shape[0])]
            w, scales = mx.stack([p[0] for p in parts]), mx.stack([p[1] for p in parts])
            yield name, w
            yield name.replace("_weight", "_scales"), scales
            continue
        if mx.issubdtype(array.dtype, mx.floating):
            target = dtype if dtype is not None else array.dtype
            if mx.issubdtype(want_dtype, mx.floating) or dtype is not None:
                array = array.astype(target)
        yield name, array

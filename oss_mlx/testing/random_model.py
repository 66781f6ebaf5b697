"""A random-weight gpt-oss built in memory, of realistic scale: `oss-mlx bench --config` and the kernel
tests run on it (no checkpoint on disk). The values follow `synthetic`'s scales: linear weights
N(0, 1/fan_in), FP4 codes uniform, e8m0 exponents around `synthetic.scale_exponent(fan_in)`."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .. import mxfp4
from ..config import ModelConfig
from ..model import Transformer
from .synthetic import BIAS_STD, NORM_STD, SyntheticSpec, scale_exponent


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of `SyntheticSpec.preset(name)`: `tiny`, `20b` or `120b`."""
    return SyntheticSpec.preset(name).model_config()


def random_codes(shape: tuple[int, ...]) -> mx.array:
    """MLX-packed FP4 codes uint32 `shape`: any bits are valid codes."""
    words = mxfp4.BITS * mxfp4.VALUES_PER_WORD // 8  # bytes per uint32
    return mx.random.randint(0, 256, (*shape[:-1], words * shape[-1]), dtype=mx.uint8).view(mx.uint32)


def random_scales(shape: tuple[int, ...], fan_in: int) -> mx.array:
    """e8m0 scales uint8 `shape`, 2^(c-1 .. c+1) around the fan-in's exponent c (activations stay O(1))."""
    c = mxfp4.SCALE_BIAS + scale_exponent(fan_in)
    return mx.random.randint(c - 1, c + 2, shape).astype(mx.uint8)


def random_parameter(name: str, p: mx.array, dtype: mx.Dtype = mx.bfloat16) -> mx.array:
    """A random value of realistic scale for parameter `name` shaped like p (draws from MLX's global
    random state: the order of calls fixes the values)."""
    shape = p.shape
    if p.dtype == mx.uint32:
        return random_codes(shape)
    if p.dtype == mx.uint8:
        return random_scales(shape, shape[-1] * mxfp4.GROUP_SIZE)
    if name.endswith("norm.weight"):
        return (1 + NORM_STD * mx.random.normal(shape)).astype(dtype)
    if name.endswith("sinks"):
        return mx.random.normal(shape).astype(dtype)  # SINK_STD = 1
    if name.endswith("bias"):
        return (BIAS_STD * mx.random.normal(shape)).astype(dtype)
    if name.startswith("embedding"):
        return mx.random.normal(shape, dtype=dtype)  # EMBED_STD = 1
    return (mx.random.normal(shape, dtype=dtype) * (1 / math.sqrt(shape[-1]))).astype(dtype)


def random_parts(model: Transformer) -> list[tuple[nn.Module, str]]:
    """The modules random_model fills, in its order, with their name prefixes (a distributed rank
    draws the same sequence and keeps its part: benchmarks/distributed_bench.py)."""
    parts = [(block, f"blocks.{i}.") for i, block in enumerate(model.blocks)]
    return parts + [
        (model.embedding, "embedding."),
        (model.norm, "norm."),
        (model.unembedding, "unembedding."),
    ]


def random_model(config: ModelConfig, seed: int = 0, dtype: mx.Dtype = mx.bfloat16) -> Transformer:
    """A gpt-oss with random weights of realistic scale, built block by block in memory, prepared for the
    backend as the loader prepares a checkpoint's."""
    from ..loader import prepare_for_backend

    mx.random.seed(seed)
    model = Transformer(config, quantized_experts=True)
    for module, prefix in random_parts(model):
        params = [(n, random_parameter(prefix + n, p, dtype)) for n, p in tree_flatten(module.parameters())]
        module.update(tree_unflatten(params))
        mx.eval(module.parameters())
    prepare_for_backend(model)
    return model


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    """n token ids, uniform over the vocabulary (the same for the same n and seed)."""
    key = mx.random.key(seed + n)
    return mx.random.randint(0, vocab, (n,), key=key).tolist()

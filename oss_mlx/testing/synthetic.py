"""Random gpt-oss checkpoints, written without torch: the test suite's fixtures and the benchmarks' models.

`write_checkpoint` writes ONE model (the same numbers) in any of three on-disk layouts:

``hf-mxfp4``
    The Hugging Face hub layout of ``openai/gpt-oss-20b``: ``config.json`` with a ``quantization_config``
    (``quant_method: mxfp4``) and experts as ``*_blocks`` uint8 [E, out, in/32, 16] + ``*_scales`` uint8
    [E, out, in/32]. Several shards are named as the hub names them (zero-based, "of" the last index:
    ``model-00000-of-00002.safetensors`` ... ``model-00002-of-00002.safetensors``) with
    ``model.safetensors.index.json``.
``hf-float``
    What ``GptOssForCausalLM.save_pretrained`` writes for a dequantized model: the same names, but
    experts as float ``gate_up_proj`` [E, H, 2I] / ``down_proj`` [E, I, H] ([E, in, out]), holding exactly
    the dequantized MXFP4 values of the ``hf-mxfp4`` layout; no ``quantization_config``; shards
    ``model-00001-of-00003.safetensors`` ...
``original``
    OpenAI's ``original/`` folder: OpenAI's config keys and ``block.{n}.attn.qkv`` (q, k, v concatenated
    on the output axis, no permutation), ``block.{n}.mlp.mlp1_weight.blocks`` ... (see `_original_tensors`).

Every float tensor is stored in ``dtype`` (bfloat16 like the hub, including norms and sinks; or float32 /
float16); blocks and scales are uint8. Values are deterministic functions of (seed, tensor name, slab index):
each tensor is generated in slabs along its first axis, so tensors come in any order and a real-shaped
checkpoint (13.8 GB for the 20b) is written streaming, holding one slab (<= 16 MB of float32) at a time.

Scales (fan-in scaled so activations stay O(1) at any size): embedding N(0, 1); linear weights
N(0, 1/fan_in) (std 0.019 at hidden 2880); biases N(0, 0.02^2); norm weights 1 + N(0, 0.05^2); sinks N(0, 1);
expert nibbles uniform over the 16 FP4 codes (rms 2.93) with e8m0 exponents 2^(c-1 .. c+1),
c = round(-log2(2.93 sqrt(fan_in))) (c = -7 at 2880, -5 at 64), so dequantized values are FP4 x 2^k, exact
in bfloat16 and float16.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import mxfp4
from .. import safetensors_file as st
from ..config import FULL, ORIGINAL_DEFAULTS, SLIDING, ModelConfig, official_config

__all__ = [
    "LAYOUTS",
    "SyntheticSpec",
    "checkpoint_tensors",
    "write_checkpoint",
]

LAYOUTS = ("hf-mxfp4", "hf-float", "original")
DTYPES = ("bfloat16", "float32", "float16")


_SLAB_ELEMS = 1 << 22  # elements per generated slab (16 MB of float32)

WEIGHT_STD_GAIN = 1.0  # linear weights ~ N(0, (gain / sqrt(fan_in))^2)
BIAS_STD = 0.02
NORM_STD = 0.05
SINK_STD = 1.0
EMBED_STD = 1.0

# The hub's quantization_config (openai/gpt-oss-20b and -120b config.json).
HUB_MODULES_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]
# OpenAI's original/config.json holds exactly the fields of gpt_oss.torch.model.ModelConfig.
ORIGINAL_CONFIG_KEYS = tuple(ORIGINAL_DEFAULTS)
REAL_VOCAB = 201088
HARMONY_EOS = 200002  # <|return|>, the hub config's eos_token_id
HARMONY_PAD = 199999  # <|endoftext|>, the hub config's pad_token_id


def _num(x: float) -> int | float:
    """150000.0 -> 150000 (as the hub's config.json writes integral floats like rope_theta)."""
    return int(x) if float(x).is_integer() else float(x)


@dataclass
class SyntheticSpec:
    """Sizes and hyper-parameters of a synthetic gpt-oss (defaults: tiny, with the real vocabulary)."""

    num_layers: int = 2
    num_experts: int = 4
    experts_per_token: int = 2
    vocab_size: int = REAL_VOCAB
    hidden_size: int = 64
    intermediate_size: int = 64
    head_dim: int = 16
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    sliding_window: int = 8
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    rope_truncate: bool = False
    swiglu_limit: float = 7.0
    layer_types: list[str] | None = field(default=None)

    @classmethod
    def tiny(cls, **overrides: Any) -> SyntheticSpec:
        """2 layers, 4 experts (top-2), hidden 64, the real 201088-token vocabulary."""
        return cls(**overrides)

    @classmethod
    def from_config(cls, config: ModelConfig, **overrides: Any) -> SyntheticSpec:
        """The spec of a model of `config`'s sizes and hyper-parameters."""
        c = config
        default_types = [SLIDING if i % 2 == 0 else FULL for i in range(c.num_layers)]
        fields = dict(
            num_layers=c.num_layers,
            num_experts=c.num_experts,
            experts_per_token=c.experts_per_token,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            head_dim=c.head_dim,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            sliding_window=c.sliding_window,
            rope_theta=c.rope_theta,
            rope_scaling_factor=c.rope_scaling_factor,
            beta_fast=c.rope_beta_fast,
            beta_slow=c.rope_beta_slow,
            original_max_position_embeddings=c.rope_original_context,
            rope_truncate=c.rope_truncate,
            swiglu_limit=c.swiglu_limit,
            layer_types=None if list(c.layer_types) == default_types else list(c.layer_types),
        )
        return cls(**{**fields, **overrides})

    def model_config(self) -> ModelConfig:
        """The ModelConfig of the model this spec writes."""
        return ModelConfig(
            num_layers=self.num_layers,
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            head_dim=self.head_dim,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            sliding_window=self.sliding_window,
            layer_types=tuple(self.resolved_layer_types),
            swiglu_limit=self.swiglu_limit,
            rope_theta=self.rope_theta,
            rope_scaling_factor=self.rope_scaling_factor,
            rope_beta_fast=self.beta_fast,
            rope_beta_slow=self.beta_slow,
            rope_original_context=self.original_max_position_embeddings,
            rope_truncate=self.rope_truncate,
        )

    @classmethod
    def gpt_oss_20b(cls, **overrides: Any) -> SyntheticSpec:
        """The real shapes of openai/gpt-oss-20b (24 layers, 32 experts, top-4)."""
        return cls.from_config(official_config("20b"), **overrides)

    @classmethod
    def gpt_oss_120b(cls, **overrides: Any) -> SyntheticSpec:
        """The real shapes of openai/gpt-oss-120b (36 layers, 128 experts, top-4)."""
        return cls.from_config(official_config("120b"), **overrides)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SyntheticSpec:
        """`tiny`, `20b` or `120b`."""
        makers = {"tiny": cls.tiny, "20b": cls.gpt_oss_20b, "120b": cls.gpt_oss_120b}
        if name not in makers:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(makers)}")
        return makers[name](**overrides)

    # -- derived -------------------------------------------------------------------------------------

    @property
    def resolved_layer_types(self) -> list[str]:
        """`layer_types`, defaulting to sliding / full alternating, starting sliding (as the hub)."""
        if self.layer_types is not None:
            return list(self.layer_types)
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_layers)]

    @property
    def max_position_embeddings(self) -> int:
        return int(self.original_max_position_embeddings * self.rope_scaling_factor)

    def validate(self) -> None:
        """Raise ValueError if the sizes can't make a gpt-oss (MXFP4 needs multiples of 32, ...)."""
        problems = []
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) <= 0 or getattr(self, name) % mxfp4.GROUP_SIZE:
                problems.append(
                    f"{name}={getattr(self, name)} must be a positive multiple of {mxfp4.GROUP_SIZE} "
                    "(MXFP4 groups)"
                )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim <= 0 or self.head_dim % 2:
            problems.append("head_dim must be even")
        if not 0 < self.experts_per_token <= self.num_experts:
            problems.append("experts_per_token must be in 1..num_experts")
        if self.num_layers <= 0 or self.vocab_size <= 0:
            problems.append("num_layers and vocab_size must be positive")
        types = self.resolved_layer_types
        if len(types) != self.num_layers:
            problems.append(f"layer_types has {len(types)} entries for {self.num_layers} layers")
        if set(types) - {"sliding_attention", "full_attention"}:
            problems.append("layer_types entries must be 'sliding_attention' or 'full_attention'")
        if problems:
            raise ValueError("invalid SyntheticSpec: " + "; ".join(problems))

    def _special_ids(self) -> tuple[int, int]:
        """(eos, pad): the hub's harmony ids when the vocabulary has them, else the last two ids."""
        if self.vocab_size > HARMONY_EOS:
            return HARMONY_EOS, HARMONY_PAD
        return self.vocab_size - 1, max(self.vocab_size - 2, 0)

    def hf_config(
        self, quantized: bool = True, style: str = "hub", dtype: str = "bfloat16"
    ) -> dict[str, Any]:
        """The Hugging Face config.json.

        style "hub": as openai/gpt-oss-20b's (transformers 4.55: `rope_scaling` + `rope_theta`); with
        quantized=False it gains `torch_dtype` as a 4.x `save_pretrained` writes. style "transformers5": as
        transformers 5 `save_pretrained` writes (`rope_parameters` holding `rope_theta`; `dtype`,
        `swiglu_alpha`).
        """
        self.validate()
        if style not in ("hub", "transformers5"):
            raise ValueError(f"unknown config style {style!r}")
        eos, pad = self._special_ids()
        rope = {
            "beta_fast": float(self.beta_fast),
            "beta_slow": float(self.beta_slow),
            "factor": float(self.rope_scaling_factor),
            "original_max_position_embeddings": int(self.original_max_position_embeddings),
            "rope_type": "yarn",
            "truncate": bool(self.rope_truncate),
        }
        cfg: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": eos,
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": int(self.original_max_position_embeddings),
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": self.resolved_layer_types,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "pad_token_id": pad,
            "rms_norm_eps": 1e-05,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": float(self.swiglu_limit),
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if style == "hub":
            cfg["rope_scaling"] = rope
            cfg["rope_theta"] = _num(self.rope_theta)
            cfg["transformers_version"] = "4.55.0.dev0"
            if not quantized:
                cfg["torch_dtype"] = dtype
        else:
            cfg["rope_parameters"] = {**rope, "rope_theta": float(self.rope_theta)}
            cfg["dtype"] = dtype
            cfg["swiglu_alpha"] = 1.702
            cfg["transformers_version"] = "5.0.0"
        if quantized:
            cfg["quantization_config"] = {
                "modules_to_not_convert": list(HUB_MODULES_NOT_CONVERTED),
                "quant_method": "mxfp4",
            }
        return dict(sorted(cfg.items()))

    def check_original_compatible(self) -> None:
        """Raise ValueError unless OpenAI's original config can describe this model.

        gpt_oss/torch/model.py slides the window on even layers only (`layer_idx % 2 == 0`), never
        truncates the YaRN ramp, and takes YaRN's original context from `initial_context_length`.
        """
        self.validate()
        alternating = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_layers)
        ]
        problems = []
        if self.resolved_layer_types != alternating:
            problems.append("layer_types must alternate sliding/full starting with sliding")
        if self.rope_truncate:
            problems.append("rope_truncate must be False (the original YaRN never truncates)")
        if self.sliding_window <= 0:
            problems.append("sliding_window must be positive (0 means no window in the original)")
        if problems:
            raise ValueError("the original layout can't describe this spec: " + "; ".join(problems))

    def original_config(self) -> dict[str, Any]:
        """OpenAI's original/config.json (the fields of gpt_oss.torch.model.ModelConfig)."""
        self.check_original_compatible()
        cfg = {
            "num_hidden_layers": self.num_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": float(self.swiglu_limit),
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": int(self.original_max_position_embeddings),
            "rope_theta": _num(self.rope_theta),
            "rope_scaling_factor": float(self.rope_scaling_factor),
            "rope_ntk_alpha": float(self.beta_slow),
            "rope_ntk_beta": float(self.beta_fast),
        }
        assert tuple(cfg) == ORIGINAL_CONFIG_KEYS
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- random MXFP4 scales -------------------------------------------------------------------------------------


def scale_exponent(fan_in: int) -> int:
    """The e8m0 exponent making rms(w) * sqrt(fan_in) ~ 1 for uniformly random FP4 codes."""
    return int(np.clip(round(-math.log2(mxfp4.FP4_RMS * math.sqrt(fan_in))), -12, 0))


# -- value sources ------------------------------------------------------------------------------------------


def _rng(seed: int, name: str, slab: int) -> np.random.Generator:
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([int(seed), h, slab])


def _slab_rows(shape: tuple[int, ...]) -> int:
    row = math.prod(shape[1:])
    return max(1, _SLAB_ELEMS // max(row, 1))


def _row_ranges(shape: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
    """(slab index, first row, end row) along axis 0."""
    step = _slab_rows(shape)
    for i, a in enumerate(range(0, shape[0], step)):
        yield i, a, min(a + step, shape[0])


@dataclass(frozen=True)
class _Source:
    """One canonical random tensor (named as in the HF layout), generated slab by slab."""

    seed: int
    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" | "blocks" | "scales"
    std: float = 1.0
    mean: float = 0.0
    center: int = 0  # scales: e8m0 exponent offset from the bias (127)

    def slabs(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, values) pairs covering axis 0; float32 for "normal", uint8 otherwise."""
        for i, a, b in _row_ranges(self.shape):
            rng = _rng(self.seed, self.name, i)
            sub = (b - a, *self.shape[1:])
            if self.kind == "normal":
                x = rng.standard_normal(sub, dtype=np.float32)
                x *= np.float32(self.std)
                if self.mean:
                    x += np.float32(self.mean)
            elif self.kind == "blocks":
                n = math.prod(sub)
                raw = rng.bit_generator.random_raw((n + 7) // 8).astype("<u8", copy=False)
                x = raw.view(np.uint8)[:n].reshape(sub)
            elif self.kind == "scales":
                lo = mxfp4.SCALE_BIAS + self.center - 1
                x = rng.integers(lo, lo + 3, size=sub, dtype=np.uint8)
            else:  # pragma: no cover
                raise AssertionError(self.kind)
            yield a, x

    def full(self) -> np.ndarray:
        return np.concatenate([x for _, x in self.slabs()], axis=0)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (inputs are finite)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype("<u2")


def _cast(x: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return _f32_to_bf16_bits(x)
    return np.ascontiguousarray(x, dtype=st.DTYPES[st_dtype].numpy)


@dataclass(frozen=True)
class _FileTensor:
    """One tensor of a safetensors file: its name there, shape, dtype, and a generator of its bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string
    make: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return st.nbytes(self.shape, self.dtype)


def _stored(name: str, sources: list[_Source], st_dtype: str) -> _FileTensor:
    """The sources concatenated along axis 0 (q|k|v for qkv), cast to st_dtype."""
    shape = (sum(s.shape[0] for s in sources), *sources[0].shape[1:])

    def make() -> Iterator[np.ndarray]:
        for s in sources:
            for _, x in s.slabs():
                yield x if s.kind != "normal" else _cast(x, st_dtype)

    return _FileTensor(name, shape, st_dtype if sources[0].kind == "normal" else "U8", make)


def _dequantized(name: str, blocks: _Source, scales: _Source, st_dtype: str) -> _FileTensor:
    """hf-float experts: dequantize [E, out, in/32, 16] blocks and store transposed, [E, in, out]."""
    e, out, g, _ = blocks.shape
    shape = (e, g * mxfp4.GROUP_SIZE, out)

    def make() -> Iterator[np.ndarray]:
        sc = scales.full()
        for a, blk in blocks.slabs():
            w = mxfp4.dequantize_blocks(blk, sc[a : a + blk.shape[0]])  # [r, out, in]
            yield _cast(np.ascontiguousarray(w.transpose(0, 2, 1)), st_dtype)

    return _FileTensor(name, shape, st_dtype, make)


def _model_sources(spec: SyntheticSpec, seed: int) -> dict[str, _Source]:
    """Every canonical tensor by its HF name, in model order (experts as blocks / scales)."""
    H, I, E, V = spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.vocab_size
    D, nq, nkv = spec.head_dim, spec.num_attention_heads, spec.num_key_value_heads

    def normal(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> _Source:
        return _Source(seed, name, shape, "normal", std=std, mean=mean)

    def lin(fan_in: int) -> float:
        return WEIGHT_STD_GAIN / math.sqrt(fan_in)

    src: dict[str, _Source] = {}

    def add(s: _Source) -> None:
        src[s.name] = s

    add(normal("model.embed_tokens.weight", (V, H), EMBED_STD))
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        add(normal(p + "input_layernorm.weight", (H,), NORM_STD, 1.0))
        for proj, rows in (("q", nq * D), ("k", nkv * D), ("v", nkv * D)):
            add(normal(p + f"self_attn.{proj}_proj.weight", (rows, H), lin(H)))
            add(normal(p + f"self_attn.{proj}_proj.bias", (rows,), BIAS_STD))
        add(normal(p + "self_attn.o_proj.weight", (H, nq * D), lin(nq * D)))
        add(normal(p + "self_attn.o_proj.bias", (H,), BIAS_STD))
        add(normal(p + "self_attn.sinks", (nq,), SINK_STD))
        add(normal(p + "post_attention_layernorm.weight", (H,), NORM_STD, 1.0))
        add(normal(p + "mlp.router.weight", (E, H), lin(H)))
        add(normal(p + "mlp.router.bias", (E,), BIAS_STD))
        for proj, out, fan_in in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            q = p + f"mlp.experts.{proj}"
            groups = fan_in // mxfp4.GROUP_SIZE
            add(_Source(seed, q + "_blocks", (E, out, groups, mxfp4.BYTES_PER_GROUP), "blocks"))
            add(_Source(seed, q + "_scales", (E, out, groups), "scales", center=scale_exponent(fan_in)))
            add(normal(q + "_bias", (E, out), BIAS_STD))
    add(normal("model.norm.weight", (H,), NORM_STD, 1.0))
    add(normal("lm_head.weight", (V, H), lin(H)))
    return src


def _hf_tensors(spec: SyntheticSpec, seed: int, dtype: str, quantized: bool) -> list[_FileTensor]:
    float_st = st.FLOAT_NAMES[dtype]
    src = _model_sources(spec, seed)
    out = []
    for name, s in src.items():
        if quantized or s.kind == "normal":
            out.append(_stored(name, [s], float_st))
        elif name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            out.append(_dequantized(base, s, src[base + "_scales"], float_st))
    return out


def _original_tensors(spec: SyntheticSpec, seed: int, dtype: str) -> list[_FileTensor]:
    """OpenAI's names (gpt_oss/torch/model.py, weights.py): same values, q|k|v fused on the output axis."""
    float_st = st.FLOAT_NAMES[dtype]
    src = _model_sources(spec, seed)
    out = [_stored("embedding.weight", [src["model.embed_tokens.weight"]], float_st)]
    for i in range(spec.num_layers):
        p, b = f"model.layers.{i}.", f"block.{i}."
        a = p + "self_attn."
        x = p + "mlp.experts."
        pairs = [
            ("attn.norm.scale", [p + "input_layernorm.weight"]),
            ("attn.qkv.weight", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]),
            ("attn.qkv.bias", [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]),
            ("attn.sinks", [a + "sinks"]),
            ("attn.out.weight", [a + "o_proj.weight"]),
            ("attn.out.bias", [a + "o_proj.bias"]),
            ("mlp.norm.scale", [p + "post_attention_layernorm.weight"]),
            ("mlp.gate.weight", [p + "mlp.router.weight"]),
            ("mlp.gate.bias", [p + "mlp.router.bias"]),
            ("mlp.mlp1_weight.blocks", [x + "gate_up_proj_blocks"]),
            ("mlp.mlp1_weight.scales", [x + "gate_up_proj_scales"]),
            ("mlp.mlp1_bias", [x + "gate_up_proj_bias"]),
            ("mlp.mlp2_weight.blocks", [x + "down_proj_blocks"]),
            ("mlp.mlp2_weight.scales", [x + "down_proj_scales"]),
            ("mlp.mlp2_bias", [x + "down_proj_bias"]),
        ]
        out += [_stored(b + n, [src[k] for k in keys], float_st) for n, keys in pairs]
    out.append(_stored("norm.scale", [src["model.norm.weight"]], float_st))
    out.append(_stored("unembedding.weight", [src["lm_head.weight"]], float_st))
    return out


# -- writing ----------------------------------------------------------------------------------------------


def _write_safetensors(
    path: Path, tensors: list[_FileTensor], on_tensor: Callable[[_FileTensor], None]
) -> None:
    """Header first (every size is known up front), then each tensor streamed slab by slab.

    Tensors are laid out by decreasing itemsize, then name (as the safetensors library orders them), so every
    offset is aligned to its dtype."""
    order = sorted(tensors, key=lambda t: (-st.ITEMSIZE[t.dtype], t.name))
    head, _ = st.build_header([(t.name, t.shape, t.dtype) for t in order], {"format": "pt"})
    with open(path, "wb") as f:
        f.write(head)
        for t in order:
            written = 0
            for slab in t.make():
                slab = np.ascontiguousarray(slab, dtype=st.DTYPES[t.dtype].numpy)
                f.write(slab.data)
                written += slab.nbytes
            if written != t.nbytes:  # pragma: no cover - a generator bug
                raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
            on_tensor(t)


def _plan_shards(tensors: list[_FileTensor], max_shard_bytes: int | None) -> list[list[_FileTensor]]:
    """Greedy in model order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list[_FileTensor]] = [[]]
    size = 0
    for t in tensors:
        if max_shard_bytes is not None and shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _shard_names(layout: str, n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    if layout == "hf-mxfp4":  # the hub's convert script: zero-based, "of" the last index
        return [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]  # save_pretrained


def checkpoint_tensors(
    spec: SyntheticSpec, layout: str = "hf-mxfp4", *, seed: int = 0, dtype: str = "bfloat16"
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of every tensor `write_checkpoint` would write, in model order."""
    return {t.name: (t.shape, t.dtype) for t in _layout_tensors(spec, layout, seed, dtype)}


def _layout_tensors(spec: SyntheticSpec, layout: str, seed: int, dtype: str) -> list[_FileTensor]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError("seed must be a non-negative int")
    spec.validate()
    if layout == "original":
        spec.check_original_compatible()
        return _original_tensors(spec, seed, dtype)
    return _hf_tensors(spec, seed, dtype, quantized=layout == "hf-mxfp4")


def write_checkpoint(
    path: str | Path,
    spec: SyntheticSpec | None = None,
    layout: str = "hf-mxfp4",
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    max_shard_bytes: int | None = 2_000_000_000,
    config_style: str = "hub",
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write `spec`'s random model (values fixed by `seed`) to the folder `path` in `layout`; return it.

    dtype: "bfloat16" (the hub's), "float32" or "float16" for every float tensor. max_shard_bytes: split into
    shards (+ model.safetensors.index.json for the hf layouts; the original layout, like OpenAI's loader,
    just takes every *.safetensors) above this size; None for one file. config_style: "hub" or
    "transformers5" (hf layouts only, see `SyntheticSpec.hf_config`). Written into a folder beside `path`,
    renamed into place once complete. A folder holding a checkpoint is refused unless overwrite=True
    (replaced once the new one is complete); one holding anything else is always refused.
    progress(tensor name, bytes done, bytes total) is called after each tensor.
    """
    spec = spec if spec is not None else SyntheticSpec()
    tensors = _layout_tensors(spec, layout, seed, dtype)
    if layout == "original":
        config = spec.original_config()
    else:
        config = spec.hf_config(quantized=layout == "hf-mxfp4", style=config_style, dtype=dtype)

    from ..convert.folder import atomic_folder

    folder = Path(path)
    if folder.is_dir() and not overwrite and _is_checkpoint(folder):
        raise FileExistsError(f"{folder} already holds a checkpoint; pass overwrite=True to replace it")

    shards = _plan_shards(tensors, max_shard_bytes)
    names = _shard_names(layout, len(shards))
    total = sum(t.nbytes for t in tensors)
    done = 0

    def on_tensor(t: _FileTensor) -> None:
        nonlocal done
        done += t.nbytes
        if progress is not None:
            progress(t.name, done, total)

    # The converter's atomic folder: an interrupted or failed run leaves the old DEST as it was, and only
    # an empty folder or a checkpoint of nothing but these files is replaced (no file of a user's is lost).
    replace = folder.exists()
    what = f"a checkpoint ({CHECKPOINT_FILES})"
    with atomic_folder(folder, replace, total, ours=_is_checkpoint, ours_is=what, flag="--overwrite") as tmp:
        for fname, shard in zip(names, shards, strict=True):
            _write_safetensors(tmp / fname, shard, on_tensor)
        if len(shards) > 1 and layout != "original":
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(
                    sorted((t.name, fname) for fname, sh in zip(names, shards, strict=True) for t in sh)
                ),
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


CHECKPOINT_FILES = "config.json and *.safetensors shards, nothing else"


def _is_checkpoint(folder: Path) -> bool:
    """A folder `write_checkpoint` may replace: config.json and shards, nothing else (what it writes)."""
    names = [p.name for p in folder.iterdir()]
    allowed = ("config.json", "model.safetensors.index.json")
    shards = [n for n in names if n.endswith(".safetensors")]
    return "config.json" in names and bool(shards) and all(n in allowed or n in shards for n in names)

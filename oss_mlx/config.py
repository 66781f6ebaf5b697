"""One model configuration, read from any of the config.json files gpt-oss ships in.

Three dialects exist: Hugging Face's (`model_type: gpt_oss`, transformers 4.x `rope_scaling` or 5.x
`rope_parameters`), OpenAI's `original/config.json` (`num_experts`, `experts_per_token`,
`rope_ntk_alpha` ...), and ours (the HF dialect plus an `oss_mlx` section written by the converter).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import LoadError
from .mxfp4 import GROUP_SIZE

SLIDING = "sliding_attention"
FULL = "full_attention"
MAX_DIM = 2**31 - 1  # the largest size of an MLX array dimension (int32)
# Far above any gpt-oss (24, 36 layers), low enough that the default layer_types list is cheap to make.
MAX_LAYERS = 65536


class ConfigError(LoadError, ValueError):
    """A config.json that does not describe a gpt-oss model we can run."""


# What a key missing from a Hugging Face config.json means: transformers' GptOssConfig defaults
# (checked against the installed transformers by the tests). Note the 120b sizes, not the 20b's.
HF_DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 36,
    "num_local_experts": 128,
    "num_experts_per_tok": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "rms_norm_eps": 1e-5,
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
    "max_position_embeddings": 131072,
    "rope_theta": 150000.0,  # GptOssConfig.default_theta
    "tie_word_embeddings": False,
    "attention_bias": True,
}
# GptOssConfig's rope_parameters when the config has no rope section at all.
HF_DEFAULT_ROPE: dict[str, Any] = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
# OpenAI's original/config.json is read by its reference as `ModelConfig(**json)`
# (gpt_oss/torch/model.py): these are that dataclass's defaults.
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 36,
    "num_experts": 128,
    "experts_per_token": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "swiglu_limit": 7.0,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000.0,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1.0,
    "rope_ntk_beta": 32.0,
}
# ModelConfig field <- config.json key, per dialect (the sizes are named alike in both).
_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
)
_HF_INTS = {
    "num_layers": "num_hidden_layers",
    "experts_per_token": "num_experts_per_tok",
    "max_position_embeddings": "max_position_embeddings",
    **{key: key for key in _SIZES},
}
_HF_FLOATS = {key: key for key in ("rms_norm_eps", "swiglu_alpha", "swiglu_limit")}
_ORIGINAL_INTS = {
    "num_layers": "num_hidden_layers",
    "num_experts": "num_experts",
    "experts_per_token": "experts_per_token",
    "rope_original_context": "initial_context_length",
    **{key: key for key in _SIZES},
}
_ORIGINAL_FLOATS = {
    "swiglu_limit": "swiglu_limit",
    "rope_theta": "rope_theta",
    "rope_scaling_factor": "rope_scaling_factor",
    "rope_beta_fast": "rope_ntk_beta",
    "rope_beta_slow": "rope_ntk_alpha",
}
# Keys of OpenAI's dialect. A Hugging Face config.json may carry some of them too (the hub's has
# experts_per_token), but it always has model_type.
_ORIGINAL_ONLY = (
    "num_experts",
    "experts_per_token",
    "rope_ntk_alpha",
    "rope_ntk_beta",
    "rope_scaling_factor",
)


# Keys that set tensor shapes (both dialects): named when their defaults were used and shapes disagree.
SIZE_KEYS = ("num_hidden_layers", "num_local_experts", "num_experts", *_SIZES)


def defaults_note(defaulted: tuple[tuple[str, Any], ...]) -> str:
    """' (not in config.json, so defaults were used: hidden_size=2880)', or '' if no size key was."""
    used = ", ".join(f"{key}={value}" for key, value in defaulted if key in SIZE_KEYS)
    return f" (not in config.json, so defaults were used: {used})" if used else ""


def is_original_dialect(raw: dict[str, Any]) -> bool:
    """Whether a config.json is OpenAI's original/config.json rather than a Hugging Face one."""
    return "model_type" not in raw and any(k in raw for k in _ORIGINAL_ONLY)


@dataclass(frozen=True)
class ModelConfig:
    # Built directly, the defaults are gpt-oss-20b's; a config.json's missing keys take its dialect's
    # defaults instead (HF_DEFAULTS, ORIGINAL_DEFAULTS).
    num_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # YaRN. beta_fast / beta_slow are OpenAI's rope_ntk_beta / rope_ntk_alpha.
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_context: int = 4096
    # The hub's config says truncate: false, and OpenAI's reference never rounds the correction range.
    rope_truncate: bool = False
    # YaRN's scale of cos/sin; None: 0.1 ln(factor) + 1 (transformers' and OpenAI's default).
    rope_attention_factor: float | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # Keys config.json did not set, with the defaults used (named when the weights disagree).
    defaulted: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            # OpenAI's convention: even layers slide, odd layers see everything. (An absurd or mistyped
            # count gets none: validate names it.)
            count = self.num_layers if isinstance(self.num_layers, int) else 0
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(min(count, MAX_LAYERS)))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self) -> None:
        # Types first: a string where a number belongs would otherwise fail in the arithmetic below
        # ("sixty-four" % 32 is string formatting: "not all arguments converted ...").
        wrong = [
            f"{f.name} must be {'a whole number' if f.type == 'int' else 'a number'} (got {value!r})"
            for f in fields(self)
            if f.type in ("int", "float")
            and (
                isinstance(value := getattr(self, f.name), bool)
                or not isinstance(value, int if f.type == "int" else (int, float))
            )
        ]
        if wrong:
            raise ConfigError("invalid gpt-oss config: " + "; ".join(wrong))
        problems = [
            f"{f.name}={getattr(self, f.name)} is beyond {MAX_DIM} (MLX's sizes are 32-bit)"
            for f in fields(self)
            if f.type == "int" and getattr(self, f.name) > MAX_DIM
        ]
        if self.num_layers > MAX_LAYERS:
            problems.append(f"num_layers={self.num_layers} is more than {MAX_LAYERS}")
        if problems:  # the products below would overflow, and MLX refuses such shapes with OverflowError
            raise ConfigError("invalid gpt-oss config: " + "; ".join(problems))
        for name in ("num_layers", "num_experts", "vocab_size", "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("sliding_window", "max_position_embeddings", "rope_original_context"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if bad := sorted(set(self.layer_types) - {SLIDING, FULL}):
            problems.append(f"unknown layer types {bad} (expected {SLIDING!r} or {FULL!r})")
        if self.num_key_value_heads >= 1 and self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.experts_per_token <= self.num_experts:
            problems.append(f"experts_per_token={self.experts_per_token} with {self.num_experts} experts")
        if self.head_dim < 2 or self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be positive and even for rotary embeddings")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) < GROUP_SIZE or getattr(self, name) % GROUP_SIZE:
                problems.append(
                    f"{name}={getattr(self, name)} is not a multiple of the MXFP4 group ({GROUP_SIZE})"
                )
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if not self.rope_scaling_factor >= 1:
            problems.append(f"the YaRN factor {self.rope_scaling_factor} must be at least 1")
        if problems:
            raise ConfigError("invalid gpt-oss config: " + "; ".join(problems))

    @property
    def qkv_dim(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    # ---- dialects ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from any supported config.json dialect (detected from its keys). A missing key means
        what it means to the dialect's own reader: transformers' defaults for a Hugging Face config,
        OpenAI's reference for original/config.json."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, not {_kind(d)}")
        original = is_original_dialect(d)
        keys = _Keys(d, source, ORIGINAL_DEFAULTS if original else HF_DEFAULTS)
        try:
            if original:
                return cls._from_original(keys)
            model_type = d.get("model_type")
            if model_type != "gpt_oss":
                raise ConfigError(
                    f"{source}: model_type is {model_type!r}, expected 'gpt_oss'. oss-mlx runs gpt-oss "
                    "checkpoints only (openai/gpt-oss-20b, openai/gpt-oss-120b and their fine-tunes)."
                )
            return cls._from_hf(keys)
        except ConfigError as e:
            message = str(e) if str(e).startswith(source) else f"{source}: {e}"
            raise ConfigError(message + defaults_note(tuple(keys.defaulted.items()))) from None

    @classmethod
    def _from_hf(cls, k: _Keys) -> ModelConfig:
        d = k.raw
        if quant := d.get("quantization_config"):
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            if method != "mxfp4":
                raise ConfigError(
                    f"quantization_config.quant_method is {method!r}: only the hub's 'mxfp4' (or no "
                    "quantization_config, float weights) is supported"
                )
        if "oss_mlx" in d:
            _check_converted(d["oss_mlx"])
        if not k.bool("attention_bias"):
            raise ConfigError("attention_bias is false, but gpt-oss attention has biases (not supported)")
        # transformers' attribute_map reads num_experts as num_local_experts.
        experts = k.int(
            "num_experts" if "num_experts" in d and "num_local_experts" not in d else "num_local_experts"
        )
        types = k.get("layer_types", None)
        if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
            raise ConfigError(f"layer_types must be a list of layer type names, not {types!r}")
        types = tuple(types or ())
        window = k.get("sliding_window", HF_DEFAULTS["sliding_window"])
        if window is None:  # transformers fails at the first sliding layer; fine without one
            if SLIDING in types or not types:
                raise ConfigError("sliding_window is null, but layer_types has sliding_attention layers")
            window = HF_DEFAULTS["sliding_window"]  # unused: no layer slides
        else:
            window = k.int("sliding_window")
        return cls(
            num_experts=experts,
            sliding_window=window,
            layer_types=types,
            tie_word_embeddings=k.bool("tie_word_embeddings"),
            extra={key: v for key, v in d.items() if key in ("oss_mlx", "quantization_config")},
            **k.fields(_HF_INTS, _HF_FLOATS),
            **_hf_rope(k),
            defaulted=tuple(k.defaulted.items()),
        )

    @classmethod
    def _from_original(cls, k: _Keys) -> ModelConfig:
        window = k.int("sliding_window")
        # The reference slides even layers by `sliding_window`; 0 means no window anywhere.
        types = (FULL,) * k.int("num_hidden_layers") if window == 0 else ()
        return cls(
            sliding_window=window or ORIGINAL_DEFAULTS["sliding_window"],
            layer_types=types,
            rope_truncate=False,  # OpenAI's reference never rounds the YaRN range
            **k.fields(_ORIGINAL_INTS, _ORIGINAL_FLOATS),
            defaulted=tuple(k.defaulted.items()),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF dialect (what the converter writes, with its own `oss_mlx` section added)."""
        return {
            "model_type": "gpt_oss",
            "architectures": ["GptOssForCausalLM"],
            "num_hidden_layers": self.num_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "original_max_position_embeddings": self.rope_original_context,
                "truncate": self.rope_truncate,
                **(
                    {}
                    if self.rope_attention_factor is None
                    else {"attention_factor": self.rope_attention_factor}
                ),
            },
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": True,
            "tie_word_embeddings": False,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kind(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", type(None): "null", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


class _Keys:
    """Typed reads of one config.json dict: defaults for missing keys (remembered), clear type errors."""

    def __init__(self, raw: dict[str, Any], source: str, defaults: dict[str, Any]):
        self.raw, self.source, self.defaults = raw, source, defaults
        self.defaulted: dict[str, Any] = {}

    def get(self, key: str, default: Any) -> Any:
        if key in self.raw:
            return self.raw[key]
        self.defaulted[key] = default
        return default

    def _value(self, key: str) -> Any:
        return self.get(key, self.defaults.get(key))

    def int(self, key: str) -> int:
        value = self._value(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, not {value!r} ({_kind(value)})")
        return value

    def float(self, key: str) -> float:
        value = self._value(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a number, not {value!r} ({_kind(value)})")
        return float(value)

    def fields(self, ints: dict[str, str], floats: dict[str, str]) -> dict[str, Any]:
        """ModelConfig field -> value, for tables of field <- key."""
        return {f: self.int(key) for f, key in ints.items()} | {
            f: self.float(key) for f, key in floats.items()
        }

    def bool(self, key: str) -> bool:
        value = self._value(key)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r} ({_kind(value)})")
        return value


def _number(rope: dict[str, Any], key: str, default: Any, where: str) -> Any:
    value = rope.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{where}.{key} must be a number, not {value!r} ({_kind(value)})")
    return value


def _hf_rope(k: _Keys) -> dict[str, Any]:
    """The YaRN fields, resolved as transformers 5 does (modeling_rope_utils and GptOssConfig)."""
    d = k.raw
    # transformers reads a non-empty rope_scaling (4.x) over rope_parameters (5.x); with neither, the
    # GptOss default. An explicit empty rope_parameters is a plain RoPE ("default" type).
    if d.get("rope_scaling"):
        where, rope = "rope_scaling", d["rope_scaling"]
    elif d.get("rope_parameters") is not None:
        where, rope = "rope_parameters", d["rope_parameters"]
    else:
        k.defaulted["rope_parameters"] = HF_DEFAULT_ROPE
        where, rope = "rope_parameters", dict(HF_DEFAULT_ROPE)
    if not isinstance(rope, dict):
        raise ConfigError(f"{where} must be an object, not {rope!r} ({_kind(rope)})")
    theta = _number(rope, "rope_theta", None, where)
    if theta is None:
        theta = k.float("rope_theta")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {"rope_theta": float(theta), "rope_scaling_factor": 1.0}
    if rope_type != "yarn":
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (gpt-oss uses yarn)")
    if (partial := _number(rope, "partial_rotary_factor", 1.0, where)) not in (None, 1, 1.0):
        raise ConfigError(f"{where}.partial_rotary_factor={partial} is not supported (gpt-oss rotates all)")
    if "factor" not in rope:
        raise ConfigError(f"{where} has rope_type 'yarn' but no 'factor' (transformers requires it too)")
    max_positions = k.int("max_position_embeddings")
    # transformers fills a missing original_max_position_embeddings with max_position_embeddings.
    original = rope.get("original_max_position_embeddings", max_positions)
    if isinstance(original, bool) or not isinstance(original, int):
        raise ConfigError(f"{where}.original_max_position_embeddings must be an integer, not {original!r}")
    factor = _number(rope, "factor", None, where)
    if factor is None:  # transformers: the ratio of the two context lengths
        factor = max_positions / original
    attention = _number(rope, "attention_factor", None, where)
    mscale = _number(rope, "mscale", None, where)
    mscale_all_dim = _number(rope, "mscale_all_dim", None, where)
    if attention is None and mscale and mscale_all_dim:
        attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    truncate = rope.get("truncate", True)  # transformers rounds when the key is absent
    return {
        "rope_theta": float(theta),
        "rope_scaling_factor": float(factor),
        "rope_beta_fast": float(_number(rope, "beta_fast", None, where) or 32.0),
        "rope_beta_slow": float(_number(rope, "beta_slow", None, where) or 1.0),
        "rope_original_context": original,
        "rope_truncate": bool(truncate),
        "rope_attention_factor": None if attention is None else float(attention),
    }


# The layout `oss-mlx convert` writes (docs/MEMORY.md); a folder from a newer converter is refused.
CONVERTED_FORMAT_VERSION = 1
QUANTIZED_PARTS = ("attention", "embedding", "unembedding")


def _check_converted(section: Any) -> None:
    """The `oss_mlx` section of a converted folder's config.json: what the loader reads from it."""
    if not isinstance(section, dict):
        raise ConfigError(f"oss_mlx must be an object, not {section!r} ({_kind(section)})")
    version = section.get("format_version", CONVERTED_FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > CONVERTED_FORMAT_VERSION:
        raise ConfigError(
            f"oss_mlx.format_version is {version!r}: this oss-mlx reads converted folders up to format "
            f"{CONVERTED_FORMAT_VERSION}. Upgrade oss-mlx, or convert the original checkpoint again."
        )
    if not isinstance(section.get("experts_mxfp4", True), bool):
        raise ConfigError("oss_mlx.experts_mxfp4 must be true or false")
    quantization = section.get("quantization") or {}
    if not isinstance(quantization, dict):
        raise ConfigError(f"oss_mlx.quantization must be an object, not {quantization!r}")
    for part, q in quantization.items():
        where = f"oss_mlx.quantization.{part}"
        if part not in QUANTIZED_PARTS:
            raise ConfigError(f"{where}: unknown part (expected one of {', '.join(QUANTIZED_PARTS)})")
        if q is None:
            continue
        if not isinstance(q, dict):
            raise ConfigError(f"{where} must be null or an object with bits and group_size, not {q!r}")
        for key in ("bits", "group_size"):
            if isinstance(q.get(key), bool) or not isinstance(q.get(key), int) or q[key] < 1:
                raise ConfigError(f"{where}.{key} must be a positive integer, not {q.get(key)!r}")
        mode = q.get("mode", "affine")
        if mode not in QUANTIZATION_MODES:
            raise ConfigError(f"{where}.mode {mode!r} is not an MLX quantization mode")
        for key, allowed in zip(("bits", "group_size"), QUANTIZATION_MODES[mode], strict=True):
            if q[key] not in allowed:  # else mx.quantize fails at load, naming no file
                raise ConfigError(
                    f"{where}.{key} is {q[key]}; MLX's {mode} quantization takes {key} "
                    f"{' or '.join(map(str, allowed))}"
                )


# What mx.quantize accepts, per mode: (bits, group sizes).
QUANTIZATION_MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "mxfp8": ((8,), (32,)),
    "nvfp4": ((4,), (16,)),
}


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# The official models, as changes to ModelConfig's defaults (which are gpt-oss-20b's).
OFFICIAL_SHAPES: dict[str, dict[str, Any]] = {"20b": {}, "120b": {"num_layers": 36, "num_experts": 128}}


def official_config(size: str) -> ModelConfig:
    """The config of openai/gpt-oss-20b or -120b (`size` "20b" / "120b"), no file needed."""
    if size not in OFFICIAL_SHAPES:
        raise ValueError(f"unknown model size {size!r}; choose {' or '.join(OFFICIAL_SHAPES)}")
    return ModelConfig(**OFFICIAL_SHAPES[size])


def read_config(folder: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read `folder/config.json`; returns the config and the raw dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a gpt-oss checkpoint folder holds a config.json")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror or e})") from None
    return ModelConfig.from_dict(raw, source=str(path)), raw

"""One model configuration, read from any of the config.json files gpt-oss ships in.

Three dialects exist: Hugging Face's (`model_type: gpt_oss`, transformers 4.x `rope_scaling` or 5.x
`rope_parameters`), OpenAI's `original/config.json` (`num_experts`, `experts_per_token`,
`rope_ntk_alpha` ...), and ours (the HF dialect plus an `oss_mlx` section written by the converter).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config.json that does not describe a gpt-oss model we can run."""


@dataclass(frozen=True)
class ModelConfig:
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
    max_position_embeddings: int = 131072
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            # OpenAI's convention: even layers slide, odd layers see everything.
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_layers))
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
        problems = []
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if bad := sorted(set(self.layer_types) - {SLIDING, FULL}):
            problems.append(f"unknown layer types {bad} (expected {SLIDING!r} or {FULL!r})")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.experts_per_token <= self.num_experts:
            problems.append(f"experts_per_token={self.experts_per_token} with {self.num_experts} experts")
        if self.head_dim % 2:
            problems.append("head_dim must be even for rotary embeddings")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                problems.append(f"{name}={getattr(self, name)} is not a multiple of the MXFP4 group (32)")
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
        """Build from any supported config.json dialect (detected from its keys)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a config is a JSON object, not {type(d).__name__}")
        try:
            if "experts_per_token" in d and "num_experts" in d:
                return cls._from_original(d)
            return cls._from_hf_checked(d, source)
        except ConfigError as e:
            message = str(e)
            raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None

    @classmethod
    def _from_hf_checked(cls, d: dict[str, Any], source: str) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type != "gpt_oss":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'gpt_oss'. oss-mlx runs gpt-oss "
                "checkpoints only (openai/gpt-oss-20b, openai/gpt-oss-120b and their fine-tunes)."
            )
        return cls._from_hf(d, source)

    @classmethod
    def _from_hf(cls, d: dict[str, Any], source: str) -> ModelConfig:
        # transformers 5 folds rope_theta into rope_parameters; 4.x keeps rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        theta = rope.get("rope_theta", d.get("rope_theta", 150000.0))
        if rope_type not in ("yarn", "default"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (gpt-oss uses yarn)")
        yarn = rope_type == "yarn"
        try:
            return cls(
                num_layers=d["num_hidden_layers"],
                num_experts=d.get("num_local_experts", d.get("num_experts", 32)),
                experts_per_token=d.get("num_experts_per_tok", d.get("experts_per_token", 4)),
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                sliding_window=d.get("sliding_window") or 128,
                layer_types=tuple(d.get("layer_types") or ()),
                rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                swiglu_alpha=d.get("swiglu_alpha", 1.702),
                swiglu_limit=d.get("swiglu_limit", 7.0),
                rope_theta=float(theta),
                rope_scaling_factor=float(rope.get("factor", 32.0)) if yarn else 1.0,
                rope_beta_fast=float(rope.get("beta_fast") or 32.0),
                rope_beta_slow=float(rope.get("beta_slow") or 1.0),
                rope_original_context=int(rope.get("original_max_position_embeddings", 4096)),
                # transformers rounds when the key is absent; the hub's config sets it to false.
                rope_truncate=bool(rope.get("truncate", True)),
                max_position_embeddings=d.get("max_position_embeddings", 131072),
                extra={k: v for k, v in d.items() if k in ("oss_mlx", "quantization_config")},
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required key {e.args[0]!r} in a gpt_oss config") from None

    @classmethod
    def _from_original(cls, d: dict[str, Any]) -> ModelConfig:
        n = d["num_hidden_layers"]
        return cls(
            num_layers=n,
            num_experts=d["num_experts"],
            experts_per_token=d["experts_per_token"],
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            head_dim=d.get("head_dim", 64),
            num_attention_heads=d.get("num_attention_heads", 64),
            num_key_value_heads=d.get("num_key_value_heads", 8),
            sliding_window=d.get("sliding_window", 128),
            layer_types=(),  # even layers slide
            swiglu_limit=d.get("swiglu_limit", 7.0),
            rope_theta=float(d.get("rope_theta", 150000.0)),
            rope_scaling_factor=float(d.get("rope_scaling_factor", 32.0)),
            rope_beta_fast=float(d.get("rope_ntk_beta", 32.0)),
            rope_beta_slow=float(d.get("rope_ntk_alpha", 1.0)),
            rope_original_context=int(d.get("initial_context_length", 4096)),
            rope_truncate=False,  # OpenAI's reference never rounds the YaRN range
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
            },
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": True,
            "tie_word_embeddings": False,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_config(folder: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read `folder/config.json`; returns the config and the raw dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a gpt-oss checkpoint folder holds a config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    return ModelConfig.from_dict(raw, source=str(path)), raw

"""LoRA: low-rank deltas attached to the model's canonical parameters, the base left as it is.

A *site* is one (layer, target) pair; each target is a canonical parameter of model.py, and a site
adds ``scale * B @ A`` to it (A [r, in] applied first, B [out, r]; scale = alpha / r, or alpha / sqrt(r)
with rsLoRA):

    target    canonical parameter                      A               B
    q, k, v   blocks.i.attn.qkv.weight (its row block)  [r, H]          [rows of q / k / v, r]
    out       blocks.i.attn.out.weight                  [r, Hq D]       [H, r]
    gate_up   blocks.i.mlp.experts.gate_up_weight       [E, r, H]       [E, 2I, r]   (per expert)
    down      blocks.i.mlp.experts.down_weight          [E, r, I]       [E, H, r]    (per expert)
    router    blocks.i.mlp.router.weight                [r, H]          [E, r]

The delta is never merged into MXFP4 weights (QLoRA-style): the base stays MXFP4 and frozen, and the
low-rank path runs beside it (`LoRALinear`, `LoRAExperts`). The router's delta is added to its float
weight at each call (E x H, small), so routing keeps its fused kernel. Gate and up rows stay
interleaved, as in the base (moe.py). Adapter tensors are named by their place in the model:
``blocks.3.attn.qkv.lora_a.q``, ``blocks.3.mlp.experts.lora_b.gate_up`` ... (adapters.py maps PEFT's
names onto these).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import LoRAError
from .moe import Experts, Router
from .runtime import runtime_of

ATTENTION_TARGETS = ("q", "k", "v", "out")
EXPERT_TARGETS = ("gate_up", "down")
TARGETS = (*ATTENTION_TARGETS, *EXPERT_TARGETS, "router")
# Shorthands accepted wherever targets are named (the CLI's --targets).
TARGET_GROUPS = {"attention": ATTENTION_TARGETS, "experts": EXPERT_TARGETS, "qkv": ("q", "k", "v")}
DEFAULT_TARGETS = (*ATTENTION_TARGETS, *EXPERT_TARGETS)  # the router is off unless asked for


def parse_targets(text: str | Iterable[str]) -> tuple[str, ...]:
    """'attention,experts' / ['q', 'v', 'down'] -> the targets in canonical order."""
    names = text.split(",") if isinstance(text, str) else list(text)
    out: set[str] = set()
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name in TARGET_GROUPS:
            out.update(TARGET_GROUPS[name])
        elif name in TARGETS:
            out.add(name)
        else:
            choices = ", ".join([*TARGET_GROUPS, *TARGETS])
            raise LoRAError(f"unknown LoRA target {name!r}; choose from {choices}")
    if not out:
        raise LoRAError("no LoRA target given (e.g. attention,experts)")
    return tuple(t for t in TARGETS if t in out)


def parse_layers(text: str | None, num_layers: int, flag: str = "--layers") -> tuple[int, ...] | None:
    """'0-3,7,-1' -> (0, 1, 2, 3, 7, L-1); None or 'all' -> None (every layer). Errors name `flag`."""
    from .cli_args import BadValue, layer_spans

    if text is None or text.strip() in ("", "all"):
        return None
    try:
        spans = layer_spans(text)
    except BadValue as e:
        raise LoRAError(f"{flag}: {e}") from None
    layers: set[int] = set()
    for span in spans:
        for i in span:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise LoRAError(
                    f"{flag}: layer {i} does not exist (the model has {num_layers}: 0-{num_layers - 1})"
                )
            layers.add(j)
    return tuple(sorted(layers))


@dataclass(frozen=True)
class Site:
    """One adapted parameter: its rank and the delta's scale."""

    rank: int
    scale: float


@dataclass
class LoRAConfig:
    """What to adapt and how, for training: `targets` on `layers` (None: all), the expert targets on
    `expert_layers` when given (OpenAI's cookbook adapts the experts of a few layers only)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[int, ...] | None = None  # None: every layer
    expert_layers: tuple[int, ...] | None = None  # None: as `layers`
    rslora: bool = False

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        for name in ("layers", "expert_layers"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(int(i) for i in value))
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise LoRAError(f"LoRA rank must be a positive integer, not {self.rank!r}")
        if not self.alpha > 0:
            raise LoRAError(f"LoRA alpha must be positive, not {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), not {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def sites(self, num_layers: int) -> dict[tuple[int, str], Site]:
        out = {}
        for t in self.targets:
            chosen = (
                self.expert_layers if t in EXPERT_TARGETS and self.expert_layers is not None else self.layers
            )
            for i in range(num_layers) if chosen is None else chosen:
                if not 0 <= i < num_layers:
                    raise LoRAError(f"LoRA layer {i} does not exist: the model has {num_layers} layers")
                out[(i, t)] = Site(self.rank, self.scale)
        return dict(sorted(out.items(), key=lambda kv: (kv[0][0], TARGETS.index(kv[0][1]))))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        for name in ("layers", "expert_layers"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        known = {"rank", "alpha", "dropout", "targets", "layers", "expert_layers", "rslora"}
        return cls(**{k: v for k, v in d.items() if k in known})


def sites_to_json(sites: dict[tuple[int, str], Site]) -> dict[str, list]:
    return {f"{i}.{t}": [s.rank, s.scale] for (i, t), s in sites.items()}


def sites_from_json(d: dict) -> dict[tuple[int, str], Site]:
    """{"LAYER.TARGET": [rank, scale]} -> sites; a rank that is not a positive whole number or a scale
    that is not finite is refused (a NaN scale would make every logit NaN, and a fused model too)."""
    out = {}
    for key, (rank, scale) in d.items():
        layer, target = key.split(".", 1)
        if target not in TARGETS:
            raise LoRAError(f"unknown LoRA target {target!r} in {key!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LoRAError(f"{key!r}: rank {rank!r} must be a positive whole number")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise LoRAError(f"{key!r}: scale {scale!r} must be a finite number")
        out[(int(layer), target)] = Site(rank, float(scale))
    return out


# ---- the modules ----------------------------------------------------------------------------------


def _uniform_a(shape: tuple[int, ...], fan_in: int, key: mx.array) -> mx.array:
    # A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0: the delta starts at zero (PEFT's and mlx-lm's init).
    bound = 1.0 / math.sqrt(fan_in)
    return mx.random.uniform(-bound, bound, shape, key=key)


class LoRALinear(nn.Module):
    """base(x) + the low-rank deltas of its row blocks: for qkv, [dq; dk; dv] (a part left out adds 0).

    parts: (name, rows) in output order; `sites` names the adapted ones. The base may be an nn.Linear
    or an nn.QuantizedLinear (a converted model's attention): it is called as it is.
    """

    def __init__(
        self,
        base: nn.Module,
        parts: list[tuple[str, int]],
        sites: dict[str, Site],
        in_dims: int,
        dropout: float = 0.0,
        key: mx.array | None = None,
    ):
        super().__init__()
        self.base = base
        self._parts = tuple(parts)
        self._scales = {name: s.scale for name, s in sites.items()}
        keys = mx.random.split(key if key is not None else mx.random.key(0), max(2, len(sites)))
        self.lora_a = {n: _uniform_a((s.rank, in_dims), in_dims, k) for (n, s), k in zip(sites.items(), keys)}
        rows = dict(parts)
        self.lora_b = {n: mx.zeros((rows[n], s.rank)) for n, s in sites.items()}
        self.dropout = nn.Dropout(dropout) if dropout else None

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        h = self.dropout(x) if self.dropout is not None else x
        deltas = []
        for name, rows in self._parts:
            if name in self.lora_a:
                a, b = self.lora_a[name].astype(x.dtype), self.lora_b[name].astype(x.dtype)
                deltas.append(((h @ a.T) @ b.T) * self._scales[name])
            else:
                deltas.append(mx.zeros((*x.shape[:-1], rows), dtype=x.dtype))
        delta = deltas[0] if len(deltas) == 1 else mx.concatenate(deltas, axis=-1)
        return y + delta.astype(y.dtype)

    def delta(self) -> mx.array:
        """The weight delta [out, in] in float32 (zero rows for parts not adapted)."""
        blocks = []
        in_dims = next(iter(self.lora_a.values())).shape[1]
        for name, rows in self._parts:
            if name in self.lora_a:
                a, b = self.lora_a[name].astype(mx.float32), self.lora_b[name].astype(mx.float32)
                blocks.append(self._scales[name] * (b @ a))
            else:
                blocks.append(mx.zeros((rows, in_dims)))
        return mx.concatenate(blocks, axis=0)


class LoRAExperts(nn.Module):
    """moe.Experts with a per-expert low-rank delta on gate_up and/or down.

    The math is moe.Experts's (its very `__call__`: routing order, SwiGLU, grouping); only `_matmul`
    adds ``scale * B_e (A_e x)`` for each row's expert e through mx.gather_mm. No `quantized` attribute:
    the fused expert kernels (which read only the base weights) leave this layer to `__call__`.
    """

    __call__ = Experts.__call__

    def __init__(
        self, base: Experts, sites: dict[str, Site], dropout: float = 0.0, key: mx.array | None = None
    ):
        super().__init__()
        self.base = base
        self.alpha, self.limit = base.alpha, base.limit
        E = base.gate_up_bias.shape[0]
        two_i, H = base.gate_up_bias.shape[1], base.down_bias.shape[1]
        dims = {"gate_up": (H, two_i), "down": (two_i // 2, H)}  # (in, out)
        self._scales = {name: s.scale for name, s in sites.items()}
        keys = mx.random.split(key if key is not None else mx.random.key(0), 2)
        self.lora_a = {
            n: _uniform_a((E, s.rank, dims[n][0]), dims[n][0], k) for (n, s), k in zip(sites.items(), keys)
        }
        self.lora_b = {n: mx.zeros((E, dims[n][1], s.rank)) for n, s in sites.items()}
        self.dropout = nn.Dropout(dropout) if dropout else None

    def _matmul(self, x: mx.array, name: str, indices: mx.array, sorted_indices: bool) -> mx.array:
        y = self.base._matmul(x, name, indices, sorted_indices)
        if name not in self.lora_a:
            return y
        # In float32: MLX's CPU gather_mm takes float32 only, and the rank-r products are small.
        h = (self.dropout(x) if self.dropout is not None else x).astype(mx.float32)
        a = self.lora_a[name].astype(mx.float32).swapaxes(-1, -2)
        b = self.lora_b[name].astype(mx.float32).swapaxes(-1, -2)
        h = mx.gather_mm(h, a, rhs_indices=indices, sorted_indices=sorted_indices)
        h = mx.gather_mm(h, b, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (h * self._scales[name]).astype(y.dtype)

    def delta(self, name: str) -> mx.array:
        """The weight delta [E, out, in] of `name` in float32."""
        a, b = self.lora_a[name].astype(mx.float32), self.lora_b[name].astype(mx.float32)
        return self._scales[name] * (b @ a)


class LoRARouter(nn.Module):
    """The router with weight W + scale * B @ A (E x H: formed at each use, so the fused routing kernels,
    which read `weight` and `bias`, still apply). Dropout does not apply here: x takes no separate path."""

    def __init__(self, base: nn.Module, site: Site, key: mx.array | None = None):
        super().__init__()
        self.base = base
        self.top_k = base.top_k
        E, H = base.weight.shape
        self._scales = {"router": site.scale}
        self.lora_a = {"router": _uniform_a((site.rank, H), H, key if key is not None else mx.random.key(0))}
        self.lora_b = {"router": mx.zeros((E, site.rank))}

    def delta(self) -> mx.array:
        a, b = self.lora_a["router"].astype(mx.float32), self.lora_b["router"].astype(mx.float32)
        return self._scales["router"] * (b @ a)

    @property
    def weight(self) -> mx.array:
        w = self.base.weight
        return w + self.delta().astype(w.dtype)

    @property
    def bias(self) -> mx.array:
        return self.base.bias

    __call__ = Router.__call__  # routing as the base does it, on the adapted weight


LORA_MODULES = (LoRALinear, LoRAExperts, LoRARouter)


# ---- attaching ------------------------------------------------------------------------------------


def attach(
    model: nn.Module,
    sites: dict[tuple[int, str], Site],
    dropout: float = 0.0,
    seed: int = 0,
) -> None:
    """Wrap the adapted modules of `model` (a Transformer, already loaded) in their LoRA modules, with
    A random (from `seed`) and B zero. Everything else is untouched; a module already wrapped is refused."""
    config: ModelConfig = model.config
    if any(isinstance(m, LORA_MODULES) for _, m in model.named_modules()):
        raise LoRAError("this model already has an adapter attached; load the base model again")
    by_layer: dict[int, dict[str, Site]] = {}
    for (i, t), site in sites.items():
        if not 0 <= i < config.num_layers:
            raise LoRAError(f"adapter layer {i} does not exist: the model has {config.num_layers} layers")
        if t not in TARGETS:
            raise LoRAError(f"unknown LoRA target {t!r}")
        by_layer.setdefault(i, {})[t] = site
    D = config.head_dim
    qkv_parts = [
        ("q", config.num_attention_heads * D),
        ("k", config.num_key_value_heads * D),
        ("v", config.num_key_value_heads * D),
    ]
    layer_keys = mx.random.split(mx.random.key(seed), config.num_layers)
    for i, wanted in sorted(by_layer.items()):
        block = model.blocks[i]
        keys = mx.random.split(layer_keys[i], 4)
        qkv = {t: s for t, s in wanted.items() if t in ("q", "k", "v")}
        if qkv:
            block.attn.qkv = LoRALinear(block.attn.qkv, qkv_parts, qkv, config.hidden_size, dropout, keys[0])
        if "out" in wanted:
            in_dims = config.num_attention_heads * D
            parts = [("o", config.hidden_size)]
            block.attn.out = LoRALinear(
                block.attn.out, parts, {"o": wanted["out"]}, in_dims, dropout, keys[1]
            )
        experts = {t: s for t, s in wanted.items() if t in EXPERT_TARGETS}
        if experts:
            base = block.mlp.experts
            if not isinstance(base, Experts):
                raise LoRAError(
                    "expert adapters need the experts in memory: drop --memory-budget (expert streaming), "
                    "or use an adapter on attention only"
                )
            block.mlp.experts = LoRAExperts(base, experts, dropout, keys[2])
        if "router" in wanted:
            block.mlp.router = LoRARouter(block.mlp.router, wanted["router"], keys[3])
    runtime_of(model).model_changed()  # decode traces made before hold the modules they saw


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, LORA_MODULES):
            yield name, m


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """Every LoRA tensor of the model by its name (``blocks.0.attn.qkv.lora_a.q`` ...)."""
    out: dict[str, mx.array] = {}
    for prefix, m in lora_modules(model):
        for kind in ("lora_a", "lora_b"):
            for part, arr in m[kind].items():
                out[f"{prefix}.{kind}.{part}"] = arr
    return out


def sites_of(model: nn.Module) -> dict[tuple[int, str], Site]:
    """The sites attached to `model` (rank from the tensors, scale as attached)."""
    out = {}
    for prefix, m in lora_modules(model):
        layer = int(prefix.split(".")[1])
        for part, a in m.lora_a.items():
            target = {"o": "out"}.get(part, part)
            out[(layer, target)] = Site(a.shape[-2], m._scales[part])
    return out


def freeze_base(model: nn.Module) -> None:
    """Only the LoRA tensors train (the base is frozen: QLoRA-style on MXFP4 experts)."""
    model.freeze()
    for _, m in lora_modules(model):
        # Frozen names are flattened ("lora_a.q"): the dicts' entries, not the dicts, are unfrozen.
        m.unfreeze(
            keys=[f"{kind}.{part}" for kind in ("lora_a", "lora_b") for part in m[kind]], recurse=False
        )


def parameter_count(sites: dict[tuple[int, str], Site], config: ModelConfig) -> int:
    """Number of LoRA values for these sites on this model (A + B of each)."""
    H, I, E, D = config.hidden_size, config.intermediate_size, config.num_experts, config.head_dim
    dims = {
        "q": (H, config.num_attention_heads * D, 1),
        "k": (H, config.num_key_value_heads * D, 1),
        "v": (H, config.num_key_value_heads * D, 1),
        "out": (config.num_attention_heads * D, H, 1),
        "gate_up": (H, 2 * I, E),
        "down": (I, H, E),
        "router": (H, E, 1),
    }
    total = 0
    for (_, t), s in sites.items():
        i, o, n = dims[t]
        total += n * s.rank * (i + o)
    return total


def weight_deltas(model: nn.Module) -> dict[str, mx.array]:
    """Canonical parameter name -> its float32 delta, in the canonical orientation (fuse.py adds these)."""
    out: dict[str, mx.array] = {}
    for prefix, m in lora_modules(model):
        if isinstance(m, LoRAExperts):
            for name in m.lora_a:
                out[f"{prefix}.{name}_weight"] = m.delta(name)
        else:
            out[f"{prefix}.weight"] = m.delta()
    return out


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))

"""Adapter folders: ours and PEFT's, read onto a loaded model (lora.py) and written back.

Ours (what `oss-mlx finetune` writes)::

    adapter_config.json     {"format": "oss-mlx-lora", "format_version": 1, "lora": {rank, alpha, dropout,
                            targets, layers, rslora, overrides}, "base": {the model's shapes}, ...}
    adapters.safetensors    float32 tensors named as in the model: blocks.3.attn.qkv.lora_a.q ...

PEFT's (transformers + peft, TRL, Unsloth)::

    adapter_config.json     peft_type LORA, r, lora_alpha, use_rslora, rank_pattern, alpha_pattern,
                            target_modules (q/k/v/o_proj), target_parameters (mlp.experts.gate_up_proj ...)
    adapter_model.safetensors
        base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight [r, H]   lora_B.weight [rows, r]
        base_model.model.model.layers.N.mlp.experts[.base_layer].lora_A.weight ...

An expert parameter [E, d1, d2] gets one lora_A [r*E, in] and one lora_B [out, r*E] (expert e's A is rows
e*r..e*r+r-1 of lora_A; its B is columns e, E+e, 2E+e ... of lora_B), and delta_e = scale * (B_e A_e) added
to W_e as x @ W_e uses it. Which of d1, d2 PEFT calls "in" depends on the versions that trained it: with
transformers 5 (whose GptOssExperts say `is_transposed`), and with any transformers under peft 0.18,
in = d1 (H for gate_up [E, H, 2I]); with peft >= 0.19 on transformers 4.x it swapped them (in = d2), so
lora_A is [r*E, 2I]. The shapes tell the two apart (2I != H), and down_proj follows gate_up's layout; an
adapter of down_proj alone on a model with intermediate == hidden cannot be told apart by shapes and is
read as transformers 5 lays it out. When both expert parameters are adapted PEFT nests the wrappers
(one `.base_layer` deeper for the first), so they are also told apart by shape, not by name.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .atomic import replace_with, write_text
from .config import ModelConfig
from .errors import LoadError
from .lora import (
    LoRAConfig,
    LoRAError,
    LoRAExperts,
    Site,
    adapter_weights,
    attach,
    lora_modules,
    sites_from_json,
    sites_of,
    sites_to_json,
)
from .runtime import runtime_of

FORMAT = "oss-mlx-lora"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
OURS_FILE = "adapters.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_PEFT_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "o_proj"}
# PEFT options whose adapters compute something else than plain LoRA: refused, by name.
_PEFT_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "modules_to_save": "modules_to_save (fully trained copies of modules)",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
}


class AdapterError(LoRAError, LoadError):
    """An adapter folder that cannot be used with this model; the message names the file and the fix."""


# ---- reading ---------------------------------------------------------------------------------------


def read_adapter_config(folder: str | os.PathLike) -> tuple[Path, dict]:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise AdapterError(f"{folder}: no such adapter folder")
    if not folder.is_dir():
        raise AdapterError(f"{folder} is a file; pass the folder that holds {CONFIG_FILE}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(
            f"{folder} holds no {CONFIG_FILE}: not an adapter folder (oss-mlx finetune and PEFT's "
            "save_pretrained write one)"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return folder, raw


def adapter_kind(raw: dict, path: Path) -> str:
    if raw.get("format") == FORMAT:
        return "oss-mlx"
    if "peft_type" in raw:
        if str(raw["peft_type"]).upper() != "LORA":
            raise AdapterError(f"{path}: peft_type {raw['peft_type']!r} is not supported (only LORA)")
        return "peft"
    raise AdapterError(f"{path}: neither an oss-mlx adapter (format {FORMAT!r}) nor a PEFT one (peft_type)")


def load_tensors(path: Path) -> dict[str, mx.array]:
    """A safetensors file's tensors; a missing, truncated or damaged file is an AdapterError in words."""
    if not path.is_file():
        bin_file = path.with_name("adapter_model.bin")
        hint = (
            f" ({bin_file.name} is there: save it again as safetensors, "
            "save_pretrained(safe_serialization=True))"
            if bin_file.is_file()
            else ""
        )
        raise AdapterError(f"{path} is missing{hint}")
    from .errors import CheckpointError
    from .safetensors_file import read_header

    try:
        read_header(path)  # truncation, bad header: said in words
        return dict(mx.load(str(path)))
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    except Exception as e:
        raise AdapterError(f"{path}: cannot read ({e})") from None


def load_adapter(model: nn.Module, folder: str | os.PathLike, dtype: mx.Dtype | None = None) -> dict:
    """Attach the adapter in `folder` (ours or PEFT's) to `model`, its tensors in `dtype` (default: the
    model's activation dtype). Returns a summary: kind, sites, parameters."""
    folder, raw = read_adapter_config(folder)
    kind = adapter_kind(raw, folder / CONFIG_FILE)
    config: ModelConfig = model.config
    if kind == "oss-mlx":
        sites, tensors, dropout = _ours(folder, raw, config)
    else:
        sites, tensors = _peft(folder, raw, config)
        dropout = 0.0
    attach(model, sites, dropout=dropout)
    expected = adapter_weights(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"{folder}: the adapter's tensors do not match its config "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    target = dtype or getattr(model, "dtype", mx.float32)
    weights = []
    for name, want in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise AdapterError(
                f"{folder}: {name} has shape {list(got.shape)}, this model needs {list(want.shape)}: "
                "the adapter was trained on a model of other shapes"
            )
        weights.append((name, got.astype(target)))
    finite = mx.stack([mx.isfinite(w).all() for _, w in weights]).tolist()
    bad = [name for (name, _), ok in zip(weights, finite) if not ok]
    if bad:  # every logit would be NaN: refused here rather than generating nothing
        which = f"{bad[0]} and {len(bad) - 1} more hold" if len(bad) > 1 else f"{bad[0]} holds"
        raise AdapterError(
            f"{folder}: {which} NaN or infinite values (a diverged training run?); use an earlier "
            "checkpoint or train again"
        )
    model.load_weights(weights, strict=False)
    mx.eval([w for _, w in weights])  # the adapter only: the base stays as lazy as it was loaded
    info = AdapterInfo(kind, folder, len(sites), sum(w.size for _, w in weights))
    runtime = runtime_of(model)
    runtime.adapter = info
    runtime.model_changed()  # decode traces made before hold the base model's arrays
    return {"kind": kind, "sites": len(sites), "parameters": info.parameters}


class AdapterInfo:
    """What was attached (a plain object: nn.Module would take a dict for parameters)."""

    def __init__(self, kind: str, path: Path, sites: int, parameters: int):
        self.kind, self.path, self.sites, self.parameters = kind, path, sites, parameters

    def __repr__(self) -> str:
        return f"AdapterInfo({self.kind}, {self.path}, {self.sites} sites, {self.parameters:,} values)"


def _ours(folder: Path, raw: dict, config: ModelConfig):
    path = folder / CONFIG_FILE
    version = raw.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise AdapterError(
            f"{path}: format_version {version!r} must be a whole number (this oss-mlx writes 1)"
        )
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {version} is newer than this oss-mlx reads")
    if not isinstance(raw.get("sites"), dict):
        raise AdapterError(f"{path}: no valid 'sites' section (an object of \"LAYER.TARGET\": [rank, scale])")
    try:
        sites = sites_from_json(raw["sites"])
        dropout = float(raw.get("dropout", 0.0))
    except (KeyError, TypeError, ValueError, LoRAError) as e:
        raise AdapterError(f"{path}: no valid 'sites' section ({e})") from None
    if not 0.0 <= dropout < 1.0:  # (NaN too)
        raise AdapterError(f"{path}: dropout {dropout} must be at least 0 and below 1")
    base = raw.get("base") or {}
    for key, ours in (
        ("num_layers", config.num_layers),
        ("hidden_size", config.hidden_size),
        ("num_experts", config.num_experts),
        ("intermediate_size", config.intermediate_size),
    ):
        if key in base and base[key] != ours:
            raise AdapterError(
                f"{folder}: trained on a model with {key} = {base[key]}, this one has {ours}: "
                "an adapter only fits the model it was trained on"
            )
    return sites, load_tensors(folder / OURS_FILE), dropout


def _pattern_value(patterns: dict, key: str, default, path: Path):
    # PEFT's get_pattern_key: the first pattern that matches the end of the module's (or parameter's) name.
    if not isinstance(patterns or {}, dict):
        raise AdapterError(f"{path}: alpha_pattern must be an object of pattern: alpha")
    for pattern, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", key):
                return value
        except re.error as e:
            raise AdapterError(f"{path}: alpha_pattern {pattern!r} is not a valid pattern ({e})") from None
    return default


def _peft(folder: Path, raw: dict, config: ModelConfig):
    path = folder / CONFIG_FILE
    for key, what in _PEFT_UNSUPPORTED.items():
        if raw.get(key) not in (None, False, {}, [], ""):
            raise AdapterError(f"{path}: {key} is set; {what} is not supported (plain LoRA only)")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias {raw['bias']!r}: adapters that train biases are not supported")
    tensors = load_tensors(folder / PEFT_FILE)
    E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
    rslora = bool(raw.get("use_rslora", False))
    alpha_default = raw.get("lora_alpha", 8)  # ranks come from the tensors' shapes

    def scale(key: str, rank: int) -> float:
        alpha = _pattern_value(raw.get("alpha_pattern"), key, alpha_default, path)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise AdapterError(f"{path}: lora_alpha of {key} is {alpha!r}; it must be a finite number")
        return alpha / (rank**0.5) if rslora else alpha / rank

    pairs: dict[str, dict[str, mx.array]] = {}  # PEFT module path -> {"A": ..., "B": ...}
    for name, array in tensors.items():
        m = re.fullmatch(r"(.*)\.lora_([AB])(?:\.default)?\.weight", name.removeprefix(PEFT_PREFIX))
        if m is None:
            raise AdapterError(
                f"{folder / PEFT_FILE}: tensor {name!r} is not a LoRA A/B weight of this model "
                "(embedding, lm_head and bias adapters are not supported)"
            )
        pairs.setdefault(m.group(1), {})[m.group(2)] = array

    sites: dict[tuple[int, str], Site] = {}
    ours: dict[str, mx.array] = {}
    experts: dict[int, list[tuple[str, mx.array, mx.array]]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{folder / PEFT_FILE}: {module} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] < 1 or b.shape[1] != a.shape[0]:
            raise AdapterError(
                f"{folder / PEFT_FILE}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                "LoRA needs A [r, in] and B [out, r] with the same r of at least 1"
            )
        m = re.fullmatch(
            r"model\.layers\.(\d+)\.(self_attn\.(q|k|v|o)_proj|mlp\.experts|mlp\.router)((?:\.base_layer)*)",
            module,
        )
        if m is None:
            raise AdapterError(
                f"{folder / PEFT_FILE}: LoRA on {module!r}: only attention q/k/v/o_proj, "
                "mlp.experts and mlp.router weights of gpt-oss are supported"
            )
        layer = int(m.group(1))
        if layer >= config.num_layers:
            raise AdapterError(f"{folder}: LoRA on layer {layer}; the model has {config.num_layers} layers")
        if m.group(3):
            target = {"o": "out"}.get(m.group(3), m.group(3))
            rank = a.shape[0]
            key = f"model.layers.{layer}.self_attn.{_PEFT_ATTN[target]}"
            sites[(layer, target)] = Site(rank, scale(key, rank))
            part = "o" if target == "out" else target
            ours[f"blocks.{layer}.attn.{'out' if target == 'out' else 'qkv'}.lora_a.{part}"] = a
            ours[f"blocks.{layer}.attn.{'out' if target == 'out' else 'qkv'}.lora_b.{part}"] = b
        elif m.group(2) == "mlp.router":
            rank = a.shape[0]
            sites[(layer, "router")] = Site(rank, scale(f"model.layers.{layer}.mlp.router.weight", rank))
            ours[f"blocks.{layer}.mlp.router.lora_a.router"] = a
            ours[f"blocks.{layer}.mlp.router.lora_b.router"] = b
        else:
            experts.setdefault(layer, []).append((module, a, b))

    for layer, found in experts.items():
        named = _name_expert_pairs(found, E, H, I, folder)
        for target, (a, b, swapped) in named.items():
            if a.shape[0] % E or b.shape[1] != a.shape[0]:
                raise AdapterError(
                    f"{folder}: layer {layer} {target}: lora_A {list(a.shape)} / lora_B {list(b.shape)} "
                    f"do not hold {E} experts' factors"
                )
            rank = a.shape[0] // E
            sites[(layer, target)] = Site(
                rank, scale(f"model.layers.{layer}.mlp.experts.{target}_proj", rank)
            )
            oa, ob = peft_expert_to_ours(a, b, E, swapped)
            ours[f"blocks.{layer}.mlp.experts.lora_a.{target}"] = oa
            ours[f"blocks.{layer}.mlp.experts.lora_b.{target}"] = ob
    if not sites:
        raise AdapterError(f"{folder}: the adapter holds no LoRA weights")
    return sites, ours


def _name_expert_pairs(found, E: int, H: int, I: int, folder: Path) -> dict[str, tuple]:
    """{target: (A, B, swapped)} for one layer's expert LoRA pairs, told apart by their shapes."""

    def classify(a, b):
        a_in, b_out = a.shape[1], b.shape[0]
        if (a_in, b_out) == (H, 2 * I):
            return "gate_up", False
        if (a_in, b_out) == (2 * I, H):
            return "gate_up", True
        if (a_in, b_out) == (I, H) and I != H:
            return "down", False
        if (a_in, b_out) == (H, I) and I != H:
            return "down", True
        if (a_in, b_out) == (H, H) and I == H:
            return "down", None  # either layout: decided below
        raise AdapterError(
            f"{folder}: expert LoRA with lora_A {list(a.shape)} and lora_B {list(b.shape)} fits neither "
            f"gate_up_proj [E, {H}, {2 * I}] nor down_proj [E, {I}, {H}] of this model"
        )

    named: dict[str, tuple] = {}
    for module, a, b in found:
        target, swapped = classify(a, b)
        if target in named:
            raise AdapterError(
                f"{folder}: two expert LoRA pairs of {module.split('.mlp')[0]} fit {target}_proj"
            )
        named[target] = (a, b, swapped)
    if "down" in named and named["down"][2] is None:
        swapped = named["gate_up"][2] if "gate_up" in named else False
        named["down"] = (*named["down"][:2], swapped)
    return named


def peft_expert_to_ours(a: mx.array, b: mx.array, E: int, swapped: bool) -> tuple[mx.array, mx.array]:
    """PEFT's lora_A [r*E, d] / lora_B [d', r*E] of an expert parameter -> ours: A [E, r, in], B [E, out, r]
    (canonical orientation: x first through A)."""
    r = a.shape[0] // E
    pa = a.reshape(E, r, a.shape[1])  # expert e: rows e*r .. e*r + r - 1
    pb = b.reshape(b.shape[0], r, E).transpose(2, 0, 1)  # expert e: columns e, E + e, ...: [E, d', r]
    if not swapped:  # delta_e = A_e^T B_e^T over [in, out]: ours is A_e, B_e
        return pa, pb
    # delta_e = B_e A_e over [in=d', out=d]: x meets B_e first
    return pb.transpose(0, 2, 1), pa.transpose(0, 2, 1)


def ours_expert_to_peft(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """The inverse of `peft_expert_to_ours` for the transformers 5 layout (in = d1)."""
    E, r, _ = a.shape
    return a.reshape(E * r, a.shape[2]), b.transpose(1, 2, 0).reshape(b.shape[1], r * E)


# ---- writing ---------------------------------------------------------------------------------------


def atomic_save_safetensors(
    tensors: dict[str, mx.array], path: Path, metadata: dict[str, str] | None = None
) -> None:
    replace_with(path, lambda tmp: mx.save_safetensors(str(tmp), tensors, metadata=metadata or {}))


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    format: str = "oss-mlx",
    lora: LoRAConfig | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the adapter attached to `model` into `folder` (files replaced atomically), float32.

    format "oss-mlx" (ours: every site's rank and scale; `lora`, the training settings, recorded beside
    them) or "peft" (loads in transformers + peft: target_modules for attention, target_parameters for
    experts and router)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float32) for k, v in adapter_weights(model).items()}
    if not weights:
        raise AdapterError("the model has no adapter attached")
    config: ModelConfig = model.config
    if format == "oss-mlx":
        atomic_save_safetensors(weights, folder / OURS_FILE, {"format": FORMAT})
        cfg = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sites": sites_to_json(sites_of(model)),
            "dropout": lora.dropout if lora is not None else 0.0,
            "lora": lora.to_dict() if lora is not None else None,
            "base": {
                "num_layers": config.num_layers,
                "hidden_size": config.hidden_size,
                "num_experts": config.num_experts,
                "intermediate_size": config.intermediate_size,
            },
            **(extra or {}),
        }
        write_text(folder / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
        return folder
    if format != "peft":
        raise AdapterError(f"unknown adapter format {format!r}; choose oss-mlx or peft")
    _save_peft(model, folder, weights)
    return folder


def _save_peft(model: nn.Module, folder: Path, weights: dict[str, mx.array]) -> None:
    sites = sites_of(model)
    ranks, scales = {s.rank for s in sites.values()}, {s.scale for s in sites.values()}
    if len(scales) > 1 or len(ranks) > 1:
        raise AdapterError("PEFT export supports one rank and one scale for every site")
    rank = ranks.pop()
    alpha = (
        scales.pop() * rank
    )  # PEFT's scale is alpha / r (an rsLoRA scale is written as the same alpha / r)
    out: dict[str, mx.array] = {}
    modules, params = set(), set()
    for name, arr in weights.items():
        parts = name.split(".")
        layer, kind, part = int(parts[1]), parts[-2], parts[-1]
        ab = "A" if kind == "lora_a" else "B"
        base = f"{PEFT_PREFIX}model.layers.{layer}"
        if part in ("q", "k", "v", "o"):
            proj = f"{part}_proj"
            modules.add(proj)
            out[f"{base}.self_attn.{proj}.lora_{ab}.weight"] = arr
        elif part == "router":
            params.add("mlp.router.weight")
            out[f"{base}.mlp.router.lora_{ab}.weight"] = arr
    for prefix, m in lora_modules(model):
        if not isinstance(m, LoRAExperts):
            continue
        layer = int(prefix.split(".")[1])
        names = [t for t in ("gate_up", "down") if t in m.lora_a]
        # PEFT wraps the experts' parameters in the order the module declares them (gate_up_proj, then
        # down_proj), the first innermost: with both, gate_up sits one `.base_layer` deeper.
        for depth, t in enumerate(names):
            nest = ".base_layer" * (len(names) - 1 - depth)
            a, b = ours_expert_to_peft(weights[f"{prefix}.lora_a.{t}"], weights[f"{prefix}.lora_b.{t}"])
            out[f"{PEFT_PREFIX}model.layers.{layer}.mlp.experts{nest}.lora_A.weight"] = a
            out[f"{PEFT_PREFIX}model.layers.{layer}.mlp.experts{nest}.lora_B.weight"] = b
            params.add(f"mlp.experts.{t}_proj")
    atomic_save_safetensors(out, folder / PEFT_FILE, {"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "target_modules": sorted(modules) or None,
        "target_parameters": sorted(params) or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "base_model_name_or_path": None,
    }
    write_text(folder / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")

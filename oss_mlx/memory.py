"""Memory planning: will a gpt-oss model fit this machine, with which preset and how much context?

Everything is arithmetic on the config (docs/MEMORY.md shows it worked out for 20b and 120b):

weights   per component, in the bytes the converter writes (`oss-mlx convert`), for a quality preset:
          experts  MXFP4: per expert 2I*H/2 + H*I/2 bytes of 4-bit values, one uint8 scale per 32
                   values, float biases (2I + H)
          attention  qkv [(Hq + 2 Hkv) D, H] and out [H, Hq D] (+ biases, sinks): float, or affine
                   b-bit with group g: rows*cols*b/8 bytes + 2 float values (scale, bias) per group
          embedding, unembedding  [V, H] each: float or affine as above
          other    norms and routers (never quantized)
kv cache  bfloat16 keys + values: 2 * Hkv * D * 2 bytes per layer per token; full-attention layers keep
          every token, sliding layers at most `sliding_window` tokens.
activations  one prefill chunk (default 512 tokens) of hidden states, attention and MoE intermediates
          (float32, worst case) plus the last token's logits; attention itself fused (no score matrix).

A machine's budget is the GPU working set: on a Mac, Metal's recommended working set (read from MLX
when it runs there; otherwise ~2/3 of RAM up to 36 GB and ~3/4 above: an approximation), which
`sudo sysctl iogpu.wired_limit_mb=N` raises; on Linux the total RAM.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import FULL, ConfigError, ModelConfig

GiB = 1 << 30
MiB = 1 << 20
COMPONENTS = ("experts", "attention", "embedding", "unembedding", "other")
DEFAULT_CONTEXT = 8192
PREFILL_CHUNK = 512
KV_BYTES = 2  # bfloat16 cache


def _presets():
    from .convert.presets import PRESETS

    return PRESETS


def dense_bytes(rows: int, cols: int, quant: dict | None, dtype_bytes: int) -> int:
    """Bytes of a [rows, cols] weight, float or quantized as MLX stores it (weight + scales (+ biases))."""
    if not quant:
        return rows * cols * dtype_bytes
    bits, group = quant["bits"], quant["group_size"]
    mode = quant.get("mode", "affine")
    packed = rows * cols * bits // 8
    groups = rows * (cols // group)
    if mode == "affine":
        return packed + 2 * groups * dtype_bytes  # scales and biases in the float dtype
    return packed + groups  # mxfp4 / mxfp8 / nvfp4: one uint8 scale per group, no biases


def expert_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """One expert (gate_up + down), MXFP4 values + uint8 scales + float biases."""
    H, I = config.hidden_size, config.intermediate_size
    gate_up = 2 * I * H // 2 + 2 * I * H // 32 + 2 * I * dtype_bytes
    down = H * I // 2 + H * I // 32 + H * dtype_bytes
    return gate_up + down


def weight_bytes(
    config: ModelConfig, quantization: dict | None = None, dtype_bytes: int = 2
) -> dict[str, int]:
    """Bytes per component (see the module docstring) for a preset's quantization spec."""
    q = quantization or {}
    H, E, V, L = config.hidden_size, config.num_experts, config.vocab_size, config.num_layers
    hq_d = config.num_attention_heads * config.head_dim
    attention = (
        dense_bytes(config.qkv_dim, H, q.get("attention"), dtype_bytes)
        + config.qkv_dim * dtype_bytes
        + dense_bytes(H, hq_d, q.get("attention"), dtype_bytes)
        + H * dtype_bytes
        + config.num_attention_heads * dtype_bytes
    )
    other = 2 * H * dtype_bytes + E * H * dtype_bytes + E * dtype_bytes  # norms, router
    return {
        "experts": L * E * expert_bytes(config, dtype_bytes),
        "attention": L * attention,
        "embedding": dense_bytes(V, H, q.get("embedding"), dtype_bytes),
        "unembedding": dense_bytes(V, H, q.get("unembedding"), dtype_bytes),
        "other": L * other + H * dtype_bytes,
    }


def kv_bytes_per_token(config: ModelConfig) -> int:
    """Keys + values of one token in one layer."""
    return 2 * config.num_key_value_heads * config.head_dim * KV_BYTES


def kv_bytes(config: ModelConfig, context: int) -> int:
    per = kv_bytes_per_token(config)
    total = 0
    for t in config.layer_types:
        total += per * (context if t == FULL else min(context, config.sliding_window))
    return total


def activation_bytes(config: ModelConfig, chunk: int = PREFILL_CHUNK) -> int:
    H, I, k = config.hidden_size, config.intermediate_size, config.experts_per_token
    per_token = 4 * H + config.qkv_dim + config.num_attention_heads * config.head_dim
    per_token += k * (3 * I + H) + config.num_experts
    return chunk * per_token * 4 + 2 * config.vocab_size * 4


# ---- machines -------------------------------------------------------------------------------------


def mac_working_set(ram_bytes: int) -> int:
    """Approximate Metal recommended working set of a Mac with this much RAM (no Mac at hand).

    ~2/3 of RAM up to 36 GB, ~3/4 above: an approximation of what macOS reports (Apple does not
    document the rule); `Machine.detect()` reads the real value from MLX on a Mac.
    """
    return ram_bytes * 2 // 3 if ram_bytes <= 36 * GiB else ram_bytes * 3 // 4


def wired_limit_cap(ram_bytes: int) -> int:
    """The most we suggest wiring for the GPU: leave max(3 GiB, 1/8 of RAM) to macOS."""
    return ram_bytes - max(3 * GiB, ram_bytes // 8)


@dataclass(frozen=True)
class Machine:
    ram_bytes: int
    working_set_bytes: int
    platform: str  # "mac" | "linux" | "other"
    how: str  # where the working set comes from, in words

    @classmethod
    def of_size(cls, gib: float, platform: str = "mac") -> Machine:
        ram = int(gib * GiB)
        if platform == "mac":
            ws = mac_working_set(ram)
            frac = "2/3" if ram <= 36 * GiB else "3/4"
            return cls(ram, ws, "mac", f"a {gib:g} GB Mac: working set ~{frac} of RAM (approximation)")
        return cls(ram, ram, platform, f"a {gib:g} GB {platform} machine: all RAM")

    @classmethod
    def detect(cls) -> Machine:
        override = os.environ.get("OSS_MLX_MEMORY_GB")
        if override:  # plan as if the GPU budget were this size (a smaller share, or another machine)
            from .cli_args import MEMORY_GB, UsageError

            try:
                b = int(MEMORY_GB(override) * 1e9)
            except ValueError as e:
                raise UsageError(f"OSS_MLX_MEMORY_GB {e} (GB, e.g. 16)") from None
            return cls(b, b, "mac" if sys.platform == "darwin" else "linux", f"OSS_MLX_MEMORY_GB={override}")
        ram = _total_ram()
        if sys.platform == "darwin":
            ws = _metal_working_set()
            if ws:
                return cls(ram, ws, "mac", "this Mac: Metal's recommended working set")
            return cls(ram, mac_working_set(ram), "mac", "this Mac: ~2/3-3/4 of RAM (Metal not available)")
        if sys.platform.startswith("linux"):
            return cls(ram, ram, "linux", "this machine: MemTotal in /proc/meminfo")
        return cls(ram, ram, "other", "this machine: total RAM")


# What a prefill chunk transiently takes beyond weights and KV cache, measured on MLX-CUDA (H200,
# 20b and 120b shapes, docs/MEMORY.md "Measured"): ~4 GB for 512-token chunks, ~9 GB for 2,048. Far
# above the intermediates' arithmetic (activation_bytes: 0.14 GB): library workspaces and the MoE's
# gathered rows. Not measured on Metal; assumed the same there.
PREFILL_TRANSIENT = {2048: 9 * 10**9, 512: 4 * 10**9}


def prefill_step_for(resident_bytes: int, kv: int, working_set: int) -> int:
    """The prefill chunk to use: 2,048 tokens (fastest) when the machine has room for its transient
    memory beside the weights and the KV cache (8k context), else 512 (measured, 120b at 8k on
    MLX-CUDA: 69.4 GB peak instead of 73.3 GB, for 22% slower prefill at 32k)."""
    for step in sorted(PREFILL_TRANSIENT, reverse=True):
        if resident_bytes + kv + PREFILL_TRANSIENT[step] <= working_set:
            return step
    return min(PREFILL_TRANSIENT)


def wire_weights(weight_bytes: int) -> int | None:
    """On Metal, keep the weights wired (resident, never paged out) up to the recommended working
    set: macOS otherwise may evict and re-read GPU buffers mid-generation. Returns the limit set,
    or None where there is no such limit (CPU, CUDA)."""
    import mlx.core as mx

    ws = _metal_working_set()
    if not ws:
        return None
    limit = min(weight_bytes + GiB, ws)
    mx.set_wired_limit(limit)
    return limit


def _total_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _metal_working_set() -> int | None:
    try:
        import mlx.core as mx

        metal = getattr(mx, "metal", None)
        if metal is None or not metal.is_available():
            return None
        info = mx.device_info() if hasattr(mx, "device_info") else metal.device_info()
        return int(info["max_recommended_working_set_size"]) or None
    except Exception:  # any MLX build or API difference: fall back to the approximation
        return None


# ---- the plan -------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Bytes a model needs: weights per component, KV cache for `context` tokens, activations."""

    config: ModelConfig
    preset: str = "reference"
    context: int = DEFAULT_CONTEXT
    quantization: dict | None = None
    dtype_bytes: int = 2
    prefill_chunk: int = PREFILL_CHUNK
    weights: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if self.quantization is None and self.preset in _presets():
            self.quantization = _presets()[self.preset].spec()
        elif self.quantization is None:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(_presets())}")
        self.weights = weight_bytes(self.config, self.quantization, self.dtype_bytes)

    @classmethod
    def for_preset(
        cls, config: ModelConfig, preset: str = "reference", context: int = DEFAULT_CONTEXT
    ) -> MemoryPlan:
        return cls(config, preset, context)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def kv_bytes(self) -> int:
        return kv_bytes(self.config, self.context)

    def kv_bytes_per_1k(self) -> tuple[int, int]:
        """(growth per 1024 tokens from full-attention layers, the sliding layers' bounded total)."""
        per = kv_bytes_per_token(self.config)
        full = sum(t == FULL for t in self.config.layer_types)
        sliding = self.config.num_layers - full
        return full * per * 1024, sliding * per * self.config.sliding_window

    @property
    def activation_bytes(self) -> int:
        return activation_bytes(self.config, self.prefill_chunk)

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_bytes + self.activation_bytes

    def fits(self, working_set_bytes: int) -> bool:
        return self.total <= working_set_bytes

    def with_context(self, context: int) -> MemoryPlan:
        return MemoryPlan(
            self.config, self.preset, context, self.quantization, self.dtype_bytes, self.prefill_chunk
        )

    def max_context(self, working_set_bytes: int) -> int:
        """The longest context that fits (0: not even the weights fit), at most max_position_embeddings."""
        fixed = self.weights_total + self.activation_bytes
        if fixed + kv_bytes(self.config, 1) > working_set_bytes:
            return 0
        lo, hi = 1, self.config.max_position_embeddings
        if fixed + kv_bytes(self.config, hi) <= working_set_bytes:
            return hi
        while lo < hi:  # kv_bytes is monotonic in the context
            mid = (lo + hi + 1) // 2
            if fixed + kv_bytes(self.config, mid) <= working_set_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def streaming_minimum(self) -> int:
        """The least `memory_budget` expert streaming accepts (see streaming.plan_streaming): the
        non-expert weights, the KV cache and activations, and top-k experts per layer (+1 in flight)."""
        from .streaming import ACTIVATION_ALLOWANCE, min_budget

        c = self.config
        biases = (2 * c.intermediate_size + c.hidden_size) * self.dtype_bytes  # stay resident
        per_expert = expert_bytes(c, self.dtype_bytes) - biases
        resident = self.weights_total - per_expert * c.num_experts * c.num_layers
        if not (self.quantization or {}).get("embedding"):
            resident -= self.weights["embedding"]  # a float table is read by rows, not kept
        allowance = self.kv_bytes + ACTIVATION_ALLOWANCE
        return min_budget(resident, allowance, per_expert, c.num_layers, c.experts_per_token)

    def streaming_budget(self, working_set: int) -> int | None:
        """A --memory-budget for expert streaming that fits `working_set` (90% of it), or None."""
        budget = int(working_set * 0.9) // 10**8 * 10**8
        return budget if budget >= self.streaming_minimum() else None

    def advice(self, machine: Machine | None = None) -> list[str]:
        """Concrete steps: what fits, or which preset / context / wired limit makes it fit (on
        `machine`, default this one)."""
        machine = machine or Machine.detect()
        ws = machine.working_set_bytes
        out: list[str] = []
        if self.fits(ws):
            out.append(
                f"fits: {gib(self.total)} of {gib(ws)} ({gib(ws - self.total)} to spare); "
                f"context up to {self.max_context(ws):,} tokens fits with this preset"
            )
            return out
        options: list[str] = []
        smaller = [
            p
            for name in _presets()
            if name != self.preset
            and (p := MemoryPlan(self.config, name, self.context, dtype_bytes=self.dtype_bytes)).total
            < self.total
        ]
        for p in sorted(smaller, key=lambda p: p.total):
            if p.fits(ws):
                options.append(
                    f"use --quality {p.preset}: {gib(p.total)} at {self.context:,} tokens of context"
                )
                break
        ctx = self.max_context(ws)
        if ctx >= 1024:
            options.append(f"limit the context to {ctx:,} tokens (--context {ctx})")
        if machine.platform == "mac":
            # the best preset (this one first, then smaller) that fits once the GPU limit is raised
            for p in [self, *sorted(smaller, key=lambda p: -p.total)]:
                need_mb = math.ceil((p.total + GiB) / MiB / 1024) * 1024
                if need_mb * MiB <= wired_limit_cap(machine.ram_bytes):
                    also = "" if p is self else f"use --quality {p.preset} ({gib(p.total)}) and "
                    options.append(
                        f"{also}raise the GPU memory limit (until reboot): "
                        f"sudo sysctl iogpu.wired_limit_mb={need_mb}"
                    )
                    break
        stream = self.streaming_budget(ws)
        if stream is not None:
            options.append(
                f"keep only the hot experts in memory, reading the others from disk (slower): "
                f"--memory-budget {stream / 1e9:.1f}GB (the least that works is "
                f"{self.streaming_minimum() / 1e9:.1f}GB)"
            )
        head = f"does not fit: needs {gib(self.total)}, the budget is {gib(ws)} ({machine.how})"
        if options:
            out.append(head + "; any one of these makes it fit:")
            out += options
        else:
            limit = (
                f" even with the GPU limit raised to {gib(wired_limit_cap(machine.ram_bytes))}"
                if machine.platform == "mac"
                else ""
            )
            out.append(
                f"{head}; no preset or context makes it fit{limit}: "
                "use a smaller model or a machine with more memory"
            )
        return out


def fit_advice(model: str, context: int = DEFAULT_CONTEXT) -> list[str]:
    """Before loading `model` (a folder or hub id; only its config.json is read): the planner's
    advice when it will not fit this machine's budget, [] when it fits or cannot be planned."""
    try:
        config, raw = config_of(str(model))
        section = raw.get("oss_mlx") or {}
        plan = MemoryPlan(
            config, section.get("preset") or "reference", context, quantization=section.get("quantization")
        )
        machine = Machine.detect()
        return [] if plan.fits(machine.working_set_bytes) else plan.advice(machine)
    except Exception:  # unreadable config: the loader will say what is wrong
        return []


def refuse_unless_fits(prog: str, model: str, context: int = DEFAULT_CONTEXT, how: str = "") -> bool:
    """Before loading `model`: when it will not fit, print the planner's advice and what to pass
    instead (to stderr, as `prog`), and return True (the caller stops). Never let the machine swap."""
    advice = fit_advice(model, context)
    if not advice:
        return False
    print(f"{prog}: " + "\n  ".join(advice), file=sys.stderr)
    print(
        f"{prog}: error: the model does not fit this machine's memory budget: do one of the above, or "
        f"pass --memory-budget SIZE{how} to keep only hot experts in memory (or --ignore-memory to load "
        "anyway)",
        file=sys.stderr,
    )
    return True


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


# ---- output ---------------------------------------------------------------------------------------


def plan_table(plan: MemoryPlan, machine: Machine | None = None, title: str | None = None):
    """A rich Table: bytes per component, KV cache, activations, total, fit."""
    from rich.table import Table

    t = Table(title=title or f"memory plan: preset {plan.preset}, context {plan.context:,} tokens")
    t.add_column("component")
    t.add_column("bytes", justify="right")
    t.add_column("GiB", justify="right")
    t.add_column("note")
    q = plan.quantization or {}

    def qnote(part: str) -> str:
        s = q.get(part)
        return f"{s['bits']}-bit {s.get('mode', 'affine')}, group {s['group_size']}" if s else "bf16"

    notes = {
        "experts": f"MXFP4, {plan.config.num_layers} x {plan.config.num_experts} experts",
        "attention": qnote("attention"),
        "embedding": qnote("embedding"),
        "unembedding": qnote("unembedding"),
        "other": "norms, routers (bf16)",
    }
    for name in COMPONENTS:
        t.add_row(name, f"{plan.weights[name]:,}", f"{plan.weights[name] / GiB:.2f}", notes[name])
    t.add_row("weights", f"{plan.weights_total:,}", f"{plan.weights_total / GiB:.2f}", "", style="bold")
    grow, bounded = plan.kv_bytes_per_1k()
    t.add_row(
        "kv cache",
        f"{plan.kv_bytes:,}",
        f"{plan.kv_bytes / GiB:.2f}",
        f"{grow / MiB:.1f} MiB per 1k tokens (full layers) + {bounded / MiB:.1f} MiB (sliding, bounded)",
    )
    t.add_row(
        "activations",
        f"{plan.activation_bytes:,}",
        f"{plan.activation_bytes / GiB:.2f}",
        f"prefill chunk of {plan.prefill_chunk} tokens (estimate)",
    )
    fit = ""
    if machine is not None:
        fit = ("fits " if plan.fits(machine.working_set_bytes) else "DOES NOT FIT ") + gib(
            machine.working_set_bytes
        )
    t.add_row("total", f"{plan.total:,}", f"{plan.total / GiB:.2f}", fit, style="bold")
    return t


def presets_table(config: ModelConfig, context: int, machine: Machine, dtype_bytes: int = 2):
    from rich.table import Table

    t = Table(title=f"presets on {machine.how} ({gib(machine.working_set_bytes)} budget)")
    for col in ("preset", "weights GiB", f"total GiB @ {context:,}", "fits", "max context"):
        t.add_column(col, justify="left" if col in ("preset", "fits") else "right")
    for name in _presets():
        p = MemoryPlan(config, name, context, dtype_bytes=dtype_bytes)
        mc = p.max_context(machine.working_set_bytes)
        t.add_row(
            name,
            f"{p.weights_total / GiB:.2f}",
            f"{p.total / GiB:.2f}",
            "yes" if p.fits(machine.working_set_bytes) else "no",
            f"{mc:,}" if mc else "-",
        )
    return t


def print_plan(plan: MemoryPlan, machine: Machine, console=None, presets: bool = True) -> None:
    from rich.console import Console

    console = console or Console()
    console.print(plan_table(plan, machine))
    console.print(
        f"machine: {machine.how}: RAM {gib(machine.ram_bytes)}, budget {gib(machine.working_set_bytes)}"
    )
    step = prefill_step_for(
        plan.weights_total, kv_bytes(plan.config, DEFAULT_CONTEXT), machine.working_set_bytes
    )
    console.print(
        f"prefill chunk at run time: {step:,} tokens (2,048 where ~{PREFILL_TRANSIENT[2048] / 1e9:.0f} GB of "
        "transient memory fits beside the weights, as measured on MLX-CUDA; else 512)",
        highlight=False,
    )
    if presets:
        console.print(presets_table(plan.config, plan.context, machine, plan.dtype_bytes))
    for line in plan.advice(machine):
        console.print(f"  - {line}", highlight=False, soft_wrap=True)


# ---- oss-mlx plan ---------------------------------------------------------------------------------

NAMED_CONFIGS = ("20b", "120b")


def named_config(name: str) -> ModelConfig:
    """The shapes of openai/gpt-oss-20b / -120b (no file needed)."""
    if name == "20b":
        return ModelConfig()
    if name == "120b":
        return ModelConfig(num_layers=36, num_experts=128)
    raise ValueError(f"unknown model size {name!r}; choose 20b or 120b")


def config_of(model: str) -> tuple[ModelConfig, dict[str, Any]]:
    """ModelConfig (+ raw dict) of a folder, a config.json file, or a hub repo id (config.json only)."""
    from .config import read_config

    path = Path(model).expanduser()
    if path.is_file():
        return read_config(path.parent) if path.name == "config.json" else _read_file_config(path)
    from .hub import is_repo_id
    from .model_store import resolve

    if path.is_dir() or is_repo_id(model):
        return read_config(resolve(model, need="config"))
    raise ConfigError(f"{model}: no such folder or config.json, and not a hub repo id")


def _read_file_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    import json

    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a JSON object, not {type(raw).__name__}")
    return ModelConfig.from_dict(raw, source=str(path)), raw


def build_parser() -> argparse.ArgumentParser:
    from . import cli_args as A

    ap = A.parser(
        "oss-mlx plan",
        "Will a gpt-oss model fit this machine (or one of --memory GB)? Bytes per component, "
        "KV cache, activations, and what to do if it does not fit.",
    )
    ap.add_argument("model", nargs="?", help="model folder, config.json, hub repo id, or 20b / 120b")
    ap.add_argument("--config", choices=NAMED_CONFIGS, help="plan for gpt-oss-20b / -120b shapes (no file)")
    ap.add_argument(
        "--preset",
        "--quality",
        dest="preset",
        choices=list(_presets()),
        help="quality preset (default: the model's, else reference)",
    )
    ap.add_argument("--context", type=A.CONTEXT, default=DEFAULT_CONTEXT, help="tokens of context")
    ap.add_argument(
        "--memory", type=A.MEMORY_GB, metavar="GB", help="plan for a machine with this many GB of RAM"
    )
    ap.add_argument(
        "--platform", choices=["mac", "linux"], help="with --memory: mac (default; GPU working set) or linux"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.platform and args.memory is None:
        ap.error("--platform applies to --memory GB (this machine's platform is detected)")
    if args.config and args.model:
        ap.error(f"give a model or --config {args.config}, not both")
    raw: dict[str, Any] = {}
    if args.config or args.model in NAMED_CONFIGS:
        config = named_config(args.config or args.model)
    elif args.model:
        from .cli_args import report, user_errors
        from .hub import is_repo_id

        try:
            config, raw = config_of(args.model)
        except user_errors() as e:
            known = args.model.lower().removeprefix("openai/gpt-oss-")
            if not is_repo_id(args.model) or known not in NAMED_CONFIGS:
                return report("oss-mlx plan", e)
            # The hub cannot be asked, but the official models' shapes are known.
            print(
                f"oss-mlx plan: {args.model}'s config.json is not at hand (offline?): planning with "
                f"the shapes of gpt-oss-{known}",
                file=sys.stderr,
            )
            config = named_config(known)
    else:
        ap.error("give a model (folder, config.json, hub id) or --config 20b|120b")
    if args.context > config.max_position_embeddings:
        ap.error(
            f"argument --context: the model's limit is {config.max_position_embeddings:,} tokens "
            f"(got {args.context:,})"
        )
    section = raw.get("oss_mlx") or {}
    preset = args.preset or section.get("preset") or "reference"
    dtype_bytes = {"float32": 4}.get(section.get("dtype", "bfloat16"), 2)
    quant = section.get("quantization") if not args.preset and section else None
    plan = MemoryPlan(config, preset, args.context, quantization=quant, dtype_bytes=dtype_bytes)
    machine = Machine.of_size(args.memory, args.platform or "mac") if args.memory else Machine.detect()
    print_plan(plan, machine)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

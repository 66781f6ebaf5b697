"""`oss-mlx plan` (bytes per component, KV cache, activations, what to do if the model does not fit) and
the fit check every command makes before it loads a model (`refuse_unless_fits`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import safetensors_file as st
from .config import OFFICIAL_SHAPES, ConfigError, ModelConfig, official_config
from .machine import PREFILL_TRANSIENT, GiB, Machine, MiB, prefill_chunk_for
from .memory import COMPONENTS, DEFAULT_CONTEXT, MemoryPlan, TrainingPlan, gib, kv_bytes, presets


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
    if plan.host_head_bytes:
        n = plan.host_head_bytes
        t.add_row("host head", f"{n:,}", f"{n / GiB:.2f}", "float32 copy of the unembedding (CPU decode)")
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


def presets_table(
    config: ModelConfig, context: int, machine: Machine, dtype_bytes: int = 2, host_head: bool | None = None
):
    from rich.table import Table

    t = Table(title=f"presets on {machine.how} ({gib(machine.working_set_bytes)} budget)")
    for col in ("preset", "weights GiB", f"total GiB @ {context:,}", "fits", "max context"):
        t.add_column(col, justify="left" if col in ("preset", "fits") else "right")
    for name in presets():
        p = MemoryPlan(config, name, context, dtype_bytes=dtype_bytes, host_head=host_head)
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
    step = prefill_chunk_for(
        plan.weights_total, kv_bytes(plan.config, DEFAULT_CONTEXT), machine.working_set_bytes
    )
    console.print(
        f"prefill chunk at run time: {step:,} tokens (2,048 where ~{PREFILL_TRANSIENT[2048] / 1e9:.0f} GB of "
        "transient memory fits beside the weights, as measured on MLX-CUDA; else 512)",
        highlight=False,
    )
    if presets:
        console.print(presets_table(plan.config, plan.context, machine, plan.dtype_bytes, plan.host_head))
    for line in plan.advice(machine):
        console.print(f"  - {line}", highlight=False, soft_wrap=True)


# ---- oss-mlx plan ---------------------------------------------------------------------------------

NAMED_CONFIGS = tuple(OFFICIAL_SHAPES)
DEFAULT_RANK = 8  # --rank with --finetune (oss-mlx finetune's default)
named_config = official_config  # the shapes of openai/gpt-oss-20b / -120b (no file needed)


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
        choices=list(presets()),
        help="quality preset (default: the model's, else reference)",
    )
    ap.add_argument("--context", type=A.CONTEXT, default=DEFAULT_CONTEXT, help="tokens of context")
    ap.add_argument(
        "--memory", type=A.MEMORY_GB, metavar="GB", help="plan for a machine with this many GB of RAM"
    )
    ap.add_argument(
        "--platform", choices=["mac", "linux"], help="with --memory: mac (default; GPU working set) or linux"
    )
    ap.add_argument(
        "--finetune",
        action="store_true",
        help="plan LoRA training instead (oss-mlx finetune: attention + experts, batch 1); --context is "
        "the training sequence length",
    )
    ap.add_argument(
        "--rank", type=A.Number(int, 1, 4096), help=f"with --finetune: the LoRA rank (default {DEFAULT_RANK})"
    )
    ap.add_argument(
        "--hosts",
        type=A.non_empty("hosts.json"),
        metavar="FILE",
        help="hosts.json: the split over these machines and the memory on each",
    )
    ap.add_argument(
        "--distributed", choices=("auto", "pipeline", "tensor"), default="auto", help="with --hosts"
    )
    return ap


def option_clash(args: argparse.Namespace) -> str | None:
    """Why these options do not go together (in words), or None: none is silently ignored."""
    if args.platform and args.memory is None:
        return "--platform applies to --memory GB (this machine's platform is detected)"
    if args.config and args.model:
        return f"give a model or --config {args.config}, not both"
    if args.hosts:
        given = [f for f, on in (("--memory", args.memory is not None), ("--finetune", args.finetune)) if on]
        if given:
            return f"--hosts plans with each host's memory from its file; it takes no {', '.join(given)}"
    elif args.distributed != "auto":
        return "--distributed applies to --hosts FILE"
    if args.rank is not None and not args.finetune:
        return "--rank applies to --finetune"
    return None


def training_plans(
    config: ModelConfig, rank: int, length: int, quantization: dict | None = None, dtype_bytes: int = 2
) -> dict[bool, TrainingPlan]:
    """{checkpointing: plan} for oss-mlx finetune's defaults (attention + experts, every layer, batch 1,
    every token scored), as a Mac trains: MLX's Metal backend differentiates the unfused attention."""
    from .lora import LoRAConfig, parameter_count

    sites = LoRAConfig(rank=rank).sites(config.num_layers)
    base = TrainingPlan(
        config, parameter_count(sites, config), length, quantization=quantization, dtype_bytes=dtype_bytes,
        fused_attention=False, cuda=False,
    )  # fmt: skip
    return {ck: base.replace(checkpointing=ck) for ck in (True, False)}


def training_table(config: ModelConfig, rank: int, length: int, machines: list[Machine], title: str = ""):
    """A rich Table: per machine, the step's bytes with and without checkpointing, and the longest
    sequence that fits with it."""
    from rich.table import Table

    plans = training_plans(config, rank, length)
    t = Table(title=title or f"LoRA training (rank {rank}, {length:,} tokens, batch 1): predictions")
    for col in ("machine", "budget", "checkpointing on", "off", "longest sequence (on)"):
        t.add_column(col, justify="left" if col == "machine" else "right")
    for m in machines:
        ws = m.working_set_bytes
        cells = [f"{gib(p.total)} {'fits' if p.fits(ws) else 'no'}" for p in (plans[True], plans[False])]
        longest = plans[True].max_length(ws)
        t.add_row(m.how.split(":")[0], gib(ws), *cells, f"{longest:,}" if longest else "-")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if clash := option_clash(args):
        ap.error(clash)
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
    dtype_bytes = st.ITEMSIZE[st.FLOAT_NAMES.get(section.get("dtype"), "BF16")]
    quant = section.get("quantization") if not args.preset and section else None
    # --memory plans for another machine, whose backend is not this one's (host_head: memory.py)
    host_head = None if args.memory is None else False
    plan = MemoryPlan(
        config, preset, args.context, quantization=quant, dtype_bytes=dtype_bytes, host_head=host_head
    )
    if args.hosts:
        from .distributed.cli import plan_main

        return plan_main(args, config, {**section, "quantization": plan.quantization})
    machine = Machine.of_size(args.memory, args.platform or "mac") if args.memory else Machine.detect()
    if args.finetune:
        from rich.console import Console

        console = Console()
        rank = args.rank or DEFAULT_RANK
        plans = training_plans(config, rank, args.context, quant, dtype_bytes)
        for plan in plans.values():
            console.print(plan.summary(), highlight=False)
        console.print(training_table(config, rank, args.context, [machine]))
        return 0
    print_plan(plan, machine)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

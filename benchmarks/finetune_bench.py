"""LoRA training at real shapes: peak memory and tokens/s of training steps, the planner's prediction
beside them (oss_mlx.memory.TrainingPlan), with gradient checkpointing on and off.

A random gpt-oss of the chosen shapes (MXFP4 experts, bfloat16 elsewhere: oss_mlx.bench.random_model),
LoRA on attention and experts (rank 8, alpha 16: OpenAI's cookbook values) on every layer, rows of
random tokens, every position scored (the planner's worst case). Warmup steps first (compilation,
allocator), then timed steps; the peak is MLX's over the timed steps, weights included (less what the
process held before it built the model: nothing, run as a script).

    python3 benchmarks/finetune_bench.py --config 20b --length 2048 --json finetune-h200.json   # GPU
    python3 benchmarks/finetune_bench.py --config tiny --length 64 --steps 1 --warmup 1         # CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np


def run(config_name: str, length: int, batch: int, rank: int, targets: str, checkpointing: bool,
        steps: int, warmup: int, seed: int = 0, **overrides) -> dict:  # fmt: skip
    """One measurement; `overrides` change the preset's shapes (ModelConfig fields: vocab_size ...)."""
    from dataclasses import replace

    from oss_mlx.bench import preset_config, random_model
    from oss_mlx.finetune.data import Dataset, TrainSequence
    from oss_mlx.finetune.trainer import TrainConfig, Trainer
    from oss_mlx.lora import LoRAConfig, parameter_count
    from oss_mlx.memory import TrainingPlan

    if "num_layers" in overrides:
        overrides.setdefault("layer_types", ())  # the default alternation for the new count
    import gc

    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()  # whatever the process held before (0 when run as a script)
    config = replace(preset_config(config_name), **overrides)
    lora = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    sites = lora.sites(config.num_layers)
    plan = TrainingPlan(
        config, parameter_count(sites, config), length=length, batch=batch, checkpointing=checkpointing
    )
    rng = np.random.default_rng(seed)
    n = length + 1
    rows = [
        TrainSequence(list(map(int, rng.integers(0, config.vocab_size, n))), [True] * n, 0)
        for _ in range(batch * (steps + warmup))
    ]
    data = Dataset(Path("random"), "", rows)
    mx.random.seed(seed)
    model = random_model(config, seed=seed, dtype=mx.bfloat16)
    trainer = Trainer(
        model,
        TrainConfig(lora, steps=steps + warmup, batch_size=batch, checkpointing=checkpointing, seed=seed),
        data,
    )
    mx.eval(model.parameters(), trainer.optimizer.state)
    losses, times = [], []
    for i in range(warmup + steps):
        if i == warmup:
            mx.clear_cache()
            mx.reset_peak_memory()
        result = trainer.train_step()
        losses.append(result.loss)
        if i >= warmup:
            times.append(result.seconds)
    peak = mx.get_peak_memory() - baseline
    step_s = statistics.median(times)
    return {
        "config": config_name,
        "length": length,
        "batch": batch,
        "rank": rank,
        "targets": list(lora.targets),
        "checkpointing": checkpointing,
        "adapter_parameters": plan.adapter_parameters,
        "steps_timed": steps,
        "step_seconds_median": step_s,
        "tokens_per_second": batch * length / step_s,
        "peak_memory_bytes": peak,
        "planned_bytes": plan.total,
        "planned_parts": {
            "weights": plan.weights,
            "adapter_state": plan.adapter_bytes,
            "activations": plan.activation_bytes,
            **plan.activation_parts,
        },
        "planned_over_measured": plan.total / peak,
        "attention_assumed_fused": plan.fused_attention,
        "losses": losses,
    }


def device() -> str:
    try:
        info = mx.device_info()
        return str(info.get("device_name") or info.get("architecture") or mx.default_device())
    except Exception:  # older MLX: no device_info
        return f"{mx.default_device()} ({platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="20b", choices=["tiny", "20b", "120b"])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attention,experts")
    p.add_argument("--checkpointing", default="on,off", help="on, off or on,off (both, one after the other)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--num-layers", type=int, help="override the preset's layer count")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size")
    args = p.parse_args(argv)
    overrides = {k: v for k in ("num_layers", "vocab_size") if (v := getattr(args, k)) is not None}
    rows = []
    for mode in args.checkpointing.split(","):
        row = run(args.config, args.length, args.batch, args.rank, args.targets, mode.strip() == "on",
                  args.steps, args.warmup, **overrides)  # fmt: skip
        row["device"] = device()
        rows.append(row)
        print(
            f"{args.config} length {args.length} batch {args.batch} rank {args.rank} checkpointing {mode}: "
            f"{row['tokens_per_second']:,.0f} tok/s ({row['step_seconds_median']:.3f} s a step), "
            f"peak {row['peak_memory_bytes'] / 1e9:.2f} GB, planned {row['planned_bytes'] / 1e9:.2f} GB "
            f"(x{row['planned_over_measured']:.2f}); losses {', '.join(f'{x:.3f}' for x in row['losses'])}",
            flush=True,
        )
        mx.clear_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

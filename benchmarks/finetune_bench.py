"""LoRA training at real shapes: peak memory and tokens/s of training steps, the planner's prediction
beside them (oss_mlx.memory.TrainingPlan), with gradient checkpointing on and off.

A random gpt-oss of the chosen shapes (MXFP4 experts, bfloat16 elsewhere: oss_mlx.bench.random_model),
LoRA on attention and experts (rank 8, alpha 16: OpenAI's cookbook values) on every layer, rows of
random tokens, every position scored (the planner's worst case). Warmup steps first (compilation,
allocator), then timed steps; the peak is MLX's over the timed steps, weights included (less what the
process held before it built the model: nothing, run as a script).

    python3 benchmarks/finetune_bench.py --config 20b --length 2048 --results $OUT/results.jsonl  # GPU
    python3 benchmarks/finetune_bench.py --config tiny --length 64 --steps 1 --warmup 1             # CPU

--results appends one row per mode (benchmarks/results/DEVICE.jsonl's format: oss_mlx/bench_results.py,
kind "finetune") as soon as it is measured, so a run cut by a time limit keeps the modes it finished.
A mode that fails (e.g. an op without a GPU implementation) is printed and recorded with its error,
and the next mode still runs.
"""

from __future__ import annotations

import argparse
import json
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


def summary(row: dict) -> str:
    losses = ", ".join(f"{x:.3f}" for x in row["losses"])
    return (
        f"{row['tokens_per_second']:,.0f} tok/s ({row['step_seconds_median']:.3f} s a step), "
        f"peak {row['peak_memory_bytes'] / 1e9:.2f} GB, planned {row['planned_bytes'] / 1e9:.2f} GB "
        f"(x{row['planned_over_measured']:.2f}); losses {losses}"
    )


def lora_targets(text: str) -> str:
    """--targets checked when parsed (the names oss-mlx finetune takes), not after the model is built."""
    from oss_mlx.cli_args import BadValue
    from oss_mlx.lora import LoRAError, parse_targets

    try:
        return ",".join(parse_targets(text))
    except LoRAError as e:
        raise BadValue(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from oss_mlx import cli_args as A

    p = A.parser("finetune_bench.py", __doc__)
    p.add_argument("--config", default="20b", choices=["tiny", "20b", "120b"], help="random weights' shapes")
    p.add_argument("--length", type=A.Number(int, 1, 131072), default=2048, help="tokens per sequence")
    p.add_argument("--batch", type=A.Number(int, 1, 4096), default=1, help="sequences per step")
    p.add_argument(
        "--rank", type=A.Number(int, 1, 4096), default=8, help="the adapter's rank (alpha 2 x rank)"
    )
    p.add_argument("--targets", type=lora_targets, default="attention,experts", help="LoRA targets")
    p.add_argument(
        "--checkpointing",
        type=A.ChoiceList(("on", "off")),
        default=["on", "off"],
        help="on, off or on,off (both, one after the other)",
    )
    p.add_argument("--steps", type=A.POSITIVE_INT, default=5, help="timed steps")
    p.add_argument("--warmup", type=A.NON_NEGATIVE_INT, default=2, help="untimed steps first")
    p.add_argument("--seed", type=A.SEED_NON_NEGATIVE, default=0, help="weights and tokens")
    p.add_argument("--json", type=A.output_file, metavar="FILE", help="write the rows here")
    p.add_argument(
        "--results",
        type=A.output_file,
        metavar="FILE",
        help="append a row per mode (benchmarks/results/DEVICE.jsonl)",
    )
    p.add_argument("--num-layers", type=A.Number(int, 1, 1024), help="override the preset's layer count")
    p.add_argument(
        "--vocab-size", type=A.Number(int, 16, 2**20), help="override the preset's vocabulary size"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from oss_mlx.bench import device_name

    args = build_parser().parse_args(argv)
    overrides = {k: v for k in ("num_layers", "vocab_size") if (v := getattr(args, k)) is not None}
    results = None
    if args.results:
        from oss_mlx.bench_results import ResultsFile, provenance

        given = list(sys.argv[1:] if argv is None else argv)
        shared = provenance(given, device_name(), "python3 benchmarks/finetune_bench.py")
        results = ResultsFile(Path(args.results), {**shared, "kind": "finetune"})
    rows, failed = [], 0
    for mode in args.checkpointing:
        label = f"{args.config} length {args.length} batch {args.batch} rank {args.rank} checkpointing {mode}"
        try:
            row = run(args.config, args.length, args.batch, args.rank, args.targets, mode == "on",
                      args.steps, args.warmup, args.seed, **overrides)  # fmt: skip
        except Exception as e:  # measured modes are kept; the failure is a result too
            failed += 1
            row = {"config": args.config, "length": args.length, "batch": args.batch, "rank": args.rank,
                   "checkpointing": mode == "on", "error": f"{type(e).__name__}: {e}"}  # fmt: skip
            print(f"{label}: failed: {row['error']}", flush=True)
        else:
            print(f"{label}: {summary(row)}", flush=True)
        row["device"] = device_name()
        rows.append(row)
        if results is not None:
            results.append(row)
        mx.clear_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

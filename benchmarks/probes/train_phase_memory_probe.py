"""Where a LoRA training step's peak memory is reached, phase by phase (docs/FINETUNE.md, "Memory").

Question: on MLX-CUDA the training planner (oss_mlx.memory.TrainingPlan) under-predicts a 20b step's
peak; which phase holds the extra, and does it grow with the layer count? Every mx.eval the step makes
(finetune/loss.py, finetune/trainer.py) is wrapped: after it, MLX's peak since the previous one and the
active memory, less what the model and optimizer held before the step.

    python3 benchmarks/probes/train_phase_memory_probe.py --layers 2,8 --length 2048          # GPU
    python3 benchmarks/probes/train_phase_memory_probe.py --config tiny --layers 2 --length 64  # CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx  # noqa: E402


class _Recorder:
    """mlx.core as the training modules see it, with eval recording each phase's peak."""

    def __init__(self, base: int):
        self.base, self.phases = base, []

    def __getattr__(self, name):
        return getattr(mx, name)

    def eval(self, *args):
        before = mx.get_active_memory() - self.base
        mx.eval(*args)
        self.phases.append((before, mx.get_peak_memory() - self.base, mx.get_active_memory() - self.base))
        mx.reset_peak_memory()


def probe(config_name: str, layers: int, length: int, checkpointing: bool, vocab: int | None) -> list:
    from dataclasses import replace

    import numpy as np

    from oss_mlx.bench import preset_config, random_model
    from oss_mlx.finetune import loss, trainer
    from oss_mlx.finetune.data import Dataset, TrainSequence
    from oss_mlx.finetune.trainer import TrainConfig, Trainer
    from oss_mlx.lora import LoRAConfig

    over = {"num_layers": layers, "layer_types": ()}
    if vocab:
        over["vocab_size"] = vocab
    config = replace(preset_config(config_name), **over)
    rng = np.random.default_rng(0)
    n = length + 1
    rows = [
        TrainSequence(list(map(int, rng.integers(0, config.vocab_size, n))), [True] * n, 0) for _ in range(2)
    ]
    model = random_model(config, seed=0, dtype=mx.bfloat16)
    t = Trainer(model, TrainConfig(LoRAConfig(rank=8, alpha=16.0), steps=2, checkpointing=checkpointing),
                Dataset(Path("random"), "", rows))  # fmt: skip
    mx.eval(model.parameters(), t.optimizer.state)
    t.train_step()  # compilation, the allocator
    mx.clear_cache()
    rec = _Recorder(mx.get_active_memory())
    mx.reset_peak_memory()
    loss.mx, trainer.mx = rec, rec
    try:
        t.train_step()
    finally:
        loss.mx, trainer.mx = mx, mx
    return rec.phases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="20b")
    p.add_argument("--layers", default="2,8")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--checkpointing", default="on")
    p.add_argument("--vocab-size", type=int)
    a = p.parse_args()
    for n in map(int, a.layers.split(",")):
        for ck in a.checkpointing.split(","):
            phases = probe(a.config, n, a.length, ck == "on", a.vocab_size)
            gb = lambda x: f"{x / 1e9:6.2f}"  # noqa: E731
            print(f"== {a.config} {n} layers, {a.length} tokens, checkpointing {ck}: GB above the model "
                  f"and optimizer (held before the eval / peak during it / held after it)")  # fmt: skip
            for i, (before, peak, after) in enumerate(phases):
                print(f"  eval {i:2d}: {gb(before)} {gb(peak)} {gb(after)}")
            print(f"  step peak {gb(max(p for _, p, _ in phases))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

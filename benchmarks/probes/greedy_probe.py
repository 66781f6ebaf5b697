"""Does the two-stage greedy argmax (generation.greedy_tokens) speed a decode step up, or do its extra
MLX nodes cost more host time than the card saves? (20b shapes, GPU machine; docs/PERFORMANCE.md,
"The first prompt", decode toward the floor.)

Rounds alternate the sampler, ours then MLX's one-row `mx.argmax` (what generation used before), twice;
for each context a warm run of that length, then 64 decoded tokens measured: the whole rate and the
rate after the first step. Rounds of the same sampler differ by the noise alone.

    python benchmarks/probes/greedy_probe.py [--config tiny] [--contexts 128,32768]
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from oss_mlx import generation
from oss_mlx.bench import _prompt, preset_config, random_model, run_oss_mlx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="20b")
    p.add_argument("--contexts", default="128,32768")
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    model = random_model(preset_config(args.config))
    vocab = model.config.vocab_size
    ours = generation.greedy_tokens
    samplers = {"two-stage": ours, "mx.argmax": lambda x: mx.argmax(x, axis=-1).astype(mx.uint32)}
    run_oss_mlx(model, _prompt(300, vocab, 0), 4)
    try:
        for name in ("two-stage", "mx.argmax", "two-stage", "mx.argmax"):
            generation.greedy_tokens = samplers[name]  # SamplingOptions.sampler() hands out this name
            for n in (int(c) for c in args.contexts.split(",")):
                run_oss_mlx(model, _prompt(n, vocab, 1), 4)
                _, decode, _, _, steady = run_oss_mlx(model, _prompt(n, vocab, 1), args.tokens)
                print(
                    f"{name:<10} context {n:>6}: decode {decode:6.1f} tok/s, steady {steady:6.1f}", flush=True
                )
    finally:
        generation.greedy_tokens = ours


if __name__ == "__main__":
    main()

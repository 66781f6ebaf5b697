"""A decode batch's step time at 20b shapes, per number of rows, with the attention's projections in
the fused kernels or in MLX's matmuls (issue 19: what limits 8 and 16 streams).

norm_qkv_rope and out_residual take a batch's rows in blocks of rows_per_block (4 / 3 in bf16), so
their weights are read once per block (the blocks sharing a slice side by side, its later reads from
L2) and each row keeps the bits it gets alone; MLX's matmuls read them once for all rows but add
launches (norm, matmul, RoPE, the row write, the output matmul, the residual). For R rows of
128-token prompts each (own prompts, own caches, joined into one decode batch), STEPS compiled
decode steps are queued back to back (each step's greedy tokens feed the next, nothing read in
between, as the scheduler does) and timed to the last one: ms per step and aggregate tok/s, for each
ATTENTION_KERNEL_MAX_ROWS setting ("kernels": the fused kernels at every R; "matmul": MLX's matmuls
from 2 rows). Each setting traces its own step.

    python benchmarks/probes/batch_step_probe.py --rows 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from oss_mlx.batch_cache import BatchCache
from oss_mlx.decode import DecodeStep
from oss_mlx.generation import greedy_tokens
from oss_mlx.kernels import decode_attention
from oss_mlx.testing.random_model import preset_config, random_model, random_prompt

# "staged-1": one row through the projections' staged path (a block of RB rows, the rest padding)
SETTINGS = {"kernels": 64, "matmul": 1, "staged-1": 64}


def batch_of(model, rows: int, prompt: int) -> tuple[BatchCache, mx.array]:
    batch = BatchCache.for_model(model)
    firsts = []
    for r in range(rows):
        cache = model.make_cache()
        tokens = mx.array(random_prompt(prompt, model.config.vocab_size, 100 + r))[None]
        firsts.append(greedy_tokens(model(tokens, cache=cache, last_logits_only=True)[:, -1, :]))
        batch.join(r, cache)
    token = mx.concatenate(firsts)[:, None]
    mx.eval(token, *batch.buffers)
    return batch, token


def timed_steps(step: DecodeStep, batch: BatchCache, token: mx.array, steps: int) -> float:
    """ms per step over `steps` steps queued back to back, after 3 untimed ones (trace, compile)."""
    for _ in range(3):
        token = greedy_tokens(step(token, batch)[:, -1, :])[:, None]
        mx.eval(token)
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        token = greedy_tokens(step(token, batch)[:, -1, :])[:, None]
        mx.async_eval(token)
    mx.eval(token)
    mx.synchronize()
    return 1000 * (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--config", default="20b")
    a = ap.parse_args()
    model = random_model(preset_config(a.config))
    print(
        f"device {mx.default_device()}, {a.config}, prompts of {a.prompt}, {a.steps} steps timed", flush=True
    )
    saved = decode_attention.ATTENTION_KERNEL_MAX_ROWS
    try:
        for rows in [int(v) for v in a.rows.split(",")]:
            for name, limit in SETTINGS.items():
                if rows == 1 and name == "matmul":
                    continue  # one row takes the kernels either way
                if rows > 1 and name == "staged-1":
                    continue
                decode_attention.ATTENTION_KERNEL_MAX_ROWS = limit
                decode_attention.STAGE_ONE_ROW = name == "staged-1"
                batch, token = batch_of(model, rows, a.prompt)
                ms = timed_steps(DecodeStep(model), batch, token, a.steps)
                print(
                    f"rows {rows:3d}  {name:8s} {ms:8.3f} ms/step  {rows * 1000 / ms:8.1f} tok/s", flush=True
                )
    finally:
        decode_attention.ATTENTION_KERNEL_MAX_ROWS = saved
        decode_attention.STAGE_ONE_ROW = False


if __name__ == "__main__":
    main()

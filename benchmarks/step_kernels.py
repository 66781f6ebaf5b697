"""Every kernel of a real decode step, timed on the card (GPU machine, under Nsight Compute):

    ncu --profile-from-start off --cache-control none --clock-control none \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread \
        --csv python3 benchmarks/step_kernels.py --depth 32768 --steps 2 > step.csv
    python3 benchmarks/step_kernels.py --summarize step.csv --steps 2

The model (20b shapes, random weights) is prefilled to `--depth` tokens and the compiled decode step
warmed up outside the profiled range; only `--steps` decode steps run between cuProfilerStart and
cuProfilerStop, so the table holds exactly their kernels: ours (custom_kernel_oss_*) and MLX's own
(the cache row scatters, the unembedding, the sampler's argmax). Caches stay warm as in the real
step (`--cache-control none`): the weights (~1 GB a step) never fit the L2 anyway. The sum is the
step's GPU time; the bench's wall time per token minus it is host time the card waited for.
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import io
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _profiler(start: bool) -> None:
    """cuProfilerStart / Stop through the driver (the context MLX made current on this thread)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver: nothing to profile (the script still runs, e.g. on CPU)
        return
    rc = (lib.cuProfilerStart if start else lib.cuProfilerStop)()
    if rc != 0:
        print(f"cuProfiler{'Start' if start else 'Stop'} returned {rc}", file=sys.stderr)


def run(depth: int, steps: int, layers: int, preset: str, sampler: str = "ours", rows: int = 1) -> None:
    import dataclasses

    import mlx.core as mx

    from oss_mlx.batch_cache import BatchCache
    from oss_mlx.bench import _prompt, preset_config, random_model
    from oss_mlx.generation import greedy_tokens
    from oss_mlx.runtime import runtime_of

    # the greedy sampler generation uses (a two-stage argmax), or MLX's one-row argmax (before it)
    argmax = greedy_tokens if sampler == "ours" else lambda x: mx.argmax(x, axis=-1)

    full = preset_config(preset)
    config = dataclasses.replace(full, num_layers=layers, layer_types=full.layer_types[:layers])
    model = random_model(config)
    step = runtime_of(model).decode
    batch = BatchCache.for_model(model)
    firsts = []
    for r in range(rows):  # each row its own prompt (so the rows route to different experts), own cache
        cache = model.make_cache()
        prompt = mx.array(_prompt(depth, config.vocab_size, r))[None]
        firsts.append(argmax(model(prompt, cache=cache, last_logits_only=True)[:, -1, :]))
        batch.join(r, cache)
    token = mx.concatenate(firsts)[:, None]
    for _ in range(3):  # trace, JIT-compile every kernel, settle the buffers
        token = argmax(step(token, batch)[:, -1, :])[:, None]
        mx.eval(token)
    mx.synchronize()
    _profiler(True)
    for _ in range(steps):
        token = argmax(step(token, batch)[:, -1, :])[:, None]
        mx.eval(token)
    mx.synchronize()
    _profiler(False)
    print(
        f"depth {depth}, {rows} rows: {steps} steps profiled, cache offset {batch.lengths[0]}",
        file=sys.stderr,
    )


def family(name: str) -> str:
    """A kernel's name without template arguments: custom_kernel_oss_sdpa_decode_bf16.. -> sdpa_decode."""
    name = name.split("(")[0].split("<")[0]
    m = re.match(r"custom_kernel_oss_([a-z_]+?)(?:_(?:bfloat16|float|half)|$)", name)
    if m:
        return m.group(1)
    return name.replace("void ", "")[:60]


def summarize(path: str, steps: int) -> None:
    """µs per step by kernel family, launches per step, GB/s read, registers; then the step's total."""
    text = Path(path).read_text()
    rows = csv.DictReader(io.StringIO(text[text.index('"ID"') :]))
    per: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    seen: dict[str, set] = collections.defaultdict(set)
    for r in rows:
        fam = family(r["Kernel Name"])
        value = float(r["Metric Value"].replace(",", "") or 0)
        metric = r["Metric Name"]
        per[fam][metric] += value
        if metric == "gpu__time_duration.sum":
            seen[fam].add(r["ID"])
        if metric == "launch__registers_per_thread":
            per[fam]["regs_max"] = max(per[fam]["regs_max"], value)
    total = sum(v["gpu__time_duration.sum"] for v in per.values()) / 1000 / steps
    print(f"{'kernel':<44} {'µs/step':>9} {'launches':>8} {'µs each':>8} {'GB/s':>7} {'regs':>5}")
    order = sorted(per.items(), key=lambda kv: -kv[1]["gpu__time_duration.sum"])
    for fam, v in order:
        us = v["gpu__time_duration.sum"] / 1000 / steps
        n = len(seen[fam]) / steps
        gbs = v["dram__bytes_read.sum"] / max(v["gpu__time_duration.sum"], 1e-9)  # bytes/ns = GB/s
        print(f"{fam:<44} {us:9.1f} {n:8.1f} {us / max(n, 1e-9):8.2f} {gbs:7.0f} {v['regs_max']:5.0f}")
    print(f"{'total GPU time per step':<44} {total:9.1f} µs  ({1e6 / total:.0f} tok/s if never idle)")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--config", default="20b", help="20b | 120b | tiny")
    p.add_argument(
        "--sampler", choices=("ours", "mlx"), default="ours", help="greedy argmax: ours or mx.argmax"
    )
    p.add_argument("--rows", type=int, default=1, help="sequences decoded together (a batch of streams)")
    p.add_argument("--summarize", metavar="CSV")
    a = p.parse_args()
    if a.summarize:
        summarize(a.summarize, a.steps)
    else:
        run(a.depth, a.steps, a.layers, a.config, a.sampler, a.rows)

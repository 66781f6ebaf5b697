"""Distributed speed on GPUs (NCCL) or any backend: prefill and decode tok/s, peak memory per rank,
greedy tokens, against one process with the same random weights. Random gpt-oss weights are made
in memory (oss_mlx.testing.random_model's values, in its order): each rank draws every tensor and
keeps its part, so no checkpoint is written (a 120b would be 65 GB).

    # one GPU, the reference (same lease)
    python3 benchmarks/distributed_bench.py --config 20b --distributed single --json single.json
    # two GPUs, NCCL (NVLink multicast off)
    mlx.launch --backend nccl -n 2 --env NCCL_NVLS_ENABLE=0 -- \\
        python3 benchmarks/distributed_bench.py --config 20b --distributed pipeline --json pipeline.json
    python3 benchmarks/distributed_bench.py --compare single.json pipeline.json

Rows: prefill tok/s of a prompt of each length (time to the first token) and decode tok/s after it
(oss_mlx.bench.run_oss_mlx, as `oss-mlx bench` measures). Peak memory: MLX's peak per rank after
the load, rank 0's since the last (longest) prompt (the workers report theirs with each heartbeat).
Greedy: GREEDY_TOKENS tokens after a 256-token prompt, with each step's top-2 logit gap, so
`--compare` can tell a real difference from a near-tie that bf16 rounding may flip. `--results`
appends every measurement as rows (benchmarks/results/); distributed_device.sh runs the whole set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

GREEDY_PROMPT, GREEDY_TOKENS = 256, 32


class RandomSource:
    """A distributed.runtime model source: random weights, each rank keeping its part."""

    def __init__(self, config, seed: int) -> None:
        self.config, self.seed = config, seed
        self.quantization, self.dtype_bytes = None, 2

    def open(self) -> None:
        pass

    def identity(self) -> tuple[str, str]:
        from oss_mlx.distributed.runtime import digest

        return digest({"config": self.config.to_hf_dict(), "seed": self.seed}), f"random, seed {self.seed}"

    def build(self, plan, group):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from oss_mlx.distributed.pipeline import PipelineStage
        from oss_mlx.distributed.tensor_parallel import TensorParallelRank, apply_cut, cut
        from oss_mlx.loader import prepare_for_backend
        from oss_mlx.model import Transformer
        from oss_mlx.testing.random_model import random_parameter, random_parts

        share = plan.shares[group.rank]
        if plan.mode == "pipeline":
            model = PipelineStage(self.config, share, group, mx.bfloat16)
        else:
            model = TensorParallelRank(self.config, share, group)
        held = {model.canonical_name(k): k for k, _ in tree_flatten(model.parameters())}
        mx.random.seed(self.seed)  # then as random_model: the model's construction draws too
        whole = Transformer(self.config)  # shapes only: its own values are never evaluated
        weights = []
        for module, prefix in random_parts(whole):
            for n, p in tree_flatten(module.parameters()):
                name = prefix + n
                value = random_parameter(name, p)  # drawn even when not held: the sequence must match
                if name in held:
                    if plan.mode == "tensor":
                        value = apply_cut(value, cut(name, p.shape, self.config, share, group.rank))
                    mx.eval(value)
                    weights.append((held[name], value))
        model.load_weights(weights, strict=True)
        model.eval()
        prepare_for_backend(model)  # as the loader does
        # Each rank's peak from here on: the requests' (rank 0 resets it per request too), not the
        # transient whole tensors drawn above.
        mx.reset_peak_memory()
        return model


def greedy(model, config, seed: int) -> dict:
    import mlx.core as mx

    from oss_mlx.generation import decode_step, prefill
    from oss_mlx.testing.random_model import random_prompt

    cache = model.make_cache()
    logits = prefill(model, random_prompt(GREEDY_PROMPT, config.vocab_size, seed), cache)
    step = decode_step(model)
    tokens, gaps, scales = [], [], []
    for _ in range(GREEDY_TOKENS):
        row = logits.astype(mx.float32).reshape(-1)
        top = mx.topk(row, 2)
        token = mx.argmax(row)
        mx.eval(top, token)
        tokens.append(int(token.item()))
        gaps.append(float(abs(top[1] - top[0]).item()))
        scales.append(float(mx.abs(row).max().item()))
        logits = step(token.reshape(1, 1), cache)[:, -1, :]
    return {"tokens": tokens, "gaps": gaps, "scales": scales}


def compare(paths: list[str], noise: float) -> int:
    ref, *others = [json.loads(Path(p).read_text()) for p in paths]
    for path, other in zip(paths[1:], others):
        a, b = ref["greedy"], other["greedy"]
        same = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
        # a step is comparable while every gap so far is above bf16 noise (noise x the logits' scale)
        clear = next(
            (i for i, (g, s) in enumerate(zip(a["gaps"], a["scales"])) if g < noise * s), len(a["gaps"])
        )
        verdict = "identical" if same >= clear else f"DIFFER at step {same}"
        print(
            f"{path}: greedy tokens equal for {same} of {len(a['tokens'])} steps; top-2 gaps above "
            f"{noise:.0%} of the logits' scale for the first {clear}: {verdict}"
        )
        for r_row, o_row in zip(ref["rows"], other["rows"]):
            print(
                f"  {r_row['phase']:7} {r_row['context']:6}: {r_row['tokens_per_s']:9.1f} tok/s one process, "
                f"{o_row['tokens_per_s']:9.1f} {other['mode']} "
                f"({o_row['tokens_per_s'] / r_row['tokens_per_s']:.2f}x)"
            )
        for m in other["memory"]:
            print(
                f"  rank {m['rank']}: peak {m['peak_memory'] / 1e9:.2f} GB (one process: "
                f"{ref['memory'][0]['peak_memory'] / 1e9:.2f} GB)"
            )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="20b", help="20b, 120b or tiny")
    ap.add_argument("--distributed", choices=("single", "pipeline", "tensor"), default="single")
    ap.add_argument("--prompt-lengths", default="128,2048,32768")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-layers", type=int, help="override the preset's (a CPU check of this script)")
    ap.add_argument("--json", help="write the results here (rank 0)")
    ap.add_argument("--results", help="append a JSON row per measurement here (rank 0; benchmarks/results/)")
    ap.add_argument("--compare", nargs="+", metavar="JSON", help="the one-process results first, then others")
    ap.add_argument(
        "--noise", type=float, default=0.01, help="--compare: top-2 gaps below this x scale are ties"
    )
    args = ap.parse_args()
    if args.compare:
        return compare(args.compare, args.noise)

    import mlx.core as mx

    from oss_mlx import kernels
    from oss_mlx.bench import run_oss_mlx
    from oss_mlx.testing.random_model import preset_config, random_model, random_prompt

    config = preset_config(args.config)
    if args.num_layers:
        config = replace(config, num_layers=args.num_layers, layer_types=())
    start = time.perf_counter()
    if args.distributed == "single":
        model, runtime = random_model(config, args.seed), None
    else:
        from oss_mlx.distributed.runtime import Options
        from oss_mlx.distributed.runtime import start as start_group

        runtime = start_group(RandomSource(config, args.seed), Options(mode=args.distributed))
        model = runtime.model  # the other ranks compute inside start_group until rank 0 is done
    loaded = time.perf_counter() - start
    rows = []
    for n in [int(x) for x in args.prompt_lengths.split(",")]:
        prefill, decode, peak, first, steady = run_oss_mlx(
            model, random_prompt(n, config.vocab_size, args.seed), args.decode_tokens
        )
        rows.append({"phase": "prefill", "context": n, "tokens_per_s": prefill, "peak_gb": peak})
        rows.append(
            {
                "phase": "decode",
                "context": n,
                "tokens_per_s": decode,
                "peak_gb": peak,
                "first_step_ms": first,
                "steady_tokens_per_s": steady,
            }
        )
        print(
            f"{args.distributed}: {n:6} tokens: prefill {prefill:9.1f} tok/s, decode {decode:7.1f} tok/s, "
            f"rank 0 peak {peak:.2f} GB",
            flush=True,
        )
    out = {
        "mode": args.distributed,
        "config": args.config,
        "device": kernels.available_backend(),
        "mlx": mx.__version__,
        "load_seconds": loaded,
        "rows": rows,
        "greedy": greedy(model, config, args.seed),
        "plan": runtime.plan.as_dict() if runtime else None,
        "backend": runtime.group.backend if runtime else None,
        "memory": runtime.memory() if runtime else [{"rank": 0, "peak_memory": mx.get_peak_memory()}],
    }
    if runtime is not None:
        time.sleep(1.0)  # one more heartbeat: the workers' peaks after the last step
        out["memory"] = runtime.memory()
    for m in out["memory"]:
        print(f"rank {m['rank']}: peak {m['peak_memory'] / 1e9:.2f} GB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.results:
        append_results(args.results, out)
    return 0


def append_results(path: str, out: dict) -> None:
    """The run as results rows (oss_mlx.bench_results): speed rows, each rank's peak, the greedy tokens."""
    from oss_mlx.bench import device_name
    from oss_mlx.bench_results import ResultsFile, provenance

    shared = provenance(sys.argv[1:], device_name(), "python3 benchmarks/distributed_bench.py")
    about = {"kind": "distributed_bench", "mode": out["mode"], "config": out["config"]}
    about.update(backend=out["backend"], world=len(out["memory"]))
    results = ResultsFile(path, {**shared, **about})
    for row in out["rows"]:
        results.append(row)
    for m in out["memory"]:
        results.append({"phase": "memory", **m})
    results.append({"phase": "greedy", "tokens": out["greedy"]["tokens"], "gaps": out["greedy"]["gaps"]})


if __name__ == "__main__":
    sys.exit(main())

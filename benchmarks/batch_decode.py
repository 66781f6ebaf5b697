"""Continuous batching on the GPU: gpt-oss-20b shapes, random weights, one command, JSON out.

    python benchmarks/batch_decode.py --results benchmarks/results/h100.jsonl   # ~4 min on an H100
    (docs/PERFORMANCE.md "Concurrency" has its last numbers)

1. Aggregate decode at 1, 4, 8, 16 streams (oss-mlx's scheduler), beside the bytes-per-step
   prediction: a step reads the attention, norms, routers and unembedding once, each distinct expert
   once (with uniform routing B tokens choose E (1 - (1 - k/E)^B) distinct experts per layer) and
   each row's keys and values; predicted(B) = measured(1) * B * bytes(1) / bytes(B) (2.2x / 3.3x /
   5.2x one stream for the 20b at 4 / 8 / 16). Target: measured >= 80% of predicted.
2. mlx-lm's BatchGenerator at the same concurrencies, same weights, same run.
3. Time to first token of a request arriving while 7 streams decode, against the same request
   alone (target <= 2x).
4. The decode MoE's per-slot kernels, matrix-unit kernels and the prefill's grouped GEMM against
   each other at 4, 8 and 16 streams (kernels/decode_moe.py MOE_MMA_FROM, MOE_GEMM_FROM).
5. Greedy equality in bf16: the first 32 tokens of each prompt decoded in a batch of 4, 8 and 16
   against the same prompt alone. Prompts are chosen by their logits alone (the lone run's, before any batch):
   at each of the 32 steps the gap between the top two logits is measured, and a prompt is kept
   when every gap exceeds GAP_ULPS bf16 ulps of its top logit (bf16 noise in the sums can flip
   anything closer); the kept ones must be equal over all 32 tokens. Every prompt is also compared
   up to its first step within noise (its tokens before it must be equal); all are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from oss_mlx import bench, bench_concurrency, kernels  # noqa: E402
from oss_mlx.batch_cache import BatchCache  # noqa: E402
from oss_mlx.kernels import decode_attention, decode_moe  # noqa: E402
from oss_mlx.memory import expert_bytes, kv_bytes, weight_bytes  # noqa: E402
from oss_mlx.runtime import runtime_of  # noqa: E402

GAP_ULPS = 4  # a top-2 gap above this many bf16 ulps of the top logit is beyond bf16 noise
STREAMS = (1, 4, 8, 16)


def bytes_per_step(config, rows: int, context: int) -> float:
    """What one decode step of `rows` sequences at `context` reads (uniform routing)."""
    w = weight_bytes(config)
    E, k, L = config.num_experts, config.experts_per_token, config.num_layers
    distinct = E * (1 - (1 - k / E) ** rows)
    dense = w["attention"] + w["unembedding"] + w["other"]
    return dense + L * distinct * expert_bytes(config) + rows * kv_bytes(config, context)


def gaps_and_tokens(model, prompt: list[int], steps: int) -> tuple[list[int], list[float], list[float]]:
    """A prompt alone, the way the scheduler runs it (prefill but the last token, the last token,
    then the batch's decode step), with each step's logits: (tokens, top-2 gaps, top logits)."""
    runtime = runtime_of(model)
    step, chunk = runtime.decode, runtime.prefill_chunk
    assert len(prompt) <= chunk, "one chunk and the last token, as the scheduler cuts a short prompt"
    cache = model.make_cache()
    model(mx.array([prompt[:-1]]), cache=cache, block_step=chunk)  # block_step: the same attention shapes
    logits = model(mx.array([prompt[-1:]]), cache=cache, last_logits_only=True, block_step=chunk)[:, -1, :]
    batch = BatchCache.for_model(model)
    tokens, gaps, tops = [], [], []
    for i in range(steps):
        row = logits[0].astype(mx.float32)
        top2 = mx.topk(row, 2)
        a, b = sorted(top2.tolist(), reverse=True)
        tokens.append(int(mx.argmax(row).item()))
        gaps.append(a - b)
        tops.append(a)
        if i == 0:
            batch.join(0, cache)
        if i + 1 < steps:
            logits = step(mx.array([[tokens[-1]]], dtype=mx.uint32), batch)[:, -1, :]
    batch.leave(0)
    return tokens, gaps, tops


def batched_tokens(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    from oss_mlx.generation import SamplingOptions
    from oss_mlx.scheduler import Sequence

    scheduler = bench_concurrency._scheduler(model, len(prompts))
    seqs = [Sequence(model.make_cache(), p, SamplingOptions(0.0, max_tokens=steps), ()) for p in prompts]
    for s in seqs:
        scheduler.submit(s)
    while not all(s.done for s in seqs):
        scheduler.step()
    return [s.report.tokens for s in seqs]


def equality(alone, together, steps: int, gap_ulps: float) -> dict:
    """Each prompt's batched tokens against its lone run's, and whether its lone top-2 gaps kept
    clear of `gap_ulps` bf16 ulps of the top logit at every step (then its tokens must be equal)."""
    records = []
    for (tokens, gaps, tops), got in zip(alone, together):
        ulp = [2.0 ** (math.floor(math.log2(max(abs(t), 1e-30))) - 7) for t in tops]  # bf16: 7 bits
        gaps_in_ulps = [g / u for g, u in zip(gaps, ulp)]
        # the steps before the first one whose top two are within noise: comparable tokens
        clear = next((i for i, g in enumerate(gaps_in_ulps) if g <= gap_ulps), steps)
        differ = [i for i, (a, b) in enumerate(zip(tokens, got)) if a != b]
        records.append(
            {
                "kept": clear == steps,
                "min_gap_ulps": min(gaps_in_ulps),
                "clear_steps": clear,
                "equal": tokens == got,
                "equal_while_clear": tokens[:clear] == got[:clear],
                "first_difference": differ[0] if differ else None,
            }
        )
    kept = [r for r in records if r["kept"]]
    return {
        "steps": steps,
        "gap_ulps": gap_ulps,
        "prompts": len(records),
        "kept": len(kept),
        "kept_equal": sum(r["equal"] for r in kept),
        "all_equal": sum(r["equal"] for r in records),
        "equal_while_clear": sum(r["equal_while_clear"] for r in records),
        "clear_steps_total": sum(r["clear_steps"] for r in records),
        "records": records,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="20b", choices=("tiny", "20b", "120b"))
    ap.add_argument("--prompt", type=int, default=128, help="each stream's prompt length")
    ap.add_argument("--decode", type=int, default=96, help="tokens decoded per stream")
    ap.add_argument("--equality-prompts", type=int, default=64, help="candidates for the bf16 equality")
    ap.add_argument("--streams", default="1,4,8,16", help="the concurrencies (1 and 8 always run)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--results", help="append a JSON row per measurement here (benchmarks/results/)")
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--mma-from", type=int, help="decode_moe.MOE_MMA_FROM for this run (0: off)")
    ap.add_argument("--equality-sizes", default="4,8,16", help="the batch sizes of the bf16 equality")
    ap.add_argument("--skip-moe-ways", action="store_true", help="leave out part 4 (~1.5 min on an H100)")
    args = ap.parse_args()
    if args.mma_from is not None and args.mma_from < 0:
        ap.error(f"--mma-from {args.mma_from}: a row count (0: the matrix-unit MoE off)")
    sizes = args.equality_sizes.split(",")
    if not all(n.strip().isdigit() and int(n) >= 1 for n in sizes):
        ap.error(f"--equality-sizes {args.equality_sizes!r}: batch sizes >= 1, comma-separated (e.g. 4,8,16)")
    if args.mma_from is not None:  # the decode MoE's matrix-unit kernels from this many rows
        decode_moe.MOE_MMA_FROM = args.mma_from or None
    global STREAMS
    STREAMS = tuple(sorted({1, 8, *(int(n) for n in args.streams.split(","))}))
    out: dict = {"config": args.config, "prompt": args.prompt, "decode": args.decode, "mlx": mx.__version__}
    results = None
    if args.results:
        from oss_mlx.bench_results import ResultsFile, provenance

        shared = provenance(sys.argv[1:], bench.device_name(), "python3 benchmarks/batch_decode.py")
        shared |= {"kind": "batch_decode", "config": args.config}
        shared |= {"prompt": args.prompt, "decode": args.decode}
        results = ResultsFile(args.results, shared)

    def save(part: str | None = None, *rows: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        if results is not None:
            for row in rows:
                results.append({"part": part, **row})

    t = time.perf_counter()
    model = bench.random_model(bench.preset_config(args.config))
    config = model.config
    out["device"], out["kernels"] = bench.device_name(), kernels.backend()
    print(
        f"built {args.config} in {time.perf_counter() - t:.1f} s on {out['device']}, kernels {out['kernels']}"
    )
    vocab = config.vocab_size
    prompts = [bench._prompt(args.prompt, vocab, 1000 * i) for i in range(max(STREAMS))]
    probe = bench._prompt(args.prompt, vocab, 999_999)

    # 1 + 3: oss-mlx at each concurrency, the prediction beside it
    rows = []
    for n in STREAMS:
        c = bench_concurrency.oss_mlx_concurrent(model, n, prompts, probe, args.decode)
        rows.append(c.__dict__)
        ttft = "-" if c.ttft_ms is None else f"{c.ttft_ms:.1f}"
        print(
            f"oss-mlx {n:>2} streams: {c.aggregate_tokens_per_s:8.1f} tok/s, TTFT {ttft} ms "
            f"(alone {c.ttft_alone_ms:.1f})",
            flush=True,
        )
    context = args.prompt + args.decode // 2
    one = rows[0]["aggregate_tokens_per_s"]
    for r in rows:
        n = r["streams"]
        speedup = n * bytes_per_step(config, 1, context) / bytes_per_step(config, n, context)
        r["predicted_tokens_per_s"] = one * speedup
        r["predicted_speedup"] = speedup
        r["measured_over_predicted"] = r["aggregate_tokens_per_s"] / r["predicted_tokens_per_s"]
        r["bytes_per_step_gb"] = bytes_per_step(config, n, context) / 1e9
    out["oss_mlx"] = rows
    eight = next(r for r in rows if r["streams"] == 8)
    out["ttft_beside_7_over_alone"] = eight["ttft_ms"] / eight["ttft_alone_ms"]
    save("oss_mlx_concurrent", *rows)
    for r in rows:
        measured, predicted = r["aggregate_tokens_per_s"], r["predicted_tokens_per_s"]
        print(
            f"  {r['streams']:>2} streams: measured {measured:8.1f}, predicted {predicted:8.1f} "
            f"({r['predicted_speedup']:.2f}x one stream, {r['bytes_per_step_gb']:.2f} GB a step): "
            f"{100 * r['measured_over_predicted']:.0f}%"
        )
    print(f"TTFT beside 7 streams / alone: {out['ttft_beside_7_over_alone']:.2f}x", flush=True)

    # 4: the decode MoE's ways against each other: per-slot kernels, the matrix-unit kernels, the
    # grouped GEMM (the grouped kernels, slower than the per-slot ones on the H100, are left out)
    grouped = {}
    saved = decode_moe.MOE_GROUPED_FROM, decode_moe.MOE_GEMM_FROM, decode_moe.MOE_MMA_FROM
    for n in () if args.skip_moe_ways else (4, 8, 16):
        for label, gemm_from, mma_from in (
            ("per_slot", None, None),
            ("mma", None, 1),
            ("gemm", 1, None),
        ):
            decode_moe.MOE_GROUPED_FROM = None
            decode_moe.MOE_GEMM_FROM, decode_moe.MOE_MMA_FROM = gemm_from, mma_from
            runtime_of(model)._decode = None  # new traces: the kernel choice is baked into them
            bench_concurrency.oss_mlx_decode(model, prompts[:n], 4, rate=False)
            grouped[f"{label}_{n}"] = bench_concurrency.oss_mlx_decode(model, prompts[:n], args.decode)
            print(f"moe {label:>8} at {n} streams: {grouped[f'{label}_{n}']:.1f} tok/s", flush=True)
    decode_moe.MOE_GROUPED_FROM, decode_moe.MOE_GEMM_FROM, decode_moe.MOE_MMA_FROM = saved
    runtime_of(model)._decode = None
    if grouped:
        out["moe_grouped_vs_per_slot"] = grouped
        save("moe_grouped_vs_per_slot", grouped)

    # 5: greedy equality, batched vs alone, for prompts beyond bf16 noise. Up to
    # ATTENTION_KERNEL_MAX_ROWS rows each row's attention and experts are its lone bits (the fused
    # projections in blocks of rows, the matrix-unit MoE); only the unembedding's matmul may round a
    # logit otherwise, by at most one bf16 ulp, so a top-2 gap of more than 2 ulps cannot flip. Past it
    # MLX's matmuls round the projections otherwise, which can flip a random model's routing: wider.
    steps = 32
    eq_prompts = [bench._prompt(args.prompt // 2, vocab, 555 + i) for i in range(args.equality_prompts)]
    alone = [gaps_and_tokens(model, p, steps) for p in eq_prompts]
    out["equality"] = {}
    for size in (int(n) for n in sizes):
        together = []
        for i in range(0, len(eq_prompts), size):
            together += batched_tokens(model, eq_prompts[i : i + size], steps)
        lone_bits = size <= decode_attention.ATTENTION_KERNEL_MAX_ROWS
        eq = equality(alone, together, steps, 2 if lone_bits else GAP_ULPS)
        out["equality"][f"batch_{size}"] = eq
        print(
            f"greedy equality, batch of {size} vs alone: {eq['kept_equal']} of {eq['kept']} kept prompts "
            f"(every gap > {eq['gap_ulps']} bf16 ulps) equal over {steps} tokens; "
            f"{eq['equal_while_clear']} of {eq['prompts']} equal up to their first step within noise "
            f"({eq['clear_steps_total']} comparable steps in all); "
            f"all {steps} tokens equal for {eq['all_equal']} of {eq['prompts']}",
            flush=True,
        )
        save(f"equality_batch_{size}", {k: v for k, v in eq.items() if k != "records"})

    # 2: mlx-lm's BatchGenerator, same weights
    if not args.skip_mlx_lm:
        lm = bench.mlx_lm_model(model)
        del model
        mx.clear_cache()
        lm_rows = []
        for n in STREAMS:
            c = bench_concurrency.mlx_lm_concurrent(lm, n, prompts, probe, args.decode)
            lm_rows.append(c.__dict__)
            ours = next(r for r in rows if r["streams"] == n)["aggregate_tokens_per_s"]
            ttft = "-" if c.ttft_ms is None else f"{c.ttft_ms:.1f}"
            print(
                f"mlx-lm  {n:>2} streams: {c.aggregate_tokens_per_s:8.1f} tok/s "
                f"(oss-mlx {ours / c.aggregate_tokens_per_s:.2f}x), TTFT {ttft} ms",
                flush=True,
            )
        out["mlx_lm"] = lm_rows
        save("mlx_lm_concurrent", *lm_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

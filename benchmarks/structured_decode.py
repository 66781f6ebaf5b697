"""Decode speed with a JSON schema enforced vs free, same run, and the host time of each token mask.

    python3 benchmarks/structured_decode.py --config 20b --decode-tokens 256 --repeat 3 --json out.json
    python3 benchmarks/structured_decode.py --config tiny --json-schema schema.json
    python3 benchmarks/structured_decode.py --config 20b --results benchmarks/results/h200.jsonl

Random weights (gpt-oss shapes, as `oss-mlx bench`) or `--model DIR`, batch 1, greedy. Each repeat runs
the same harmony prompt twice through generation.generate_tokens, free and constrained (the order
alternates between repeats), each with a fresh cache; both stop at <|return|> or the token limit.
Random weights are the worst case for the constraint: the model never closes its reasoning or its
strings, so the reasoning budget ends the analysis and the answer is closed to fit the limit, and
both the free-text and the JSON masks are measured. Reports decode tok/s of each and their ratio,
and per-mask host milliseconds (mean, median, p90, max; the first includes building the matcher,
which overlaps the prompt). The mask of token n+1 is computed while the GPU runs step n+1, so
decode keeps its speed as long as a mask takes less than a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from oss_mlx.bench import device_name, preset_config, random_model  # noqa: E402
from oss_mlx.constrained import TurnConstraint  # noqa: E402
from oss_mlx.generation import SamplingOptions, TokenStream, generate_tokens  # noqa: E402
from oss_mlx.harmony import render_conversation  # noqa: E402
from oss_mlx.structured import OutputConstraint, check  # noqa: E402
from oss_mlx.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "details": {
            "type": "object",
            "properties": {"summary": {"type": "string"}, "when": {"type": "string", "format": "date"}},
            "required": ["summary", "when"],
            "additionalProperties": False,
        },
    },
    "required": ["title", "year", "tags", "rating", "details"],
    "additionalProperties": False,
}


class TimedConstraint(TurnConstraint):
    """Records the host time of every mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.times: list[float] = []

    def begin(self, remaining: int) -> mx.array:
        t = time.perf_counter()
        out = super().begin(remaining)
        self.times.append(time.perf_counter() - t)
        return out

    def advance(self, token: int, remaining: int) -> mx.array:
        t = time.perf_counter()
        out = super().advance(token, remaining)
        self.times.append(time.perf_counter() - t)
        return out


def run(model, tokenizer, prompt: list[int], tokens: int, checked=None) -> dict:
    options = SamplingOptions(temperature=0.0, max_tokens=tokens)
    constraint = None if checked is None else TimedConstraint(checked, tokenizer, tokens)
    report = TokenStream()
    cache = model.make_cache()
    for _ in generate_tokens(
        model, prompt, cache, options, set(tokenizer.stop_ids), report, constraint=constraint
    ):
        pass
    s = report.stats
    row = {
        "constrained": checked is not None,
        "generated": s.generated_tokens,
        "decode_tps": (s.generated_tokens - 1) / s.generation_seconds if s.generation_seconds > 0 else 0.0,
        "finish": s.finish_reason,
    }
    if constraint is not None:
        ms = [1e3 * t for t in constraint.times]
        steady = ms[1:] or ms
        row |= {
            "closed_to_fit": s.closed_to_fit,
            "masks": len(ms),
            "first_mask_ms": ms[0],
            "mask_ms_mean": statistics.fmean(steady),
            "mask_ms_median": statistics.median(steady),
            "mask_ms_p90": sorted(steady)[int(0.9 * (len(steady) - 1))],
            "mask_ms_max": max(steady),
            "closing_searches": constraint.searches,
            "text": tokenizer.decode(report.tokens)[-300:],
        }
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", choices=("tiny", "20b", "120b"), default="20b", help="random weights")
    src.add_argument("--model", help="a checkpoint folder instead of random weights")
    p.add_argument(
        "--json-schema", help="a JSON schema file (default: a nested object with a date and enums)"
    )
    p.add_argument("--decode-tokens", type=int, default=256, help="max tokens per reply (default 256)")
    p.add_argument("--reasoning-budget", type=int, help="analysis tokens at most (default: half the tokens)")
    p.add_argument("--repeat", type=int, default=3, help="free + constrained pairs (default 3)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--results", help="append a JSON row per run and the summary here (benchmarks/results/)")
    args = p.parse_args(argv)
    results = None
    if args.results:
        from oss_mlx.bench_results import ResultsFile, provenance

        shared = {
            **provenance(
                list(sys.argv[1:] if argv is None else argv),
                device_name(),
                "python3 benchmarks/structured_decode.py",
            ),
            "kind": "structured_decode",
        }
        results = ResultsFile(args.results, shared)

    schema = json.loads(Path(args.json_schema).read_text()) if args.json_schema else DEFAULT_SCHEMA
    tokenizer = load_tokenizer(args.model)
    if args.model:
        import oss_mlx

        model, tokenizer = oss_mlx.load(args.model)
    else:
        model = random_model(preset_config(args.config))
    budget = args.reasoning_budget if args.reasoning_budget is not None else args.decode_tokens // 2
    checked = check(OutputConstraint(json_schema=schema, reasoning_budget=budget))
    tokenizer.grammar_tokenizer()  # built once per process (~1 s), not inside a measurement
    prompt = render_conversation(
        [{"role": "user", "content": "Describe a film as JSON: " + json.dumps(schema)}], tokenizer
    )
    run(model, tokenizer, prompt, 16)  # warm-up: traces, kernels, allocator
    run(model, tokenizer, prompt, 16, checked)
    rows = []
    for i in range(args.repeat):
        pair = [None, checked] if i % 2 == 0 else [checked, None]
        for c in pair:
            row = run(model, tokenizer, prompt, args.decode_tokens, c)
            rows.append(row)
            if results is not None:
                results.append(
                    {"config": args.model or args.config, **{k: v for k, v in row.items() if k != "text"}}
                )
            extra = (
                f" mask ms mean {row['mask_ms_mean']:.3f} median {row['mask_ms_median']:.3f} "
                f"p90 {row['mask_ms_p90']:.3f} max {row['mask_ms_max']:.2f}"
                f" (first {row['first_mask_ms']:.1f})"
                f" searches {row['closing_searches']} closed {row['closed_to_fit']}"
                if c is not None
                else ""
            )
            kind = "schema" if c is not None else "free  "
            print(
                f"{kind} {row['generated']:4d} tokens {row['decode_tps']:8.1f} tok/s {row['finish']}{extra}"
            )
    free = [r["decode_tps"] for r in rows if not r["constrained"]]
    constrained = [r for r in rows if r["constrained"]]
    summary = {
        "device": device_name(),
        "config": args.model or args.config,
        "decode_tokens": args.decode_tokens,
        "reasoning_budget": budget,
        "free_tps_median": statistics.median(free),
        "schema_tps_median": statistics.median(r["decode_tps"] for r in constrained),
        "mask_ms_mean": statistics.fmean(r["mask_ms_mean"] for r in constrained),
        "mask_ms_p90": max(r["mask_ms_p90"] for r in constrained),
    }
    summary["schema_vs_free"] = summary["schema_tps_median"] / summary["free_tps_median"]
    print(
        f"{summary['device']}: free {summary['free_tps_median']:.1f} tok/s, schema "
        f"{summary['schema_tps_median']:.1f} tok/s ({100 * (summary['schema_vs_free'] - 1):+.1f}%), "
        f"mask {summary['mask_ms_mean']:.3f} ms/token (p90 {summary['mask_ms_p90']:.3f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    if results is not None:
        results.append({"summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())

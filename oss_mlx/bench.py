"""`oss-mlx bench`: prefill and decode speed and peak memory, oss-mlx beside mlx-lm, one run.

Both engines run the same weights: gpt-oss shapes with random weights built in memory (`--config
20b|120b|tiny`; MXFP4 experts as random bits with realistic e8m0 scales) or a checkpoint
(`--model DIR`), mapped to mlx-lm's `gpt_oss.Model` (q/k/v split, gate/up de-interleaved, as its
`sanitize` expects). oss-mlx runs its own token loop (`runtime.generate_tokens`: chunked prefill
and the model's caches); mlx-lm runs its own `generate_step`. For each prompt length: prefill tok/s
(prompt tokens / time to the first sampled token) and decode tok/s after that prompt (greedy, tokens
after the first / their time), with the peak memory of that request.

    oss-mlx bench --config 20b --prompt-lengths 128,2048,8192 --json out.json
    oss-mlx bench --config 20b --results benchmarks/results/h200.jsonl   # append, with provenance
    oss-mlx bench --config tiny --engines oss-mlx,oss-mlx:reference,mlx-lm
    oss-mlx bench --config tiny --concurrency 1,4,8,16 --prompt-lengths 128 --decode-tokens 64

With `--concurrency`, streams decode together instead (bench_concurrency.py): aggregate and
per-stream decode tok/s, and the time to first token of a request arriving while the others decode,
oss-mlx's scheduler beside mlx-lm's BatchGenerator; each stream's prompt is the first prompt length.

Engines: `oss-mlx` (custom kernels where the backend has them), `oss-mlx:reference` (pure MLX,
OSS_MLX_KERNELS=reference), `mlx-lm`. `--check-logits N` also compares oss-mlx's logits with
kernels against the reference path over an N-token prompt and a few decoded tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import bench_first, kernels, mxfp4
from .config import ModelConfig
from .model import Transformer
from .testing.kernel_checks import check_layers, check_logits
from .testing.random_model import preset_config, random_model
from .testing.random_model import random_prompt as _prompt

__all__ = ["check_layers", "check_logits", "main", "mlx_lm_model", "preset_config", "random_model"]

ENGINES = ("oss-mlx", "oss-mlx:reference", "mlx-lm")


@dataclass
class Row:
    engine: str  # "oss-mlx" | "mlx-lm"
    phase: str  # "prefill" | "decode"
    context: int  # prompt tokens (decode: the depth it decodes at)
    tokens_per_s: float
    peak_gb: float
    kernels: str = ""  # oss-mlx: the kernel backend used (metal | cuda | reference)
    label: str = ""  # the --engines entry it came from (oss-mlx:reference shows as engine oss-mlx)
    # decode rows: the first decode step alone (oss-mlx traces its compiled step there when the cache
    # buffer has a size not seen before) and the rate over the steps after it. tokens_per_s stays the
    # rate over every decoded token (what the bench has always reported).
    first_step_ms: float | None = None
    steady_tokens_per_s: float | None = None
    detail: dict | None = None  # the first-prompt rows' other numbers (bench_first.py)
    # --concurrency rows (phase "decode-concurrent"): tokens_per_s is the aggregate of `streams`
    streams: int | None = None
    per_stream_tokens_per_s: float | None = None
    ttft_ms: float | None = None  # a request arriving while streams - 1 others decode
    ttft_alone_ms: float | None = None


# ---- models ---------------------------------------------------------------------------------------


def mlx_lm_model(model: Transformer):
    """mlx-lm's gpt_oss.Model holding the same weights (shared where the layouts agree)."""
    from mlx_lm.models import gpt_oss

    c = model.config
    args = gpt_oss.ModelArgs.from_dict(c.to_hf_dict())  # the HF config.json keys mlx-lm reads
    lm = gpt_oss.Model(args)
    nn.quantize(
        lm,
        **mxfp4.MLX_MODE,
        class_predicate=lambda p, m: ".experts." in p and hasattr(m, "to_quantized"),
    )
    hq, hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    weights = {
        "model.embed_tokens.weight": model.embedding.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.unembedding.weight,
    }
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        a, m, e = b.attn, b.mlp, b.mlp.experts
        qw, qb = a.qkv.weight, a.qkv.bias
        cuts = [(0, hq * D), (hq * D, (hq + hkv) * D), ((hq + hkv) * D, (hq + 2 * hkv) * D)]
        for proj, (lo, hi) in zip(("q_proj", "k_proj", "v_proj"), cuts):
            weights[p + f"self_attn.{proj}.weight"] = qw[lo:hi]
            weights[p + f"self_attn.{proj}.bias"] = qb[lo:hi]
        weights[p + "self_attn.o_proj.weight"] = a.out.weight
        weights[p + "self_attn.o_proj.bias"] = a.out.bias
        weights[p + "self_attn.sinks"] = a.sinks
        weights[p + "input_layernorm.weight"] = a.norm.weight
        weights[p + "post_attention_layernorm.weight"] = m.norm.weight
        weights[p + "mlp.router.weight"] = m.router.weight
        weights[p + "mlp.router.bias"] = m.router.bias
        x = p + "mlp.experts."
        # gate = even rows, up = odd rows (interleaved as shipped); mlx-lm keeps them apart.
        for proj, sl in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
            weights[x + f"{proj}.weight"] = mx.contiguous(e.gate_up_weight[:, sl, :])
            weights[x + f"{proj}.scales"] = mx.contiguous(e.gate_up_scales[:, sl, :])
            weights[x + f"{proj}.bias"] = mx.contiguous(e.gate_up_bias[:, sl])
        H = c.hidden_size  # our rows may be padded for MLX-CUDA (loader.pad_down_rows)
        weights[x + "down_proj.weight"] = mx.contiguous(e.down_weight[:, :H])
        weights[x + "down_proj.scales"] = mx.contiguous(e.down_scales[:, :H])
        weights[x + "down_proj.bias"] = e.down_bias
        mx.eval([v for k, v in weights.items() if k.startswith(p)])
    lm.load_weights(list(weights.items()), strict=True)
    mx.eval(lm.parameters())
    return lm


# ---- runs -----------------------------------------------------------------------------------------


# (prefill tok/s, decode tok/s, peak GB, first decode step ms, steady decode tok/s)
Timings = tuple[float, float, float, "float | None", "float | None"]


def _first_and_steady(times: list[float]) -> tuple[float | None, float | None]:
    """(first decode step in ms, tok/s over the steps after it) from the times tokens arrived."""
    if len(times) < 3 or times[-1] <= times[1]:
        return None, None
    return 1000 * (times[1] - times[0]), (len(times) - 2) / (times[-1] - times[1])


def oss_mlx_token_times(
    model: Transformer, prompt: list[int], decode: int, prefill_chunk: int | None = None, cache=None
) -> tuple[float, list[float]]:
    """oss-mlx's own token loop over `prompt` (after what `cache` holds; default a fresh cache), greedy,
    decode + 1 tokens: (its start, when each token arrived), time.perf_counter() seconds."""
    from .generation import SamplingOptions, TokenStream
    from .runtime import generate_tokens

    cache = cache if cache is not None else model.make_cache()
    options = SamplingOptions(temperature=0.0, max_tokens=decode + 1)
    times = []
    start = time.perf_counter()
    for _ in generate_tokens(
        model, prompt, cache, options, stop_ids=set(), report=TokenStream(), prefill_chunk=prefill_chunk
    ):
        times.append(time.perf_counter())
    return start, times


def mlx_lm_token_times(model, prompt: list[int], decode: int, cache=None) -> tuple[float, list[float]]:
    """mlx-lm's own generate_step over `prompt` (after what its prompt `cache` holds), decode + 1
    tokens: (its start, when each token arrived), time.perf_counter() seconds."""
    from mlx_lm.generate import generate_step

    mx.reset_peak_memory()
    times = []
    start = time.perf_counter()
    for _ in generate_step(mx.array(prompt), model, max_tokens=decode + 1, prompt_cache=cache):
        times.append(time.perf_counter())
    return start, times


def rates(prompt_tokens: int, start: float, times: list[float]) -> Timings:
    """(prefill tok/s, decode tok/s, peak GB, first decode step ms, steady decode tok/s) from the
    times the tokens arrived: prefill = prompt tokens / time to the first token; decode = the
    tokens after the first / their time."""
    n, t1, t2 = len(times), times[0], times[-1]
    decode_tps = (n - 1) / (t2 - t1) if t2 > t1 else 0.0
    peak = mx.get_peak_memory() / 1e9
    return (prompt_tokens / (t1 - start), decode_tps, peak, *_first_and_steady(times))


def run_oss_mlx(
    model: Transformer, prompt: list[int], decode: int, prefill_chunk: int | None = None
) -> Timings:
    """(prefill tok/s, decode tok/s, peak GB, first decode step ms, steady decode tok/s) through
    oss-mlx's own token loop."""
    return rates(len(prompt), *oss_mlx_token_times(model, prompt, decode, prefill_chunk))


def run_mlx_lm(model, prompt: list[int], decode: int) -> Timings:
    """(prefill tok/s, decode tok/s, peak GB, first decode step ms, steady decode tok/s) through
    mlx-lm's own generate_step."""
    return rates(len(prompt), *mlx_lm_token_times(model, prompt, decode))


def follow_up(engine: str, model, depth: int, new: int, seed: int, prefill_chunk: int | None) -> dict:
    """`new` tokens prefilled after `depth` cached ones, beside `new` tokens on an empty cache: each
    rate (tok/s to the first token) and their ratio. The fresh prompt runs first, twice (the second
    kept: warm), then the depth is filled and the follow-up timed once (--follow-up)."""
    vocab = model.config.vocab_size if hasattr(model, "config") else model.args.vocab_size
    tokens = _prompt(depth + new, vocab, seed)
    context, added = tokens[:depth], tokens[depth:]

    def timed(prompt: list[int], cache) -> float:
        if engine == "mlx-lm":
            start, times = mlx_lm_token_times(model, prompt, 0, cache)
        else:
            start, times = oss_mlx_token_times(model, prompt, 0, prefill_chunk, cache)
        return len(prompt) / (times[0] - start)

    def fresh_cache():
        if engine == "mlx-lm":
            from mlx_lm.models.cache import make_prompt_cache

            return make_prompt_cache(model)
        return model.make_cache()

    fresh = [timed(added, fresh_cache()) for _ in range(2)][-1]
    cache = fresh_cache()
    timed(context, cache)
    after = timed(added, cache)
    return {"depth": depth, "new": new, "fresh_tps": fresh, "follow_up_tps": after, "ratio": after / fresh}


# ---- output ---------------------------------------------------------------------------------------


def device_name() -> str:
    info = {}
    try:
        info = mx.device_info()
    except Exception:
        pass
    name = str(info.get("device_name", "")) if isinstance(info, dict) else ""
    if kernels.available_backend() == "cuda" and shutil.which("nvidia-smi"):
        try:
            out = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                .stdout.strip()
                .splitlines()
            )
            name = out[0] if out else name
        except Exception:
            pass
    return name or platform.processor() or platform.machine()


def write_json(path: str, value) -> None:
    """`value` as JSON in `path`, whole or not at all: the file is rewritten after every row, and a
    Ctrl-C in the middle of one write must not cost the rows of the earlier ones."""
    from .atomic import write_text

    write_text(path, json.dumps(value, indent=1))


def print_table(rows: list[Row], engines: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    by = {(r.label or r.engine, r.phase, r.context): r for r in rows}
    table = Table(title=title)
    table.add_column("phase")
    table.add_column("context", justify="right")
    for e in engines:
        table.add_column(f"{e} tok/s", justify="right")
    base = "mlx-lm" if "mlx-lm" in engines else None
    for e in engines:
        if base and e != base:
            table.add_column(f"{e} / mlx-lm", justify="right")
    for e in engines:
        table.add_column(f"{e} peak GB", justify="right")
    keys = sorted({(r.phase, r.context) for r in rows}, key=lambda k: (k[0] != "prefill", k[1]))
    for phase, ctx in keys:
        cells = [phase, f"{ctx:,}"]
        vals = {e: by.get((e, phase, ctx)) for e in engines}
        cells += [f"{vals[e].tokens_per_s:,.1f}" if vals[e] else "-" for e in engines]
        for e in engines:
            if base and e != base:
                a, b = vals[e], vals[base]
                cells.append(f"{a.tokens_per_s / b.tokens_per_s:.2f}x" if a and b and b.tokens_per_s else "-")
        cells += [f"{vals[e].peak_gb:.1f}" if vals[e] else "-" for e in engines]
        table.add_row(*cells)
    Console().print(table)


# ---- main -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import cli_args as A

    p = A.parser("oss-mlx bench", __doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--config", choices=("tiny", "20b", "120b"), default="20b", help="shapes of the random-weight model"
    )
    src.add_argument("--model", help="a checkpoint folder or hub id instead of random weights")
    p.add_argument(
        "--prompt-lengths",
        type=A.NumberList(A.Number(int, 1, 2**20)),
        default=[128, 2048, 8192],
        metavar="N,N,...",
        help="comma-separated prompt lengths in tokens",
    )
    p.add_argument(
        "--decode-tokens", type=A.Number(int, 1, 10**6), default=64, help="tokens decoded after each prompt"
    )
    p.add_argument(
        "--concurrency",
        type=A.NumberList(A.CONCURRENCY),
        metavar="N,N,...",
        help="measure N streams decoding together instead (aggregate and per-stream tok/s, time to "
        "first token of a request arriving meanwhile), each stream's prompt the first --prompt-lengths",
    )
    p.add_argument(
        "--engines",
        type=A.ChoiceList(ENGINES),
        default=["oss-mlx", "mlx-lm"],
        metavar="E,E,...",
        help=f"comma-separated, of {', '.join(ENGINES)}",
    )
    p.add_argument(
        "--warmup",
        type=A.Number(int, 0, 2**20),
        default=2100,
        help="warm-up prompt length (0: none); over 2,048 compiles the full prefill chunk's kernels and "
        "the cache growth before anything is timed",
    )
    p.add_argument(
        "--check-logits",
        type=A.Number(int, 0, 2**20),
        default=0,
        metavar="N",
        help="compare kernel vs reference logits over an N-token prompt (0, the default: no check)",
    )
    p.add_argument(
        "--check-layers",
        type=A.Number(int, 0, 2**20),
        default=0,
        metavar="N",
        help="after an N-token prompt, compare each layer's decode update, kernels vs reference "
        "(0, the default: no check)",
    )
    p.add_argument(
        "--repeat",
        type=A.Number(int, 1, 1000),
        default=1,
        metavar="N",
        help="run each prompt length N times in a row per engine and keep the last run (the earlier "
        "ones are printed): a first run at a new length pays MLX's one-time setup for its shapes, "
        "~0.3 s at 2k on MLX-CUDA for either engine",
    )
    p.add_argument("--seed", type=A.SEED_NON_NEGATIVE, default=0, help="random weights and prompts")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="with --config: the random model's float weights and activations (a CPU multiplies float32 "
        "with its BLAS, bfloat16 without)",
    )
    p.add_argument(
        "--quality",
        choices=("reference", "balanced", "small"),
        default="reference",
        help="with --config: quantize the random model's dense layers as `oss-mlx convert` would "
        "(oss-mlx engines only)",
    )
    p.add_argument(
        "--prefill-step",
        type=A.Number(int, 1, 2**20),
        help="oss-mlx's prefill chunk in tokens (default: 2048, or what load picks)",
    )
    p.add_argument("--json", type=A.output_file, metavar="FILE", help="write the rows here")
    bench_first.add_arguments(p)
    p.add_argument(
        "--results",
        type=A.output_file,
        metavar="FILE",
        help="append one JSON line per measurement here, with date, device, versions, command and git "
        "commit (the device's results file: benchmarks/results/DEVICE.jsonl)",
    )
    p.add_argument(
        "--memory-budget",
        type=A.size,
        metavar="SIZE",
        help="with --model: stream experts within this budget (oss-mlx only); reports the hit rate",
    )
    p.add_argument(
        "--ignore-memory", action="store_true", help="run even if the memory planner says it will not fit"
    )
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def memory_needed(config: ModelConfig, quality: str, context: int, engines: list[str]):
    """(bytes the run needs at its peak, the plan): the planner's total for the longest prompt, plus
    mlx-lm's own copies of the experts (gate and up de-interleaved) while both models are alive."""
    from .memory import MemoryPlan

    plan = MemoryPlan(config, quality, context)
    extra = plan.weights["experts"] if "mlx-lm" in engines else 0
    return plan.total + extra, plan


def _same_file(a: str | None, b: str | None) -> bool:
    return bool(a and b) and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _given(pairs: tuple[tuple[str, object], ...]) -> str:
    """The names of the options given (truthy), comma-separated."""
    return ", ".join(name for name, value in pairs if value)


def option_clash(args: argparse.Namespace) -> str | None:
    """Why these options do not go together (in words), or None: an option a mode would silently
    ignore measures something else than what the command line says."""
    fresh = "--cold/--ttft" if args.cold and args.ttft else "--cold" if args.cold else "--ttft"
    checks = (("--check-logits", args.check_logits), ("--check-layers", args.check_layers))
    repeat = (("--repeat", args.repeat > 1),)
    if _same_file(args.json, args.results):
        return "--json rewrites its file on every row and --results appends to its own: give two files"
    modes = (("--cold", args.cold), ("--ttft", args.ttft), ("--follow-up", args.follow_up))
    if args.concurrency and (used := _given(modes + repeat + checks)):
        return f"--concurrency measures streams decoding together only; it takes no {used}"
    if (args.cold or args.ttft) and not args.follow_up and (used := _given(repeat + checks)):
        return f"{fresh} measure(s) in fresh processes only (no in-process runs); it takes no {used}"
    if (args.cold or args.ttft) and (args.quality != "reference" or args.dtype != "bfloat16"):
        return (
            f"{fresh} build(s) the --config model in a fresh process with bfloat16 reference weights: "
            "--quality and --dtype do not apply"
        )
    if args.follow_up_tokens is not None and not args.follow_up:
        return "--follow-up-tokens applies to --follow-up D,..."
    if args.cold_timeout is not None and not (args.cold or args.ttft):
        return "--cold-timeout applies to --cold / --ttft"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    engines = args.engines
    if args.memory_budget and (not args.model or "mlx-lm" in engines):
        parser.error(
            "--memory-budget needs --model (experts are read from its files) and "
            "--engines without mlx-lm (mlx-lm keeps every expert resident)"
        )
    if args.quality != "reference" and (args.model or "mlx-lm" in engines):
        parser.error(
            "--quality applies to --config random weights and oss-mlx engines only "
            "(a converted --model already has its preset; mlx-lm maps float weights)"
        )
    if args.model and args.dtype != "bfloat16":
        parser.error("--dtype applies to --config random weights (a checkpoint has its own dtype)")
    if clash := option_clash(args):
        parser.error(clash)
    bench_first.resolve_defaults(args)
    lengths = args.prompt_lengths
    G = args.decode_tokens
    depth = max(args.follow_up, default=0) + (args.follow_up_tokens if args.follow_up else 0)
    context = max([*lengths, args.warmup, args.check_logits, args.check_layers, depth]) + G + 1
    print(
        f"oss-mlx bench: prompts of {', '.join(f'{n:,}' for n in lengths)} tokens, {G} decoded after each, "
        f"engines {', '.join(engines)}",
        flush=True,
    )
    if not args.model:
        from .memory import Machine, gib

        need, plan = memory_needed(preset_config(args.config), args.quality, context, engines)
        machine = Machine.detect()
        print(
            f"oss-mlx bench: building a random-weight gpt-oss ({args.config}: "
            f"{plan.config.num_layers} layers, {plan.config.num_experts} experts, "
            f"{gib(plan.weights_total)} of weights) in memory; "
            f"needs ~{gib(need)} of {gib(machine.working_set_bytes)} ({machine.how})",
            flush=True,
        )
        if need > machine.working_set_bytes and not args.ignore_memory:
            print(
                f"oss-mlx bench: error: --config {args.config} does not fit this machine's memory: "
                f"needs ~{gib(need)}, the budget is {gib(machine.working_set_bytes)}. Use --config tiny, "
                "shorter --prompt-lengths, --engines oss-mlx (mlx-lm adds its own copy of the experts), "
                "or --ignore-memory to run anyway",
                file=sys.stderr,
            )
            return 1
    elif not args.memory_budget and not args.ignore_memory:
        from .plan_cli import refuse_unless_fits

        if refuse_unless_fits("oss-mlx bench", args.model, context, how=" (with --engines oss-mlx)"):
            return 1

    rows: list[Row] = []
    extra: dict = {}
    meta = {
        "device": device_name(),
        "mlx": mx.__version__,
        "source": args.model or f"--config {args.config} (random weights)",  # made exact once built
        "decode_tokens": G,
        "repeat": args.repeat,
    }

    results = None
    if args.results:
        from .bench_results import ResultsFile, provenance

        run_fields = {"kind": "bench", "source": meta["source"], "decode_tokens": G, "repeat": args.repeat}
        results = ResultsFile(args.results, {**provenance(argv, meta["device"]), **run_fields})

    def write_rows(new: list[Row], kept: bool = True) -> None:
        # After every measurement, not once at the end: a run cut by a time limit keeps its rows.
        if args.json and kept:
            write_json(args.json, [{**asdict(r), **meta} for r in rows])
        for r in new if results is not None else ():
            results.append({**asdict(r), "kept": kept})

    def add(row: Row) -> None:
        rows.append(row)
        write_rows([row])

    if args.cold or args.ttft:  # fresh processes first: this one then holds no model beside theirs
        failed = bench_first.fresh_process_rows(args, engines, Row, add)
        if failed:
            print(f"oss-mlx bench: error: {failed} fresh process(es) gave no result (above)", file=sys.stderr)
            return 1
        if not args.follow_up:
            return 0
        lengths = []  # the in-process rows are the fresh processes' second runs
    t = time.perf_counter()
    if args.model:
        from .cli_args import report, user_errors
        from .loader import load_model

        try:
            model, info = load_model(args.model, memory_budget=args.memory_budget, warm_up=False)
        except user_errors() as e:
            return report("oss-mlx bench", e, doing=f"cannot load {args.model}")
        where = "" if str(info.path) == args.model else f" from {info.path}"
        source = args.model + where + (f" (memory budget {args.memory_budget})" if args.memory_budget else "")
    else:
        dtype = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[args.dtype]
        model = random_model(preset_config(args.config), seed=args.seed, dtype=dtype)
        source = (
            f"--config {args.config} (random weights{', ' + args.dtype if args.dtype != 'bfloat16' else ''})"
        )
        if args.quality != "reference":
            from .convert.presets import get_preset
            from .loader import quantize_dense

            quantize_dense(model, get_preset(args.quality).spec())
            mx.eval(model.parameters())
            source += f", --quality {args.quality}"
    meta["source"] = source
    if results is not None:
        results.shared["source"] = source
    from . import warmup

    want = warmup.wanted() if args.load_warmup == "auto" else args.load_warmup == "on"
    if want and not args.memory_budget and any(e.startswith("oss-mlx") for e in engines):
        # as loading does, deep enough for every prompt here (warmup.WARM_CONTEXT at least)
        done = warmup.warm_up(
            model,
            context=max(warmup.WARM_CONTEXT, context),
            step=args.prefill_step,
            batched=bool(args.concurrency),
        )
        print(f"oss-mlx bench: load-time warm-up {done.summary()}", flush=True)
    c = model.config
    print(
        f"oss-mlx bench: {source}; {c.num_layers} layers, {c.num_experts} experts "
        f"(top-{c.experts_per_token}), hidden {c.hidden_size}; built in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    print(
        f"device: {device_name()} ({mx.default_device()}), mlx {mx.__version__}, "
        f"kernels: {kernels.backend()}",
        flush=True,
    )

    if args.concurrency:
        return _concurrency(args, model, engines, source, rows, results)
    follow_ups: list[tuple[str, dict]] = []

    def timing_rows(label: str, kern: str, ctx: int, res: Timings) -> list[Row]:
        pre, dec, peak, first_ms, steady = res
        engine = label.split(":")[0]
        return [
            Row(engine, "prefill", ctx, pre, peak, kern, label),
            Row(engine, "decode", ctx, dec, peak, kern, label, first_ms, steady),
        ]

    def measure(label: str, kern: str, ctx: int, run) -> Timings:
        """`run()` args.repeat times; the last result (the earlier ones printed, and appended to
        --results marked "kept": false)."""
        for i in range(args.repeat - 1):
            res = run()
            pre, dec, *_ = res
            print(
                f"  {label:<18} context {ctx:>6}, run {i + 1} of {args.repeat} (not kept): "
                f"prefill {pre:9.1f} tok/s, decode {dec:7.1f} tok/s",
                flush=True,
            )
            write_rows(timing_rows(label, kern, ctx, res), kept=False)
            gc.collect()
        return run()

    def record(label: str, kern: str, ctx: int, res: Timings) -> None:
        pre, dec, peak, first_ms, steady = res
        new = timing_rows(label, kern, ctx, res)
        rows.extend(new)
        after_first = "" if steady is None else f" (first step {first_ms:.1f} ms, then {steady:.1f} tok/s)"
        print(
            f"  {label:<18} [{kern or '-':>9}] context {ctx:>6}: prefill {pre:9.1f} tok/s, "
            f"decode {dec:7.1f} tok/s{after_first}, peak {peak:.2f} GB",
            flush=True,
        )
        write_rows(new)

    for name in [e for e in engines if e.startswith("oss-mlx")]:
        mode = "reference" if name.endswith(":reference") else None
        with kernels.use_backend(mode):
            kern = kernels.backend()
            if args.warmup:
                run_oss_mlx(model, _prompt(args.warmup, c.vocab_size, args.seed), 4)
            for n in lengths:
                prompt = _prompt(n, c.vocab_size, args.seed)
                run = lambda p=prompt: run_oss_mlx(model, p, G, args.prefill_step)  # noqa: E731
                record(name, kern, n, measure(name, kern, n, run))
                gc.collect()
            measure_at = partial(follow_up, "oss-mlx", model, seed=args.seed, prefill_chunk=args.prefill_step)
            follow_ups += bench_first.follow_up_rows("oss-mlx", name, kern, measure_at, args, Row, add)
    if args.memory_budget:
        from .streaming import model_streaming_stats

        stats = model_streaming_stats(model)
        extra["expert_streaming"] = {"hit_rate": stats.hit_rate, "bytes_read": stats.bytes_read}
        print(f"  expert streaming: {stats.summary()}", flush=True)
    if args.check_logits:
        extra["logits_check"] = check_logits(model, args.check_logits, seed=args.seed)
        print(f"  logits, kernels vs reference: {extra['logits_check']}", flush=True)
    if args.check_layers:
        extra["layers_check"] = check_layers(model, args.check_layers, seed=args.seed)
        print(f"  per layer, kernels vs reference: {extra['layers_check']}", flush=True)
    if "mlx-lm" in engines:
        t = time.perf_counter()
        lm = mlx_lm_model(model)
        del model  # mlx-lm's peak memory: its own weights (shared ones stay alive through it)
        gc.collect()
        mx.clear_cache()
        print(f"  mlx-lm model mapped in {time.perf_counter() - t:.1f} s", flush=True)
        if args.warmup:
            run_mlx_lm(lm, _prompt(args.warmup, c.vocab_size, args.seed), 4)
        for n in lengths:
            prompt = _prompt(n, c.vocab_size, args.seed)
            record("mlx-lm", "", n, measure("mlx-lm", "", n, lambda p=prompt: run_mlx_lm(lm, p, G)))
            gc.collect()
        measure_at = partial(follow_up, "mlx-lm", lm, seed=args.seed, prefill_chunk=None)
        follow_ups += bench_first.follow_up_rows("mlx-lm", "mlx-lm", "", measure_at, args, Row, add)

    title = f"{device_name()} · mlx {mx.__version__} · {source} · decode {G} tokens"
    print_table([r for r in rows if r.phase in ("prefill", "decode")], engines, title)
    if follow_ups:
        bench_first.print_follow_ups(follow_ups, title)
    if args.json and extra:
        write_json(args.json + ".check.json", extra)
    for name, result in extra.items() if results is not None else ():
        results.append({"phase": name, "result": result})
    return 0


def _concurrency(
    args: argparse.Namespace,
    model: Transformer,
    engines: list[str],
    source: str,
    rows: list,
    results_file=None,
) -> int:
    """--concurrency: streams decoding together, each engine, one table (bench_concurrency.py); a row
    per engine and concurrency (appended to `results_file`, a bench_results.ResultsFile, when given)."""
    from . import bench_concurrency as bc

    length, G = args.prompt_lengths[0], args.decode_tokens
    most = max(args.concurrency)
    vocab = model.config.vocab_size
    prompts = [_prompt(length, vocab, args.seed + 1000 * i) for i in range(most)]
    probe = _prompt(length, vocab, args.seed + 999_999)
    meta = {"device": device_name(), "mlx": mx.__version__, "source": source, "decode_tokens": G}
    results: dict[str, list] = {}

    def keep(label: str, kern: str, c) -> None:
        results.setdefault(label, []).append(c)
        ttft = "" if c.ttft_ms is None else f", TTFT {c.ttft_ms:.0f} ms beside {c.streams - 1} streams"
        print(
            f"  {label:<18} [{kern or '-':>9}] {c.streams:>3} streams: {c.aggregate_tokens_per_s:9.1f} tok/s "
            f"({c.per_stream_tokens_per_s:.1f} per stream){ttft}, alone {c.ttft_alone_ms:.0f} ms, "
            f"peak {c.peak_gb:.2f} GB",
            flush=True,
        )
        engine = label.split(":")[0]
        row = Row(engine, "decode-concurrent", length, c.aggregate_tokens_per_s, c.peak_gb, kern, label)
        row.streams, row.per_stream_tokens_per_s = c.streams, c.per_stream_tokens_per_s
        row.ttft_ms, row.ttft_alone_ms = c.ttft_ms, c.ttft_alone_ms
        rows.append(row)
        if args.json:
            write_json(args.json, [{**asdict(r), **meta} for r in rows])
        if results_file is not None:
            results_file.append({**asdict(row), "kept": True})

    for name in [e for e in engines if e.startswith("oss-mlx")]:
        with kernels.use_backend("reference" if name.endswith(":reference") else None):
            kern = kernels.backend()
            for n in args.concurrency:
                keep(name, kern, bc.oss_mlx_concurrent(model, n, prompts, probe, G))
                gc.collect()
    if "mlx-lm" in engines:
        lm = mlx_lm_model(model)
        del model
        gc.collect()
        mx.clear_cache()
        for n in args.concurrency:
            keep("mlx-lm", "", bc.mlx_lm_concurrent(lm, n, prompts, probe, G))
            gc.collect()
    title = f"{device_name()} · mlx {mx.__version__} · {source} · prompts {length}, decode {G} tokens"
    bc.print_concurrency(results, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())

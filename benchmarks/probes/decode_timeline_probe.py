"""Is a decode step bound by the card or by the host? (20b shapes, GPU machine; docs/PERFORMANCE.md,
"Decode toward the floor".)

For each context: a warm run of that length, then `--tokens` decoded tokens through oss-mlx's own
token loop, twice:
- host: every `mx.async_eval` call timed (MLX-CUDA encodes the graph on the calling thread there: each
  node's eval_gpu, the CUDA graph built, updated and launched), and the compiled step's call (the
  replayed trace's outputs made), per decoded token, beside the wall time per token;
- card: the kernels' own start and end on the card in the same loop, recorded by CUPTI through
  torch.profiler (process-wide: MLX's graph launches are seen too): per token the card's busy time
  (kernels' union) and idle time inside the decode span, and each kernel's mean duration, warm as the
  step runs them (Nsight Compute's `steps` stage times them one at a time with cold caches).

If the card is idle for a good part of each token, the step waits on the host and faster kernels
alone will not raise the rate. JSON lines on stdout (`--json FILE` too).

    python benchmarks/probes/decode_timeline_probe.py [--config 20b] [--contexts 128,32768] [--tokens 48]
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import mlx.core as mx

from oss_mlx import decode as decode_module
from oss_mlx.bench import _prompt, oss_mlx_token_times, preset_config, random_model, run_oss_mlx


class HostClock:
    """Seconds spent in mx.async_eval and in the decode step's call while installed."""

    def __init__(self) -> None:
        self.async_eval = 0.0
        self.step = 0.0
        self.calls = 0

    def __enter__(self) -> HostClock:
        self._eval, self._call = mx.async_eval, decode_module.DecodeStep.__call__
        clock = self

        def timed_eval(*args):
            t = time.perf_counter()
            try:
                return clock._eval(*args)
            finally:
                clock.async_eval += time.perf_counter() - t

        def timed_call(step, *args, **kwargs):
            t = time.perf_counter()
            try:
                return clock._call(step, *args, **kwargs)
            finally:
                clock.step += time.perf_counter() - t
                clock.calls += 1

        mx.async_eval = timed_eval
        decode_module.DecodeStep.__call__ = timed_call
        return self

    def __exit__(self, *exc) -> None:
        mx.async_eval, decode_module.DecodeStep.__call__ = self._eval, self._call


def prefilled(model, prompt: list[int]):
    """A cache holding `prompt` (prefilled through oss-mlx's token loop, one token sampled)."""
    cache = model.make_cache()
    oss_mlx_token_times(model, prompt, 0, cache=cache)
    return cache


def decode_run(model, cache, tokens: int) -> tuple[float, int]:
    """(seconds from the first token to the last, tokens after the first): one more token after what
    `cache` holds, then `tokens` decoded, through oss-mlx's own token loop (bench.py's)."""
    _, times = oss_mlx_token_times(model, [1], tokens, cache=cache)
    return times[-1] - times[0], len(times) - 1


def card_timeline(model, prompt: list[int], tokens: int, trace: str | None = None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.init()
    prof = profile(activities=[ProfilerActivity.CUDA])
    cache = prefilled(model, prompt)
    mx.synchronize()
    prof.start()
    seconds, n = decode_run(model, cache, tokens)
    mx.synchronize()
    prof.stop()
    if trace:
        prof.export_chrome_trace(trace)
    kernels = []
    for e in prof.events():
        if str(e.device_type).endswith("CUDA"):
            kernels.append((e.time_range.start, e.time_range.end, e.name))
    kernels.sort()
    if not kernels:
        return {"error": "CUPTI saw no kernels"}
    busy, cur_s, cur_e = 0.0, None, None
    for s, e, _ in kernels:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = kernels[-1][1] - kernels[0][0]
    per = collections.defaultdict(list)
    for s, e, name in kernels:
        per[name.split("(")[0][:60]].append(e - s)
    steps = max(n, 1)
    top = sorted(per.items(), key=lambda kv: -sum(kv[1]))[:16]
    return {
        "kernels": len(kernels),
        "span_us_per_token": span / steps,
        "busy_us_per_token": busy / steps,
        "idle_us_per_token": (span - busy) / steps,
        "wall_us_per_token": 1e6 * seconds / steps,
        "top": [
            {
                "kernel": k,
                "calls_per_token": len(v) / steps,
                "mean_us": sum(v) / len(v),
                "us_per_token": sum(v) / steps,
            }
            for k, v in top
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="20b")
    p.add_argument("--contexts", default="128,32768")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--json", default=None)
    p.add_argument("--trace-dir", default=None, help="also write each context's Chrome trace here")
    args = p.parse_args()
    model = random_model(preset_config(args.config))
    vocab = model.config.vocab_size
    run_oss_mlx(model, _prompt(300, vocab, 0), 4)
    rows = []
    for n in (int(c) for c in args.contexts.split(",")):
        prompt = _prompt(n, vocab, 1)
        run_oss_mlx(model, prompt, 4)
        cache = prefilled(model, prompt)
        with HostClock() as clock:
            seconds, steps = decode_run(model, cache, args.tokens)
        # the clock counts the one-token chunk before the first decoded token too: the per-token host
        # figures are upper bounds by that much
        row = {
            "probe": "decode_timeline",
            "context": n,
            "decode_tps": steps / seconds,
            "wall_us_per_token": 1e6 * seconds / steps,
            "async_eval_us_per_token": 1e6 * clock.async_eval / steps,
            "step_call_us_per_token": 1e6 * clock.step / max(clock.calls, 1),
        }
        try:
            trace = f"{args.trace_dir}/decode-{n}.json" if args.trace_dir else None
            row["card"] = card_timeline(model, prompt, args.tokens, trace)
        except Exception as e:  # no torch with CUDA, no CUPTI: the host figures still stand
            row["card"] = {"error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

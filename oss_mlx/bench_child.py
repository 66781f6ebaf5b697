"""The fresh process of `oss-mlx bench --cold / --ttft` (bench_first.py): build or load the model as
a user's process would, run one prompt (cold), the same again (warm), print the result as a line of
JSON. Started as `python -m oss_mlx.bench_child SPEC` by bench_first.run_fresh_process."""

from __future__ import annotations

import time

MODULE_START = time.time()  # as early as this module runs: after the interpreter and oss_mlx's imports

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402

from .bench_first import CHILD_MARK, ChildSpec, FirstPrompt, chat_prompt, ptx_cache_files  # noqa: E402


def _child(spec: ChildSpec, module_start: float) -> FirstPrompt:
    import mlx.core as mx

    from . import kernels, warmup
    from .bench import mlx_lm_model, mlx_lm_token_times, oss_mlx_token_times, rates
    from .testing.random_model import preset_config, random_model, random_prompt

    ptx = ptx_cache_files()
    engine = spec.engine
    report = None
    if spec.model:
        from .loader import load_model
        from .runtime import runtime_of

        model, _ = load_model(
            spec.model,
            memory_budget=spec.memory_budget,
            warm_up=spec.warm_up if engine != "mlx-lm" else False,
        )
        report = runtime_of(model).warmup_report
    else:
        model = random_model(preset_config(spec.config), seed=spec.seed)
        want = warmup.wanted() if spec.warm_up is None else spec.warm_up
        if engine != "mlx-lm" and want:
            report = warmup.warm_up(model, context=warmup.WARM_CONTEXT, step=spec.prefill_chunk)
    vocab = model.config.vocab_size
    if spec.prompt == "chat":
        prompt = chat_prompt(spec.model if spec.model and os.path.isdir(spec.model) else None)
    else:
        prompt = random_prompt(int(spec.prompt), vocab, spec.seed)  # the bench's warm rows' prompt
    if engine == "mlx-lm":
        lm = mlx_lm_model(model)
        del model
        mx.clear_cache()

        def run():
            return mlx_lm_token_times(lm, prompt, spec.decode)
    else:

        def run():
            return oss_mlx_token_times(model, prompt, spec.decode, spec.prefill_chunk)

    ready = time.perf_counter()
    ready_wall = time.time()
    start, times = run()
    first_wall = ready_wall + (times[0] - ready)
    cold = rates(len(prompt), start, times)
    w_start, w_times = run()
    warm = rates(len(prompt), w_start, w_times)
    return FirstPrompt(
        engine=engine,
        prompt=spec.prompt,
        tokens=len(prompt),
        imports_s=module_start - spec.spawned,
        load_s=ready_wall - module_start,
        warmup_s=report.seconds if report else None,
        warmup=report.summary() if report else None,
        cold_prefill_tps=cold[0],
        warm_prefill_tps=warm[0],
        cold_decode_tps=cold[1],
        warm_decode_tps=warm[1],
        ttft_from_start_s=first_wall - spec.spawned,
        ttft_from_load_s=times[0] - ready,
        warm_ttft_s=w_times[0] - w_start,
        ptx_cache_files=ptx,
        kernels="" if engine == "mlx-lm" else kernels.backend(),
        peak_gb=max(cold[2], warm[2]),
    )


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m oss_mlx.bench_child SPEC (oss-mlx bench --cold starts it)")
    result = _child(ChildSpec(**json.loads(sys.argv[1])), MODULE_START)
    print(CHILD_MARK + json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()

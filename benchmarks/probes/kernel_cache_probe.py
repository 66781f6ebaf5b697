"""Does the cross-process cache of our CUDA kernels work (oss_mlx/kernels/cuda_cache.py)? GPU machine.

1. The source: for every kernel specialization a small model launches, MLX's own generated source
   (printed by `verbose=True`) against cuda_cache.kernel_source: the module name MLX looks up is a
   hash of it, so they must be equal byte for byte.
2. Two fresh processes, each timing its first prompt (which compiles every kernel it launches): the
   first with OSS_MLX_KERNEL_CACHE=1 (it writes the cache in the background, then waits for it), the
   second reading it. The second's first prompt should lose the compile time, and its tokens must be
   the first's.

    python benchmarks/probes/kernel_cache_probe.py          # both parts (PROBE_CONFIG=tiny: smaller)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))


def _model():
    import dataclasses

    from oss_mlx.testing.random_model import preset_config, random_model

    full = preset_config(os.environ.get("PROBE_CONFIG", "20b"))
    return random_model(dataclasses.replace(full, num_layers=2, layer_types=full.layer_types[:2]))


def _run(model) -> list[int]:
    """A 300-token prompt and 8 greedy tokens through the model's runtime (prefill and decode kernels)."""
    from oss_mlx.generation import SamplingOptions
    from oss_mlx.runtime import generate_tokens
    from oss_mlx.testing.random_model import random_prompt

    prompt = random_prompt(300, model.config.vocab_size, 3)
    options = SamplingOptions(temperature=0.0, max_tokens=8)
    return list(generate_tokens(model, prompt, model.make_cache(), options, set()))


def check_sources() -> int:
    """Part 1: MLX's generated source of each launched specialization against ours."""
    import mlx.core as mx

    from oss_mlx.kernels import dispatch

    compared, differ = 0, []
    make = dispatch._kernel

    def verbose_kernel(name):  # every launch goes through dispatch._kernel(name)(...)
        kernel = make(name)

        def call(**kwargs):
            nonlocal compared
            with tempfile.TemporaryFile() as out:
                saved = os.dup(1)
                sys.stdout.flush()
                os.dup2(out.fileno(), 1)
                try:
                    result = kernel(**kwargs, verbose=True)
                finally:
                    os.dup2(saved, 1)
                    os.close(saved)
                out.seek(0)
                printed = out.read().decode()
            theirs = printed.split("```\n", 1)[1].rsplit("\n```", 1)[0]
            _, ours = dispatch.cuda_source(
                name, kwargs["inputs"], kwargs["template"], kwargs["output_dtypes"]
            )
            compared += 1
            if ours != theirs:
                differ.append(name)
                if len(differ) == 1:
                    at = next(
                        (i for i, (p, q) in enumerate(zip(ours, theirs)) if p != q),
                        min(len(ours), len(theirs)),
                    )
                    near = slice(max(0, at - 40), at + 40)
                    print(f"first difference at {at}: ours {ours[near]!r} theirs {theirs[near]!r}")
            return result

        return call

    dispatch._kernel = verbose_kernel
    try:
        _run(_model())
        mx.synchronize()
    finally:
        dispatch._kernel = make
    print(f"sources compared: {compared}, different: {len(differ)} {sorted(set(differ))}")
    return 0 if compared and not differ else 1


def child() -> None:
    """One fresh process: its first prompt timed, then its tokens and what the cache did, as JSON."""
    import mlx.core as mx

    from oss_mlx.kernels import cuda_cache, dispatch

    model = _model()
    mx.synchronize()
    start = time.perf_counter()
    tokens = _run(model)
    mx.synchronize()
    first = time.perf_counter() - start
    start = time.perf_counter()
    _run(model)
    mx.synchronize()
    second = time.perf_counter() - start
    cache = dispatch.RUNTIME.disk_cache
    cache.wait()
    print(
        json.dumps(
            {
                "first_prompt_s": first,
                "again_s": second,
                "tokens": tokens,
                "written": len(cache.written),
                "failed": cache.failed,
                "cache_dir": str(cuda_cache.cache_dir()),
            }
        )
    )


def main() -> int:
    if "--child" in sys.argv:
        child()
        return 0
    rc = check_sources()
    env = {**os.environ, "OSS_MLX_KERNEL_CACHE": "1", "OSS_MLX_WARMUP": "0"}
    runs = []
    for label in ("writes", "reads"):
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        ok = out.returncode == 0
        row = json.loads(out.stdout.strip().splitlines()[-1]) if ok else {"error": out.stderr[-2000:]}
        runs.append(row)
        print(label, {k: v for k, v in row.items() if k != "tokens"}, flush=True)
    same = all("tokens" in r for r in runs) and runs[0]["tokens"] == runs[1]["tokens"]
    print(f"tokens equal: {same}")
    return rc if same else 1


if __name__ == "__main__":
    sys.exit(main())

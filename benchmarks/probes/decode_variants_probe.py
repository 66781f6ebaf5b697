"""Does a setting speed decode up end to end? Alternating rounds in one process (20b shapes, GPU
machine; docs/PERFORMANCE.md, "Decode toward the floor").

Each `--set MODULE.NAME=V1,V2,...` names a module constant of oss_mlx and the values to try (the
kernels' launch settings: decode_moe.MOE_MMA_ISSUE, decode_attention.QKV_PAIRS_PER_WARP, ...). Rounds
alternate the values, `--rounds` times; for each value the model's decode step is made again (its
compiled trace bakes the settings in), then for each context a warm run of that length and
`--tokens` decoded tokens measured: the whole rate and the rate after the first step. Rounds of the
same value differ by the noise alone (decode moves by up to ±15% between identical runs on the cards).

    python benchmarks/probes/decode_variants_probe.py --set decode_moe.MOE_MMA_ISSUE=1,3 \
        [--contexts 128,32768] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics

from oss_mlx.bench import _prompt, preset_config, random_model, run_oss_mlx
from oss_mlx.runtime import runtime_of


def parse_setting(text: str) -> tuple[object, str, list[int | float | str]]:
    """'decode_moe.MOE_MMA_ISSUE=1,3' -> (oss_mlx.kernels.decode_moe, or else oss_mlx.X; name; values)."""
    target, _, values = text.partition("=")
    module_name, _, attr = target.rpartition(".")
    if not module_name or not attr or not values:
        raise SystemExit(f"--set {text!r}: write MODULE.NAME=V1,V2 (e.g. decode_moe.MOE_MMA_ISSUE=1,3)")
    for prefix in ("oss_mlx.kernels.", "oss_mlx."):
        try:
            module = importlib.import_module(prefix + module_name)
            break
        except ImportError:
            continue
    else:
        raise SystemExit(f"--set {text!r}: no module oss_mlx.kernels.{module_name} or oss_mlx.{module_name}")
    if not hasattr(module, attr):
        raise SystemExit(f"--set {text!r}: {module.__name__} has no {attr}")

    def value(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return {"None": None, "True": True, "False": False}.get(v, v)

    return module, attr, [value(v) for v in values.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="settings", action="append", required=True, help="MODULE.NAME=V1,V2,...")
    p.add_argument("--config", default="20b")
    p.add_argument("--contexts", default="128,32768")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    settings = [parse_setting(s) for s in args.settings]
    counts = {len(v) for _, _, v in settings}
    if len(counts) != 1:
        raise SystemExit("--set: give every setting the same number of values (they change together)")
    count = counts.pop()
    model = random_model(preset_config(args.config))
    vocab = model.config.vocab_size
    run_oss_mlx(model, _prompt(300, vocab, 0), 4)
    saved = [getattr(m, a) for m, a, _ in settings]
    rates: dict[tuple[int, int], list[float]] = {}
    try:
        for r in range(args.rounds):
            for i in range(count):
                label = " ".join(f"{a}={vals[i]}" for _, a, vals in settings)
                for module, attr, vals in settings:
                    setattr(module, attr, vals[i])
                runtime_of(model).model_changed()  # a new decode step: its trace bakes the settings in
                for n in (int(c) for c in args.contexts.split(",")):
                    prompt = _prompt(n, vocab, 1)
                    run_oss_mlx(model, prompt, 4)
                    _, decode, _, _, steady = run_oss_mlx(model, prompt, args.tokens)
                    rates.setdefault((i, n), []).append(steady)
                    row = {"round": r, "setting": label, "context": n, "decode_tps": decode}
                    print(json.dumps(row | {"steady_tps": steady}), flush=True)
    finally:
        for (module, attr, _), v in zip(settings, saved):
            setattr(module, attr, v)
    for (i, n), values in sorted(rates.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        label = " ".join(f"{a}={vals[i]}" for _, a, vals in settings)
        print(f"context {n:>6} {label}: steady median {statistics.median(values):6.1f} tok/s over {values}")


if __name__ == "__main__":
    main()

"""The primitives of one decode step of the 20b (uncompiled, so MLX's graph shows each node), by
kind: how many nodes the host encodes a token (GPU machine; docs/PERFORMANCE.md, "Decode toward the
floor").

    python benchmarks/probes/step_ops_probe.py [--config 20b] [--context 128]
"""

from __future__ import annotations

import argparse
import collections
import io
import re

import mlx.core as mx

from oss_mlx.bench import _prompt, preset_config, random_model
from oss_mlx.decode import DecodeStep, decode_one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="20b")
    p.add_argument("--context", type=int, default=128)
    args = p.parse_args()
    model = random_model(preset_config(args.config))
    cache = model.make_cache()
    mx.eval(model(mx.array([_prompt(args.context, model.config.vocab_size, 1)]), cache=cache))
    logits = decode_one(DecodeStep(model, compile=False), mx.array([[1]]), cache)
    buf = io.StringIO()
    mx.export_to_dot(buf, logits)
    ops = collections.Counter(re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue()))
    print(f"{sum(ops.values())} nodes, {len(model.blocks)} layers: {dict(ops.most_common())}")


if __name__ == "__main__":
    main()

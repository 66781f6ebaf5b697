"""Run by every rank of a distributed test (under mlx.launch, or as rank 0 with --hosts): rank 0
drives the model and prints one JSON line of results; the other ranks only compute.

    python tests/distributed_probe.py MODEL --distributed pipeline|tensor [--hosts FILE] [--endless]
        [--after-a-line]

`checks` is also run in the test process on the single-process model: the reference.
"""

from __future__ import annotations

import argparse
import json
import sys

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3
TURNS = ("Hello there, who are you?", "And what can you do for me today?")


PARTS = ("forward", "generate", "session")


def checks(model, tokenizer, max_tokens: int, prefill_chunk: int, parts=PARTS) -> dict:
    """A forward without cache, chunked prefill + decode, and a two-turn session (greedy), or the
    `parts` of them named."""
    import time

    import mlx.core as mx

    from oss_mlx.generation import SamplingOptions, TokenStream
    from oss_mlx.runtime import generate_tokens, runtime_of
    from oss_mlx.session import Done, Session

    runtime_of(model).prefill_chunk = prefill_chunk  # several prefill chunks even for short prompts
    out: dict = {"seconds": {}}
    start = time.perf_counter()
    ids = [int(t) for t in tokenizer.encode(PROMPT)]
    if "forward" in parts:
        logits = model(mx.array(ids)[None])
        out["logits"] = logits[0, -1, :64].astype(mx.float32).tolist()
        out["argmax"] = mx.argmax(logits[0], axis=-1).tolist()
        out["seconds"]["forward"] = time.perf_counter() - start
    greedy = SamplingOptions(temperature=0, max_tokens=max_tokens)
    if "generate" in parts:
        out["generated"] = list(generate_tokens(model, ids, model.make_cache(), greedy, set(), TokenStream()))
        out["seconds"]["generate"] = time.perf_counter() - start
    if "session" not in parts:
        return out
    session = Session(model, tokenizer, reasoning_effort="low")
    out["turns"] = []
    for text in TURNS:
        reply = None
        for event in session.send(text, temperature=0, max_tokens=max_tokens):
            if isinstance(event, Done):
                reply = event.reply
        stats = reply.stats
        out["turns"].append(
            {"tokens": reply.tokens, "prompt": stats.prompt_tokens, "prefilled": stats.prefilled_tokens}
        )
    out["seconds"]["session"] = time.perf_counter() - start
    return out


def endless(model) -> None:
    """Decode until the group fails; prints progress, then the error rank 0 got."""
    from oss_mlx.distributed.group import DistributedError
    from oss_mlx.generation import SamplingOptions
    from oss_mlx.runtime import generate_tokens

    print(json.dumps({"ready": True}), flush=True)
    options = SamplingOptions(temperature=0, max_tokens=10**9)
    try:
        for i, _ in enumerate(generate_tokens(model, list(range(1, 40)), model.make_cache(), options, set())):
            if i % 10 == 0:
                print(json.dumps({"tokens": i}), flush=True)
    except DistributedError as e:
        print(json.dumps({"error": str(e)}), flush=True)


def after_a_line(model, tokenizer) -> None:
    """Say ready, wait for a line on stdin (the test kills a rank meanwhile), then send a message:
    prints the reply's token count or the error rank 0 got."""
    from oss_mlx.distributed.group import DistributedError
    from oss_mlx.session import Done, Session

    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    try:
        for event in Session(model, tokenizer).send(TURNS[0], temperature=0, max_tokens=4):
            if isinstance(event, Done):
                print(json.dumps({"reply": event.reply.tokens}), flush=True)
    except DistributedError as e:
        print(json.dumps({"error": str(e)}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--distributed", default="auto")
    ap.add_argument("--hosts")
    ap.add_argument("--plan-context", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prefill-step", type=int, default=24)
    ap.add_argument("--endless", action="store_true", help="decode until a rank fails (fault tests)")
    ap.add_argument("--then-endless", action="store_true", help="the checks, then --endless")
    ap.add_argument("--after-a-line", action="store_true", help="one message once stdin has a line")
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"which checks, of {','.join(PARTS)} (default all; none: load only)",
    )
    args = ap.parse_args()
    parts = tuple(p for p in args.parts.split(",") if p != "none")
    if not set(parts) <= set(PARTS):
        ap.error(f"--parts: choose from {', '.join(PARTS)} or none")

    import time

    from oss_mlx.distributed import cli

    start = time.perf_counter()
    model, tokenizer = cli.load(args.model, args)
    loaded = time.perf_counter() - start
    if args.endless:
        endless(model)
        return 1
    if args.after_a_line:
        after_a_line(model, tokenizer)
        return 1
    out = checks(model, tokenizer, args.max_tokens, args.prefill_step, parts)
    from oss_mlx.runtime import runtime_of

    out["plan"] = runtime_of(model).distributed.plan.as_dict()
    out["seconds"]["load"] = loaded
    print(json.dumps(out), flush=True)
    if args.then_endless:
        endless(model)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

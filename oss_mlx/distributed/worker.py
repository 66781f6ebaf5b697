"""`python -m oss_mlx.distributed.worker --model FOLDER ...`: one compute rank, as `--hosts` starts
it (under mlx.launch the ranks run the oss-mlx command itself). It joins the group, loads its part
and runs rank 0's commands until rank 0 stops it."""

from __future__ import annotations

import argparse
import sys

from ..memory import DEFAULT_CONTEXT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oss_mlx.distributed.worker", description=__doc__)
    p.add_argument("--model", required=True, help="the model folder on this machine")
    p.add_argument("--distributed", choices=("auto", "pipeline", "tensor"), default="auto")
    p.add_argument("--plan-context", type=int, default=DEFAULT_CONTEXT)
    args = p.parse_args(argv)
    from .group import DistributedError
    from .runtime import Options, start

    try:
        start(
            args.model,
            Options(mode=None if args.distributed == "auto" else args.distributed, context=args.plan_context),
        )
    except DistributedError as e:
        print(f"oss-mlx worker: {e}", file=sys.stderr)
        return 1
    print(
        "oss-mlx worker: this process became rank 0; start workers through --hosts or mlx.launch",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())

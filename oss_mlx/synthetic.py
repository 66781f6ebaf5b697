"""`oss-mlx synthetic`: write a random gpt-oss checkpoint (the generator is `oss_mlx.testing.synthetic`,
re-exported here: `from oss_mlx.synthetic import SyntheticSpec, write_checkpoint`)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from .errors import ConvertError
from .testing.synthetic import DTYPES, LAYOUTS, SyntheticSpec, checkpoint_tensors, write_checkpoint

__all__ = ["LAYOUTS", "SyntheticSpec", "build_parser", "checkpoint_tensors", "main", "write_checkpoint"]


def build_parser() -> argparse.ArgumentParser:
    from . import cli_args as A

    ap = A.parser("oss-mlx synthetic", "Write a random gpt-oss checkpoint.")
    ap.add_argument("dest", type=Path, help="output folder")
    ap.add_argument("--config", default="tiny", choices=["tiny", "20b", "120b"], help="sizes")
    ap.add_argument("--layout", default="hf-mxfp4", choices=list(LAYOUTS), help="on-disk layout")
    ap.add_argument(
        "--seed", type=A.SEED_NON_NEGATIVE, default=0, help="the same seed writes the same values"
    )
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="of every float tensor")
    ap.add_argument(
        "--max-shard-bytes",
        type=A.NON_NEGATIVE_INT,
        default=2_000_000_000,
        help="split into shards above this size; 0: a single file",
    )
    ap.add_argument(
        "--config-style",
        default="hub",
        choices=["hub", "transformers5"],
        help="config.json as on the hub (transformers 4) or as transformers 5 writes it",
    )
    ap.add_argument("--num-layers", type=A.Number(int, 1, 1024), help="override the preset's layer count")
    ap.add_argument("--num-experts", type=A.Number(int, 1, 4096), help="override the preset's expert count")
    ap.add_argument(
        "--vocab-size", type=A.Number(int, 1, 2**24), help="override the preset's vocabulary size"
    )
    ap.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint in DEST (once the new one is complete)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """`oss-mlx synthetic DEST --config tiny|20b|120b --layout ... --seed N`."""
    args = build_parser().parse_args(argv)

    overrides = {
        k: v
        for k, v in (
            ("num_layers", args.num_layers),
            ("num_experts", args.num_experts),
            ("vocab_size", args.vocab_size),
        )
        if v is not None
    }
    try:
        spec = SyntheticSpec.preset(args.config, **overrides)
        if args.num_experts is not None and spec.experts_per_token > spec.num_experts:
            spec = replace(spec, experts_per_token=spec.num_experts)
        start = time.monotonic()
        last = [0.0]

        def progress(name: str, done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 2.0 or done == total:
                last[0] = now
                print(
                    f"\r{done / 1e9:7.2f} / {total / 1e9:.2f} GB ({100 * done / total:5.1f}%)  "
                    f"{now - start:6.1f}s  {name[:60]:<60}",
                    end="" if done < total else "\n",
                    flush=True,
                )

        out = write_checkpoint(
            args.dest,
            spec,
            args.layout,
            seed=args.seed,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_bytes or None,
            config_style=args.config_style,
            overwrite=args.overwrite,
            progress=progress,
        )
    except FileExistsError:  # the library's advice names its keyword; a user of the CLI needs the flag
        print(
            f"oss-mlx synthetic: error: {args.dest} already holds checkpoint files; pass --overwrite to "
            "replace them",
            file=sys.stderr,
        )
        return 2
    except ValueError as e:  # also a DEST that is a file or holds something else than a checkpoint
        print(f"oss-mlx synthetic: error: {e}", file=sys.stderr)
        return 2
    except ConvertError as e:  # DEST's folder cannot be written, the disk is too small: said in words
        print(f"\noss-mlx synthetic: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a read-only or full disk, a file where the folder should be
        from .cli_args import describe_error

        print(f"\noss-mlx synthetic: error: cannot write {args.dest}: {describe_error(e)}", file=sys.stderr)
        return 1
    print(f"wrote {args.layout} {args.config} checkpoint to {out} in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

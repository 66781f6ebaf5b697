"""`oss-mlx convert SOURCE DEST`: a checkpoint (hub id or folder, any layout) -> the oss-mlx layout.

oss-mlx convert openai/gpt-oss-20b ~/models/gpt-oss-20b                 # reference (exact)
oss-mlx convert openai/gpt-oss-20b ~/models/gpt-oss-20b-small --quality small --verify
oss-mlx convert ./my-finetune ~/models/ft --plan                        # sizes, fit; writes nothing
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .presets import PRESETS, get_preset

if TYPE_CHECKING:
    from rich.console import Console

EXIT_ERROR = 1
EXIT_VERIFY = 3


def build_parser() -> argparse.ArgumentParser:
    from oss_mlx import cli_args as A

    ap = A.parser(
        "oss-mlx convert",
        "Convert a gpt-oss checkpoint (hub repo id or local folder: hub MXFP4, transformers "
        "float fine-tune, OpenAI original) to the oss-mlx layout: one shard per layer, experts as "
        "contiguous byte ranges, checksums and provenance in config.json, the vocabulary included.",
    )
    ap.add_argument("source", help="hub repo id (e.g. openai/gpt-oss-20b) or checkpoint folder")
    ap.add_argument("dest", type=Path, help="output folder (must not exist unless --force)")
    ap.add_argument(
        "--quality",
        default="reference",
        choices=list(PRESETS),
        help="; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()),
    )
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="float dtype of everything that is not MXFP4",
    )
    ap.add_argument("--plan", action="store_true", help="print sizes and whether it fits; write nothing")
    ap.add_argument(
        "--verify",
        action="store_true",
        help="after converting (or instead, when DEST is already a conversion): shard checksums and a "
        "stage-by-stage forward pass against SOURCE",
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="replace DEST if it is an earlier conversion or empty (only once the new one is complete)",
    )
    ap.add_argument("--revision", help="hub revision (branch, tag or commit)")
    ap.add_argument("--cache-dir", help="Hugging Face cache folder (default: huggingface_hub's)")
    ap.add_argument("--context", type=A.CONTEXT, default=8192, help="context length in tokens for --plan")
    ap.add_argument("--verify-tokens", type=A.Number(int, 1, 4096), default=16, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None, out: Console | None = None) -> int:
    """out: a rich Console for the summary table (default stdout; the model store passes stderr)."""
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.markup import escape

    out, err = out or Console(), Console(stderr=True)

    def on_term(signum, frame):  # a kill -TERM cleans up like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        return _run(args, out, err)
    except KeyboardInterrupt:
        err.print(
            f"interrupted: nothing was written to {args.dest}; the source is untouched", highlight=False
        )
        return 130
    except Exception as e:
        from oss_mlx.cli_args import UsageError, describe_error, user_errors

        if not isinstance(e, (*user_errors(), OSError)):
            raise
        err.print(
            f"oss-mlx convert: [bold red]error:[/] {escape(describe_error(e))}",
            highlight=False,
            soft_wrap=True,
        )
        return 2 if isinstance(e, UsageError) else EXIT_ERROR  # a bad DEST is a bad argument
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _run(args, out, err) -> int:
    from oss_mlx.memory import GiB, Machine, MemoryPlan
    from oss_mlx.plan_cli import print_plan

    from . import converter as C
    from .folder import check_dest, is_converted
    from .hub import download, is_repo_id, resolve_source

    preset = get_preset(args.quality)
    verify_only = args.verify and not args.force and not args.plan and is_converted(args.dest)
    if not args.plan and not verify_only:  # fail before any download; convert() checks again
        local = Path(args.source).expanduser()
        check_dest(args.dest, args.force, keep=[local] if local.exists() else [])

    if args.plan and not Path(args.source).expanduser().exists() and is_repo_id(args.source):
        # Planning a hub model needs its config.json only.
        src = download(args.source, args.revision, args.cache_dir, config_only=True)
        from oss_mlx.config import read_config

        config, _ = read_config(src.folder)
        plan = MemoryPlan(config, preset.name, args.context, dtype_bytes=C.DTYPES[args.dtype].size)
        print_plan(plan, Machine.detect(), out)
        out.print(
            f"(sizes from {args.source}'s config.json; the weights were not downloaded)", highlight=False
        )
        return 0

    err.print(f"source: {args.source}", highlight=False)
    src = resolve_source(args.source, args.revision, args.cache_dir)
    if verify_only:
        err.print(f"{args.dest} exists: verifying it against the source (nothing is converted)")
        return _verify(args, out, err, args.dest, src)
    cplan = C.plan_conversion(src.folder, preset, args.dtype)
    mplan = MemoryPlan(cplan.config, preset.name, args.context, dtype_bytes=C.DTYPES[args.dtype].size)

    if args.plan:
        print_plan(mplan, Machine.detect(), out)
        import shutil

        parent = args.dest.absolute().parent
        while not parent.exists():
            parent = parent.parent
        free = shutil.disk_usage(parent).free
        out.print(
            f"conversion: {src.folder} ({cplan.layout}) -> {args.dest} ({preset.name}, {args.dtype}): "
            f"{len(cplan.shards)} shards, {cplan.tensor_bytes:,} bytes ({cplan.tensor_bytes / GiB:.2f} GiB); "
            f"{free / GiB:.1f} GiB free on the destination disk"
            + ("" if free > cplan.file_bytes_estimate else " [red](NOT ENOUGH)[/]")
            + (f"; [yellow]{args.dest} exists (--force replaces it)[/]" if args.dest.exists() else ""),
            highlight=False,
        )
        return 0

    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    total = cplan.tensor_bytes
    err.print(
        f"converting {src.folder} ({cplan.layout}) -> {args.dest.absolute()}: preset {preset.name}, "
        f"{args.dtype}, {len(cplan.shards)} shards, {total / 1e9:.2f} GB",
        highlight=False,
    )
    start = time.monotonic()
    with Progress(
        TextColumn("{task.description}", table_column=None),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task("converting", total=total)

        def on_progress(name: str, n: int) -> None:
            progress.update(task, advance=n, description=name[:48].ljust(48))

        result = C.convert(src, args.dest, cplan, force=args.force, on_progress=on_progress)
        progress.update(task, description="converted".ljust(48))
    seconds = time.monotonic() - start
    _summary(out, result, mplan, seconds, src)

    if args.verify:
        return _verify(args, out, err, result.dest, src)
    return 0


def _verify(args, out, err, dest: Path, src) -> int:
    from .verify import VerifyError, check_shards, verify_logits

    try:
        err.print("verify: checking shard checksums …")
        shards = check_shards(dest)
        err.print(f"verify: {args.verify_tokens}-token forward, converted vs source …")
        report = verify_logits(dest, src.folder, args.verify_tokens)
    except VerifyError as e:
        err.print(f"[bold red]verify FAILED:[/] {e}", highlight=False, soft_wrap=True)
        return EXIT_VERIFY
    end = report.end_to_end
    if report.allowed == 0.0:
        what = f"every stage and the logits identical to the source's ({end.tokens} tokens)"
    else:
        worst = report.worst
        what = (
            f"every stage identical to the source quantized in memory; largest deviation from the "
            f"source {worst.deviation:.4f} ({worst.name}) ≤ {report.allowed}; end to end: relative RMS "
            f"{end.rel_rms:.4f}, top-1 agreement {end.top1_agree:.0%} ({end.tokens} tokens)"
        )
    out.print(f"[green]verify OK[/]: {len(shards)} shard checksums match; {what}", highlight=False)
    return 0


def _summary(out, result, mplan, seconds: float, src) -> None:
    from rich.table import Table

    from oss_mlx.memory import GiB

    t = Table(title="converted", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("where", str(result.dest))
    t.add_row("source", f"{src.name}" + (f" @ {src.revision}" if src.revision else ""))
    t.add_row("preset", f"{result.plan.preset.name} ({result.plan.preset.summary}); {result.plan.dtype}")
    t.add_row(
        "size",
        f"{result.bytes_written:,} bytes ({result.bytes_written / GiB:.2f} GiB) "
        f"in {len(result.shards)} shards",
    )
    t.add_row("time", f"{seconds:.1f} s ({result.bytes_written / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    comps = mplan.weights
    t.add_row("components", ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in comps.items()))
    out.print(t)


def run(argv: list[str] | None = None) -> None:  # pragma: no cover
    sys.exit(main(argv))

"""The command line's side of a distributed run: `--hosts` / `--distributed` for chat, serve and
generate, loading on every rank, and `oss-mlx plan --hosts`.

Two ways to start one (docs/DISTRIBUTED.md):
    oss-mlx chat --model FOLDER --hosts hosts.json      this process is rank 0 and starts the others
    mlx.launch --hostfile hosts.json -- oss-mlx generate --model FOLDER "prompt"
                                                        every rank runs the command; rank 0 prints,
                                                        serves or chats, the others only compute
"""

from __future__ import annotations

import argparse
import sys

from .. import cli_args as A
from .. import safetensors_file as st
from ..machine import GiB, Machine
from ..memory import DEFAULT_CONTEXT
from .errors import DistributedError
from .hosts import Hostfile, HostsError, Launch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("several machines (docs/DISTRIBUTED.md)")
    g.add_argument(
        "--hosts",
        type=A.non_empty("hosts.json"),
        metavar="FILE",
        help="hosts.json (mlx.launch's hostfile): start a rank on each host, this process being rank 0",
    )
    g.add_argument(
        "--distributed",
        choices=("auto", "pipeline", "tensor"),
        default="auto",
        help="split by layers (pipeline) or heads and experts (tensor); auto: the planner chooses",
    )
    g.add_argument(
        "--plan-context",
        type=A.CONTEXT,
        default=DEFAULT_CONTEXT,
        metavar="TOKENS",
        help=f"context the memory split is planned for (default {DEFAULT_CONTEXT})",
    )


def requested(args: argparse.Namespace) -> bool:
    """Whether this run is distributed: --hosts given, or started as one rank (mlx.launch)."""
    from .group import launched

    return bool(getattr(args, "hosts", None)) or launched()


def is_worker() -> bool:
    """Started by a launcher as a rank other than 0 (decided before anything binds a port)."""
    import os

    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    return rank.strip() not in ("", "0")


def load(model_path: str, args: argparse.Namespace):
    """(model, tokenizer) on rank 0; the other ranks compute until rank 0 is done, then exit here."""
    from ..tokenizer import load_tokenizer
    from .group import connect_timeout, heartbeat_timeout, launched
    from .runtime import Options, start

    mode = None if args.distributed == "auto" else args.distributed
    launch = None
    connect_timeout(), heartbeat_timeout()  # a bad setting is refused before any rank starts
    if args.hosts:
        if launched():
            raise DistributedError(
                "--hosts starts the ranks itself: under mlx.launch, drop it (or run without mlx.launch)"
            )
        hostfile = Hostfile.read(args.hosts)
        worker_args = ["--model", str(model_path), "--distributed", args.distributed]
        worker_args += ["--plan-context", str(args.plan_context)]
        launch = Launch(hostfile, worker_args)
        for env, host in zip(launch.envs, hostfile.hosts):
            if host.memory_gb is not None:  # the planner reads each rank's budget from it
                env["OSS_MLX_MEMORY_GB"] = str(host.memory_gb)
        launch.prepare_self()
        launch.start()
    runtime = start(model_path, Options(mode=mode, context=args.plan_context), launch)
    if launch is not None:
        launch.on_failure = runtime.fail
    from ..runtime import runtime_of

    return runtime.model, load_tokenizer(runtime_of(runtime.model).info.path)


# ---- oss-mlx plan --hosts -----------------------------------------------------------------------


def budgets_of(hostfile: Hostfile) -> tuple[list[int], list[str]]:
    """Each host's budget (bytes) and where it comes from."""
    here = Machine.detect()
    budgets, notes = [], []
    for i, h in enumerate(hostfile.hosts):
        if h.memory_gb is not None:
            budgets.append(int(h.memory_gb * 1e9))
            notes.append("memory_gb in hosts.json")
        else:
            budgets.append(here.working_set_bytes)
            notes.append("this machine's" if i == 0 else "assumed like this machine (set memory_gb)")
    return budgets, notes


def print_plan(
    config, section: dict, hostfile: Hostfile, mode: str | None, context: int, console=None
) -> int:
    from rich.console import Console
    from rich.table import Table

    from .plan import PlanError, make_plan

    console = console or Console()
    budgets, notes = budgets_of(hostfile)
    dtype_bytes = st.ITEMSIZE[st.FLOAT_NAMES.get(section.get("dtype"), "BF16")]
    quant = section.get("quantization")
    try:
        plan = make_plan(
            config,
            budgets,
            mode=mode,
            backend=hostfile.backend,
            context=context,
            quantization=quant,
            dtype_bytes=dtype_bytes,
        )
    except PlanError as e:
        console.print(f"[red]does not fit:[/] {e}", highlight=False, soft_wrap=True)
        return 1
    t = Table(title=f"{plan.mode} over {plan.world} ranks ({hostfile.backend}), context {context:,} tokens")
    for col in ("rank", "host", "holds", "weights GiB", "KV GiB", "total GiB", "budget GiB", "fits"):
        t.add_column(col, justify="right" if "GiB" in col or col == "rank" else "left")
    for s, h, b, note in zip(plan.shares, hostfile.hosts, budgets, notes):
        t.add_row(
            str(s.rank),
            h.ssh,
            s.describe(config),
            f"{s.weight_bytes / GiB:.2f}",
            f"{s.kv_bytes / GiB:.2f}",
            f"{s.total / GiB:.2f}",
            f"{b / GiB:.2f} ({note})",
            "yes" if s.total <= b else "NO",
        )
    console.print(t)
    console.print(f"why {plan.mode}: {plan.why}", highlight=False, soft_wrap=True)
    console.print(
        "totals include activations of a 512-token prefill chunk and 0.5 GiB of runtime per rank; "
        "at run time each rank's own memory is read and the link is measured (the mode may then differ)",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def plan_main(args: argparse.Namespace, config, section: dict) -> int:
    try:
        hostfile = Hostfile.read(args.hosts)
    except HostsError as e:
        print(f"oss-mlx plan: {e}", file=sys.stderr)
        return 2
    mode = None if args.distributed == "auto" else args.distributed
    return print_plan(config, section, hostfile, mode, args.context)

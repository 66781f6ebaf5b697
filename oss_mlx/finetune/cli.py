"""`oss-mlx finetune`: LoRA on a gpt-oss model (MXFP4 base frozen) from JSONL chat data.

    oss-mlx finetune --model openai/gpt-oss-20b --data train.jsonl --valid valid.jsonl --out my-adapter

OUT receives the adapter (adapter_config.json + adapters.safetensors, loaded by `--adapter OUT` on
chat / serve / generate and by `oss_mlx.load(..., adapter=OUT)`), train_log.jsonl (one JSON object per
step and per evaluation) and checkpoints/step-N (adapter, optimizer state, data position; the last
--keep of them). `--resume` continues from the last checkpoint. Before anything is loaded the memory
planner checks that a step fits (turning gradient checkpointing on when needed) and refuses otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from ..lora import DEFAULT_TARGETS, LoRAConfig, LoRAError, parse_layers, parse_targets

DELAY_ENV = "OSS_MLX_FINETUNE_DELAY"  # testing hook: seconds to sleep after each step (lets a test kill it)
PEFT_FOLDER = "peft"  # the adapter in PEFT's format too, beside ours
MAX_STEPS = 10**9  # MLX counts steps in int32; a billion steps is far beyond any run on one machine


def build_parser() -> argparse.ArgumentParser:
    from .. import cli_args as A
    from ..hub import DEFAULT_MODEL

    positive = A.Number(float, 0.0, low_open=True)
    p = A.parser("oss-mlx finetune", __doc__)
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="hub id, checkpoint or converted folder")
    p.add_argument("--data", required=True, metavar="FILE", help="training conversations (JSONL)")
    p.add_argument("--valid", metavar="FILE", help="held-out conversations (JSONL): eval loss")
    p.add_argument("--out", required=True, metavar="DIR", help="where the adapter and checkpoints go")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=A.Number(int, 1, 4096), default=8, help="the adapter's rank")
    g.add_argument("--alpha", type=positive, default=16.0, help="scale = alpha / rank")
    g.add_argument("--dropout", type=A.Number(float, 0.0, 0.95), default=0.0, help="on the adapter's input")
    g.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="q,k,v,out (or attention), gate_up,down (or experts), router",
    )
    g.add_argument("--layers", type=A.layers, help="layers to adapt, e.g. 0-11,23 (default: all)")
    g.add_argument(
        "--expert-layers", type=A.layers, help="layers whose experts are adapted (default: --layers)"
    )
    g.add_argument("--rslora", action="store_true", help="scale = alpha / sqrt(rank)")
    g = p.add_argument_group("optimization")
    g.add_argument(
        "--steps", type=A.Number(int, 1, MAX_STEPS), help="optimizer steps (default: --epochs over the data)"
    )
    g.add_argument(
        "--epochs",
        type=A.Number(float, 0.0, 1e6, low_open=True),
        default=1.0,
        help="passes over the data (when --steps is not given)",
    )
    g.add_argument("--learning-rate", "--lr", type=positive, default=1e-4, help="peak")
    g.add_argument(
        "--min-learning-rate", type=A.Number(float, 0.0), default=0.0, help="where the cosine ends"
    )
    g.add_argument("--warmup", type=A.NON_NEGATIVE_INT, default=0, help="linear warmup steps")
    g.add_argument("--batch-size", type=A.Number(int, 1, 4096), default=1, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=A.Number(int, 1, 4096), default=1, help="micro-batches per step")
    g.add_argument("--weight-decay", type=A.Number(float, 0.0), default=0.0, help="AdamW's")
    g.add_argument("--grad-clip", type=A.Number(float, 0.0), default=1.0, help="max gradient norm; 0: off")
    g.add_argument(
        "--checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="gradient checkpointing: auto turns it on when a step would not fit otherwise",
    )
    g.add_argument(
        "--seed",
        type=A.SEED_NON_NEGATIVE,
        default=0,
        help="the adapter's initial values, data order, dropout",
    )
    g.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the base's float weights"
    )
    g = p.add_argument_group("data")
    g.add_argument("--max-length", type=A.Number(int, 16, 131072), default=2048, help="tokens per sequence")
    g.add_argument("--truncate", action="store_true", help="cut longer sequences instead of failing")
    g.add_argument("--include-analysis", action="store_true", help="score the chain of thought too")
    g.add_argument(
        "--turns", choices=["all", "last"], default="all", help="which answers of a conversation train"
    )
    g.add_argument(
        "--reasoning-effort",
        choices=["low", "medium", "high"],
        default="medium",
        help="the system message's, where a line gives none",
    )
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=A.POSITIVE_INT, default=50, help="steps between eval losses")
    g.add_argument("--save-every", type=A.POSITIVE_INT, default=100, help="steps between checkpoints")
    g.add_argument("--keep", type=A.POSITIVE_INT, default=3, help="checkpoints kept")
    g.add_argument("--log-every", type=A.POSITIVE_INT, default=1, help="steps between progress lines")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete a previous run in --out and start over")
    g.add_argument(
        "--save-peft", action="store_true", help="also write the adapter in PEFT's format to OUT/peft"
    )
    g.add_argument(
        "--ignore-memory", action="store_true", help="run even if the planner says it will not fit"
    )
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"oss-mlx finetune: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume and args.overwrite:
        return _fail("--resume continues the run in --out, --overwrite deletes it: give one of them")
    if args.min_learning_rate > args.learning_rate:  # the cosine would climb instead of decaying
        return _fail(
            f"--min-learning-rate {args.min_learning_rate:g} is above the peak --learning-rate "
            f"{args.learning_rate:g}: give a smaller one (default 0)"
        )
    if args.steps is not None and args.warmup >= args.steps:
        return _fail(
            f"--warmup {args.warmup} must be below --steps {args.steps} (the peak would never be reached)"
        )
    from ..cli_args import DELAY_SECONDS, UsageError, env_number

    try:
        args.delay = env_number(DELAY_ENV, DELAY_SECONDS, 0.0, "seconds")
    except UsageError as e:
        return _fail(str(e))
    out = Path(args.out).expanduser()
    try:
        with contextlib.ExitStack() as held:  # the run lock, released when the run ends
            return run(args, out, held)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {_what_is_kept(out)}", file=sys.stderr)
        return 130


def _lock_run(out: Path, held: contextlib.ExitStack) -> bool:
    """Whether this process now holds `out`'s run lock (an flock on the folder itself, so no file of
    ours sits among the user's), until `held` closes. Two runs writing one folder would mix their
    checkpoints, and one's clean-up would take the other's save in progress."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _what_is_kept(out: Path) -> str:
    from .trainer import complete_checkpoints

    kept = complete_checkpoints(out) if out.is_dir() else []
    if kept:
        return f"the last checkpoint ({kept[-1].name}) is kept: continue with --resume"
    return "no checkpoint was written yet, so there is nothing to resume: start again with --overwrite"


def run(args, out: Path, held: contextlib.ExitStack) -> int:
    from rich.console import Console

    from ..adapters import CONFIG_FILE, OURS_FILE
    from ..convert.folder import DestError, check_dest
    from ..machine import Machine
    from ..memory import TrainingPlan, choose_checkpointing, gib
    from ..plan_cli import config_of
    from ..tokenizer import load_tokenizer
    from .data import DataError, RenderOptions, load_dataset
    from .trainer import CHECKPOINTS, LOG_FILE, TrainConfig, clean_partial, complete_checkpoints

    console = Console(stderr=True, highlight=False)
    say = console.print

    # ---- the output folder: never lose a previous run by accident ---------------------------------
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not _lock_run(out, held):
        return _fail(
            f"another oss-mlx finetune is writing to {out} now: wait for it to end (or stop it), or give "
            "another --out",
            1,
        )
    clean_partial(out)  # first: a checkpoint a killed save had moved aside is put back
    previous = complete_checkpoints(out) if out.is_dir() else []
    if args.resume:
        if not previous:
            start = (
                "--overwrite instead of --resume"
                if out.is_dir() and any(out.iterdir())
                else "without --resume"
            )
            return _fail(f"--resume: {out} holds no checkpoint to resume (start again with {start})")
    elif out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            return _fail(
                f"{out} is not empty (a previous run?): pass --resume to continue it, --overwrite to "
                "delete it and start over, or another --out"
            )
        run_files = {CHECKPOINTS, LOG_FILE, CONFIG_FILE, OURS_FILE, PEFT_FOLDER}
        others = sorted(p.name for p in out.iterdir() if p.name not in run_files)
        try:  # --overwrite replaces a run, never a folder of the user's own files
            check_dest(
                out,
                True,
                ours=lambda _: not others,
                ours_is=f"a training run's folder (it also holds {', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''})",
                flag="--overwrite",
            )
        except DestError as e:
            return _fail(str(e))
        for path in out.iterdir():  # the folder itself stays: it holds this run's lock
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    # ---- model config, data: checked before the weights are loaded ---------------------------------
    from ..errors import LoadError
    from ..loader import check_vocabulary
    from ..model_store import resolve

    try:
        # config.json alone for now: a hub id not on this machine is downloaded only once the plan fits
        described = resolve(args.model, need="config")
        config, raw = config_of(str(described))
        tokenizer = load_tokenizer(described)
        check_vocabulary(config, tokenizer.vocab_size, described)
        layers = parse_layers(args.layers, config.num_layers)
        expert_layers = parse_layers(args.expert_layers, config.num_layers, "--expert-layers")
        lora = LoRAConfig(
            rank=args.rank,
            alpha=args.alpha,
            dropout=args.dropout,
            targets=parse_targets(args.targets),
            layers=layers,
            expert_layers=expert_layers,
            rslora=args.rslora,
        )
        options = RenderOptions(
            reasoning_effort=args.reasoning_effort,
            include_analysis=args.include_analysis,
            turns=args.turns,
            max_length=args.max_length,
            truncate=args.truncate,
        )
        train = load_dataset(args.data, tokenizer, options)
        valid = load_dataset(args.valid, tokenizer, options) if args.valid else None
    except (LoadError, DataError, LoRAError) as e:  # the config, checkpoint and vocabulary errors too
        return _fail(str(e), 1)
    say(
        f"data: {len(train)} sequences, {train.tokens:,} tokens ({train.targets:,} scored)"
        + (f", {train.truncated} truncated" if train.truncated else "")
        + (f"; valid: {len(valid)} sequences, {valid.targets:,} scored tokens" if valid else "")
    )
    batches = math.ceil(len(train) / args.batch_size)
    if args.grad_accum > batches:  # one step would go through the data more than once
        return _fail(
            f"--grad-accum {args.grad_accum} is more than the {batches} batches of {args.batch_size} "
            f"the {len(train)} training sequences make: a step would see sequences twice; give at most "
            f"--grad-accum {batches}"
        )
    per_epoch = math.ceil(batches / args.grad_accum)
    steps = args.steps or max(1, math.ceil(per_epoch * args.epochs))
    if steps > MAX_STEPS:
        return _fail(f"--epochs {args.epochs:g} makes {steps:,} steps, over {MAX_STEPS:,}: give fewer epochs")
    if args.warmup >= steps:
        return _fail(
            f"--warmup {args.warmup} must be below the run's {steps} steps (the peak would never be reached)"
        )

    # ---- the memory plan ----------------------------------------------------------------------------
    from ..lora import parameter_count

    sites = lora.sites(config.num_layers)
    longest = max(len(s.tokens) for s in train.sequences)
    section = raw.get("oss_mlx") or {}
    plan = TrainingPlan(
        config,
        parameter_count(sites, config),
        length=longest,
        batch=min(args.batch_size, len(train)),  # an epoch's batches hold at most every sequence
        quantization=section.get("quantization"),
        dtype_bytes=4 if args.dtype == "float32" else 2,
        grad_accum=args.grad_accum,
        scored=max(s.targets for s in train.sequences),
    )
    machine = Machine.detect()
    try:
        plan, why = choose_checkpointing(plan, machine.working_set_bytes, args.checkpointing)
    except MemoryError as e:
        if not args.ignore_memory:
            return _fail(f"{e} (or --ignore-memory to try anyway)", 1)
        plan, why = plan.replace(checkpointing=args.checkpointing != "off"), "as asked (--ignore-memory)"
    say(f"memory: {plan.summary()}; budget {gib(machine.working_set_bytes)} ({machine.how}); {why}")
    say(f"LoRA: {len(sites)} sites, {plan.adapter_parameters:,} trainable values (rank {lora.rank})")

    tconfig = TrainConfig(
        lora=lora,
        steps=steps,
        learning_rate=args.learning_rate,
        min_learning_rate=args.min_learning_rate,
        warmup=args.warmup,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip or None,
        checkpointing=plan.checkpointing,
        seed=args.seed,
    )

    # ---- the model ----------------------------------------------------------------------------------
    import mlx.core as mx

    from ..loader import load_model
    from .trainer import Trainer, TrainError, read_state, write_final

    try:
        folder = resolve(args.model, say=lambda text: say(text, style="bold"))
    except LoadError as e:
        return _fail(str(e), 1)
    identity = {
        "model": str(folder.resolve()),
        "dtype": args.dtype,
        "render": {
            k: getattr(options, k)
            for k in ("reasoning_effort", "include_analysis", "turns", "max_length", "truncate")
        },
    }
    say(f"loading {args.model} …")
    try:
        model, _ = load_model(folder, dtype=mx.float32 if args.dtype == "float32" else mx.bfloat16)
        trainer = Trainer(model, tconfig, train, valid)
    except (LoadError, LoRAError) as e:
        return _fail(str(e), 1)

    log_path = out / LOG_FILE
    if args.resume:
        last = previous[-1]
        try:
            state = read_state(last)
            problems = _resume_problems(state, tconfig, identity, train, valid)
            if problems:
                return _fail(f"--resume: {last} was made with other settings: {'; '.join(problems)}", 1)
            trainer.load_checkpoint(last)
        except (TrainError, OSError, KeyError, ValueError) as e:
            before = f" (delete {last.name} to resume from {previous[-2].name})" if len(previous) > 1 else ""
            return _fail(f"--resume: cannot use {last}: {e}{before}", 1)
        _truncate_log(log_path, trainer.step)
        say(
            f"resumed from {last.name}: step {trainer.step} of {steps}, "
            f"data epoch {trainer.order.position.epoch}"
        )
    else:
        log_path.write_text("")

    extra = {"run": identity}
    delay = args.delay
    progress = _Progress(console, steps, trainer.step)
    from ..interrupts import InterruptGuard

    def eval_due(step: int) -> bool:
        return valid is not None and (step == 0 or step % args.eval_every == 0 or step == steps)

    try:
        if eval_due(trainer.step) and not _has_eval(log_path, trainer.step):  # (an interrupted one too)
            loss = trainer.evaluate()
            _log(log_path, {"step": trainer.step, "eval_loss": loss})
            progress.note(f"step {trainer.step}: eval loss {loss:.4f}")
        while trainer.step < steps:
            with InterruptGuard() as guard:
                try:
                    pending = trainer.compute_step()
                except TrainError as e:
                    progress.stop()
                    return _fail(
                        f"{e}: lower --learning-rate (or --alpha) and start again with --overwrite", 1
                    )
                with guard.hold():  # the step's update and its log row: both or neither
                    result = trainer.commit(pending)
                    _log(log_path, _step_row(result))
            if guard.requested:
                raise KeyboardInterrupt
            progress.update(result, args.log_every)
            if eval_due(result.step):
                loss = trainer.evaluate()
                _log(log_path, {"step": result.step, "eval_loss": loss})
                progress.note(f"step {result.step}: eval loss {loss:.4f}")
            if result.step % args.save_every == 0 or result.step == steps:
                trainer.save_checkpoint(out, keep=args.keep, extra=extra)
            if delay:
                time.sleep(delay)
    except KeyboardInterrupt:
        progress.stop()
        if trainer.step and not (out / "checkpoints" / f"step-{trainer.step:06d}").is_dir():
            trainer.save_checkpoint(out, keep=args.keep, extra=extra)
        raise
    progress.stop()
    write_final(trainer, out, extra=extra)
    if args.save_peft:
        from ..adapters import AdapterError, save_adapter

        try:
            save_adapter(trainer.model, out / PEFT_FOLDER, format="peft")
        except AdapterError as e:
            say(f"[yellow]not written in PEFT's format: {e}[/]")
    say(f"done: {trainer.step} steps; adapter in {out} (use it with --adapter {out})")
    return 0


def _resume_problems(state: dict, config, identity: dict, train, valid) -> list[str]:
    problems = []
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    for key, value in config.to_dict().items():
        if key == "steps":
            if value < state["step"]:
                problems.append(f"--steps {value} is below the checkpoint's step {state['step']}")
            elif saved.get("steps") != value:
                problems.append(
                    f"steps was {saved.get('steps')} (the cosine schedule depends on it), now {value}"
                )
        elif saved.get(key) != value:
            problems.append(f"{key} was {saved.get(key)!r}, now {value!r}")
    run = state.get("run") if isinstance(state.get("run"), dict) else {}
    for key, value in identity.items():
        if run.get(key) != value:
            problems.append(f"{key} was {run.get(key)!r}, now {value!r}")
    if state.get("train_sha256") != train.sha256:
        problems.append("the training data changed")
    if (state.get("valid_sha256") or None) != (valid.sha256 if valid is not None else None):
        problems.append("the validation data changed")
    return problems


def _step_row(result) -> dict:
    return {
        "step": result.step,
        "loss": result.loss,
        "learning_rate": result.learning_rate,
        "tokens": result.tokens,
        "targets": result.targets,
        "seconds": round(result.seconds, 4),
    }


def _has_eval(path: Path, step: int) -> bool:
    """Whether the log holds step's eval loss (a run interrupted while evaluating does not)."""
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step") == step and "eval_loss" in row:
            return True
    return False


def _log(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log rows of steps after the checkpoint (they are trained again)."""
    from ..atomic import write_text

    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the kill
    write_text(path, "".join(k + "\n" for k in kept))


def duration(seconds: float) -> str:
    """H:MM:SS, with days in front past 24 hours ("3d 04:05:06"): a clock would wrap."""
    days, rest = divmod(int(max(0.0, seconds)), 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


class _Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, console, total: int, done: int):
        self.console, self.total, self.start_step = console, total, done
        self.start = time.perf_counter()
        self.tokens = 0
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  lr {task.fields[lr]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task("train", total=total, completed=done, loss="-", tps="-", lr="-")
            self.bar.start()

    def update(self, r, every: int) -> None:
        self.tokens += r.tokens
        elapsed = time.perf_counter() - self.start
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        left = (self.total - r.step) * elapsed / max(1, r.step - self.start_step)
        if self.bar is not None:
            self.bar.update(
                self.task,
                completed=r.step,
                loss=f"{r.loss:.4f}",
                tps=f"{tps:,.0f}",
                lr=f"{r.learning_rate:.2e}",
            )
        elif r.step % every == 0 or r.step == self.total:
            self.console.print(
                f"step {r.step}/{self.total}  loss {r.loss:.4f}  lr {r.learning_rate:.2e}  "
                f"{tps:,.0f} tok/s  eta {duration(left)}"
            )

    def note(self, text: str) -> None:
        self.console.print(text)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

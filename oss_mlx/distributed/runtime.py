"""Start-up, rank roles and fault handling of a distributed run.

`start()` runs on every rank: join the group, open the control link, gather each rank's memory, plan
the split (rank 0 measures the link and decides; every rank computes the same shares), check that
every rank has the same model, code and plan, load this rank's part. Rank 0 gets a `Runtime` back
and goes on with the tokenizer, sessions, chat or server; the others enter the command loop
(protocol.serve) and exit when rank 0 stops them, or at once when rank 0 or the link is gone.

A failing step at start-up (a missing checkpoint on one machine, a plan that does not fit) is agreed
on by all ranks (an all_sum of failures), so every rank stops with the reason instead of waiting in
the next collective.

On rank 0 every step of the model's scheduler runs on one compute thread (`Runtime.run`, called by
the model's runtime: oss_mlx/runtime.py `run_step`): the stepping thread waits on it while watching
the group, so when a rank dies or hangs the request ends with a DistributedError within the heartbeat
timeout, whatever collective the compute thread is stuck in;
the workers are told to exit, processes we started are killed, and rank 0 exits with status 1 at the
end (os._exit: a thread blocked in a collective cannot be joined).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import hashlib
import json
import os
import queue
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import safetensors_file as st
from ..errors import LoadError
from ..loader import Checkpoint, open_checkpoint
from ..machine import Machine
from ..memory import DEFAULT_CONTEXT
from ..model_store import resolve
from ..runtime import runtime_of
from . import protocol
from .group import (
    ControlLink,
    DistributedError,
    Group,
    JoinWatch,
    connect_timeout,
    decode_text,
    encode_text,
    init_group,
    measure_latency,
    worker_exit,
)
from .plan import MODES, Plan, PlanError, make_plan

STOP_TIMEOUT = 10.0  # seconds the workers get to take the stop command at the end
# Seconds start-up may go on once a rank's failure is known: enough for every rank to agree on it and
# say why (_Agreement); past it the rank left waiting in a collective (one that hangs) is given up.
START_GRACE = 10.0
AFTER_FAILURE_TIMEOUT = 5.0  # a step run after a failure (Runtime.run) takes no collective: seconds
REPORT_ENV = "OSS_MLX_DISTRIBUTED_REPORT"  # a folder: each rank writes rank-N.json (memory, share) there


@dataclass
class Options:
    mode: str | None = None  # "pipeline" | "tensor" | None (the planner chooses)
    context: int = DEFAULT_CONTEXT  # planned for
    dtype: mx.Dtype | None = None
    quantize_experts: bool = True


def peak_rss() -> int:
    """This process's peak resident set, bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss()


def _budget() -> int:
    return Machine.detect().working_set_bytes


class _ComputeThread:
    """One thread that runs every step of rank 0's model (a daemon: it may be stuck in a collective
    for good after a failure). Not a ThreadPoolExecutor: those refuse work once the interpreter
    begins to exit, and the planned stop of the workers runs at exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # submitted and not finished (a job stuck in a collective stays counted)
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="oss-mlx-compute", daemon=True).start()

    @property
    def idle(self) -> bool:
        with self._lock:
            return self._pending == 0

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending += 1
        self._jobs.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(e)
            finally:
                with self._lock:
                    self._pending -= 1


class Runtime:
    """Rank 0's view of the group (module docstring)."""

    def __init__(self, group: Group, launch=None) -> None:
        self.group = group
        self.launch = launch  # hosts.Launch when oss-mlx started the workers (--hosts), else None
        self.link: ControlLink | None = None
        self.model = None
        self.plan: Plan | None = None
        self.controller: protocol.Controller | None = None
        self.failure: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self._failed = threading.Event()
        self._starting = True
        self._closed = False
        self._told = False  # the failure was raised to the caller (the request ended with it)
        self._started = threading.Event()  # start() returned or raised (ends the start-up grace)
        self._compute = _ComputeThread()
        atexit.register(self.close)

    # -- faults ----------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._failed.set()
        if self._starting:  # start() reports it once every rank agreed, unless it waits for good
            _deadline(START_GRACE, self._started, lambda: self._give_up(reason))
            return
        if self.controller is not None:
            self.controller.refusal = self.error
        if self.link is not None:
            self.link.abort_all(reason)
        if self.launch is not None:
            self.launch.kill()
        for callback in self.on_failure:
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 - a callback must not hide the failure
                pass

    def error(self) -> DistributedError:
        self._told = True
        return DistributedError(f"the distributed run failed: {self.failure}; the request was ended")

    def _wait(self, future: concurrent.futures.Future, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.failure is not None:
                raise self.error()
            try:
                return future.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                if deadline is not None and time.monotonic() > deadline:
                    self.fail(f"no answer within {timeout:.0f} s")
                continue
            except DistributedError:
                raise
            except Exception as e:
                # An MLX error in a collective ("[ring] connection to a peer was lost") comes before the
                # link says which rank: wait a moment for that. Any other error during a step leaves
                # the workers mid-command: the group cannot go on either way.
                if not self._failed.wait(2.0):
                    self.fail(f"rank 0: {type(e).__name__}: {e}")
                raise self.error() from None

    def run(self, fn: Callable, *args, timeout: float | None = None):
        """fn(*args) on the compute thread, watched: a failure of the group raises a DistributedError
        here (oss_mlx/runtime.py steps the scheduler through this)."""
        if self.failure is not None:
            return self._run_failed(fn, args)
        return self._wait(self._compute.submit(fn, *args), timeout)

    def _run_failed(self, fn: Callable, args: tuple):
        """fn after a failure, when the compute thread is free (not stuck in a collective): every
        command raises the failure before any collective now (Controller.refusal), so a scheduler
        step ends the sequences submitted since with it rather than leaving them queued for good."""
        if not self._compute.idle:
            raise self.error()
        try:
            return self._compute.submit(fn, *args).result(timeout=AFTER_FAILURE_TIMEOUT)
        except DistributedError:
            raise
        except Exception:  # noqa: BLE001 - the model's state after a failure: the failure says it
            raise self.error() from None

    def _give_up(self, reason: str) -> None:
        """Start-up waits in a collective that will not end (a rank hangs or is gone): say why, stop
        the ranks we started and end this process (nothing can interrupt that wait)."""
        print(f"oss-mlx: the distributed start-up failed: {reason}", file=sys.stderr, flush=True)
        if self.link is not None:
            self.link.abort_all(reason)
        if self.launch is not None:
            self.launch.kill()
        os._exit(1)

    def memory(self) -> list[dict]:
        """Per rank: MLX's peak memory and the peak RSS, bytes (the others' as of their last
        heartbeat, at most HEARTBEAT_INTERVAL old)."""
        out = [{"rank": 0, "peak_memory": mx.get_peak_memory(), "peak_rss": peak_rss()}]
        for r in range(1, self.group.size):
            peer = self.link.peers.get(r) if self.link is not None else None
            out.append(
                {
                    "rank": r,
                    "peak_memory": peer.peak_memory if peer else 0,
                    "peak_rss": peer.peak_rss if peer else 0,
                }
            )
        return out

    # -- the end ---------------------------------------------------------------------------------

    def _settle(self, timeout: float) -> None:
        """Wait (bounded) until the thread stepping the model's scheduler has no sequence left: a
        reply interrupted at exit (Ctrl-C) still takes steps to leave, which must reach the workers
        before they are stopped."""
        from ..runtime import runtime_of

        model_runtime = runtime_of(self.model)
        deadline = time.monotonic() + timeout
        while model_runtime.busy and self.failure is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        """Stop the workers (a planned end) or, after a failure, end this process (status 1)."""
        if self._closed:
            return
        self._closed = True
        if self.failure is None and self.link is not None:
            self.link.closing()  # the workers leave once stopped: not a failure
        if self.failure is None and self.controller is not None:
            self._settle(STOP_TIMEOUT)
            try:
                self.run(self.controller.stop, timeout=STOP_TIMEOUT)
            except DistributedError:
                pass
        if self.failure is None:
            if self.link is not None:
                self.link.stop()
            if self.launch is not None:
                self.launch.wait()
            return
        if self.launch is not None:
            self.launch.kill()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # the compute thread may be blocked in a collective for good


# ---- start-up -------------------------------------------------------------------------------------


class _Agreement:
    """Every rank runs the same fallible step; all go on only if all succeeded."""

    def __init__(self, group: Group, link: ControlLink) -> None:
        self.group, self.link = group, link

    def __call__(self, what: str, fn: Callable):
        try:
            result, error = fn(), None
        except (DistributedError, PlanError, LoadError, ValueError, OSError, RuntimeError) as e:
            result, error = None, f"{what}: {e}"
        if error and self.group.rank != 0:
            self.link.report(error)
        failed = int(self.group.sum([1 if error else 0])[0])
        if not failed:
            return result
        if self.group.rank != 0:
            worker_exit(error or f"another rank could not {what}")
        deadline = time.monotonic() + 3.0
        expected = failed - (1 if error else 0)
        while len(self.link.reports) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        reports = ([(0, error)] if error else []) + self.link.reports
        raise DistributedError(_merge(self.link, reports) or f"a rank could not {what}")


def _merge(link: ControlLink, reports: list[tuple[int, str]]) -> str:
    """The ranks' reasons in one line, each said once (every rank refuses a plan for the same reason)."""
    ranks: dict[str, list[int]] = {}
    for rank, text in reports:
        ranks.setdefault(text, []).append(rank)
    parts = []
    for text, who in ranks.items():
        if len(who) == 1:
            parts.append(f"{'rank 0' if who[0] == 0 else link.describe(who[0])}: {text}")
        else:
            parts.append(f"ranks {', '.join(str(r) for r in sorted(who))}: {text}")
    return "; ".join(parts)


FINGERPRINT_BYTES = 1 << 20


def _fingerprint(path: Path) -> dict:
    """A safetensors file's size, header, and sha256 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(0, size - FINGERPRINT_BYTES))
        h.update(f.read(FINGERPRINT_BYTES))
    header = st.read_header(path)
    return {"size": size, "header": header.tensors, "metadata": header.metadata, "sha256": h.hexdigest()}


def digest(x) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()


class CheckpointSource:
    """Where every rank's weights come from: a checkpoint folder (any layout) at the same path on
    each machine, or a hub id, which each machine resolves by the model store's rule. `start` uses
    find() (optional), open(), then config, quantization, dtype_bytes, identity(), build().
    (benchmarks/distributed_bench.py has another source: random weights made in memory.)"""

    def __init__(self, path: str | os.PathLike, options: Options) -> None:
        self.path, self.options = path, options
        self.folder: Path | None = None
        self.ckpt: Checkpoint | None = None

    def find(self) -> None:
        """The folder on this machine (model_store.resolve: a hub id's first use downloads and
        converts it once)."""
        self.folder = resolve(self.path)

    def open(self) -> None:
        from .shard_load import activation_dtype

        if self.folder is None:
            self.find()
        self.ckpt = open_checkpoint(self.folder, self.options.quantize_experts)
        self.config = self.ckpt.config
        self.quantization = (self.ckpt.raw.get("oss_mlx") or {}).get("quantization")
        self.dtype_bytes = activation_dtype(self.ckpt, self.options.dtype).size

    def identity(self) -> tuple[str, str]:
        """(a digest of the model: config and weights; a one-line description)."""
        ckpt = self.ckpt
        section = ckpt.raw.get("oss_mlx") or {}
        if section.get("shards"):
            weights = {"shards": section["shards"]}  # sha256 of every shard, recorded at conversion
        else:  # no checksums in other layouts: headers, sizes and a fingerprint of the bytes (not all
            # of them: hashing a 65 GB checkpoint at every start would take minutes)
            files = sorted(set(ckpt.tensors.file_of.values()))
            weights = {path.name: _fingerprint(path) for path in files}
        created = section.get("created", "")
        about = f"{ckpt.layout} {ckpt.folder.name}" + (f" converted {created}" if created else "")
        model = {"config": ckpt.config.to_hf_dict(), "layout": ckpt.layout, "weights": weights}
        return digest(model), about

    def build(self, plan: Plan, group: Group):
        from .shard_load import build_rank_model

        model, _ = build_rank_model(self.ckpt, plan, group, self.options.dtype)
        return model


def _identity(source, plan: Plan) -> tuple[list[str], str]:
    """(digests of code, model and plan; a one-line description) of this rank."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("oss-mlx")
    except PackageNotFoundError:
        ours = "0"
    code = f"oss-mlx {ours}, mlx {mx.__version__}, protocol {protocol.HEADER}+{protocol.INLINE}"
    model, about = source.identity()
    return [digest(code), model, digest(plan.as_dict())], f"{about}; {code}"[:200]


def _check_same(group: Group, link: ControlLink, source, plan: Plan) -> None:
    digests, about = _identity(source, plan)
    mine = np.frombuffer(bytes.fromhex("".join(digests)), dtype=np.uint8).astype(np.int32)
    every = group.gather(np.concatenate([mine, encode_text(about)]))
    if group.rank != 0:
        ok = group.broadcast(np.zeros(1, np.int32))[0]
        if not ok:
            worker_exit("this rank's model, code or plan differs from rank 0's (rank 0 says which)")
        return
    problems = []
    for r in range(1, group.size):
        theirs = every[r]
        for i, what in enumerate(("code version", "model (config and weights)", "plan")):
            if not np.array_equal(theirs[32 * i : 32 * (i + 1)], every[0][32 * i : 32 * (i + 1)]):
                problems.append(
                    f"{link.describe(r)} has another {what}: {decode_text(theirs[96:])!r} there, "
                    f"{decode_text(every[0][96:])!r} on rank 0"
                )
    group.broadcast(np.array([0 if problems else 1], np.int32))
    if problems:
        raise DistributedError(
            "the ranks do not run the same thing: "
            + "; ".join(problems)
            + ". Copy the same converted folder to every machine (its config.json records each shard's "
            "sha256) and install the same oss-mlx and mlx."
        )


def _report(group: Group, plan: Plan, baseline: int, loaded: float) -> None:
    folder = os.environ.get(REPORT_ENV)
    if not folder:
        return
    share = plan.shares[group.rank]
    data = {
        "rank": group.rank,
        "world": group.size,
        "mode": plan.mode,
        "share": plan.as_dict()["shares"][group.rank],
        "planned_weight_bytes": share.weight_bytes,
        "baseline_rss": baseline,
        "rss_after_load": current_rss(),
        "peak_rss_after_load": peak_rss(),
        "load_seconds": loaded,
    }
    path = Path(folder) / f"rank-{group.rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def first_on_its_host(group: Group) -> bool:
    """Whether no lower rank runs on this machine (by host name): it resolves a hub id first, so that
    a first use downloads and converts once per machine, not once per rank."""
    import socket

    mine = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:4], "little") >> 1
    hosts = [int(h) for h in group.gather([mine])[:, 0]]
    return hosts.index(mine) == group.rank


def _on_sigterm(runtime: Runtime) -> Callable:
    """Rank 0's SIGTERM handler. mlx.launch stops every rank as soon as one ends, often before this
    rank's link has said which one ended: wait a moment for that, then end the request with it (a
    DistributedError, said by the chat, the server or generate); a SIGTERM without a failure exits,
    one after the error was raised is left to the ending caller (raising again could cut its message)."""

    def handler(signum, frame) -> None:
        if runtime.failure is None:
            runtime._failed.wait(2.0)
        if runtime.failure is None:
            raise SystemExit(128 + signum)
        if not runtime._told:
            raise runtime.error()
        # Else the caller already has the error and is ending (close() exits with status 1).

    return handler


def start(model, options: Options | None = None, launch=None) -> Runtime:
    """Join the group and load this rank's part (module docstring). model: a checkpoint folder (the
    same path on every machine) or a source like CheckpointSource. Rank 0: returns the Runtime, with
    `runtime.model` ready; other ranks: serve rank 0's commands, then exit (never return)."""
    options = options or Options()
    source = model if hasattr(model, "build") else CheckpointSource(model, options)
    if options.mode is not None and options.mode not in MODES:
        raise DistributedError(f"unknown distributed mode {options.mode!r}; choose pipeline or tensor")
    group, link, runtime = _join(launch)
    try:
        model, plan = _load(group, link, source, options)
        if runtime is not None and runtime.failure is not None:
            raise DistributedError(runtime.failure)
    except DistributedError as e:  # agreed by every rank, with the reasons
        if runtime is None:
            worker_exit("start-up failed")
        raise e from None
    except RuntimeError as e:  # MLX's error in a collective: a rank is gone
        if runtime is None:
            worker_exit(f"start-up failed: {e}")
        raise _cause(runtime, e) from None
    finally:
        if runtime is not None:
            runtime._started.set()
    if runtime is None:
        _serve(model, group, link)  # never returns
    return _ready(runtime, model, plan, group, link)


def _deadline(seconds: float, done: threading.Event, expire: Callable[[], None]) -> None:
    """expire() from a thread unless `done` is set within `seconds`."""

    def watch() -> None:
        if not done.wait(seconds):
            expire()

    threading.Thread(target=watch, name="oss-mlx-deadline", daemon=True).start()


def _join(launch) -> tuple[Group, ControlLink, Runtime | None]:
    """Join the group and open the control link; the Runtime on rank 0. Bounded by connect_timeout():
    MLX's set-up waits for every rank for good, so a rank that hangs or dies before it joins ends
    the others (JoinWatch)."""
    wait = connect_timeout()
    started = {w.rank: w.process.pid for w in launch.workers} if launch is not None else {}
    watch = JoinWatch(wait + 5.0, _not_joined(wait), started)
    group = None
    try:
        group = init_group()
        runtime = Runtime(group, launch) if group.rank == 0 else None
        if runtime is None:
            _leave_interrupts_to_rank0()
        link = ControlLink(group, runtime.fail if runtime is not None else worker_exit)
    except RuntimeError as e:  # DistributedError (no group, a rank did not connect) or MLX's
        if group is not None and group.rank != 0 and not isinstance(e, DistributedError):
            worker_exit(f"start-up failed: {e}")
        raise _exited(launch) or e from None
    finally:
        watch.done()
    if runtime is not None:
        runtime.link = link
    return group, link, runtime


def _not_joined(wait: float) -> str:
    return (
        f"the ranks did not all join the group within {wait:.0f} s: a rank hangs or ended at start-up, "
        "or cannot reach the others' addresses (OSS_MLX_CONNECT_TIMEOUT sets the wait)"
    )


def _exited(launch) -> DistributedError | None:
    """A rank we started that has ended, as the error (MLX's own then is only a refused or lost
    connection, and advice that does not apply)."""
    reason = launch.exited() if launch is not None else None
    return DistributedError(reason) if reason else None


def _cause(runtime: Runtime, error: Exception) -> DistributedError:
    """What made a start-up collective fail on rank 0: the rank that ended (the launcher or the
    control link says which) rather than MLX's lost connection."""
    found = _exited(runtime.launch)
    if found is not None:
        return found
    if runtime.failure is not None or runtime._failed.wait(2.0):
        return DistributedError(runtime.failure)
    return DistributedError(f"rank 0: {type(error).__name__}: {error}")


def _leave_interrupts_to_rank0() -> None:
    """A worker ignores SIGINT: a terminal's Ctrl-C reaches every rank of its process group (mlx.launch),
    rank 0 gets it too and stops the others in order; a worker ended mid-collective fails the run."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _load(group: Group, link: ControlLink, source, options: Options):
    """(model, plan) of this rank: find, open, plan and load, every fallible step agreed."""
    agree = _Agreement(group, link)
    baseline = current_rss()
    started = time.perf_counter()
    find = getattr(source, "find", None)
    if find is not None:  # the first rank of each machine, then the others (they find its copy)
        first = first_on_its_host(group)
        agree("find the model", find if first else lambda: None)
        agree("find the model", (lambda: None) if first else find)
    agree("open the model", source.open)
    budgets = [int(b) * 2**20 for b in group.gather([_budget() // 2**20])[:, 0]]
    latency = measure_latency(group, source.config.hidden_size) if options.mode is None else 0.0
    latency = float(group.broadcast(np.array([latency], np.float32), mx.float32)[0])
    plan = agree(
        "plan the split",
        lambda: make_plan(
            source.config,
            budgets,
            mode=options.mode,
            latency=latency if options.mode is None else None,
            backend=group.backend,
            context=options.context,
            quantization=source.quantization,
            dtype_bytes=source.dtype_bytes,
        ),
    )
    _check_same(group, link, source, plan)
    model = agree("load its part of the model", lambda: source.build(plan, group))
    group.barrier()
    _report(group, plan, baseline, time.perf_counter() - started)
    return model, plan


def _serve(model, group: Group, link: ControlLink) -> None:
    """A worker: run rank 0's commands until it stops them, then exit."""
    try:
        protocol.serve(
            model,
            group,
            on_step=lambda: setattr(link, "steps", link.steps + 1),
            wait_wake=link.wait_woken,
        )
    except Exception as e:  # a desynchronised cache, an MLX error: rank 0 hears why, then all stop
        link.report(f"{type(e).__name__}: {e}")
        time.sleep(0.5)
        worker_exit(f"{type(e).__name__}: {e}")
    link.stop()
    worker_exit("stopped by rank 0", 0)


def _ready(runtime: Runtime, model, plan: Plan, group: Group, link: ControlLink) -> Runtime:
    """Rank 0 after the load: signals, the controller, the workers parked until the first request."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        # SIGTERM (mlx.launch stopping every rank, or a user) unwinds: the workers are stopped, or the
        # failure that caused it is said before the process ends.
        signal.signal(signal.SIGTERM, _on_sigterm(runtime))
    runtime.model, runtime.plan = model, plan
    runtime.controller = protocol.Controller(
        group, on_step=lambda: setattr(link, "steps", link.steps + 1), wake=link.wake_all
    )
    runtime.run(runtime.controller.park)  # until the first request
    runtime_of(model).distributed = runtime  # its calls are announced, its steps run on our thread
    runtime._starting = False
    return runtime

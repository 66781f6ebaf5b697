"""The process group: MLX's collectives (any backend) plus a control link that notices a dead rank.

MLX's collectives block until every rank takes part. The ring backend raises when a peer's socket
closes ("[ring] connection to a peer was lost"), but a peer that hangs, or a link that drops without
closing (a cable pulled, a machine frozen), blocks them forever, and NCCL blocks either way. So every
worker also holds one TCP connection to rank 0, outside MLX, on which both sides send a heartbeat
twice a second: a closed connection or HEARTBEAT_TIMEOUT without a beat is a failure, reported to
`on_failure` (rank 0: the request ends with an error, the workers are told to stop) or ending the
worker process (os._exit: its main thread may be blocked inside a collective, which nothing can
interrupt). The same link carries a worker's error messages (a failed load, a desynchronised cache),
so rank 0 can say what went wrong where.

Rank 0's control address is sent to the others through MLX itself (an all_sum), so whatever launched
the ranks (mlx.launch, `--hosts`, mpirun) needs to know nothing about it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import DistributedError

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 5.0  # seconds; OSS_MLX_HEARTBEAT_TIMEOUT overrides it


def heartbeat_timeout() -> float:
    """OSS_MLX_HEARTBEAT_TIMEOUT, read when a link starts (a bad value fails the distributed run only,
    in words, not every command at import)."""
    from ..cli_args import HEARTBEAT_SECONDS, env_number

    return env_number("OSS_MLX_HEARTBEAT_TIMEOUT", HEARTBEAT_SECONDS, HEARTBEAT_TIMEOUT, "seconds, e.g. 5")


CONNECT_TIMEOUT = 120.0  # every worker connects to rank 0 within this (they load nothing before it)


def connect_timeout() -> float:
    """OSS_MLX_CONNECT_TIMEOUT: seconds every rank has to join the group and the control link."""
    from ..cli_args import HEARTBEAT_SECONDS, env_number

    return env_number("OSS_MLX_CONNECT_TIMEOUT", HEARTBEAT_SECONDS, CONNECT_TIMEOUT, "seconds, e.g. 120")


ADDRESS_BYTES = 256


# ---- the MLX group --------------------------------------------------------------------------------


def launched() -> bool:
    """Whether this process was started as one rank of several (mlx.launch, `--hosts`, mpirun)."""
    env = os.environ
    if "MLX_RANK" in env:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", "1")) or 1) > 1


def backend_from_env() -> str:
    """The backend the launcher prepared: mlx.launch and `--hosts` set these variables."""
    env = os.environ
    if env.get("OSS_MLX_BACKEND"):
        return env["OSS_MLX_BACKEND"]
    if "NCCL_HOST_IP" in env:
        return "nccl"
    if "MLX_IBV_DEVICES" in env:
        return "jaccl-ring" if env.get("MLX_JACCL_RING") else "jaccl"
    if "MLX_HOSTFILE" in env:
        return "ring"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi"
    return "any"


def rank0_address_from_env() -> str | None:
    """Rank 0's IP as the launcher wrote it down for the backend (what the others can reach)."""
    env = os.environ
    if env.get("OSS_MLX_CONTROL_HOST"):
        return env["OSS_MLX_CONTROL_HOST"]
    if env.get("NCCL_HOST_IP"):
        return env["NCCL_HOST_IP"]
    if env.get("MLX_JACCL_COORDINATOR"):
        return env["MLX_JACCL_COORDINATOR"].rsplit(":", 1)[0]
    path = env.get("MLX_HOSTFILE")
    if path:
        try:
            hosts = json.loads(open(path).read())
            first = hosts[0][0] if isinstance(hosts[0], list) else hosts[0]
            return str(first).rsplit(":", 1)[0]
        except (OSError, ValueError, IndexError, TypeError):
            return None
    return None


@dataclass
class Group:
    """mx.distributed's group with the backend's name."""

    group: mx.distributed.Group
    backend: str

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def broadcast(self, values: np.ndarray | list, dtype=mx.int32) -> np.ndarray:
        """Rank 0's values on every rank (the others pass the same shape), evaluated."""
        x = mx.array(np.asarray(values))
        if self.rank != 0:
            x = mx.zeros_like(x)
        out = mx.distributed.all_sum(x.astype(dtype), group=self.group)
        mx.eval(out)
        return np.array(out)

    def sum(self, values: np.ndarray | list, dtype=mx.int32) -> np.ndarray:
        """The sum over ranks of each rank's values, evaluated."""
        out = mx.distributed.all_sum(mx.array(np.asarray(values)).astype(dtype), group=self.group)
        mx.eval(out)
        return np.array(out)

    def gather(self, values: np.ndarray | list, dtype=mx.int32) -> np.ndarray:
        """[size, ...]: every rank's values (same shape on all), evaluated."""
        x = mx.array(np.asarray(values)).astype(dtype)
        out = mx.distributed.all_gather(x[None], group=self.group)
        mx.eval(out)
        return np.array(out)

    def barrier(self) -> None:
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=self.group))


def init_group(backend: str | None = None) -> Group:
    """Join the group the launcher prepared (raises DistributedError with advice if there is none)."""
    backend = backend or backend_from_env()
    try:
        g = mx.distributed.init(strict=True, backend=backend)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"cannot join a distributed group with the {backend} backend ({e}). {_advice(e)}"
        ) from None
    if g.size() < 2:
        raise DistributedError(
            f"the {backend} backend started a group of one: start several ranks (mlx.launch -n 2, or --hosts)"
        )
    return Group(g, backend)


# The watcher of `JoinWatch` (argv: seconds, message, the rank's pid, then RANK=PID of the ranks it
# started): EOF on its stdin in time (joined, or the rank is gone) ends it quietly; else, at the
# deadline or once a started rank has ended (and the rank, given 2 s, did not say so itself: it
# cannot while MLX waits), it says why and ends them all.
_JOIN_WATCHER = """
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
seconds, message, parent = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
started = [tuple(int(v) for v in a.split("=")) for a in sys.argv[4:]]
def ended(pid):
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:
            return True
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
deadline = time.monotonic() + seconds
while not select.select([0], [], [], 0.2)[0]:
    gone = [(r, p) for r, p in started if ended(p)]
    if gone and select.select([0], [], [], 2.0)[0]:
        break  # the rank said it itself (with the ended rank's output) and ended
    if gone or time.monotonic() > deadline:
        if gone:
            r, p = gone[0]
            message = (f"rank {r} (pid {p}) ended before the group was formed "
                       "(OSS_MLX_DISTRIBUTED_LOG=1 shows its output)")
        print("oss-mlx: " + message, file=sys.stderr, flush=True)
        for pid in [p for _, p in started] + [parent]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        break
"""


class JoinWatch:
    """Ends this rank, and the ranks it started (`started`: rank -> pid), with `message` unless
    `done()` comes within `seconds`, or as soon as one of those ranks ends. MLX's set-up
    (mx.distributed.init) holds the interpreter lock while it waits for the other ranks, so a rank
    that dies or hangs before it joins would keep this one waiting for good, and no thread of this
    process could step in: a small process of its own watches instead."""

    def __init__(self, seconds: float, message: str, started: dict[int, int] | None = None) -> None:
        import subprocess

        ranks = [f"{r}={p}" for r, p in (started or {}).items()]
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _JOIN_WATCHER, str(seconds), message, str(os.getpid()), *ranks],
            stdin=subprocess.PIPE,
            start_new_session=True,  # (the terminal's Ctrl-C is not for it)
        )

    def done(self) -> None:
        import subprocess

        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass


def _advice(error: Exception) -> str:
    if "bind" in str(error):  # (the ring backend's "Couldn't bind socket")
        return (
            "This rank's address in the hostfile (its \"ips\") is not one of this machine's, or its port "
            "is taken: correct the hostfile (or mlx.launch's --starting-port)."
        )
    return (
        "Start every rank with mlx.launch (e.g. `mlx.launch --backend ring --hostfile hosts.json -- "
        "oss-mlx generate ...`) or let oss-mlx start them: `oss-mlx generate --hosts hosts.json ...`."
    )


def measure_latency(group: Group, width: int, repeats: int = 12) -> float:
    """Median seconds of one all_sum of `width` float32 values (a decode step's size) over the group."""
    x = mx.ones((width,))
    mx.eval(mx.distributed.all_sum(x, group=group.group))  # warm-up: first use sets up buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group.group))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# ---- the control link -----------------------------------------------------------------------------


def encode_text(text: str, size: int = ADDRESS_BYTES) -> np.ndarray:
    raw = text.encode()
    if len(raw) > size:
        raise ValueError(f"{text!r} does not fit {size} bytes")
    return np.frombuffer(raw.ljust(size, b"\0"), dtype=np.uint8).astype(np.int32)


def decode_text(values: np.ndarray) -> str:
    return bytes(int(v) for v in values).rstrip(b"\0").decode()


@dataclass
class Peer:
    """A worker as rank 0 knows it."""

    rank: int
    host: str
    pid: int
    sock: socket.socket
    last_seen: float
    steps: int = 0
    closed: bool = False
    peak_memory: int = 0  # the worker's MLX peak memory (GPU, or CPU buffers), bytes
    peak_rss: int = 0


class ControlLink:
    """Heartbeats and messages between rank 0 and each worker (see the module docstring).

    on_failure(reason) is called once, from a link thread, when a peer dies, hangs or reports an error;
    rank 0 decides what then happens, a worker ends itself unless told otherwise. `stop()` ends the
    link quietly (a planned shutdown)."""

    def __init__(self, group: Group, on_failure: Callable[[str], None], timeout: float | None = None):
        self.group, self.rank, self.world = group, group.rank, group.size
        self.on_failure = on_failure
        self.timeout = heartbeat_timeout() if timeout is None else timeout
        self.steps = 0  # this rank's completed steps (a worker sends it with each beat)
        self.peers: dict[int, Peer] = {}
        self.messages: list[str] = []  # workers' error reports, as they came
        self.reports: list[tuple[int, str]] = []  # the same as (rank, text)
        self._failed: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.woken = threading.Event()  # a worker: rank 0 said "wake" (protocol PARK)
        self._sock: socket.socket | None = None
        self.host = socket.gethostname()
        if self.rank == 0:
            self._serve()
        else:
            self._connect()
        threading.Thread(target=self._beat, name="oss-mlx-heartbeat", daemon=True).start()

    # -- set-up ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        host = rank0_address_from_env() or "127.0.0.1"
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind = "127.0.0.1" if host.startswith("127.") else "0.0.0.0"
        listener.bind((bind, 0))
        listener.listen(self.world)
        token = secrets.token_hex(16)
        port = listener.getsockname()[1]
        self.group.broadcast(encode_text(f"{host} {port} {token}"))
        listener.settimeout(1.0)
        wait = connect_timeout()
        deadline = time.monotonic() + wait
        while len(self.peers) < self.world - 1:
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.world)) - set(self.peers))
                listener.close()
                raise DistributedError(
                    f"rank(s) {missing} did not connect to rank 0's control port {host}:{port} within "
                    f"{wait:.0f} s: is {host} reachable from them (firewall)? Set "
                    "OSS_MLX_CONTROL_HOST to an address of rank 0 they can reach."
                )
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10.0)
            try:
                hello = json.loads(_readline(conn))
            except (OSError, ValueError):
                conn.close()
                continue
            if hello.get("token") != token or not 0 < int(hello.get("rank", 0)) < self.world:
                conn.close()
                continue
            conn.settimeout(None)
            r = int(hello["rank"])
            self.peers[r] = Peer(
                r, str(hello.get("host", "?")), int(hello.get("pid", 0)), conn, time.monotonic()
            )
        listener.close()
        for peer in self.peers.values():
            threading.Thread(
                target=self._read, args=(peer,), name=f"oss-mlx-link-{peer.rank}", daemon=True
            ).start()

    def _connect(self) -> None:
        host, port, token = decode_text(self.group.broadcast(np.zeros(ADDRESS_BYTES, np.int32))).split()
        try:
            sock = socket.create_connection((host, int(port)), timeout=30.0)
        except OSError as e:
            raise DistributedError(
                f"rank {self.rank} cannot reach rank 0's control port {host}:{port} ({e}); set "
                "OSS_MLX_CONTROL_HOST on rank 0 to an address this machine can reach"
            ) from None
        sock.settimeout(None)
        sock.sendall(
            (
                json.dumps({"rank": self.rank, "token": token, "host": self.host, "pid": os.getpid()}) + "\n"
            ).encode()
        )
        self._sock = sock
        self.peers[0] = Peer(0, host, 0, sock, time.monotonic())
        threading.Thread(target=self._read, args=(self.peers[0],), name="oss-mlx-link-0", daemon=True).start()

    # -- running ---------------------------------------------------------------------------------

    def describe(self, rank: int) -> str:
        peer = self.peers.get(rank)
        if rank == 0 and self.rank == 0:
            return f"rank 0 ({self.host}, pid {os.getpid()})"
        return (
            f"rank {rank} ({peer.host}, pid {peer.pid})"
            if peer and peer.pid
            else f"rank {rank} ({peer.host if peer else '?'})"
        )

    def send(self, rank: int, kind: str, text: str = "") -> None:
        peer = self.peers.get(rank)
        if peer is None or peer.closed:
            return
        try:
            with self._lock:
                peer.sock.sendall(f"{kind} {text}".replace("\n", " ").encode() + b"\n")
        except OSError:
            pass  # the reader notices

    def report(self, text: str) -> None:
        """A worker: tell rank 0 what went wrong here (before exiting)."""
        self.send(0, "err", text)

    def fail(self, reason: str) -> None:
        with self._lock:
            if self._failed is not None or self._stopping.is_set():
                return
            self._failed = reason
        self.on_failure(reason)

    @property
    def failed(self) -> str | None:
        return self._failed

    def wake_all(self) -> None:
        """Rank 0: parked workers, back to the collectives."""
        for r in list(self.peers):
            self.send(r, "wake")

    def wait_woken(self) -> None:
        """A worker: wait for rank 0's "wake" (a failure ends the process meanwhile)."""
        self.woken.wait()
        self.woken.clear()

    def abort_all(self, reason: str) -> None:
        """Rank 0: tell every worker to exit now (they may be blocked in a collective)."""
        for r in list(self.peers):
            self.send(r, "abort", reason)

    @staticmethod
    def memory() -> str:
        """'MLX peak bytes, peak RSS bytes' of this process (sent with each heartbeat)."""
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return f"{mx.get_peak_memory()} {rss if sys.platform == 'darwin' else rss * 1024}"

    def closing(self) -> None:
        """A planned end begins: peers that now close their connection are not failures."""
        self._stopping.set()

    def stop(self) -> None:
        """A planned end: no more failures are reported; 'bye', then the connections close."""
        self._stopping.set()
        for peer in self.peers.values():
            self.send(peer.rank, "bye")
            peer.closed = True
            try:
                peer.sock.close()
            except OSError:
                pass

    def _beat(self) -> None:
        while not self._stopping.is_set():
            now = time.monotonic()
            for peer in list(self.peers.values()):
                if peer.closed:
                    continue
                self.send(peer.rank, "hb", f"{self.steps} {self.memory()}")
                if now - peer.last_seen > self.timeout and not self._stopping.is_set():
                    behind = f" at step {peer.steps}" if self.rank == 0 else ""
                    silent = now - peer.last_seen
                    self.fail(
                        f"{self.describe(peer.rank)} has not answered for {silent:.1f} s{behind}: the "
                        "process hangs or the link to it dropped"
                    )
            self._stopping.wait(HEARTBEAT_INTERVAL)

    def _read(self, peer: Peer) -> None:
        buffer = b""
        while True:
            try:
                data = peer.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                peer.closed = True
                if not self._stopping.is_set():
                    last = f" after: {self.messages[-1]}" if self.messages else ""
                    self.fail(
                        f"{self.describe(peer.rank)} closed its connection (the process ended or the link "
                        f"dropped){last}"
                    )
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                kind, _, text = line.decode(errors="replace").partition(" ")
                peer.last_seen = time.monotonic()
                if kind == "hb":
                    fields = [int(v) for v in text.split()]
                    peer.steps = fields[0] if fields else 0
                    if len(fields) >= 3:
                        peer.peak_memory, peer.peak_rss = fields[1], fields[2]
                elif kind == "err":
                    self.messages.append(f"{self.describe(peer.rank)}: {text}")
                    self.reports.append((peer.rank, text))
                    self.fail(self.messages[-1])
                elif kind == "wake":
                    self.woken.set()
                elif kind == "abort":
                    self.fail(f"rank 0 stopped the group: {text}")
                elif kind == "bye":
                    peer.closed = True
                    if self.rank != 0:  # rank 0 is done: a worker's loop ends with the stop command
                        return


def _readline(conn: socket.socket, limit: int = 65536) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk or len(data) > limit:
            raise OSError("connection closed during hello")
        data += chunk
    return data.decode()


def worker_exit(reason: str, code: int = 1) -> None:
    """End a worker at once: its main thread may be blocked in a collective (see the module docstring)."""
    try:
        print(f"oss-mlx worker (pid {os.getpid()}): {reason}; exiting", file=sys.stderr, flush=True)
    finally:
        os._exit(code)
